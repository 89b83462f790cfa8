"""Groups ``hift`` and ``hift_partial``: CausalHiFTGenerator.inference, and the scaling that keeps a
random-weight HiFT's output far from degenerate."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np

from cosyjax.parity.reference.capture import Arrays, hook
from cosyjax.parity.reference.config import MakeCaseError


def run_hift(hift: Any, mel: Any, out: Arrays) -> dict[str, Any]:
    """Groups ``hift`` (finalize) and ``hift_partial`` on ``mel`` (1, 80, T); returns output statistics."""
    import torch

    stats = {}
    for group, finalize in (("hift", True), ("hift_partial", False)):
        cap: dict[str, list] = {"f0": [], "post": []}
        with contextlib.ExitStack() as stack:
            stack.enter_context(hook(hift.f0_predictor, lambda _m, _a, o, cap=cap: cap["f0"].append(o.clone())))
            stack.enter_context(hook(hift.conv_post, lambda _m, _a, o, cap=cap: cap["post"].append(o.clone())))
            stack.enter_context(torch.inference_mode())
            audio, source = hift.inference(speech_feat=mel, finalize=finalize)
        if len(cap["f0"]) != 1 or len(cap["post"]) != 1:
            raise MakeCaseError(f"{group}: expected one f0 and one conv_post call")
        f0 = cap["f0"][0].to(torch.float32)  # upstream: .to(speech_feat) after the float64 predictor
        length = source.shape[-1]
        sine_gen = hift.m_source.l_sin_gen
        g = group
        out.put(f"{g}/speech_feat", mel, "(1, 80, T) input mel")
        out.put(f"{g}/finalize", np.bool_(finalize), "flag passed to CausalHiFTGenerator.inference")
        out.put(f"{g}/f0", f0, "(1, T') f0_predictor output (computed in float64 upstream, stored as float32 here)")
        out.put(f"{g}/source", source, "(1, 1, T'*480) NSF source (second return value of inference)")
        out.put(f"{g}/conv_post", cap["post"][0], "(1, n_fft+2, frames) conv_post output before exp/sin + iSTFT")
        out.put(f"{g}/audio", audio, "(1, samples) waveform, clamped to +-audio_limit")
        out.put(f"{g}/noise_rand_ini", sine_gen.rand_ini, "(1, 9) SineGen2.rand_ini (column 0 zeroed), drawn at construction")
        out.put(f"{g}/noise_sine_waves", sine_gen.sine_waves[:, :length],
                "(1, L, 9) SineGen2.sine_waves[:, :L] (torch.rand at construction), used as the additive-noise "
                "source: noise = noise_amp * this")
        out.put(f"{g}/noise_uv", hift.m_source.uv[:, :length],
                "(1, L, 1) SourceModuleHnNSF.uv[:, :L] (torch.rand at construction); only feeds the unused "
                "noise_branch output")
        a = audio.float()
        stats[group] = {
            "voiced_fraction": float((f0 > hift.m_source.l_sin_gen.voiced_threshold).float().mean()),
            "f0_min": float(f0.min()), "f0_max": float(f0.max()),
            "audio_std": float(a.std()), "audio_clipped_fraction": float((a.abs() >= hift.audio_limit).float().mean()),
            "conv_post_std": float(cap["post"][0].std()),
        }
    return stats


def scale_hift(hift: Any, mel: Any, f0_median: float, conv_post_std: float) -> dict[str, float]:
    """Scale two HiFT layers so its output is far from degenerate on the case mel.

    1. The f0 classifier (weight and bias): f0 = |Linear(x)| scales exactly, so median(f0) becomes
       ``f0_median`` Hz.  Random weights give f0 of order 1 Hz, all under the 10 Hz voiced threshold;
       the scaled f0 spans voiced and unvoiced frames.
    2. conv_post (weight-norm g and bias): its output std becomes ``conv_post_std``, so exp() of the
       magnitude half stays moderate and the audio is not clamped to +-audio_limit everywhere.
    Probing runs on a copy (upstream's inference casts the f0 predictor to float64 in place).
    """
    import torch

    probe = copy.deepcopy(hift)
    with torch.inference_mode():
        f0 = probe.f0_predictor.to(torch.float64)(mel.to(torch.float64), finalize=True)
    median = float(f0.median())
    if median <= 0:
        raise MakeCaseError("hift: the f0 predictor gives zero f0 on the case mel")
    f0_gain = f0_median / median
    with torch.no_grad():
        for m in (hift, probe):
            m.f0_predictor.classifier.weight.mul_(f0_gain)
            m.f0_predictor.classifier.bias.mul_(f0_gain)
    captured = []
    with hook(probe.conv_post, lambda _m, _a, o: captured.append(o.clone())), torch.inference_mode():
        probe.inference(speech_feat=mel, finalize=True)
    post_gain = conv_post_std / float(captured[0].std())
    with torch.no_grad():
        hift.conv_post.parametrizations.weight.original0.mul_(post_gain)
        hift.conv_post.bias.mul_(post_gain)
    return {"f0_classifier_gain": f0_gain, "conv_post_gain": post_gain}
