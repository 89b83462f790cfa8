"""Training for research: upstream-matching losses, jitted/data-parallel train steps, checkpoints."""
