"""HiFT row: mel -> waveform for S seconds of audio (finalize=True, f0 net in float64 like upstream).

cosyjax ``hift_inference`` (jitted, mel padded to ``mel_bucket``) vs upstream
``CausalHiFTGenerator.inference`` on the same weights and the same source-noise buffers; the two
waveforms are compared.  One cosyjax row per ``Workload.dtypes`` entry (``policy=`` that precision
policy, params cast as ``CosyVoice3Model`` casts them: the f0 net stays float32, and the bf16 policy has no
float64), each compared with the one upstream (float32) waveform and timing; a bf16 row also against the
float32 row's waveform, and every waveform must be finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import finish_row, log, measure, new_row, rows_vs_float32, set_cosyjax, snr_db, stage_row
from benchmarks.models import Bundle


def warm_key(frames: int, policy) -> tuple:
    """Identifies the compiled HiFT program used for ``frames`` mel frames (finalize=True) under the
    ``PrecisionPolicy`` ``policy``."""
    from cosyjax.hift.generator import hift_numerics, mel_bucket

    return ("hift", True, mel_bucket(frames), hift_numerics(policy))


def run(bundle: Bundle) -> list[dict[str, Any]]:
    from cosyjax.hift.generator import hift_inference

    wl = bundle.wl
    cfg = wl.config.hift
    bundle.build("hift")
    noise = bundle.buffers["hift_noise"]
    mel = wl.hift_mel()
    frames = mel.shape[1]
    audio_s = frames * cfg.upsample_scale / cfg.sampling_rate
    rows, audio = [], {}
    for dtype in wl.dtypes:
        params = bundle.jax_params("hift", dtype)
        policy = bundle.policy(dtype)

        def ours(params=params, policy=policy):
            return np.asarray(hift_inference(params, mel, cfg=cfg, finalize=True, noise=noise, policy=policy))

        log(f"[hift] cosyjax {dtype}: {frames} mel frames ({audio_s:.1f} s)")
        m = measure(ours, wl.repeats["hift"])
        bundle.warm.add(warm_key(frames, policy))
        rows.append(stage_row("hift", "HiFT", f"{frames} mel frames → {audio_s:.1f} s audio", dtype, m, policy, params,
                              audio_s, "audio"))
        audio[dtype] = m.output
        log(f"[hift] cosyjax {dtype} {m.best:.2f} s")
    rows_vs_float32(rows, audio)  # the same inputs and weights in bf16 arithmetic against the float32 row
    if bundle.has_reference:
        import torch

        ref = bundle.upstream["hift"]
        dev = bundle.torch_device
        mel_t = torch.from_numpy(np.transpose(mel, (0, 2, 1)).copy()).to(dev)

        def upstream(n=frames):
            with torch.inference_mode():
                return ref.inference(mel_t[:, :, :n], finalize=True)[0].float().cpu().numpy()

        log("[hift] upstream")
        up = measure(upstream, wl.repeats["hift"], warmup=lambda: upstream(min(frames, 32)),
                     torch_cuda=dev == "cuda")
        bundle.upstream_ran.add("hift")
        ref_audio = up.output
        for row in rows:
            diff = float(np.abs(audio[row["dtype"]] - ref_audio).max())
            snr = snr_db(audio[row["dtype"]], ref_audio)
            row.update(upstream=up.best, upstream_device=dev, max_diff=diff,
                       agreement=f"audio max diff {diff:.2g}, SNR {snr:.0f} dB")
            row["extra"]["snr_db"] = snr
            row["memory"]["upstream"] = up.memory
            row["extra"]["upstream_rtf"] = up.best / audio_s
        log(f"[hift] upstream {up.best:.2f} s")
    return [finish_row(row) for row in rows]


def run_stream(bundle: Bundle) -> list[dict[str, Any]]:
    """Extra stage ``hift_stream`` (not in --all): the vocoder's cost per streaming chunk.

    One steady-state chunk (MAX_HOP_FACTOR hops = 200 mel frames at the release) arriving after S and
    3 S seconds were already streamed: cosyjax ``hift_stream_push`` from the carried state (O(chunk))
    vs upstream's streaming contract, ``CausalHiFTGenerator.inference(all mel so far, finalize=False)``
    (O(total)), whose new samples are compared with cosyjax's chunk (same noise buffers).
    """
    from cosyjax.hift.source import HiftNoise
    from cosyjax.hift.stream import hift_stream_init, hift_stream_push, stream_bucket, stream_plan
    from cosyjax.model import MAX_HOP_FACTOR

    wl = bundle.wl
    cfg = wl.config.hift
    params = bundle.jax_params("hift")
    chunk = MAX_HOP_FACTOR * wl.hop * wl.config.flow.token_mel_ratio
    totals = [max(chunk + stream_plan(cfg).delay + 1, round(s * wl.mel_rate)) for s in (wl.seconds, 3 * wl.seconds)]
    rng = np.random.default_rng([wl.seed, 5])
    mel = (rng.standard_normal((1, max(totals), cfg.in_channels)) * 2.0 - 5.0).astype(np.float32)
    ref = bundle.upstream["hift"] if bundle.has_reference else None
    if ref is not None:
        sine = ref.m_source.l_sin_gen
        noise = HiftNoise(sine.rand_ini.numpy().reshape(-1).astype(np.float32),
                          sine.sine_waves[0, :max(totals) * cfg.upsample_scale].numpy())
    else:
        noise = wl.seed
    bucket = stream_bucket(chunk)
    rows = []
    for total in totals:
        start = total - chunk
        held: dict[str, Any] = {}

        def reach_then_push(total=total, start=start, held=held):
            """Warm-up: stream up to the timed chunk's start, then push the chunk once."""
            state, pos = hift_stream_init(cfg, 1, noise=noise), 0
            while pos < start:
                step = min(chunk, start - pos)
                state, _ = hift_stream_push(params, state, mel[:, pos:pos + step], cfg=cfg, bucket=bucket)
                pos += step
            held["state"] = state
            return ours(total=total)

        def ours(total=total, start=start, held=held):
            return np.asarray(hift_stream_push(params, held["state"], mel[:, start:total], cfg=cfg, bucket=bucket)[1])

        log(f"[hift_stream] cosyjax: streaming {start} frames, then one {chunk}-frame chunk")
        m = measure(ours, wl.repeats["hift"], warmup=reach_then_push)
        emitted = int(np.asarray(held["state"].emitted)[0])
        pos = start
        seconds_so_far = pos * cfg.upsample_scale / cfg.sampling_rate
        row = new_row("hift_stream", f"HiFT stream chunk after {seconds_so_far:.3g} s",
                      f"{chunk} mel frames after {pos} streamed; cosyjax carried state, upstream re-run on all mel",
                      "s")
        set_cosyjax(row, m, m.best)
        if ref is not None:
            import torch

            dev = bundle.torch_device
            mel_t = torch.from_numpy(np.transpose(mel[:, :total], (0, 2, 1)).copy()).to(dev)

            def upstream(mel_t=mel_t):
                with torch.inference_mode():
                    return ref.inference(mel_t, finalize=False)[0].float().cpu().numpy()

            log("[hift_stream] upstream")
            up = measure(upstream, wl.repeats["hift"], warmup=False if "hift" in bundle.upstream_ran else None,
                         torch_cuda=dev == "cuda")
            bundle.upstream_ran.add("hift")
            new = up.output[:, emitted:]
            n = min(new.shape[1], m.output.shape[1])
            diff = float(np.abs(m.output[:, :n] - new[:, :n]).max()) if n else 0.0
            row.update(upstream=up.best, upstream_device=dev, max_diff=diff,
                       agreement=f"new samples {m.output.shape[1]} / {new.shape[1]}, max diff {diff:.2g}")
            row["memory"]["upstream"] = up.memory
        rows.append(finish_row(row))
    return rows
