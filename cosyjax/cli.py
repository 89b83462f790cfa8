"""``cosyjax`` command line: thin argument parsing over the library.

Commands:
  cosyjax convert --model-dir M --out O [--dtype float32|bfloat16] [--overwrite]
  cosyjax parity check --case DIR --out REPORT_DIR [--stages llm,flow,hift]
  cosyjax parity make-case --reference-repo PATH --config CONFIG.yaml --seed N --out DIR
  cosyjax parity live --reference-repo PATH --model-dir M --out REPORT_DIR
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXAMPLES = """examples:
  cosyjax convert --model-dir pretrained_models/Fun-CosyVoice3-0.5B --out converted/cv3
  cosyjax parity check --case tests/data/tiny-a --out /tmp/report --stages hift
  cosyjax parity make-case --reference-repo ~/src/CosyVoice --config tests/data/configs/tiny-b.yaml \\
      --seed 0 --out /tmp/tiny-b
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: reported as one line, no traceback."""
    from cosyjax.checkpoint import CheckpointError
    from cosyjax.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, FileNotFoundError]
    try:  # these packages need torch; without it the commands that use them fail earlier
        from cosyjax.convert.common import ConversionError
        from cosyjax.parity.case import CaseError
        from cosyjax.parity.check import CheckError

        errors += [ConversionError, CaseError, CheckError]
    except ImportError:
        pass
    return tuple(errors)


def _cmd_convert(args: argparse.Namespace) -> int:
    from cosyjax.convert import convert_to_dir

    out = convert_to_dir(args.model_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                         progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _print_summary(report: dict) -> None:
    for g in report["groups"]:
        print(f"  {g['group']:22s} {g['status']:16s} max_abs_err={g['max_abs_err']} min_snr_db={g['min_snr_db']}")
    print("PASSED" if report["passed"] else "FAILED")


def _stages(text: str | None) -> list[str] | None:
    return None if text is None else [s for s in text.split(",") if s.strip()]


def _cmd_check(args: argparse.Namespace) -> int:
    from cosyjax.parity.check import run_check

    report = run_check(args.case, args.out, stages=_stages(args.stages), dtype=args.dtype,
                       overwrite=args.overwrite, progress=not args.quiet)
    _print_summary(report)
    print(f"report: {args.out}/report.json, {args.out}/report.html, {args.out}/outputs.npz")
    return 0 if report["passed"] else 1


def _cmd_make_case(args: argparse.Namespace) -> int:
    from cosyjax.parity.make_case import make_case

    out = make_case(args.reference_repo, args.config, args.seed, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_live(args: argparse.Namespace) -> int:
    from cosyjax.parity.live import run_live

    report = run_live(args.reference_repo, args.model_dir, args.out, stages=_stages(args.stages),
                      seed=args.seed, overwrite=args.overwrite)
    _print_summary(report)
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyjax", description="CosyVoice3 in JAX/Flax.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a release directory (PyTorch .pt) to a JAX checkpoint",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="release directory (cosyvoice3.yaml, llm.pt, flow.pt, hift.pt)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    parity = sub.add_parser("parity", help="parity harness against the upstream PyTorch reference")
    psub = parity.add_subparsers(dest="parity_command", required=True)

    p = psub.add_parser("check", help="check cosyjax stages against a reference case")
    p.add_argument("--case", required=True, help="case directory (shared/golden/FORMAT.md layout)")
    p.add_argument("--out", required=True, help="report directory (report.json, report.html, outputs.npz)")
    p.add_argument("--stages", help="comma-separated stages or groups (default: all the case holds)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_check)

    p = psub.add_parser("make-case", help="make a reference case from an upstream CosyVoice checkout")
    p.add_argument("--reference-repo", required=True, help="source checkout of FunAudioLLM/CosyVoice")
    p.add_argument("--config", required=True, help="case config yaml (sizes, lengths); see tests/data/configs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_make_case)

    p = psub.add_parser("live", help="compare against upstream running live on a real release directory")
    p.add_argument("--reference-repo", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stages")
    p.add_argument("--seed", type=int, default=0, help="seed for the random test inputs")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_live)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"cosyjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
