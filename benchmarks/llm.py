"""LLM rows: prefill and decode at each batch size.

cosyjax: ``lm.start`` (host checks + jitted prefill) and one ``lm.stream`` chunk of ``llm_steps`` RAS
steps (one jitted ``while_loop``), exactly the calls ``CosyVoice3Model.tts`` makes, with the model's
default sampler.  Warm-up: the same calls with max_len = 1 (same compiled programs, one step).
upstream: ``CosyVoice3LM``'s own pieces in ``inference_wrapper``'s order, batched over rows:
``llm.forward_one_step`` (HF Qwen2 + KV cache), ``llm_decoder``, log_softmax and ``sampling_ids``
(RAS, one call per row, as upstream runs it).  Upstream has no batched decode; the rows share one
batched forward per step.  Outputs: the first-step logits (after prefill) of both, same weights.

Per batch size, one cosyjax measurement per ``Workload.dtypes`` entry (``precision=policy.llm``, params
cast to its compute dtype) and one upstream (float32) measurement that every row's ratio and logits
comparison use.  The logits after the prefill and after the decode chunk must be finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import (finish_row, log, measure, new_row, non_finite, set_cosyjax, set_precision,
                               vs_float32, wall)
from benchmarks.models import Bundle


def _ours(bundle: Bundle, batch: int, dtype: str = "float32"):
    import jax

    from cosyjax.llm import lm
    from cosyjax.llm.sampling import SamplerSettings

    wl = bundle.wl
    cfg = wl.config.llm
    params = bundle.jax_params("llm", dtype)
    precision = bundle.policy(dtype).llm
    settings = SamplerSettings.from_config(cfg.sampling)  # CosyVoice3Model's default sampler
    rows = [wl.llm_request(r) for r in range(batch)]
    reqs = [lm.LMRequest.zero_shot(r["text"], r["prompt_text"], r["prompt_speech"]) for r in rows]
    keys = jax.random.split(jax.random.key(wl.seed), batch)
    prepared = lm.prepare(cfg, reqs, keys)

    def run(**prepare_kwargs):
        def prefill():
            state = lm.start(params, cfg, reqs, keys, settings, precision=precision, **prepare_kwargs)
            return state, np.asarray(state.logits)

        (state, logits), prefill_s = wall(prefill)
        (_, state, chunk), decode_s = wall(lambda: next(lm.stream(params, cfg, state, settings,
                                                                   chunk_size=wl.llm_steps, precision=precision)))
        return {"prefill_s": prefill_s, "decode_s": decode_s, "steps": int(chunk.steps), "logits": logits,
                "last_logits": np.asarray(state.logits)}  # read after the timed chunk

    text_len = len(rows[0]["text"])
    # max_len = int(text_len * max_ratio) = 1: the same programs (cache_len is kept), one decode step.
    warm = lambda: run(cache_len=prepared.cache_len, max_ratio=1.5 / text_len)  # noqa: E731
    key = ("llm", batch, prepared.ids.shape[1], prepared.cache_len, wl.llm_steps, settings, precision)
    return run, warm, key, prepared, rows, params


def _upstream(bundle: Bundle, rows: list[dict[str, np.ndarray]]):
    import torch

    wl = bundle.wl
    cfg = wl.config.llm
    up = bundle.upstream["llm"]
    dev = bundle.torch_device
    batch = len(rows)
    min_len = int(len(rows[0]["text"]) * 2)  # Qwen2LM.inference: min_token_text_ratio = 2
    sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)

    def lm_input(r):  # Qwen2LM.inference's lm_input: [sos, prompt_text + text, task_id, prompt_speech]
        speech = up.speech_embedding.weight
        text = torch.from_numpy(np.concatenate([r["prompt_text"], r["text"]]))[None].to(dev)
        return torch.cat([speech[cfg.sos].reshape(1, 1, -1), up.llm.model.model.embed_tokens(text),
                          speech[cfg.task_id].reshape(1, 1, -1),
                          up.speech_embedding(torch.from_numpy(r["prompt_speech"])[None].to(dev))], dim=1)

    def run(steps: int):
        with torch.inference_mode():
            start = _now()
            x = torch.cat([lm_input(r) for r in rows])
            length = x.shape[1]
            masks = torch.tril(torch.ones((batch, length, length), device=dev)).to(torch.bool)
            y, cache = up.llm.forward_one_step(x, masks=masks, cache=None)
            logits = up.llm_decoder(y[:, -1])
            logp = logits.log_softmax(dim=-1)
            sync()
            mid = _now()
            out: list[list[int]] = [[] for _ in range(batch)]
            for i in range(steps):
                tops = [up.sampling_ids(logp[b], out[b], 25, ignore_eos=i < min_len) for b in range(batch)]
                for b in range(batch):
                    out[b].append(tops[b])
                x = up.speech_embedding.weight[torch.tensor(tops, device=dev)].reshape(batch, 1, -1)
                masks = torch.tril(torch.ones((batch, 1, 1), device=dev)).to(torch.bool)
                y, cache = up.llm.forward_one_step(x, masks=masks, cache=cache)
                logp = up.llm_decoder(y[:, -1]).log_softmax(dim=-1)
            sync()
            end = _now()
        return {"prefill_s": mid - start, "decode_s": end - mid, "steps": steps,
                "logits": logits.float().cpu().numpy(), "tokens": out}

    return run


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fastest prefill and fastest decode over the timed runs (logits of the first run)."""
    best = dict(runs[0])
    best["prefill_s"] = min(r["prefill_s"] for r in runs)
    best["decode_s"] = min(r["decode_s"] for r in runs)
    return best


