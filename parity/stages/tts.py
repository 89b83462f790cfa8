"""Parity of the orchestration (``cosyjax.model.CosyVoice3Model.tts``): groups ``tts``, ``tts_stream``.

The reference is upstream ``CosyVoice3Model.tts`` (cosyvoice/cli/model.py) on the case's three
stages with the LLM output forced to ``tts/llm_tokens`` (see ``cosyjax.parity.reference.tts``); we pass
the same ids as ``forced_tokens``, so the silent-token filter, the hop schedule, the flow calls, the
mel accumulation and the HiFT calls are what is checked.  The HiFT source noise is the case's
(``tts/noise_rand_ini``; ``hift/noise_sine_waves`` followed by ``tts/noise_sine_waves_tail``).

tts:         flow_tokens (exact), audio + chunk_lengths (stream=False), audio_speed (speed != 1).
tts_stream:  token_hop_len (our config-derived base hop, exact); for the first stream request on a
             fresh model and the second one on the same model (upstream's never-reset hop):
             flow_calls (exact: target tokens, streaming, finalize per flow call), chunk_lengths
             (exact), audio.  Inputs come from the ``tts`` group.
"""

from __future__ import annotations

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.hift.source import HiftNoise
from cosyjax.model import CosyVoice3Model
from cosyjax.parity.case import Case
from cosyjax.parity.compare import compare_close, compare_equal
from cosyjax.parity.stages import GroupResult

# Max abs error of the waveform, float32 CPU.  The chain is flow (10 Euler steps, ~1e-5 on mel)
# then HiFT, whose NSF phase accumulates f0 over all samples; the stage groups measure audio at
# ~1e-6.  The SNR floor is the orchestration target (>= 50 dB; measured far above it).
TOLERANCES = {
    "float32": {"audio": 1e-4, "snr_db": 50.0},
    # bf16 weights: LLM output is forced, so only the flow/HiFT weight rounding shows.  Measured on
    # tiny-b: max abs 0.102, SNR >= 13.7 dB.  The bf16 flow's mel error (~7e-2) moves the HiFT f0,
    # whose phase integrates over every sample, so waveform SNR is low although the spectra agree.
    "bfloat16": {"audio": 0.2, "snr_db": 10.0},
}


def _model(case: Case, model: ConvertedModel) -> CosyVoice3Model:
    ref = case.group("tts")
    sine = np.concatenate([case.arrays["hift/noise_sine_waves"], ref["noise_sine_waves_tail"]], axis=1)
    noise = HiftNoise(np.asarray(ref["noise_rand_ini"], np.float32), np.asarray(sine, np.float32))
    return CosyVoice3Model(model, hift_noise=noise, upstream_hop_quirk=True)


def _inputs(case: Case) -> dict:
    ref = case.group("tts")
    return dict(text_ids=ref["text"], prompt_text_ids=ref["prompt_text"],
                llm_prompt_speech_tokens=ref["llm_prompt_speech_token"],
                flow_prompt_speech_tokens=ref["flow_prompt_speech_token"], prompt_feat=ref["prompt_speech_feat"][0],
                embedding=ref["flow_embedding"][0], forced_tokens=ref["llm_tokens"])


def _run(m: CosyVoice3Model, inputs: dict, **kwargs) -> tuple[np.ndarray, np.ndarray, dict]:
    chunks = [c["tts_speech"] for c in m.tts(**inputs, **kwargs)]
    return (np.concatenate(chunks, axis=1), np.asarray([c.shape[1] for c in chunks], np.int64), m.last_trace)


def run(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Run one tts group of ``case`` through ``CosyVoice3Model`` and compare with upstream's yields."""
    dtype = "bfloat16" if model.dtype == "bfloat16" else "float32"
    tol = TOLERANCES[dtype]
    ref = case.group(group)
    m = _model(case, model)
    inputs = _inputs(case)
    out: dict[str, np.ndarray] = {}
    comparisons = []

    def close(name):
        comparisons.append(compare_close(f"{group}/{name}", out[name], ref[name], tol["audio"],
                                         snr_min=tol["snr_db"]))

    def equal(name):
        comparisons.append(compare_equal(f"{group}/{name}", out[name], ref[name]))

    if group == "tts":
        out["audio"], out["chunk_lengths"], trace = _run(m, inputs)
        out["flow_tokens"] = trace["flow_tokens"][None]
        out["audio_speed"], _, _ = _run(m, inputs, speed=float(ref["speed"]))
        equal("flow_tokens")
        equal("chunk_lengths")
        close("audio")
        close("audio_speed")
        plots = [("tts waveform (stream=False)", "tts/audio"), ("tts waveform, speed", "tts/audio_speed")]
    else:
        out["token_hop_len"] = np.int64(m.schedule.base)
        equal("token_hop_len")
        for suffix in ("", "_2"):  # the same model instance: the second request sees the stale hop
            audio, lengths, trace = _run(m, inputs, stream=True)
            out[f"audio{suffix}"], out[f"chunk_lengths{suffix}"] = audio, lengths
            out[f"flow_calls{suffix}"] = trace["flow_calls"]
            equal(f"flow_calls{suffix}")
            equal(f"chunk_lengths{suffix}")
            close(f"audio{suffix}")
        plots = [("tts_stream waveform, first request", "tts_stream/audio"),
                 ("tts_stream waveform, second request (stale hop)", "tts_stream/audio_2")]
    return GroupResult(outputs={f"{group}/{k}": v for k, v in out.items()}, comparisons=comparisons, plots=plots)


RUNNERS = {"tts": run, "tts_stream": run}
