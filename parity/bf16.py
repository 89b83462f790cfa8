"""What ``cosyjax parity check --dtype bfloat16`` requires: bf16 *compute* against the float32 reference.

With ``--dtype bfloat16`` the case's release is converted to bf16 weights and every stage runs under
the bf16 precision policy (``cosyjax.precision``: bf16 matmul/conv operands with float32
accumulation; norms, softmax, RoPE, the timestep embedding, the f0 predictor, the NSF phase and the
iSTFT in float32, and no float64).  bf16 keeps 8 bits of mantissa, so the reference is met to a
signal-to-noise ratio, not to float32 rounding; the targets are the accelerator issue's:

- greedy token agreement >= 99 %: the token the LLM's argmax picks at each teacher-forced step
  (the same history on both sides; a free-running greedy decode diverges for good at its first
  near-tie, so its token sequence is reported, not required), over the steps bf16 can decide: a
  step whose reference top-1/top-2 logit margin is within ``NEAR_TIE_SIGMAS`` standard deviations
  of the difference of two of our logits' errors (sqrt(2) x the error rms over the step's largest
  logits) is a near-tie, counted and reported, not held (``compare_agreement``);
- mel (and every other intermediate) SNR >= 30 dB;
- audio SNR >= 20 dB, and the vocoder's conv_post with it: conv_post is the audio's STFT
  (log-magnitude and phase, one iSTFT away), so it is held to the audio's target, not the mel's.

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
# A teacher-forced step is a near-tie when the reference's top-1/top-2 margin is at most this many standard
# deviations of a logit difference's bf16 error; bf16 cannot decide it (3: a flip beyond it is a 3-sigma event).
NEAR_TIE_SIGMAS = 3.0
# The logits whose error sets that deviation: the reference's largest few of the row.  Measured on four random
# configs (about 600 steps): |error(top-1) - error(top-2)| / (sqrt(2) x their rms) has median 0.7, 90th
# percentile 1.65, 99th 2.1-2.4 (a standard normal's: 0.67, 1.64, 2.58); with the whole row's rms instead, up to
# 4.6.
TIE_TOP_K = 8


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
    """Fraction of the decidable rows of [..., V] logits whose argmax agrees, against ``target``.

    A row is decidable when the reference's top-1/top-2 margin exceeds ``NEAR_TIE_SIGMAS`` x sqrt(2) x
    the rms of our error (ours - ref) over the reference's ``TIE_TOP_K`` largest logits of the row: the
    standard deviation of the error of a difference of two of our logits there.  Random-weight LMs have
    steps whose two best logits differ by less than bf16's error (nearly uniform rows); any bf16
    computation may flip those, so they are counted and reported, not held.  The error is capped at what
    the SNR target allows (rms(ref row) x 10^(-SNR_DB / 20)), and the logits' SNR is checked on its own.
    """
    ours = np.asarray(ours_logits, np.float64)
    ref = np.asarray(ref_logits, np.float64)
    if ours.shape != ref.shape:
        return Comparison(key, False, atol=target, shape=list(ref.shape),
                          message=f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}",
                          model="bf16 target: teacher-forced greedy token agreement")
    ours = ours.reshape(-1, ref.shape[-1])
    ref = ref.reshape(-1, ref.shape[-1])
    agree = np.argmax(ours, -1) == np.argmax(ref, -1)
    if ref.shape[-1] > 1:
        top2 = np.sort(ref, -1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    else:
        margin = np.full(ref.shape[:1], np.inf)
    # The error where the argmax is decided: its rms over the reference's TIE_TOP_K largest logits of the row (the
    # largest logits carry somewhat more error than the row's average), at most what the SNR target allows for the
    # row (so a wrong row cannot make its own step a tie).
    top = np.argsort(ref, -1)[:, -min(TIE_TOP_K, ref.shape[-1]):]
    error = np.minimum(np.sqrt(np.mean(np.take_along_axis(ours - ref, top, -1) ** 2, -1)),
                       np.sqrt(np.mean(ref ** 2, -1)) * 10.0 ** (-SNR_DB / 20.0))
    decidable = margin > NEAR_TIE_SIGMAS * np.sqrt(2.0) * error
    n = int(decidable.sum())
    rate = float(np.mean(agree[decidable])) if n else 1.0
    ties = int(ref.shape[0] - n)
    message = (f"argmax agreement {rate:.2%} of {n} decidable rows (target >= {target:.0%}); "
               f"{ties} near-tie row(s) within {NEAR_TIE_SIGMAS:g} sigma of the bf16 logits error not held, "
               f"{int((~agree[~decidable]).sum())} of them flipped; all rows: {float(np.mean(agree)):.2%} of "
               f"{ref.shape[0]}")
    return Comparison(key, rate >= target, atol=target, max_abs=1.0 - rate, shape=[int(ref.shape[0])],
                      message=message, model="bf16 target: teacher-forced greedy token agreement over the steps "
                      "bf16 can decide")


__all__ = ["AUDIO_SNR_DB", "NEAR_TIE_SIGMAS", "SNR_DB", "TIE_TOP_K", "TOKEN_AGREEMENT", "bf16_stored_flow",
           "compare_agreement", "compare_snr", "policy_for", "precision_for", "snr_db", "teacher_forced_flow"]
