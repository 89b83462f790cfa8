"""Fine-tune the tiny release end to end on a synthetic dataset in upstream's format, with ``cosyjax train``.

    JAX_PLATFORMS=cpu python examples/finetune_synthetic.py --out /tmp/finetune_synthetic [--reference-repo PATH]

Steps, each one a command a user would run:

1. ``tools/make_synthetic_dataset.py``: a train and a dev set (parquet shards + data.list, the columns of
   upstream's ``tools/make_parquet_list.py``) for ``tests/data/tiny-release``;
2. ``cosyjax train --model llm`` for 30 steps, checkpointing at 15 (eval loss on the dev set), and the
   same run stopped at 15 and resumed: the step-30 losses are identical;
3. ``cosyjax train --model flow --lora 8``: LoRA on the DiT, exported with the adapters merged into the
   kernels (``OUT/flow-lora/export``, a release directory);
4. the export read back by our converter (and, with ``--reference-repo``, built by upstream's
   ``load_hyperpyyaml`` and loaded with its strict ``load_state_dict``).

Each run directory holds metrics.jsonl, tensorboard/, loss.png, checkpoints/ and run.json.  The
training settings are examples/conf/tiny_train.yaml (a demo learning rate; the rest upstream's).
About a minute per run on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RELEASE = os.path.join(REPO, "tests", "data", "tiny-release")
CONF = os.path.join(HERE, "conf", "tiny_train.yaml")


def sh(*args: str) -> str:
    """Run a command, echoing it; returns its last stdout line (the commands print a JSON summary)."""
    print("$", " ".join(args), flush=True)
    done = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip().splitlines()[-1]


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="finetune_synthetic_out", help="output directory")
    parser.add_argument("--reference-repo", default=None, help="upstream CosyVoice checkout: load the export there")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    data = {}
    for split, utts, shards, seed in (("train", 48, 4, 0), ("dev", 8, 1, 1)):
        data[split] = sh(py, os.path.join(REPO, "tools", "make_synthetic_dataset.py"), "--release", RELEASE, "--out",
                         os.path.join(out, "data", split), "--num-utts", str(utts), "--num-shards", str(shards),
                         "--seed", str(seed), "--overwrite")
    common = ["--config", CONF, "--data", data["train"], "--cv-data", data["dev"], "--init", RELEASE,
              "--max-frames-in-batch", "320", "--min-rows-bucket", "4", "--log-every", "1", "--eval-every", "15",
              "--save-every", "15"]
    train = [py, "-m", "cosyjax.cli", "train"]

    llm = os.path.join(out, "llm")
    sh(*train, *common, "--model", "llm", "--out", llm, "--max-steps", "30", "--min-length-bucket", "128",
       "--no-export")
    resumed = os.path.join(out, "llm-resumed")
    for steps in ("15", "30"):  # stop at 15, then the same command with more steps resumes
        sh(*train, *common, "--model", "llm", "--out", resumed, "--max-steps", steps, "--min-length-bucket", "128",
           "--no-export")
    a, b = losses(llm), losses(resumed)
    print(f"llm: loss {a[1]:.3f} -> {a[30]:.3f}; resumed at 15, step-30 loss {b[30]:.6f} vs {a[30]:.6f} "
          f"({'identical' if a[30] == b[30] else 'DIFFERENT'})")

    flow = os.path.join(out, "flow-lora")
    summary = json.loads(sh(*train, *common, "--model", "flow", "--lora", "8", "--lora-alpha", "16", "--out", flow,
                            "--max-steps", "30", "--min-length-bucket", "64"))
    c = losses(flow)
    print(f"flow LoRA: loss {c[1]:.3f} -> {c[30]:.3f}; export {summary['export']}")

    from cosyjax.convert import convert_model

    exported = convert_model(summary["export"], progress=False)
    print("export converts back:", sorted(exported.params))
    if args.reference_repo:
        from cosyjax.parity.reference.release import build_models, load_weights
        from cosyjax.parity.upstream import import_upstream

        import_upstream(args.reference_repo)
        models = build_models(summary["export"])
        load_weights(models, summary["export"])  # strict, as upstream's CosyVoiceModel.load
        print("upstream loads the export strictly")
    result = {"llm_first": a[1], "llm_last": a[30], "resume_identical": a[30] == b[30], "flow_lora_first": c[1],
              "flow_lora_last": c[30], "export": summary["export"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["resume_identical"] else 1)
