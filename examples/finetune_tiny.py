"""Fine-tune a tiny CosyVoice3 LLM on synthetic data and watch the loss fall.

    JAX_PLATFORMS=cpu python examples/finetune_tiny.py --steps 300 --out /tmp/finetune_tiny

What it shows, end to end, with the pieces of ``cosyjax.train``:

- ``prepare_llm_batch`` lays out (text, speech) pairs as upstream's ``prepare_lm_input_target``;
- ``llm_loss`` is CosyVoice3LM's training loss; ``make_train_step`` jits one optimizer step with
  upstream's clipping (grad_clip 5) and gradient accumulation (accum_grad 2), optionally with
  bfloat16 compute over float32 master weights (``--bf16``);
- ``save_checkpoint`` writes the train state with orbax (``restore_train_state`` resumes it);
- the loss curve is saved as ``loss.png`` (matplotlib) and ``loss.json``.

The synthetic task is learnable: each example's speech tokens are a fixed function of its text
tokens (every text id maps to two speech ids), drawn from a pool of 64 examples.  The model starts
from random weights at tiny dimensions, so the run takes about a minute on two CPU cores.

With ``--release DIR`` (a CosyVoice3 release directory such as ``tests/data/tiny-a/model``; needs
torch) the script instead converts that release, fine-tunes its LLM, and exports the result with
``cosyjax.convert.export.export_to_dir`` to ``OUT/release``: a directory upstream's PyTorch
``AutoModel`` loads (llm.pt fine-tuned, flow.pt and hift.pt as converted, the rest copied).

The learning rate is a demo setting (AdamW 3e-3 with upstream's WarmupLR); upstream's SFT recipe
is Adam at 1e-5, constant (``make_optimizer()`` defaults), far too slow to show anything in 300 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import LLMConfig
from cosyjax.train.checkpoint import save_checkpoint
from cosyjax.train.losses import llm_loss, prepare_llm_batch
from cosyjax.train.step import TrainState, make_optimizer, make_train_step, random_params


def tiny_config() -> LLMConfig:
    """A small CosyVoice3 LLM: 2 Qwen2 layers of width 64, 64 text ids, 32 speech tokens."""
    return dataclasses.replace(LLMConfig.tiny(), vocab_size=64, speech_token_size=32)


def init_params(cfg: LLMConfig, seed: int) -> dict:
    """Random params for ``cfg`` (``cosyjax.train.step.random_params``)."""
    from cosyjax.llm.qwen2 import param_shapes

    return random_params(param_shapes(cfg), seed)


def synthetic_pool(cfg: LLMConfig, size: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """``size`` (text, speech) pairs; speech = for each text id t: [f(t), g(t)] with fixed random f, g."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, cfg.speech_token_size, (cfg.vocab_size, 2))
    texts = [rng.integers(0, cfg.vocab_size, int(n)).tolist() for n in rng.integers(3, 7, size)]
    speeches = [table[t].reshape(-1).tolist() for t in texts]
    return texts, speeches


def save_plot(losses: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("llm_loss (cross entropy)")
    ax.set_yscale("log")
    ax.set_title("tiny CosyVoice3 LLM on synthetic data")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--out", default="finetune_tiny_out", help="output directory (loss.png, loss.json, "
                        "checkpoints/, release/)")
    parser.add_argument("--batch", type=int, default=8, help="rows per optimizer step (default 8)")
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation steps (upstream accum_grad: 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=30, help="WarmupLR warm-up steps (default 30)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--release", default=None, help="fine-tune this release's LLM and export it (needs torch)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    converted = None
    if args.release:
        from cosyjax.convert import convert_model

        converted = convert_model(args.release, progress=False)
        cfg, params = converted.config.llm, converted.params["llm"]
    else:
        cfg = tiny_config()
        params = init_params(cfg, args.seed)

    texts, speeches = synthetic_pool(cfg, 64, args.seed)
    longest = max(1 + len(t) + 1 + len(s) for t, s in zip(texts, speeches))  # sos, text, task_id, speech
    optimizer = make_optimizer(optim="adamw", lr=args.lr, scheduler="warmuplr", warmup_steps=args.warmup)
    step = make_train_step(lambda p, b, r: llm_loss(p, b, cfg=cfg), optimizer, accum_steps=args.accum,
                           compute_dtype=jnp.bfloat16 if args.bf16 else None, weight_key="num_tokens")
    state = TrainState.create(params, optimizer, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    losses = []
    start = time.time()
    for k in range(args.steps):
        rows = rng.choice(len(texts), args.batch, replace=False)
        batch = prepare_llm_batch(cfg, [texts[i] for i in rows], [speeches[i] for i in rows], pad_to=longest)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if k == 0 or (k + 1) % 50 == 0 or k + 1 == args.steps:
            print(f"step {k + 1:4d}  loss {losses[-1]:.4f}  acc {float(metrics['acc']):.3f}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}  lr {float(metrics['lr']):.2e}  "
                  f"({time.time() - start:.1f} s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    ckpt = save_checkpoint(os.path.join(args.out, "checkpoints"), state,
                           metadata={"example": "finetune_tiny", "steps": args.steps,
                                     "llm_config": dataclasses.asdict(cfg)})
    plot = os.path.join(args.out, "loss.png")
    save_plot(losses, plot)
    with open(os.path.join(args.out, "loss.json"), "w", encoding="utf-8") as f:
        json.dump({"loss": losses}, f)
    result = {"first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])), "plot": plot, "checkpoint": ckpt,
              "seconds": time.time() - start}
    if converted is not None:
        from cosyjax.convert.export import export_to_dir

        tuned = dataclasses.replace(converted, params={**converted.params, "llm": jax.device_get(state.params)})
        result["release"] = export_to_dir(tuned, os.path.join(args.out, "release"), template_dir=args.release,
                                          overwrite=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
