"""Benchmark the flow (front + 10-step CFG Euler over the DiT) at full-size dims, float32 CPU.

Default workload: 4 s of speech (100 tokens -> 200 mel frames) after a 1 s prompt (25 tokens,
50 frames), so the DiT sees 250 frames x CFG batch 2 for 10 steps; this keeps the run under
4 minutes on 2 CPU cores.  ``--tokens 250`` is the 10 s workload (about 7.5 minutes on 2 cores with
the reference: cosyjax 111 s warm, upstream 201 s).  Random weights.  cosyjax runs
jitted after a warm-up call; with ``--reference-repo PATH`` (a CosyVoice checkout) upstream's
``CausalMaskedDiffWithDiT.inference`` runs on the same weights in the same process and the two mels
are compared.

    JAX_PLATFORMS=cpu python benchmarks/bench_flow.py [--tokens 250] [--reference-repo /work/upstream]
"""

from __future__ import annotations

import argparse
import os
import time
import types

import numpy as np


def full_size_config(depth: int):
    """The release's flow config (from the full-size manifest); depth may be cut for a quick run."""
    import dataclasses

    from cosyjax.parity.manifest import release_config

    return dataclasses.replace(release_config().flow, depth=depth)


def build_reference(repo: str, cfg):
    """Upstream CausalMaskedDiffWithDiT with random weights (torch default init, seed 0)."""
    import torch

    from cosyjax.parity.upstream import import_upstream

    import_upstream(repo)  # stand-ins for the frontend-only packages and matcha's BASECFM
    from cosyvoice.flow.DiT.dit import DiT
    from cosyvoice.flow.flow import CausalMaskedDiffWithDiT
    from cosyvoice.flow.flow_matching import CausalConditionalCFM
    from cosyvoice.transformer.upsample_encoder import PreLookaheadLayer

    torch.manual_seed(0)
    cfm_params = types.SimpleNamespace(sigma_min=cfg.sigma_min, solver="euler", t_scheduler=cfg.t_scheduler,
                                       training_cfg_rate=cfg.training_cfg_rate,
                                       inference_cfg_rate=cfg.inference_cfg_rate, reg_loss_type=cfg.reg_loss_type)
    estimator = DiT(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                    mel_dim=cfg.mel_dim, mu_dim=cfg.mu_dim, spk_dim=cfg.spk_dim, out_channels=cfg.out_channels,
                    static_chunk_size=cfg.static_chunk_size, num_decoding_left_chunks=cfg.num_decoding_left_chunks)
    decoder = CausalConditionalCFM(in_channels=2 * cfg.mel_dim + cfg.mu_dim, cfm_params=cfm_params, n_spks=1,
                                   spk_emb_dim=cfg.spk_emb_dim, estimator=estimator)
    model = CausalMaskedDiffWithDiT(
        input_size=cfg.input_size, output_size=cfg.output_size, spk_embed_dim=cfg.spk_embed_dim,
        output_type="mel", vocab_size=cfg.vocab_size, input_frame_rate=cfg.input_frame_rate,
        token_mel_ratio=cfg.token_mel_ratio, pre_lookahead_len=cfg.pre_lookahead_len,
        pre_lookahead_layer=PreLookaheadLayer(cfg.input_size, cfg.pre_lookahead_channels, cfg.pre_lookahead_len),
        decoder=decoder)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100, help="target tokens (2 mel frames each)")
    parser.add_argument("--frames", type=int, default=None, help="target mel frames (overrides --tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=25)
    parser.add_argument("--depth", type=int, default=22, help="DiT blocks (22 in the release)")
    parser.add_argument("--streaming", action="store_true", help="chunked attention (default: full)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up")
    parser.add_argument("--reference-repo", default=None, help="CosyVoice checkout to time upstream on the same weights")
    args = parser.parse_args()

    import jax

    from cosyjax.flow.flow import flow_inference, make_flow

    cfg = full_size_config(args.depth)
    tokens = args.frames // cfg.token_mel_ratio if args.frames else args.tokens
    rng = np.random.default_rng(0)
    token = rng.integers(0, cfg.vocab_size, (1, tokens))
    prompt_token = rng.integers(0, cfg.vocab_size, (1, args.prompt_tokens))
    prompt_feat = rng.standard_normal((1, cfg.token_mel_ratio * args.prompt_tokens, cfg.output_size)).astype(np.float32)
    embedding = rng.standard_normal((1, cfg.spk_embed_dim)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal((1, cfg.output_size, cfg.noise_frames)).astype(np.float32)

    reference = None
    if args.reference_repo:
        import torch

        from cosyjax.convert.flow import convert

        torch.set_num_threads(os.cpu_count() or 1)
        reference = build_reference(args.reference_repo, cfg)
        reference.decoder.rand_noise = torch.from_numpy(noise)  # same starting noise on both sides
        state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
        params = convert(state, cfg, "reference (random init)")
    else:
        print("no --reference-repo given: timing cosyjax only (random Flax init)")
        tok = np.zeros((1, 4), np.int32)
        params = make_flow(cfg).init(jax.random.PRNGKey(0), tok, np.zeros((1, cfg.spk_embed_dim), np.float32),
                                     np.zeros((1, 4, cfg.output_size), np.float32))["params"]
    params = jax.device_put(params)

    def run_jax():
        mel = flow_inference(params, token, prompt_token, prompt_feat, embedding, cfg=cfg, noise=noise,
                             streaming=args.streaming, finalize=True)
        return np.asarray(jax.block_until_ready(mel))

    frames = cfg.token_mel_ratio * (tokens + args.prompt_tokens)
    audio_s = cfg.token_mel_ratio * tokens / (cfg.input_frame_rate * cfg.token_mel_ratio)
    print(f"flow: dim={cfg.dim} depth={cfg.depth} heads={cfg.heads}, {tokens} tokens + {args.prompt_tokens} prompt "
          f"tokens -> {frames} frames ({cfg.token_mel_ratio * tokens} generated = "
          f"{audio_s:.1f} s), {cfg.n_timesteps} steps x CFG batch 2, "
          f"{jax.default_backend()} float32, {os.cpu_count()} CPU cores")
    start = time.perf_counter()
    ours = run_jax()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = run_jax()
        times.append(time.perf_counter() - start)
    rows = [("cosyjax (jit, warm)", min(times)), ("cosyjax first call (incl. compile)", first)]
    if reference is not None:
        import torch

        t = lambda a, dtype=torch.float32: torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
        with torch.inference_mode():
            start = time.perf_counter()
            ref, _ = reference.inference(t(token, torch.int64), t([tokens], torch.int64),
                                         t(prompt_token, torch.int64), t([args.prompt_tokens], torch.int64),
                                         t(prompt_feat), t([prompt_feat.shape[1]], torch.int64), t(embedding),
                                         streaming=args.streaming, finalize=True)
            rows.append(("upstream torch (eager)", time.perf_counter() - start))
        ref = ref.numpy().transpose(0, 2, 1)
        print(f"max |cosyjax - upstream| mel = {np.abs(ours - ref).max():.3g} (max |mel| {np.abs(ref).max():.3g})")
    else:
        print("upstream half skipped: pass --reference-repo PATH (a CosyVoice checkout) to time it")
    print(f"{'':36s} {'seconds':>8s} {'x realtime':>10s}")
    for name, sec in rows:
        print(f"{name:36s} {sec:8.2f} {audio_s / sec:10.2f}")


if __name__ == "__main__":
    main()
