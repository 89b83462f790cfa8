"""``cosyjax parity live``: the parity check on a real release directory, with upstream running live.

Upstream's modules are built from the release's own ``cosyvoice3.yaml`` and loaded with its
``llm.pt``/``flow.pt``/``hift.pt`` exactly as ``CosyVoiceModel.load`` does; seeded random test
inputs (token ids, a log-mel-like prompt, a speaker embedding) go through every stage group of the
case format, captured by the same code ``make-case`` uses.  The captured case (arrays, plus a
``model`` link to the release directory) is then checked with ``run_check`` like any other case.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable

import numpy as np

from cosyjax.config import load_model_config
from cosyjax.parity.check import run_check

# Input lengths of the live case: long enough to exercise RoPE and the streaming chunk masks.
LIVE_LENGTHS = {"prompt_text_len": 12, "text_len": 16, "prompt_speech_len": 40, "speech_len": 60,
                "hift_mel_len": 120}


def capture_live_case(reference_repo: str, model_dir: str, case_dir: str, *, seed: int = 0) -> str:
    """Run upstream on ``model_dir``'s real weights and write a case (arrays + a link to the release)."""
    from cosyjax.parity.reference.capture import torch_reference_mode
    from cosyjax.parity.reference.make import case_inputs, run_all
    from cosyjax.parity.reference.release import build_models, load_weights
    from cosyjax.parity.upstream import import_upstream

    info = import_upstream(reference_repo)
    cfg = load_model_config(model_dir)
    case_cfg = {"case": dict(LIVE_LENGTHS), "qwen": {"vocab_size": cfg.llm.vocab_size},
                "speech_token_size": cfg.llm.speech_token_size, "spk_embed_dim": cfg.flow.spk_embed_dim}
    with torch_reference_mode():
        models = build_models(model_dir)
        load_weights(models, model_dir)
        inputs = case_inputs(case_cfg, seed)
        golden, run_info = run_all(models, inputs, LIVE_LENGTHS["hift_mel_len"])
    os.makedirs(case_dir)
    os.symlink(os.path.abspath(model_dir), os.path.join(case_dir, "model"))
    np.savez(os.path.join(case_dir, "golden.npz"), **golden.arrays)
    with open(os.path.join(case_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(golden.manifest(), f, indent=1)
    meta = {"config_name": f"live:{os.path.basename(os.path.abspath(model_dir))}", "seed": seed,
            "upstream_commit": info.commit or os.environ.get("COSYJAX_REFERENCE_COMMIT", "unknown"),
            "lengths": LIVE_LENGTHS, "stand_ins": info.stand_ins,
            "llm_greedy": {k: run_info["llm_greedy"].get(k) for k in ("n_tokens", "stopped_by_token", "stop_token")}}
    with open(os.path.join(case_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)
    return case_dir


def run_live(reference_repo: str, model_dir: str, out_dir: str, *, stages: Iterable[str] | None = None,
             seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Capture a live case from upstream on ``model_dir`` and check cosyjax against it.

    The captured arrays are kept next to the report as ``out_dir/live-case.npz`` for re-checking.
    """
    from cosyjax.parity.check import CheckError

    if os.path.exists(out_dir) and not overwrite:
        raise CheckError(f"{out_dir}: output exists (pass --overwrite to replace it)")
    scratch = tempfile.mkdtemp(prefix="cosyjax-live-")
    try:
        case_dir = capture_live_case(reference_repo, model_dir, os.path.join(scratch, "case"), seed=seed)
        report = run_check(case_dir, out_dir, stages=stages, overwrite=overwrite)
        shutil.copy(os.path.join(case_dir, "golden.npz"), os.path.join(out_dir, "live-case.npz"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report
