"""End-to-end rows: non-stream RTF and streaming first-chunk latency, batch 1.

Both sides run their own ``CosyVoice3Model.tts`` (cosyjax ``cosyjax.model``; upstream
``cosyvoice/cli/model.py``) on one zero-shot request over the same random-weight LLM, flow and HiFT:
LLM decode (prefill + max_len RAS steps: the random LLM never draws a stop id, see
``models.random_llm_state_dict``, so both sides generate exactly ``Workload.e2e_tokens`` tokens) ->
silent-token filter -> flow -> HiFT, token ids in and waveform out.  Not included: the text and
audio frontend (tokenizer, prompt mel, speaker embedding, speech tokenizer).  Upstream runs the LLM
in a thread, as it does in production; cosyjax pulls LLM chunks lazily.

- e2e: wall time of the whole ``tts(stream=False)`` call / seconds of audio produced (RTF).
- stream: time from calling ``tts(stream=True)`` to the first audio chunk; then the request is
  abandoned (upstream's LLM thread is stopped through a wrapper around ``llm.inference`` that ends
  its token generator, and joined).  Both models start the request with a fresh hop schedule.

Warm-up: cosyjax's e2e needs no call of its own when the LLM, flow and HiFT rows already compiled
the same padded shapes in this process (``Bundle.warm``); otherwise one full call.  The timed call's
compile count is recorded either way (``cosyjax_timed_compiles``; 0 expected).  Upstream gets a short
warm-up request (LLM stopped after one hop) unless its modules already ran in this process.

The e2e row is repeated per ``Workload.dtypes`` entry (``bundle.model(dtype)``: ``CosyVoice3Model`` under
that precision policy, same weights); upstream's request runs once and every row's ratio is against it.
The audio must be finite.  The stream row runs the float32 model only.
"""

from __future__ import annotations

import threading
import time
import types
from typing import Any

import numpy as np

from benchmarks import flow as flow_stage
from benchmarks import hift as hift_stage
from benchmarks.common import (finish_row, log, measure, new_row, non_finite, set_cosyjax, set_precision,
                               vs_float32)
from benchmarks.models import Bundle
from cosyjax.model import Trace


class LLMControl:
    """Wraps upstream ``CosyVoice3LM.inference`` (an instance attribute, the class method is untouched):
    the generator ends after ``limit`` tokens or when ``stop`` is set; ``count`` holds the tokens it
    yielded in the last request."""

    def __init__(self, lm):
        self.stop = threading.Event()
        self.limit: int | None = None
        self.count = 0
        control = self
        original = type(lm).inference

        def inference(self, *args, **kwargs):
            control.count = 0
            for token in original(self, *args, **kwargs):
                if control.stop.is_set() or (control.limit is not None and control.count >= control.limit):
                    return
                control.count += 1
                yield token

        lm.inference = types.MethodType(inference, lm)


def _control(bundle: Bundle) -> LLMControl:
    if not hasattr(bundle, "llm_control"):
        bundle.llm_control = LLMControl(bundle.upstream["llm"])
    return bundle.llm_control


def _ours_kwargs(bundle: Bundle) -> dict[str, Any]:
    wl = bundle.wl
    req = wl.llm_request(0)
    fin = wl.flow_inputs()
    return dict(text_ids=req["text"], prompt_text_ids=req["prompt_text"], llm_prompt_speech_tokens=req["prompt_speech"],
                flow_prompt_speech_tokens=fin["prompt_token"][0], prompt_feat=fin["prompt_feat"][0],
                embedding=fin["embedding"][0], key=wl.seed)


def _upstream_call(bundle: Bundle, stream: bool):
    """A function starting upstream's tts generator for the e2e request (fresh hop schedule)."""
    import torch

    wl = bundle.wl
    model = bundle.upstream_model()
    req = wl.llm_request(0)
    fin = wl.flow_inputs()

    def ids(a):
        return torch.from_numpy(np.asarray(a, np.int64)).to(torch.int32).reshape(1, -1)

    kwargs = dict(text=ids(req["text"]), flow_embedding=torch.from_numpy(fin["embedding"]),
                  prompt_text=ids(req["prompt_text"]), llm_prompt_speech_token=ids(req["prompt_speech"]),
                  flow_prompt_speech_token=ids(fin["prompt_token"]),
                  prompt_speech_feat=torch.from_numpy(fin["prompt_feat"]), stream=stream)

    def start():
        model.token_hop_len = bundle.upstream_hop  # upstream never resets it between requests
        return model.tts(**kwargs)

    return start


