"""Flow row: tokens -> mel for S seconds of speech after the prompt, non-streaming (full attention).

cosyjax ``flow_inference`` (front + 10 Euler steps x CFG batch 2 over the DiT, jitted; the token
length is padded to ``token_bucket``) vs upstream ``CausalMaskedDiffWithDiT.inference`` on the same
weights and the same noise buffer; the two mels are compared.  One cosyjax row per ``Workload.dtypes``
entry (``precision=policy.flow``, params cast to its compute dtype), each compared with the one upstream
(float32) mel and timing; a bf16 row also against the float32 row's mel, and every mel must be finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import finish_row, log, measure, new_row, rows_vs_float32, stage_row
from benchmarks.models import Bundle


def warm_key(bundle: Bundle, total_tokens: int, streaming: bool = False, precision=None) -> tuple:
    """Identifies the compiled flow program used for ``total_tokens`` prompt + target tokens under
    ``precision`` (the flow stage's ``Precision``; None: the float32 policy's)."""
    from cosyjax.flow.flow import token_bucket

    return ("flow", bool(streaming), token_bucket(total_tokens), precision or bundle.policy("float32").flow)


def run(bundle: Bundle) -> list[dict[str, Any]]:
    from cosyjax.flow.flow import flow_inference

    wl = bundle.wl
    cfg = wl.config.flow
    bundle.build("flow")
    noise = bundle.buffers["flow_rand_noise"]
    inp = wl.flow_inputs()
    n, p = inp["token"].shape[1], inp["prompt_token"].shape[1]
    audio_s = wl.audio_seconds(n)
    rows, mels = [], {}
    for dtype in wl.dtypes:
        params = bundle.jax_params("flow", dtype)
        precision = bundle.policy(dtype).flow

        def ours(params=params, precision=precision):
            return np.asarray(flow_inference(params, inp["token"], inp["prompt_token"], inp["prompt_feat"],
                                             inp["embedding"], cfg=cfg, noise=noise, streaming=False, finalize=True,
                                             precision=precision))

        log(f"[flow] cosyjax {dtype}: {n} tokens ({audio_s:.1f} s) after {p} prompt tokens, "
            f"{cfg.n_timesteps} steps x CFG 2")
        m = measure(ours, wl.repeats["flow"])
        bundle.warm.add(warm_key(bundle, n + p, precision=precision))
        rows.append(stage_row("flow", "Flow", f"{n} tokens + {p} prompt → {cfg.token_mel_ratio * n} frames "
                              f"({audio_s:.1f} s), {cfg.n_timesteps} Euler steps × CFG 2", dtype, m,
                              bundle.policy(dtype), params, audio_s, "mel"))
        mels[dtype] = m.output
        log(f"[flow] cosyjax {dtype} {m.best:.2f} s")
    rows_vs_float32(rows, mels)  # the same inputs and weights in bf16 arithmetic against the float32 row
    if bundle.has_reference:
        import torch

        ref = bundle.upstream["flow"]
        dev = bundle.torch_device
        ref.decoder.rand_noise = torch.from_numpy(noise)  # the buffer cosyjax uses (already upstream's)

        def t(a, dtype=torch.float32):
            return torch.from_numpy(np.asarray(a)).to(dtype).to(dev)

        def upstream(tokens=n):
            with torch.inference_mode():
                mel, _ = ref.inference(t(inp["token"][:, :tokens], torch.int64), t([tokens], torch.int64),
                                       t(inp["prompt_token"], torch.int64), t([p], torch.int64),
                                       t(inp["prompt_feat"]), t([inp["prompt_feat"].shape[1]], torch.int64),
                                       t(inp["embedding"]), streaming=False, finalize=True)
                return mel.float().cpu().numpy()

        log("[flow] upstream")
        # eager torch needs no compile: a short call warms the allocator and kernels
        up = measure(upstream, wl.repeats["flow"], warmup=lambda: upstream(min(n, wl.hop)),
                     torch_cuda=dev == "cuda")
        bundle.upstream_ran.add("flow")
        ref_mel = up.output.transpose(0, 2, 1)
        for row in rows:
            diff = float(np.abs(mels[row["dtype"]] - ref_mel).max())
            row.update(upstream=up.best, upstream_device=dev, max_diff=diff,
                       agreement=f"mel max diff {diff:.2g} (largest mel {float(np.abs(ref_mel).max()):.3g})")
            row["memory"]["upstream"] = up.memory
            row["extra"]["upstream_rtf"] = up.best / audio_s
        log(f"[flow] upstream {up.best:.2f} s")
    return [finish_row(row) for row in rows]


def run_stream(bundle: Bundle) -> list[dict[str, Any]]:
    """Extra stage ``flow_stream`` (not in --all): the flow's cost per streaming hop.

    S seconds of tokens streamed with upstream's hop schedule (base, 2 base, 4 base, 4 base, ...; the
    prompt is whole hops, so no pad).  Each non-final hop: cosyjax ``flow_stream_push`` (integrates the
    new frames once against its K/V cache) vs upstream's ``inference(prefix, streaming=True,
    finalize=False)`` re-run on the whole prefix, whose new frames are compared with cosyjax's.  The
    cosyjax stream runs twice and the second run is timed (the first compiles its shapes).  The final
    hop (upstream: full attention over everything) is the non-stream flow row's work and is left out.
    """
    import time

    from cosyjax.flow.stream import flow_stream_init, flow_stream_push
    from cosyjax.model import MAX_HOP_FACTOR, STREAM_SCALE_FACTOR

    wl = bundle.wl
    cfg = wl.config.flow
    params = bundle.jax_params("flow")
    noise = bundle.buffers["flow_rand_noise"]
    inp = wl.flow_inputs()
    tokens, la, ratio = inp["token"], cfg.pre_lookahead_len, cfg.token_mel_ratio
    hops, offset, hop = [], 0, wl.hop
    while offset + hop + la <= tokens.shape[1]:
        hops.append((offset, hop))
        offset += hop
        hop = min(MAX_HOP_FACTOR * wl.hop, STREAM_SCALE_FACTOR * hop)

    def stream_once() -> tuple[list[float], list[np.ndarray]]:
        state = flow_stream_init(cfg, inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
        times, mels = [], []
        for off, h in hops:
            t0 = time.perf_counter()
            mel, state = flow_stream_push(params, state, tokens[:, :off + h + la], cfg=cfg, noise=noise,
                                          finalize=False, out_from=ratio * off)
            times.append(time.perf_counter() - t0)
            mels.append(mel)
        return times, mels

    log(f"[flow_stream] cosyjax: {len(hops)} hops {[h for _, h in hops]} (warm-up stream, then the timed one)")
    warm_t0 = time.perf_counter()
    stream_once()
    warm_s = time.perf_counter() - warm_t0
    times, mels = stream_once()
    rows = []
    for k, ((off, h), seconds, mel) in enumerate(zip(hops, times, mels)):
        prefix = off + h
        row = new_row("flow_stream", f"Flow stream hop {k + 1}",
                      f"{h} new tokens after {off} streamed (+{inp['prompt_token'].shape[1]} prompt); cosyjax "
                      f"K/V-cached push, upstream re-run on the {prefix}-token prefix", "s")
        row.update(cosyjax=seconds, cosyjax_warmup_s=warm_s if k == 0 else None)
        if bundle.has_reference:
            import torch

            ref = bundle.upstream["flow"]
            dev = bundle.torch_device
            ref.decoder.rand_noise = torch.from_numpy(noise)

            def t(a, dtype=torch.float32):
                return torch.from_numpy(np.asarray(a)).to(dtype).to(dev)

            p = inp["prompt_token"].shape[1]
            need = prefix + la
            with torch.inference_mode():
                t0 = time.perf_counter()
                up, _ = ref.inference(t(tokens[:, :need], torch.int64), t([need], torch.int64),
                                      t(inp["prompt_token"], torch.int64), t([p], torch.int64), t(inp["prompt_feat"]),
                                      t([inp["prompt_feat"].shape[1]], torch.int64), t(inp["embedding"]),
                                      streaming=True, finalize=False)
                up_s = time.perf_counter() - t0
            new = up.float().cpu().numpy().transpose(0, 2, 1)[:, ratio * off:]
            diff = float(np.abs(new - mel).max()) if new.shape == mel.shape else float("inf")
            row.update(upstream=up_s, upstream_device=dev, max_diff=diff,
                       agreement=f"new mel frames {mel.shape[1]} / {new.shape[1]}, max diff {diff:.2g}")
        log(f"[flow_stream] hop {k + 1}: cosyjax {seconds:.2f} s" + (
            f", upstream {row['upstream']:.2f} s" if row["upstream"] else ""))
        rows.append(finish_row(row))
    return rows
