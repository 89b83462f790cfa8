"""HiFT vocoder speed at the release dims (base_channels 512, 8/5/3 upsampling), random weights, float32.

Ours: ``hift_inference`` on a [1, T, 80] mel (default T = 500 frames = 10 s at 24 kHz), jitted and
timed after a warm-up call of the same shape.
Reference (with ``--reference-repo PATH``): upstream ``CausalHiFTGenerator.inference`` built from
that checkout, holding the same weights (its own random init, converted to ours with
``cosyjax.convert.hift.convert``) and the same noise buffers, so the two outputs are also compared.

Streaming section (skip with ``--stream-seconds`` and no values): the cost of one streaming chunk
of ``--chunk-frames`` mel frames (default 200 = 100 tokens, upstream's steady-state hop) once the
stream already holds 10 s / 30 s of audio, for the carried-state ``hift_stream_push`` (O(chunk))
and for upstream's rerun contract ``hift_stream_step`` (vocodes all mel so far, O(total)).

    python benchmarks/bench_hift.py [--frames 500] [--repeats 3] [--reference-repo /work/upstream]
                                    [--stream-seconds 10 30] [--chunk-frames 200]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cosyjax.config import HiftConfig  # noqa: E402
from cosyjax.hift.generator import hift_inference, hift_stream_step, param_shapes  # noqa: E402
from cosyjax.hift.source import HiftNoise  # noqa: E402
from cosyjax.hift.stream import hift_stream_init, hift_stream_push, stream_bucket, stream_plan  # noqa: E402


def release_config() -> HiftConfig:
    """The release's hift config (from the full-size manifest)."""
    from cosyjax.parity.manifest import release_config as model_config

    return model_config().hift


def upstream_model(repo: str, cfg: HiftConfig):
    """Upstream CausalHiFTGenerator at ``cfg``'s dims, in eval mode (random init, seed 0)."""
    import torch

    from cosyjax.parity.upstream import import_upstream

    import_upstream(repo)
    from cosyvoice.hifigan.f0_predictor import CausalConvRNNF0Predictor
    from cosyvoice.hifigan.generator import CausalHiFTGenerator

    torch.manual_seed(0)
    f0 = CausalConvRNNF0Predictor(num_class=cfg.f0_num_class, in_channels=cfg.f0_in_channels,
                                  cond_channels=cfg.f0_cond_channels)
    model = CausalHiFTGenerator(
        in_channels=cfg.in_channels, base_channels=cfg.base_channels, nb_harmonics=cfg.nb_harmonics,
        sampling_rate=cfg.sampling_rate, nsf_alpha=cfg.nsf_alpha, nsf_sigma=cfg.nsf_sigma,
        nsf_voiced_threshold=cfg.nsf_voiced_threshold, upsample_rates=list(cfg.upsample_rates),
        upsample_kernel_sizes=list(cfg.upsample_kernel_sizes),
        istft_params={"n_fft": cfg.n_fft, "hop_len": cfg.hop_len},
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        source_resblock_kernel_sizes=list(cfg.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in cfg.source_resblock_dilation_sizes],
        lrelu_slope=cfg.lrelu_slope, audio_limit=cfg.audio_limit, conv_pre_look_right=cfg.conv_pre_look_right,
        f0_predictor=f0)
    return model.eval()


