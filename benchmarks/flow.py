"""Flow row: tokens -> mel for S seconds of speech after the prompt, non-streaming (full attention).

cosyjax ``flow_inference`` (front + 10 Euler steps x CFG batch 2 over the DiT, jitted; the token
length is padded to ``token_bucket``) vs upstream ``CausalMaskedDiffWithDiT.inference`` on the same
weights and the same noise buffer; the two mels are compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import finish_row, log, measure, new_row, set_cosyjax
from benchmarks.models import Bundle


def warm_key(bundle: Bundle, total_tokens: int, streaming: bool = False) -> tuple:
    """Identifies the compiled flow program used for ``total_tokens`` prompt + target tokens."""
    from cosyjax.flow.flow import token_bucket

    return ("flow", bool(streaming), token_bucket(total_tokens))


def run(bundle: Bundle) -> list[dict[str, Any]]:
    from cosyjax.flow.flow import flow_inference

    wl = bundle.wl
    cfg = wl.config.flow
    params = bundle.jax_params("flow")
    noise = bundle.buffers["flow_rand_noise"]
    inp = wl.flow_inputs()
    n, p = inp["token"].shape[1], inp["prompt_token"].shape[1]
    audio_s = wl.audio_seconds(n)

    def ours():
        return np.asarray(flow_inference(params, inp["token"], inp["prompt_token"], inp["prompt_feat"],
                                         inp["embedding"], cfg=cfg, noise=noise, streaming=False, finalize=True))

    log(f"[flow] cosyjax: {n} tokens ({audio_s:.1f} s) after {p} prompt tokens, {cfg.n_timesteps} steps x CFG 2")
    m = measure(ours, wl.repeats["flow"])
    bundle.warm.add(warm_key(bundle, n + p))
    row = new_row("flow", "Flow", f"{n} tokens + {p} prompt → {cfg.token_mel_ratio * n} frames ({audio_s:.1f} s), "
                  f"{cfg.n_timesteps} Euler steps × CFG 2", "s")
    set_cosyjax(row, m, m.best)
    row["extra"]["cosyjax_rtf"] = m.best / audio_s
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
        diff = float(np.abs(m.output - ref_mel).max())
        row.update(upstream=up.best, upstream_device=dev, max_diff=diff,
                   agreement=f"mel max diff {diff:.2g} (max |mel| {float(np.abs(ref_mel).max()):.3g})")
        row["memory"]["upstream"] = up.memory
        row["extra"]["upstream_rtf"] = up.best / audio_s
    log(f"[flow] cosyjax {m.best:.2f} s" + (f", upstream {row['upstream']:.2f} s" if row["upstream"] else ""))
    return [finish_row(row)]
