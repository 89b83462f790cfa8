"""Parity of the orchestration (``cosyjax.model.CosyVoice3Model.tts``): groups ``tts``, ``tts_stream``.

The reference is upstream ``CosyVoice3Model.tts`` (cosyvoice/cli/model.py) on the case's three
stages with the LLM output forced to ``tts/llm_tokens`` (see ``cosyjax.parity.reference.tts``); we pass
the same ids as ``forced_tokens``, so the silent-token filter, the hop schedule, the flow calls, the
mel accumulation and the HiFT calls are what is checked.  The HiFT source noise is the case's
(``tts/noise_rand_ini``; ``hift/noise_sine_waves`` followed by ``tts/noise_sine_waves_tail``).

tts:         flow_tokens (exact), audio + chunk_lengths (stream=False), audio_speed (speed != 1).
tts_stream:  token_hop_len (our config-derived base hop, exact); for two stream requests that share
             one ``HopState`` (upstream's never-reset hop: the second starts where the first
             stopped): flow_calls (exact: target tokens, streaming, finalize per flow call),
             chunk_lengths (exact), audio.  Inputs come from the ``tts`` group.
"""

from __future__ import annotations

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.hift.source import HiftNoise
from cosyjax.model import CosyVoice3Model, HopState, Trace
from cosyjax.parity import bf16
from cosyjax.parity import error_model as em
from cosyjax.parity.case import Case
from cosyjax.parity.compare import compare_equal, compare_probed
from cosyjax.parity.stages import GroupResult
from cosyjax.parity.stages import hift as hift_stage

# float32: the audio tolerance comes from cosyjax.parity.error_model: one-ulp probes of every flow
# and HiFT weight (the HiFT f0 predictor, float64 on both sides, aside) and of the DiT's timestep
# frequencies (``rounded_constants``: torch rounds that exp its own way, and the shift it gives every
# frame is what the NSF phase integrates) through this whole request, x KAPPA.  That carries the
# flow's rounding through the vocoder, where it moves the f0 and the NSF phase integrates it over
# every sample.  The SNR floor is the orchestration target (>= 50 dB).
SNR_MIN_DB = 50.0
# bfloat16: the whole request in bf16 compute, to the audio SNR target of cosyjax.parity.bf16.


def _model(case: Case, model: ConvertedModel) -> CosyVoice3Model:
    ref = case.group("tts")
    sine = np.concatenate([case.arrays["hift/noise_sine_waves"], ref["noise_sine_waves_tail"]], axis=1)
    noise = HiftNoise(np.asarray(ref["noise_rand_ini"], np.float32), np.asarray(sine, np.float32))
    return CosyVoice3Model(model, bf16.policy_for(model), hift_noise=noise)


def _inputs(case: Case) -> dict:
    ref = case.group("tts")
    return dict(text_ids=ref["text"], prompt_text_ids=ref["prompt_text"],
                llm_prompt_speech_tokens=ref["llm_prompt_speech_token"],
                flow_prompt_speech_tokens=ref["flow_prompt_speech_token"], prompt_feat=ref["prompt_speech_feat"][0],
                embedding=ref["flow_embedding"][0], forced_tokens=ref["llm_tokens"])


def _run(m: CosyVoice3Model, inputs: dict, **kwargs) -> tuple[np.ndarray, np.ndarray, Trace]:
    trace = Trace()
    chunks = [c["tts_speech"] for c in m.tts(**inputs, **kwargs, trace=trace)]
    return np.concatenate(chunks, axis=1), np.asarray([c.shape[1] for c in chunks], np.int64), trace


def _compute(case: Case, group: str, model: ConvertedModel) -> dict[str, np.ndarray]:
    ref = case.group(group)
    m = _model(case, model)
    inputs = _inputs(case)
    out: dict[str, np.ndarray] = {}
    if group == "tts":
        out["audio"], out["chunk_lengths"], trace = _run(m, inputs)
        out["flow_tokens"] = trace.flow_tokens[None]
        out["audio_speed"], _, _ = _run(m, inputs, speed=float(ref["speed"]))
    else:
        out["token_hop_len"] = np.int64(m.schedule.base)
        hop = HopState(m.schedule.base)  # upstream's never-reset hop, shared by the two requests
        for suffix in ("", "_2"):  # the second request starts from the hop the first left
            out[f"audio{suffix}"], out[f"chunk_lengths{suffix}"], trace = _run(m, inputs, stream=True, hop_state=hop)
            out[f"flow_calls{suffix}"] = trace.flow_calls
    return out


def run(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Run one tts group of ``case`` through ``CosyVoice3Model`` and compare with upstream's yields."""
    ref = case.group(group)
    if model.dtype == "bfloat16":
        out, sigma = _compute(case, group, model), {}
    else:
        out, sigma = em.probe_sigmas(lambda m, _seed: _compute(case, group, m), model, skip=hift_stage.float64_part,
                                     constants=True)
    comparisons = []
    for name, value in out.items():
        key = f"{group}/{name}"
        if not np.issubdtype(value.dtype, np.floating):
            comparisons.append(compare_equal(key, value, ref[name]))
        elif model.dtype == "bfloat16":
            comparisons.append(bf16.compare_snr(key, value, ref[name], bf16.AUDIO_SNR_DB))
        else:
            comparisons.append(compare_probed(key, value, ref[name], sigma[name], snr_min=SNR_MIN_DB))
    if group == "tts":
        plots = [("tts waveform (stream=False)", "tts/audio"), ("tts waveform, speed", "tts/audio_speed")]
    else:
        plots = [("tts_stream waveform, first request", "tts_stream/audio"),
                 ("tts_stream waveform, second request (stale hop)", "tts_stream/audio_2")]
    return GroupResult(outputs={f"{group}/{k}": v for k, v in out.items()}, comparisons=comparisons, plots=plots)


RUNNERS = {"tts": run, "tts_stream": run}