def _now() -> float:
    import time

    return time.perf_counter()


def run(bundle: Bundle) -> list[dict[str, Any]]:
    """Prefill and decode rows for every batch size: one pair per dtype, prefill rows first."""
    wl = bundle.wl
    cfg = wl.config.llm
    out = []
    for batch in wl.batch_sizes:
        ours: dict[str, Any] = {}
        for dtype in wl.dtypes:
            ours_run, ours_warm, key, prepared, rows, params = _ours(bundle, batch, dtype)
            prompt = int(prepared.lengths[0])
            log(f"[llm] bs={batch}: cosyjax {dtype} ({prompt}-token prompt, {wl.llm_steps} steps)")
            m = measure(ours_run, wl.repeats["llm"], warmup=ours_warm)
            bundle.warm.add(key)
            ours[dtype] = (m, _best(m.outputs), params)
        up_o, up_mem = None, None
        if bundle.has_reference:
            log(f"[llm] bs={batch}: upstream")
            up_run = _upstream(bundle, rows)
            # eager torch compiles nothing: one short warm-up call for the first batch size only
            warm = False if "llm" in bundle.upstream_ran else (lambda: up_run(1))
            up = measure(lambda: up_run(wl.llm_steps), wl.repeats["llm"], warmup=warm,
                         torch_cuda=bundle.torch_device == "cuda")
            bundle.upstream_ran.add("llm")
            up_o, up_mem = _best(up.outputs), up.memory
        workload = f"bs {batch}, {prompt}-token zero-shot prompt"
        pres, decs = [], []
        for dtype, (m, o, params) in ours.items():
            pre = set_cosyjax(new_row("llm", f"LLM prefill, bs {batch}", workload, "ms", batch, dtype), m,
                              1e3 * o["prefill_s"])
            pre["extra"]["prompt_tokens"] = batch * prompt  # real tokens; cosyjax pads each row to a bucket
            pre["extra"]["cosyjax_padded_prompt_tokens"] = batch * int(prepared.ids.shape[1])
            dec = new_row("llm", f"LLM decode, bs {batch}",
                          f"bs {batch}, {o['steps']} RAS steps after the prompt; per generated token", "ms/token",
                          batch, dtype)
            set_cosyjax(dec, m, 1e3 * o["decode_s"] / o["steps"] / batch)
            dec["cosyjax_warmup_s"] = dec["cosyjax_compile_s"] = None  # shown once, on the prefill row
            for row in (pre, dec):
                set_precision(row, bundle.policy(dtype), "llm", params)
            non_finite(pre, "first-step logits", o["logits"])
            non_finite(dec, "logits after the decode chunk", o["last_logits"])
            if dtype != "float32" and "float32" in ours:
                vs_float32(pre, o["logits"], ours["float32"][1]["logits"])
            if up_mem:
                pre["memory"]["upstream"] = dec["memory"]["upstream"] = up_mem
            dec["extra"]["cosyjax_ms_per_step"] = 1e3 * o["decode_s"] / o["steps"]
            if up_o is not None:
                diff = float(np.abs(o["logits"] - up_o["logits"]).max())
                scale = float(np.abs(up_o["logits"]).max())
                agree = f"first-step logits max diff {diff:.2g} (largest logit {scale:.3g})"
                pre.update(upstream=1e3 * up_o["prefill_s"], upstream_device=bundle.torch_device, max_diff=diff,
                           agreement=agree)
                dec.update(upstream=1e3 * up_o["decode_s"] / up_o["steps"] / batch,
                           upstream_device=bundle.torch_device, agreement="sampled tokens differ (own RNGs)")
                dec["extra"]["upstream_ms_per_step"] = 1e3 * up_o["decode_s"] / up_o["steps"]
                stops = sum(t >= cfg.speech_token_size for row in up_o["tokens"] for t in row)
                if stops:
                    dec["extra"]["upstream_stop_ids_drawn"] = int(stops)
            pres.append(finish_row(pre))
            decs.append(finish_row(dec))
            log(f"[llm] bs={batch}: {dtype} decode {dec['cosyjax']:.2f} ms/token"
                + (f" vs upstream {dec['upstream']:.2f}" if dec["upstream"] else ""))
        out += pres + decs
    return out
