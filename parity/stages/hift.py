"""Parity of the HiFT vocoder: groups ``hift`` (finalize=True) and ``hift_partial`` (finalize=False).

Inputs from the case: ``speech_feat`` (1, C, T) (transposed to our (1, T, C)), ``finalize`` and the
dumped random buffers ``noise_rand_ini`` (1, H) and ``noise_sine_waves`` (1, L, H), injected as
``HiftNoise``.  ``noise_uv`` only feeds upstream's unused noise-branch output and is not compared.

Compared, in the reference layouts:
  f0         (1, T')            the f0 net (float64, like upstream) cast to float32;
  source     (1, 1, T' * S)     the NSF excitation;
  conv_post  (1, N + 2, frames) the decoder output before exp/sin;
  audio      (1, samples)       the clamped waveform (plus an SNR floor).
"""

from __future__ import annotations

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.hift.generator import hift_inference
from cosyjax.hift.source import HiftNoise
from cosyjax.parity import error_model as em
from cosyjax.parity.case import Case
from cosyjax.parity.compare import compare_close, compare_probed
from cosyjax.parity.stages import GroupResult

# float32: tolerances from cosyjax.parity.error_model (one-ulp weight probes through our own
# vocoder, x KAPPA; see parity/TOLERANCES.md).  The f0 predictor runs in float64 on both sides, so
# its weights are not perturbed and f0 is held to 2 float32 ulp (its one rounding to float32).
# bfloat16 conversion: the f0 predictor and the NSF merge stay float32 (checkpoint.FLOAT32_ONLY),
# so f0 and source keep their float32 bounds; the rest carries bf16 weight rounding.  Measured
# on tiny-a/tiny-b: conv_post 2.8e-2, audio 9.2e-3 with SNR >= 32.8 dB; bounds are ~2x that.
BF16_TOLERANCES = {"conv_post": 6e-2, "audio": 2e-2}
SNR_MIN_DB = {"float32": 60.0, "bfloat16": 25.0}
NAMES = ("f0", "source", "conv_post", "audio")


def float64_part(path: str) -> bool:
    """Params both sides evaluate in float64 (upstream casts the f0 predictor): not probed."""
    return path.startswith("hift/f0_predictor")


def _compute(case: Case, group: str, model: ConvertedModel) -> dict[str, np.ndarray]:
    cfg = model.config.hift
    ref = case.group(group)
    mel = np.transpose(np.asarray(ref["speech_feat"], np.float32), (0, 2, 1))  # (B, C, T) -> (B, T, C)
    noise = HiftNoise(np.asarray(ref["noise_rand_ini"], np.float32), np.asarray(ref["noise_sine_waves"], np.float32))
    res = hift_inference(model.params["hift"], mel, cfg=cfg, finalize=bool(ref["finalize"]), noise=noise,
                         return_intermediates=True)
    f0_len = int(np.asarray(res["f0_len"])[0])
    frames = int(np.asarray(res["conv_post_len"])[0])
    samples = int(np.asarray(res["audio_len"])[0])
    return {
        "f0": np.asarray(res["f0"])[:, :f0_len],
        "source": np.asarray(res["source"])[:, None, :f0_len * cfg.upsample_scale],
        "conv_post": np.transpose(np.asarray(res["conv_post"])[:, :frames], (0, 2, 1)),
        "audio": np.asarray(res["audio"])[:, :samples],
    }


def run(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Run one hift group of ``case`` with ``model``'s hift params and compare f0, source, conv_post, audio."""
    dtype = "bfloat16" if model.dtype == "bfloat16" else "float32"
    ref = case.group(group)
    names = [n for n in NAMES if n in ref]
    comparisons = []
    out, sigma = em.probe_sigmas(lambda m, _seed: _compute(case, group, m), model, skip=float64_part)
    for n in names:
        key = f"{group}/{n}"
        snr = SNR_MIN_DB[dtype] if n == "audio" else None
        if n == "f0":
            comparisons.append(compare_close(key, out[n], ref[n], em.ulp_floor(ref[n]),
                                             model="2 ulp of max|f0| (float64 on both sides, one float32 rounding)"))
        elif dtype == "bfloat16" and n in BF16_TOLERANCES:
            comparisons.append(compare_close(key, out[n], ref[n], BF16_TOLERANCES[n], snr_min=snr))
        else:
            comparisons.append(compare_probed(key, out[n], ref[n], sigma[n], snr_min=snr))
    return GroupResult(outputs={f"{group}/{n}": v for n, v in out.items()}, comparisons=comparisons,
                       plots=[(f"{group} waveform", f"{group}/audio"), (f"{group} f0", f"{group}/f0"),
                              (f"{group} NSF source", f"{group}/source")])


RUNNERS = {"hift": run, "hift_partial": run}
