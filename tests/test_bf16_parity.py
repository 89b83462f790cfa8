"""``cosyjax parity check --dtype bfloat16`` on tiny-b: bf16 *compute* on every stage (LLM, flow, HiFT) against
upstream's float32 reference, to the accelerator issue's targets (``cosyjax.parity.bf16``): teacher-forced greedy
token agreement >= 99 %, mel (and every float intermediate) SNR >= 30 dB, audio SNR >= 20 dB.

The end-to-end groups (``tts``, ``tts_stream``) are checked link by link, teacher-forced at the flow's output
(``cosyjax.parity.stages.tts``): their free-running audio misses the audio target on this random-weight case
whatever the flow's bf16 compute does (the chain's conditioning, reported with the group; parity/TOLERANCES.md).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from cosyjax.convert import convert_model
from cosyjax.parity import bf16
from cosyjax.parity.check import run_check

from conftest import DATA

CASE = os.path.join(DATA, "tiny-b")
STAGE_GROUPS = ("llm", "llm_greedy", "flow", "flow_stream", "flow_stream_partial", "hift", "hift_partial")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_check(CASE, str(tmp_path_factory.mktemp("bf16") / "report"), dtype="bfloat16", progress=False)


def _group(report, name):
    return next(g for g in report["groups"] if g["group"] == name)


def _snr(report, group):
    return {c["key"].split("/", 1)[1]: c["snr_db"] for c in _group(report, group)["comparisons"]
            if c.get("snr_db") is not None}


def test_every_stage_meets_the_bf16_targets(report):
    assert report["dtype"] == "bfloat16"
    for name in STAGE_GROUPS:
        group = _group(report, name)
        assert group["status"] == "pass", (name, [c for c in group["comparisons"] if not c["passed"]])
    agreement = next(c for c in _group(report, "llm")["comparisons"] if c["key"].endswith("#greedy_agreement"))
    assert agreement["passed"] and 1.0 - agreement["max_abs"] >= bf16.TOKEN_AGREEMENT
    for name in ("flow", "flow_stream", "flow_stream_partial"):
        snr = _snr(report, name)
        assert snr["mel"] >= bf16.SNR_DB and min(snr.values()) >= bf16.SNR_DB, (name, snr)
    for name in ("hift", "hift_partial"):
        snr = _snr(report, name)
        assert min(snr["audio"], snr["conv_post"]) >= bf16.AUDIO_SNR_DB, (name, snr)
        assert min(snr["f0"], snr["source"]) >= bf16.SNR_DB, (name, snr)
    for name in ("llm", "llm_greedy"):
        assert min(_snr(report, name).values()) >= bf16.SNR_DB


def test_end_to_end_chain_link_by_link(report):
    """tts / tts_stream: the bf16 vocoder inside the chain (speed, stream caches, the second request's stale
    hop) on the teacher-forced flow's mel at the audio target; the bf16 flow inside the chain at the mel
    target; integer outputs exact; the free-running audio and the chain's conditioning reported."""
    for name in ("tts", "tts_stream"):
        group = _group(report, name)
        assert group["status"] == "pass", (name, [c for c in group["comparisons"] if not c["passed"]])
        keys = {c["key"]: c for c in group["comparisons"]}
        audio = ("audio", "audio_speed") if name == "tts" else ("audio", "audio_2")
        mels = ("mel", "mel_speed") if name == "tts" else ("mel", "mel_2")
        for a in audio:
            c = keys[f"{name}/{a}#teacher_forced_flow"]
            assert c["snr_db"] >= bf16.AUDIO_SNR_DB and c["snr_min"] == bf16.AUDIO_SNR_DB
            assert f"{name}/{a}: all-bf16 chain (free-running) SNR " in group["message"]
            assert "bf16-stored flow weights SNR " in group["message"]
        for m in mels:
            c = keys[f"{name}/{m}#bf16_flow"]
            assert c["snr_db"] >= bf16.SNR_DB and c["snr_min"] == bf16.SNR_DB
        integers = ("chunk_lengths", "flow_tokens") if name == "tts" else (
            "token_hop_len", "chunk_lengths", "flow_calls", "chunk_lengths_2", "flow_calls_2")
        for k in integers:
            assert keys[f"{name}/{k}"]["atol"] == 0.0


def test_teacher_forced_flow_is_float32_and_the_rest_bf16():
    """The teacher-forced chain swaps only the flow: float32 weights and compute; LLM/vocoder stay bf16."""
    model = convert_model(os.path.join(CASE, "model"), dtype="bfloat16", progress=False)
    forced, policy = bf16.teacher_forced_flow(model, os.path.join(CASE, "model"))
    assert policy.flow.compute == "float32" and policy.llm.compute == policy.hift.compute == "bfloat16"
    assert not policy.f0_float64
    assert forced.params["hift"] is model.params["hift"] and forced.params["llm"] is model.params["llm"]
    leaves = [a for a in jax.tree.leaves(forced.params["flow"]) if hasattr(a, "dtype")]
    assert leaves and all(str(a.dtype) != "bfloat16" for a in leaves)
    stored = bf16.bf16_stored_flow(model, os.path.join(CASE, "model"))
    assert stored.params["flow"] is model.params["flow"] and stored.dtype == "float32"


def test_agreement_holds_decidable_steps_and_reports_near_ties():
    """``compare_agreement``: a flip inside the bf16 error of a near-tied step is reported, not held; a flip
    of a step whose margin bf16 cannot cross fails; a wrong row cannot make its own step a tie."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 50))
    ref[:, 7] = ref.max(-1) + 1.0  # every step decided by a margin of 1 ...
    ref[:3, 8] = ref[:3, 7] - 1e-3  # ... but three near-ties
    ours = ref + 1e-3 * rng.normal(size=ref.shape)  # bf16-sized error (about 60 dB)
    ours[:3, 8] = ours[:3, 7] + 1e-3  # the near-ties flip
    c = bf16.compare_agreement("k", ours, ref)
    assert c.passed and c.max_abs == 0.0 and "3 near-tie row(s)" in c.message and "3 of them flipped" in c.message
    assert "98.50% of 200" in c.message  # the raw agreement, reported
    flipped = ours.copy()
    flipped[10:13, 3] = flipped[10:13, 7] + 1.0  # three decided steps flip: 197 / 200 < 99 %
    assert not bf16.compare_agreement("k", flipped, ref).passed
    wrong = ours.copy()
    wrong[20:23] = rng.normal(size=(3, 50)) * 100.0  # rows of garbage: their error is capped, their flips held
    assert not bf16.compare_agreement("k", wrong, ref).passed
