"""hift stage."""
