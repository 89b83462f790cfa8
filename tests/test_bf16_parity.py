"""``cosyjax parity check --dtype bfloat16`` on tiny-b: bf16 *compute* on every stage (LLM, flow, HiFT) against
upstream's float32 reference, to the accelerator issue's targets (``cosyjax.parity.bf16``): teacher-forced greedy
token agreement >= 99 %, mel (and every float intermediate) SNR >= 30 dB, audio SNR >= 20 dB.

The end-to-end groups (``tts``, ``tts_stream``: flow then vocoder on the flow's own mel) miss the audio target on
this random-weight case, before and after HiFT ran in bf16: see ``test_end_to_end_audio_target``.
"""

from __future__ import annotations

import os

import pytest

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
        assert snr["audio"] >= bf16.AUDIO_SNR_DB, (name, snr)
        assert min(snr["f0"], snr["source"], snr["conv_post"]) >= bf16.SNR_DB, (name, snr)
    for name in ("llm", "llm_greedy"):
        assert min(_snr(report, name).values()) >= bf16.SNR_DB


@pytest.mark.xfail(strict=True, reason="known gap, measured 12.0 dB before and after HiFT ran in bf16: the bf16 "
                   "flow alone (float32 LLM and HiFT) gives 12.1 dB, its 49.6 dB mel error amplified by tiny-b's "
                   "random-weight f0 net and the NSF phase (source SNR 15.9 dB); parity/TOLERANCES.md")
def test_end_to_end_audio_target(report):
    for name in ("tts", "tts_stream"):
        snr = _snr(report, name)
        assert min(snr.values()) >= bf16.AUDIO_SNR_DB, (name, snr)