def _finish_upstream_stream(bundle: Bundle, gen, before: set) -> None:
    """Abandon an upstream stream request: stop its LLM thread, close the generator, join the thread."""
    control = _control(bundle)
    control.stop.set()
    gen.close()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=600)
    control.stop.clear()


def _warm_key(seed: int) -> None:
    """What ``CosyVoice3Model`` does to the request key before the LLM (``key[None]``)."""
    import jax

    jax.block_until_ready(jax.random.key(seed)[None])


def _ours_prewarmed(bundle: Bundle, m) -> bool:
    """Whether the LLM, flow and HiFT rows compiled every program the e2e request on model ``m`` uses."""
    import jax

    from cosyjax.llm import lm

    wl = bundle.wl
    cfg = wl.config.llm
    req = wl.llm_request(0)
    prepared = lm.prepare(cfg, [lm.LMRequest.zero_shot(req["text"], req["prompt_text"], req["prompt_speech"])],
                          jax.random.split(jax.random.key(0), 1))
    # the model decodes in its one KV-cache size (``m.cache_len``, from its limits), not the request's own
    keys = {("llm", 1, prepared.ids.shape[1], m.cache_len, m.schedule.base, m.sampler, m.policy.llm),
            flow_stage.warm_key(bundle, wl.prompt_tokens + wl.e2e_tokens, precision=m.policy.flow),
            hift_stage.warm_key(bundle.e2e_mel_frames(), m.policy)}
    return keys <= bundle.warm


def run_e2e(bundle: Bundle) -> list[dict[str, Any]]:
    wl = bundle.wl
    kwargs = _ours_kwargs(bundle)
    sr = wl.config.hift.sampling_rate
    rows, outs = [], {}
    for dtype in wl.dtypes:
        m = bundle.model(dtype)

        def ours(m=m):
            trace = Trace()
            chunks = [c["tts_speech"] for c in m.tts(**kwargs, trace=trace)]
            return np.concatenate(chunks, axis=1), np.asarray(trace.llm_tokens), len(trace.flow_tokens)

        prewarmed = _ours_prewarmed(bundle, m)
        log(f"[e2e] cosyjax {dtype}: tts(stream=False), {wl.e2e_text_len} text tokens -> {wl.e2e_tokens} speech "
            f"tokens ({'programs compiled by the stage rows' if prewarmed else 'full warm-up call'})")
        # prewarmed: only the request's PRNG-key handling is new (a one-op program)
        mo = measure(ours, wl.repeats["e2e"], warmup=(lambda: _warm_key(wl.seed)) if prewarmed else None)
        audio, llm_tokens, n_flow = mo.output
        n_llm = len(llm_tokens)
        audio_s = audio.shape[1] / sr
        row = new_row("e2e", "E2E non-stream, bs 1",
                      f"tts(stream=False): LLM {n_llm} tokens → flow → HiFT, {audio_s:.1f} s audio; RTF = wall / audio",
                      "RTF", dtype=dtype)
        set_cosyjax(row, mo, mo.best / audio_s)
        set_precision(row, m.policy, None, m.params)
        row["extra"].update(cosyjax_wall_s=mo.best, cosyjax_audio_s=audio_s, cosyjax_llm_tokens=n_llm,
                            cosyjax_flow_tokens=n_flow, cosyjax_warmup="stage rows" if prewarmed else "full call")
        non_finite(row, "audio", audio)
        outs[dtype] = (audio, llm_tokens)
        rows.append(row)
        log(f"[e2e] cosyjax {dtype} RTF {row['cosyjax']:.2f} ({mo.best:.1f} s)")
    for row in rows:
        if row["dtype"] != "float32" and "float32" in outs:
            (audio, tokens), (audio32, tokens32) = outs[row["dtype"]], outs["float32"]
            same = tokens.shape == tokens32.shape and bool((tokens == tokens32).all())
            # the same key samples other tokens once bf16 moves the logits: then the audio is not comparable
            if same:
                vs_float32(row, audio, audio32)
            row["extra"].setdefault("vs_float32", {})["same_llm_tokens"] = same
    if bundle.has_reference:
        control = _control(bundle)
        start = _upstream_call(bundle, stream=False)

        def upstream():
            chunks = [c["tts_speech"].numpy() for c in start()]
            return np.concatenate(chunks, axis=1), control.count

        def upstream_warm():
            control.limit = wl.hop + wl.config.flow.pre_lookahead_len
            try:
                return upstream()
            finally:
                control.limit = None

        warmed = {"llm", "flow", "hift"} <= bundle.upstream_ran
        log("[e2e] upstream: tts(stream=False)")
        mu = measure(upstream, wl.repeats["e2e"], warmup=False if warmed else upstream_warm,
                     torch_cuda=bundle.torch_device == "cuda")
        bundle.upstream_ran.update({"llm", "flow", "hift"})
        up_audio, up_tokens = mu.output
        up_audio_s = up_audio.shape[1] / sr
        for row in rows:
            extra = row["extra"]
            row.update(upstream=mu.best / up_audio_s, upstream_device=bundle.torch_device,
                       agreement=f"LLM tokens {extra['cosyjax_llm_tokens']} / {up_tokens}, audio "
                                 f"{extra['cosyjax_audio_s']:.2f} s / {up_audio_s:.2f} s (different sampled tokens)")
            row["memory"]["upstream"] = mu.memory
            extra.update(upstream_wall_s=mu.best, upstream_audio_s=up_audio_s, upstream_llm_tokens=up_tokens)
        log(f"[e2e] upstream RTF {mu.best / up_audio_s:.2f} ({mu.best:.1f} s)")
    return [finish_row(row) for row in rows]


