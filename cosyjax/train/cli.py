"""``cosyjax train``: argument parsing over ``cosyjax.train.run`` (registered by ``cosyjax.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXAMPLES = """examples:
  python tools/make_synthetic_dataset.py --release tests/data/tiny-release --out /tmp/synth/train
  cosyjax train --config tests/data/tiny-release/cosyvoice3.yaml --data /tmp/synth/train/data.list \\
      --model llm --init tests/data/tiny-release --out /tmp/run-llm --max-steps 30
  cosyjax train ... --model flow --lora 8 --out /tmp/run-flow-lora
  cosyjax train ... --model llm --dpo --ref tests/data/tiny-release --out /tmp/run-dpo
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$RANK cosyjax train ...   (each host)
"""


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``cosyjax``'s subparsers."""
    p = sub.add_parser("train", help="train the LLM or the flow on upstream's parquet data (full, LoRA, DPO)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="upstream yaml: train_conf and the data pipeline (a release's inference yaml works: "
                        "upstream's cosyvoice3.yaml values are then used, and logged)")
    p.add_argument("--data", required=True, help="data.list of parquet shards (upstream's make_parquet_list.py)")
    p.add_argument("--cv-data", default=None, help="held-out data.list: eval loss at --eval-every and at the end")
    p.add_argument("--model", required=True, choices=["llm", "flow"])
    p.add_argument("--out", required=True, help="run directory (resumed from its newest checkpoint when it has one)")
    p.add_argument("--init", default=None, help="release or converted directory to start from (default: random)")
    p.add_argument("--tokenizer", default=None, help="CosyVoice-BlankEN directory (default: --init's or --config's)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    p.add_argument("--max-epochs", type=int, default=None, help="default: train_conf max_epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="activations and weights in the step (float32 masters always); auto: bfloat16 on "
                        "accelerators, float32 on CPU")
    p.add_argument("--lora", type=int, default=None, metavar="RANK", help="train LoRA adapters of this rank only")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank; default alpha = rank)")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated module names (default: the attention and MLP projections)")
    p.add_argument("--dpo", action="store_true", help="DPO (needs reject_speech_token in the data and --ref)")
    p.add_argument("--ref", default=None, help="DPO reference model: release or converted dir, or an llm.pt in one")
    p.add_argument("--dpo-mask", default="target", choices=["target", "upstream"],
                   help="positions of the sequence log-prob: the targets (default) or upstream's IGNORE_ID ones")
    p.add_argument("--dpo-beta", type=float, default=0.01, help="DPOLoss beta (upstream 0.01)")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps (default: train_conf save_per_step; -1 there: every epoch)")
    p.add_argument("--keep", type=int, default=5, help="checkpoints kept (newest); 0 keeps all")
    p.add_argument("--log-every", type=int, default=None, help="default: train_conf log_interval")
    p.add_argument("--eval-every", type=int, default=None, help="eval loss every N steps (and at the end)")
    p.add_argument("--average", type=int, default=0, metavar="N",
                   help="export the mean of N checkpoints (upstream's average_model.py)")
    p.add_argument("--average-by", default="eval_loss", choices=["eval_loss", "latest"],
                   help="which N: lowest eval loss (--val_best) or the newest")
    p.add_argument("--no-export", action="store_true", help="skip the export to upstream .pt files")
    p.add_argument("--max-frames-in-batch", type=int, default=None,
                   help="override the yaml's batch.max_frames_in_batch")
    p.add_argument("--min-length-bucket", type=int, default=None,
                   help="pad every batch to at least this length (LLM positions, flow tokens): fewer compiles")
    p.add_argument("--min-rows-bucket", type=int, default=None,
                   help="pad every batch to at least this many rows (a short last batch then reuses the step)")
    p.add_argument("--data-ranks", type=int, default=None,
                   help="data shards split over this many ranks (default: the process count)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=_cmd_train)
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from cosyjax.train.run import RunOptions, run

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logger = logging.getLogger("cosyjax")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # ours only: orbax/absl stay at their own levels
    logger.propagate = False
    options = RunOptions(
        config=args.config, data=args.data, model=args.model, out=args.out, init=args.init, cv_data=args.cv_data,
        tokenizer=args.tokenizer, max_steps=args.max_steps, max_epochs=args.max_epochs, seed=args.seed,
        compute_dtype=args.compute_dtype, lora_rank=args.lora, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else None,
        dpo=args.dpo, ref=args.ref, dpo_mask=args.dpo_mask, dpo_beta=args.dpo_beta, save_every=args.save_every,
        keep=args.keep or None, log_every=args.log_every, eval_every=args.eval_every, average=args.average,
        average_by=args.average_by, export=not args.no_export, data_ranks=args.data_ranks,
        max_frames_in_batch=args.max_frames_in_batch, min_length_bucket=args.min_length_bucket,
        min_rows_bucket=args.min_rows_bucket)
    summary = run(options, coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    print(json.dumps(summary))
    return 0
