"""What ``cosyjax parity check --dtype bfloat16`` requires: bf16 *compute* against the float32 reference.

With ``--dtype bfloat16`` the case's release is converted to bf16 weights and every stage runs under
the bf16 precision policy (``cosyjax.precision``: bf16 matmul/conv operands with float32
accumulation; norms, softmax, RoPE, the timestep embedding, the f0 predictor, the NSF phase and the
iSTFT in float32, and no float64).  bf16 keeps 8 bits of mantissa, so the reference is met to a
signal-to-noise ratio, not to float32 rounding; the targets are the accelerator issue's:

- greedy token agreement >= 99 %: the token the LLM's argmax picks at each teacher-forced step
  (the same history on both sides; a free-running greedy decode diverges for good at its first
  near-tie, so its token sequence is reported, not required);
- mel (and every other intermediate) SNR >= 30 dB;
- audio SNR >= 20 dB.

Integer outputs (layouts, lengths, hop schedules) must still match exactly.

The end-to-end groups (``tts``, ``tts_stream``) are checked link by link, teacher-forced at the flow's
output (``teacher_forced_flow``), as the LLM's agreement is at its tokens; the all-bf16 chain's audio is
reported beside the chain's conditioning (``bf16_stored_flow``), not required.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.parity.compare import Comparison, compare_close, snr_db
from cosyjax.precision import BFLOAT16, FLOAT32, Precision, PrecisionPolicy

SNR_DB = 30.0
AUDIO_SNR_DB = 20.0
TOKEN_AGREEMENT = 0.99


def precision_for(model) -> Precision:
    """The stage precision a parity run uses: bf16 compute for a bf16-converted case."""
    return BFLOAT16 if model.dtype == "bfloat16" else FLOAT32


def policy_for(model) -> PrecisionPolicy:
    """The whole-model policy a parity run uses.

    bfloat16 case: the bf16 policy (bf16 compute on every stage, no float64).  float32 case: the
    float32 policy with ``f0_float64`` asked for explicitly, whatever the backend: the float32 error
    model holds the HiFT f0 to its one float32 rounding because upstream runs the f0 net, the NSF
    division and the phase cumsum in float64 (on CPU that is also the float32 policy's default).
    """
    if model.dtype == "bfloat16":
        return PrecisionPolicy.resolve("bfloat16")
    return dataclasses.replace(PrecisionPolicy.resolve("float32"), f0_float64=True)


@functools.lru_cache(maxsize=1)
def _float32_release(model_dir: str) -> ConvertedModel:
    from cosyjax.convert import convert_model

    return convert_model(model_dir, dtype="float32", progress=False)


def teacher_forced_flow(model: ConvertedModel, model_dir: str) -> tuple[ConvertedModel, PrecisionPolicy]:
    """The bf16 ``model`` with its flow teacher-forced: float32 flow weights (from the release in
    ``model_dir``) and float32 flow compute; the LLM and the vocoder keep the bf16 policy.

    The flow's float32 mel stands in for the reference's (its float32 parity is the flow and tts
    groups' float32 check), so the vocoder's bf16 error is measured on the reference's input.
    """
    flow = _float32_release(os.path.abspath(model_dir)).params["flow"]
    policy = PrecisionPolicy.resolve("bfloat16")
    policy = dataclasses.replace(policy, flow=Precision("float32", policy.flow.attention))
    return dataclasses.replace(model, params={**model.params, "flow": flow}), policy


def bf16_stored_flow(model: ConvertedModel, model_dir: str) -> ConvertedModel:
    """The float32 release with only its flow weights taken from the bf16 ``model`` (bf16-rounded).

    Run under the float32 policy, its output's distance from the reference is what storing the flow
    in bf16 alone costs, with no bf16 compute anywhere: the chain's conditioning at bf16 rounding.
    """
    f32 = _float32_release(os.path.abspath(model_dir))
    return dataclasses.replace(f32, params={**f32.params, "flow": model.params["flow"]})


def compare_snr(key: str, ours, ref, snr_min: float = SNR_DB) -> Comparison:
    """Passes when 10 log10(sum ref^2 / sum (ours - ref)^2) >= ``snr_min`` (and the shapes agree)."""
    return compare_close(key, ours, ref, float("inf"), snr_min=snr_min, model=f"bf16 target: SNR >= {snr_min:g} dB")


def compare_agreement(key: str, ours_logits, ref_logits, target: float = TOKEN_AGREEMENT) -> Comparison:
    """Fraction of rows [..., V] whose argmax agrees, against ``target``."""
    ours = np.argmax(np.asarray(ours_logits), -1).reshape(-1)
    ref = np.argmax(np.asarray(ref_logits), -1).reshape(-1)
    agree = float(np.mean(ours == ref)) if ref.size else 1.0
    return Comparison(key, agree >= target, atol=target, max_abs=1.0 - agree, shape=[int(ref.size)],
                      message=f"argmax agreement {agree:.2%} of {ref.size} (target >= {target:.0%})",
                      model="bf16 target: teacher-forced greedy token agreement")


__all__ = ["AUDIO_SNR_DB", "SNR_DB", "TOKEN_AGREEMENT", "bf16_stored_flow", "compare_agreement", "compare_snr",
           "policy_for", "precision_for", "snr_db", "teacher_forced_flow"]
