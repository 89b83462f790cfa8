"""Parity of the HiFT vocoder: groups ``hift`` (finalize=True) and ``hift_partial`` (finalize=False).

Inputs from the case: ``speech_feat`` (1, C, T) (transposed to our (1, T, C)), ``finalize`` and the
dumped random buffers ``noise_rand_ini`` (1, H) and ``noise_sine_waves`` (1, L, H), injected as
``HiftNoise``.  ``noise_uv`` only feeds upstream's unused noise-branch output and is not compared.

Compared, in the reference layouts:
  f0         (1, T')            the f0 net (float64, like upstream) cast to float32;
  source     (1, 1, T' * S)     the NSF excitation;
  conv_post  (1, N + 2, frames) the decoder output before exp/sin;
  audio      (1, samples)       the clamped waveform (plus an SNR floor).

The vocoder runs under ``bf16.policy_for(model)``: float32 with the float64 f0 path (upstream's), or
the bf16 policy (bf16 conv stacks, float32 f0 net / NSF / iSTFT, no float64).
"""

from __future__ import annotations

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.hift.generator import hift_inference
from cosyjax.hift.source import HiftNoise
from cosyjax.parity import bf16
from cosyjax.parity import error_model as em
from cosyjax.parity.case import Case
from cosyjax.parity.compare import compare_close, compare_probed
from cosyjax.parity.stages import GroupResult

# float32: tolerances from cosyjax.parity.error_model (one-ulp weight probes through our own
# vocoder, x KAPPA; see parity/TOLERANCES.md).  The f0 predictor runs in float64 on both sides, so
# its weights are not perturbed and f0 is held to 2 float32 ulp (its one rounding to float32).
# bfloat16: bf16 compute (the bf16 policy: bf16 conv stacks; the f0 net, NSF source and iSTFT in
# float32, no float64) against the float32 reference, to the targets of cosyjax.parity.bf16: f0,
# source SNR >= 30 dB; audio and conv_post (the audio's STFT, one iSTFT away: it cannot be held tighter
# than the audio it becomes) SNR >= 20 dB (measured numbers in parity/TOLERANCES.md).
SNR_MIN_DB = 60.0  # float32 audio floor
NAMES = ("f0", "source", "conv_post", "audio")
AUDIO_DOMAIN = ("conv_post", "audio")  # held to the bf16 audio target


def float64_part(path: str) -> bool:
    """Params both sides evaluate in float64 (upstream casts the f0 predictor): not probed."""
    return path.startswith("hift/f0_predictor")


def _compute(case: Case, group: str, model: ConvertedModel) -> dict[str, np.ndarray]:
    cfg = model.config.hift
    ref = case.group(group)
    mel = np.transpose(np.asarray(ref["speech_feat"], np.float32), (0, 2, 1))  # (B, C, T) -> (B, T, C)
    noise = HiftNoise(np.asarray(ref["noise_rand_ini"], np.float32), np.asarray(ref["noise_sine_waves"], np.float32))
    res = hift_inference(model.params["hift"], mel, cfg=cfg, finalize=bool(ref["finalize"]), noise=noise,
                         policy=bf16.policy_for(model), return_intermediates=True)
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
    ref = case.group(group)
    names = [n for n in NAMES if n in ref]
    comparisons = []
    if model.dtype == "bfloat16":
        out = _compute(case, group, model)
        for n in names:
            target = bf16.AUDIO_SNR_DB if n in AUDIO_DOMAIN else bf16.SNR_DB
            comparisons.append(bf16.compare_snr(f"{group}/{n}", out[n], ref[n], target))
        return GroupResult(outputs={f"{group}/{n}": v for n, v in out.items()}, comparisons=comparisons,
                           plots=_plots(group))
    out, sigma = em.probe_sigmas(lambda m, _seed: _compute(case, group, m), model, skip=float64_part)
    for n in names:
        key = f"{group}/{n}"
        snr = SNR_MIN_DB if n == "audio" else None
        if n == "f0":
            comparisons.append(compare_close(key, out[n], ref[n], em.ulp_floor(ref[n]),
                                             model="2 ulp of max|f0| (float64 on both sides, one float32 rounding)"))
        else:
            comparisons.append(compare_probed(key, out[n], ref[n], sigma[n], snr_min=snr))
    return GroupResult(outputs={f"{group}/{n}": v for n, v in out.items()}, comparisons=comparisons,
                       plots=_plots(group))


def _plots(group: str) -> list[tuple[str, str]]:
    return [(f"{group} waveform", f"{group}/audio"), (f"{group} f0", f"{group}/f0"),
            (f"{group} NSF source", f"{group}/source")]


RUNNERS = {"hift": run, "hift_partial": run}