def run_stream(bundle: Bundle) -> list[dict[str, Any]]:
    wl = bundle.wl
    m = bundle.model()
    kwargs = _ours_kwargs(bundle)
    sr = wl.config.hift.sampling_rate

    def ours():
        start = time.perf_counter()
        gen = m.tts(**kwargs, stream=True)
        first = next(gen)["tts_speech"]
        latency = time.perf_counter() - start
        gen.close()
        return latency, first.shape[1]

    log("[stream] cosyjax: tts(stream=True) until the first chunk")
    mo = measure(ours, wl.repeats["stream"])
    latency = min(o[0] for o in mo.outputs)
    samples = mo.output[1]
    need = wl.hop + wl.config.flow.pre_lookahead_len
    row = new_row("stream", "Stream first chunk, bs 1",
                  f"tts(stream=True): request → first audio chunk (first hop: {need} LLM tokens → flow → HiFT)", "s")
    set_cosyjax(row, mo, latency)
    row["extra"].update(cosyjax_first_chunk_s=samples / sr)
    if bundle.has_reference:
        start_call = _upstream_call(bundle, stream=True)
        _control(bundle)

        def upstream():
            before = set(threading.enumerate())
            start = time.perf_counter()
            gen = start_call()
            first = next(gen)["tts_speech"]
            latency = time.perf_counter() - start
            _finish_upstream_stream(bundle, gen, before)
            return latency, first.shape[1]

        warmed = {"llm", "flow", "hift"} <= bundle.upstream_ran
        log("[stream] upstream: tts(stream=True) until the first chunk")
        mu = measure(upstream, wl.repeats["stream"], warmup=False if warmed else None,
                     torch_cuda=bundle.torch_device == "cuda")
        bundle.upstream_ran.update({"llm", "flow", "hift"})
        up_latency = min(o[0] for o in mu.outputs)
        up_samples = mu.output[1]
        row.update(upstream=up_latency, upstream_device=bundle.torch_device,
                   agreement=f"first chunk {samples / sr:.2f} s / {up_samples / sr:.2f} s of audio")
        row["memory"]["upstream"] = mu.memory
        row["extra"].update(upstream_first_chunk_s=up_samples / sr)
    log(f"[stream] cosyjax {latency:.2f} s" + (f", upstream {row['upstream']:.2f} s" if row["upstream"] else ""))
    return [finish_row(row)]
