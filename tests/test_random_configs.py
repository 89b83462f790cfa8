"""The parity tolerances hold on configs this repo has never seen (upstream-marked).

``cosyjax.parity.random_config.random_case_config(seed)`` draws dims a fitted tolerance would not
survive (wide HiFT, deep/wide DiT, GQA ratios 1-8, tied and untied Qwen heads, prompt and target
lengths up to a few hundred tokens); for each seed the case is made by upstream (``make_case``) and
checked with ``cosyjax parity check``, in float32 and in bfloat16: every group must pass.  Needs
COSYJAX_REFERENCE_REPO (an upstream CosyVoice checkout); each case takes about a minute to make, two to check
in float32 and one or two in bfloat16 on 2 cores.
"""

from __future__ import annotations

import os

import pytest
import yaml

from cosyjax.parity.random_config import random_case_config

# Six short-range draws and two from the long end of the length ranges.
SEEDS = [(s, False) for s in (101, 102, 103, 104, 105, 106)] + [(201, True), (202, True)]


@pytest.mark.upstream
@pytest.mark.parametrize("seed,long", SEEDS, ids=[f"{s}{'-long' if lg else ''}" for s, lg in SEEDS])
def test_random_config_passes_every_group(seed, long, tmp_path):
    repo = os.environ.get("COSYJAX_REFERENCE_REPO")
    if not repo:
        pytest.skip("COSYJAX_REFERENCE_REPO is not set (an upstream CosyVoice checkout)")
    from cosyjax.parity.check import run_check
    from cosyjax.parity.make_case import make_case

    cfg = random_case_config(seed, long=long)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    case = make_case(repo, str(path), seed, str(tmp_path / "case"), progress=False)
    for dtype in ("float32", "bfloat16"):  # float32: the error model; bfloat16: the bf16 targets (parity/bf16.py)
        report = run_check(case, str(tmp_path / f"report-{dtype}"), progress=False, plots=False, dtype=dtype)
        failed = [f"{g['group']}: {g['status']} {g['message'][:300]} "
                  + "; ".join(f"{c['key']} max_abs={c['max_abs']} tol={c['atol']} snr={c['snr_db']} {c['message']}"
                              for c in g["comparisons"] if not c["passed"])
                  for g in report["groups"] if g["status"] != "pass"]
        assert not failed, f"{dtype} {cfg}\n" + "\n".join(failed)
        assert {g["group"] for g in report["groups"]} >= {"llm", "llm_greedy", "flow", "flow_stream", "hift",
                                                           "hift_partial", "tts", "tts_stream"}


def test_random_configs_are_valid_and_differ():
    """The drawn configs pass make_case's own validation and cover the ranges the module names."""
    from cosyjax.parity.make_case import load_case_config

    import tempfile

    drawn = [random_case_config(s, long=lg) for s, lg in SEEDS]
    with tempfile.TemporaryDirectory() as d:
        for i, cfg in enumerate(drawn):
            p = os.path.join(d, f"{i}.yaml")
            with open(p, "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg, f)
            load_case_config(p)  # raises on an invalid draw
    ratios = {c["qwen"]["num_attention_heads"] // c["qwen"]["num_key_value_heads"] for c in drawn}
    assert len(ratios) >= 3 and len({c["qwen"]["tie_word_embeddings"] for c in drawn}) == 2
    assert len({c["hift_base_channels"] for c in drawn}) >= 4 and len({c["dit"]["depth"] for c in drawn}) >= 3
    assert max(c["case"]["prompt_speech_len"] for c in drawn) >= 150
