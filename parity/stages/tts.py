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

With a bfloat16 case (``--dtype bfloat16``) the chain is checked link by link, teacher-forced at the
flow's output as the LLM group is at its tokens (``bf16.teacher_forced_flow``):

- the audio keys (``audio``, ``audio_speed``, ``audio_2``) come from the chain with the flow in float32
  (the case's float32 flow weights, float32 compute) and the LLM and the vocoder in bf16, against the
  reference at the audio target: the bf16 vocoder inside the chain (speed, stream caches, finalize);
- ``mel`` (``mel_speed``, ``mel_2``): the whole mel the vocoder received in the all-bf16 chain against
  that of the teacher-forced chain, at the mel target: the bf16 flow inside the chain (hops, caches);
- reported, not required: the all-bf16 (free-running) audio against the reference, and the same
  float32 chain with only its flow weights stored in bf16 (float32 compute).  The second measures the
  chain's conditioning: a random-weight f0 net turns the flow's bf16-sized mel error into an f0 error
  that the NSF phase integrates over every sample, so on such a case no bf16 flow can reach the audio
  target free-running (parity/TOLERANCES.md).
"""

from __future__ import annotations

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.hift.source import HiftNoise
from cosyjax.model import CosyVoice3Model, HopState, Trace
from cosyjax.precision import PrecisionPolicy
from cosyjax.parity import bf16
from cosyjax.parity import error_model as em
from cosyjax.parity.case import Case
from cosyjax.parity.compare import Comparison, compare_equal, compare_probed
from cosyjax.parity.stages import GroupResult
from cosyjax.parity.stages import hift as hift_stage

# float32: the audio tolerance comes from cosyjax.parity.error_model: one-ulp probes of every flow
# and HiFT weight (the HiFT f0 predictor, float64 on both sides, aside) and of the DiT's timestep
# frequencies (``rounded_constants``: torch rounds that exp its own way, and the shift it gives every
# frame is what the NSF phase integrates) through this whole request, x KAPPA.  That carries the
# flow's rounding through the vocoder, where it moves the f0 and the NSF phase integrates it over
# every sample.  The SNR floor is the orchestration target (>= 50 dB).
SNR_MIN_DB = 50.0
# bfloat16: link by link (module docstring), to the targets of cosyjax.parity.bf16.


def _model(case: Case, model: ConvertedModel, policy: PrecisionPolicy | None = None) -> CosyVoice3Model:
    ref = case.group("tts")
    sine = np.concatenate([case.arrays["hift/noise_sine_waves"], ref["noise_sine_waves_tail"]], axis=1)
    noise = HiftNoise(np.asarray(ref["noise_rand_ini"], np.float32), np.asarray(sine, np.float32))
    return CosyVoice3Model(model, policy or bf16.policy_for(model), hift_noise=noise)


def _inputs(case: Case) -> dict:
    ref = case.group("tts")
    return dict(text_ids=ref["text"], prompt_text_ids=ref["prompt_text"],
                llm_prompt_speech_tokens=ref["llm_prompt_speech_token"],
                flow_prompt_speech_tokens=ref["flow_prompt_speech_token"], prompt_feat=ref["prompt_speech_feat"][0],
                embedding=ref["flow_embedding"][0], forced_tokens=ref["llm_tokens"])


def _run(m: CosyVoice3Model, inputs: dict, **kwargs) -> tuple[np.ndarray, np.ndarray, Trace]:
    trace = Trace(record_mel=True)
    chunks = [c["tts_speech"] for c in m.tts(**inputs, **kwargs, trace=trace)]
    return np.concatenate(chunks, axis=1), np.asarray([c.shape[1] for c in chunks], np.int64), trace


def _compute(case: Case, group: str, model: ConvertedModel,
             policy: PrecisionPolicy | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Our outputs under the reference's names, and the mel each request's vocoder received."""
    ref = case.group(group)
    m = _model(case, model, policy)
    inputs = _inputs(case)
    out: dict[str, np.ndarray] = {}
    mels: dict[str, np.ndarray] = {}
    if group == "tts":
        out["audio"], out["chunk_lengths"], trace = _run(m, inputs)
        out["flow_tokens"] = trace.flow_tokens[None]
        mels["mel"] = trace.mel
        out["audio_speed"], _, trace = _run(m, inputs, speed=float(ref["speed"]))
        mels["mel_speed"] = trace.mel
    else:
        out["token_hop_len"] = np.int64(m.schedule.base)
        hop = HopState(m.schedule.base)  # upstream's never-reset hop, shared by the two requests
        for suffix in ("", "_2"):  # the second request starts from the hop the first left
            out[f"audio{suffix}"], out[f"chunk_lengths{suffix}"], trace = _run(m, inputs, stream=True, hop_state=hop)
            out[f"flow_calls{suffix}"] = trace.flow_calls
            mels[f"mel{suffix}"] = trace.mel
    return out, mels


def _snr_text(ours: np.ndarray, ref: np.ndarray) -> str:
    if ours.shape != ref.shape:
        return f"shape {ours.shape} != reference {ref.shape}"
    return f"SNR {bf16.snr_db(ours, ref):.1f} dB"


def _run_bf16(case: Case, group: str, model: ConvertedModel) -> tuple[dict, list[Comparison], list[str]]:
    """The bf16 chain, link by link (module docstring): outputs, comparisons, notes."""
    ref = case.group(group)
    forced_model, forced_policy = bf16.teacher_forced_flow(model, case.model_dir)
    out, forced_mels = _compute(case, group, forced_model, forced_policy)
    free, free_mels = _compute(case, group, model)
    stored = bf16.bf16_stored_flow(model, case.model_dir)
    conditioned, _ = _compute(case, group, stored, bf16.policy_for(stored))
    comparisons, notes = [], []
    for name, value in out.items():
        key = f"{group}/{name}"
        if not np.issubdtype(value.dtype, np.floating):
            comparisons.append(compare_equal(key, value, ref[name]))
            if not np.array_equal(free[name], value):  # the free-running chain takes the same path
                comparisons.append(compare_equal(f"{key}#bf16_flow", free[name], ref[name]))
            continue
        comparisons.append(bf16.compare_snr(f"{key}#teacher_forced_flow", value, ref[name], bf16.AUDIO_SNR_DB))
        notes.append(f"{key}: all-bf16 chain (free-running) {_snr_text(free[name], ref[name])}; float32 chain with "
                     f"bf16-stored flow weights {_snr_text(conditioned[name], ref[name])} (the chain's conditioning); "
                     "reported, not required")
    for name, mel in free_mels.items():
        comparisons.append(bf16.compare_snr(f"{group}/{name}#bf16_flow", mel, forced_mels[name], bf16.SNR_DB))
    outputs = {**out, **{f"{name}#free_running": v for name, v in free.items() if name.startswith("audio")},
               **free_mels}
    return outputs, comparisons, notes


def run(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Run one tts group of ``case`` through ``CosyVoice3Model`` and compare with upstream's yields."""
    ref = case.group(group)
    notes: list[str] = []
    if model.dtype == "bfloat16":
        out, comparisons, notes = _run_bf16(case, group, model)
    else:
        out, sigma = em.probe_sigmas(lambda m, _seed: _compute(case, group, m)[0], model,
                                     skip=hift_stage.float64_part, constants=True)
        comparisons = []
        for name, value in out.items():
            key = f"{group}/{name}"
            if not np.issubdtype(value.dtype, np.floating):
                comparisons.append(compare_equal(key, value, ref[name]))
            else:
                comparisons.append(compare_probed(key, value, ref[name], sigma[name], snr_min=SNR_MIN_DB))
    if group == "tts":
        plots = [("tts waveform (stream=False)", "tts/audio"), ("tts waveform, speed", "tts/audio_speed")]
    else:
        plots = [("tts_stream waveform, first request", "tts_stream/audio"),
                 ("tts_stream waveform, second request (stale hop)", "tts_stream/audio_2")]
    return GroupResult(outputs={f"{group}/{k}": v for k, v in out.items()}, comparisons=comparisons, plots=plots,
                       notes=notes)


RUNNERS = {"tts": run, "tts_stream": run}