def random_params(cfg: HiftConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(np.float32), param_shapes(cfg))


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500, help="mel frames (50 per second)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repo", default=None, help="upstream CosyVoice checkout to time against")
    parser.add_argument("--stream-seconds", type=float, nargs="*", default=[10.0, 30.0],
                        help="audio already streamed when the timed chunk arrives (none: skip the section)")
    parser.add_argument("--chunk-frames", type=int, default=200, help="mel frames per streaming chunk")
    args = parser.parse_args()
    cfg = release_config()
    rng = np.random.default_rng(1)
    mel = (rng.standard_normal((1, args.frames, cfg.in_channels)) * 2.0 - 5.0).astype(np.float32)
    seconds = args.frames * cfg.upsample_scale / cfg.sampling_rate
    rows = []

    model = None
    if args.reference_repo:
        from cosyjax.convert.hift import convert

        model = upstream_model(args.reference_repo, cfg)
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        params = convert(state, cfg, "upstream random init")
        samples = args.frames * cfg.upsample_scale
        noise = HiftNoise(model.m_source.l_sin_gen.rand_ini.numpy(),
                          model.m_source.l_sin_gen.sine_waves[:, :samples].numpy())
    else:
        print("no --reference-repo: timing cosyjax only (random params, noise from seed 0)")
        params, noise = random_params(cfg), 0

    def ours():
        return np.asarray(hift_inference(params, mel, cfg=cfg, finalize=True, noise=noise))

    start = time.perf_counter()
    audio = ours()
    compile_s = time.perf_counter() - start
    ours_s = timed(ours, args.repeats)
    rows.append(("cosyjax (jit, CPU f32)", ours_s, compile_s))

    if model is not None:
        import torch

        mel_t = torch.from_numpy(np.transpose(mel, (0, 2, 1)).copy())

        def reference():
            with torch.inference_mode():
                return model.inference(mel_t, finalize=True)[0].numpy()

        ref_audio = reference()
        ref_s = timed(reference, args.repeats)
        rows.append((f"upstream torch {torch.__version__} ({torch.get_num_threads()} threads)", ref_s, None))
        diff = np.abs(audio - ref_audio)
        err = max(float(np.sum(diff.astype(np.float64) ** 2)), 1e-30)
        snr = 10 * np.log10(np.sum(ref_audio.astype(np.float64) ** 2) / err)
        print(f"same weights and noise: max |ours - upstream| = {diff.max():.3g}, SNR {snr:.1f} dB, "
              f"shape {audio.shape}")

    print(f"\nHiFT, {args.frames} mel frames -> {seconds:.1f} s of audio, {jax.devices()[0].platform}, best of "
          f"{args.repeats}")
    print(f"{'':42s} {'time (s)':>9s} {'x realtime':>11s} {'compile (s)':>12s}")
    for name, t, comp in rows:
        print(f"{name:42s} {t:9.3f} {seconds / t:11.1f} {'' if comp is None else f'{comp:.1f}':>12s}")
    if len(rows) == 2:
        print(f"\nupstream / cosyjax time ratio: {rows[1][1] / rows[0][1]:.2f}")
    if args.stream_seconds:
        bench_stream(params, cfg, args.stream_seconds, args.chunk_frames, args.repeats)


def bench_stream(params, cfg: HiftConfig, seconds_list, chunk: int, repeats: int) -> None:
    """Time one streaming chunk after ``seconds`` of audio: carried state vs rerun on all mel."""
    fps = cfg.sampling_rate / cfg.upsample_scale  # mel frames per second
    totals = [max(chunk + stream_plan(cfg).delay + 1, int(round(s * fps))) for s in seconds_list]
    rng = np.random.default_rng(2)
    mel = (rng.standard_normal((1, max(totals), cfg.in_channels)) * 2.0 - 5.0).astype(np.float32)
    key = jax.random.PRNGKey(0)
    bucket = stream_bucket(chunk)
    chunk_s = chunk * cfg.upsample_scale / cfg.sampling_rate
    rows = []
    for total in totals:
        # Carried state: reach total - chunk frames in chunks, then time the next chunk from that state.
        state, pos = hift_stream_init(cfg, 1, key), 0
        start = time.perf_counter()
        while pos < total - chunk:
            step = min(chunk, total - chunk - pos)
            state, _ = hift_stream_push(params, state, mel[:, pos:pos + step], cfg=cfg, bucket=bucket)
            pos += step
        jax.block_until_ready(state)
        warm_s = time.perf_counter() - start

        def carried():
            return np.asarray(hift_stream_push(params, state, mel[:, pos:total], cfg=cfg, bucket=bucket)[1])

        new = carried()
        carried_s = timed(carried, repeats)
        emitted = int(np.asarray(state.emitted)[0])

        def rerun():
            return np.asarray(hift_stream_step(params, mel[:, :total], emitted, cfg=cfg, finalize=False, noise=key)[0])

        start = time.perf_counter()
        old = rerun()
        rerun_first = time.perf_counter() - start
        rerun_s = timed(rerun, repeats)
        err = float(np.abs(new - old).max())
        rows.append((total, carried_s, rerun_s, err, new.shape[1], warm_s, rerun_first))
    print(f"\nStreaming: one chunk of {chunk} mel frames ({chunk_s:.1f} s of audio, bucket {bucket}) arriving after "
          f"T frames, best of {repeats}")
    print(f"{'T (audio so far)':>18s} {'carried (s)':>12s} {'rerun (s)':>10s} {'rerun/carried':>14s} "
          f"{'carried x RT':>13s} {'max|diff|':>10s} {'samples':>8s}")
    for total, c_s, r_s, err, n, _, _ in rows:
        print(f"{total:>7d} ({total / fps:5.1f} s) {c_s:12.3f} {r_s:10.3f} {r_s / c_s:14.1f} {chunk_s / c_s:13.1f} "
              f"{err:10.2e} {n:8d}")
    firsts = ", ".join(f"{r[6]:.1f}" for r in rows)
    print(f"(first calls incl. compile: carried warm-up {rows[0][5]:.1f} s, rerun {firsts} s)")


if __name__ == "__main__":
    main()
