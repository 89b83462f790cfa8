"""cosyjax benchmarks: one entry point, ``python -m benchmarks`` (run from the repo root).

Full-size models from the release config dims (``tests/data/full-size-manifest.json``) with random
weights, float32; per stage and end to end; warm-up (compile) reported apart from the timed calls;
with ``--reference-repo`` the same weights also run through upstream's PyTorch modules in the same
process, and each row gets the ratio cosyjax / upstream.  See ``benchmarks/cli.py`` for the options
and the module docstrings of ``llm``, ``flow``, ``hift`` and ``e2e`` for what each row times.

    python -m benchmarks --all --reference-repo /path/to/CosyVoice --json out.json --markdown out.md
    python -m benchmarks --stages flow,hift --seconds 5
    python -m benchmarks --quick            # tiny dims: a smoke test of the whole entry
"""

from benchmarks.workload import STAGES

__all__ = ["STAGES"]
