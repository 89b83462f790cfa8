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
"""

from __future__ import annotations

import numpy as np

from cosyjax.parity.compare import Comparison, compare_close
import dataclasses

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


__all__ = ["AUDIO_SNR_DB", "SNR_DB", "TOKEN_AGREEMENT", "compare_agreement", "compare_snr", "policy_for",
           "precision_for"]
