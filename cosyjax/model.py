"""Model orchestration: speech-token ids + prompt features -> waveform chunks.

The JAX counterpart of upstream ``cosyvoice/cli/model.py::CosyVoice3Model`` (whose ``tts`` is
``CosyVoice2Model.tts``), working on token ids and prompt features; the text/audio frontend is
elsewhere.  ``CosyVoice3Model.tts`` is a generator of ``{"tts_speech": np.ndarray [1, samples]}``:

Non-stream (SPEC 8.1), one yield per call::

    tokens = LLM to completion (silent-token filter applied)
    mel    = flow(tokens, streaming=False, finalize=True)
    mel    = linear-interpolate to int(T / speed) frames          (speed != 1 only)
    wav    = hift(mel, finalize=True)

Stream (SPEC 8.2), upstream's hop schedule::

    base = static_chunk_size // token_mel_ratio   (25 for the release: one DiT chunk of 50 frames)
    hop  = base; pad = ceil(P / hop) * hop - P    (P = flow prompt tokens; aligns hops to DiT chunks)
    loop: this = hop + (pad if offset == 0 else 0)
          if len(tokens) - offset >= this + pre_lookahead_len:
              mel = flow(tokens[:offset + this + lookahead], streaming=True, finalize=False)
              M  += mel[ratio * offset:]; yield hift(M, finalize=False)[emitted:]
              offset += this; hop = min(max_hop, scale * hop)
          if llm done and len(tokens) - offset < this + lookahead: break
    final: M += flow(all tokens, streaming=False, finalize=True)[ratio * offset:]
           yield hift(M, finalize=True)[emitted:]

Upstream quirks, each behind an option:

- ``upstream_hop_quirk`` (off by default): upstream keeps the hop in an *instance* attribute that
  is never reset, so on one model the first stream request runs hops base+pad, 2 base, 4 base, ...
  and every later request starts where the previous one stopped (4 base = 100 for the release),
  with the pad computed against that hop.  Its break test also uses the hop just processed
  (stale), which only matters when the first hop (max + pad) exceeds the next.  Here that shared
  hop is an explicit ``HopState``: pass the same one to several ``tts(..., hop_state=...)`` calls
  to reproduce upstream (the parity runner does), or set ``upstream_hop_quirk=True`` to have the
  model share its own ``hop_state`` across every request, as upstream does.  By default every
  request gets the fresh schedule, so a request's output never depends on earlier requests.
Reproduced by default:

- ``silent_filter=True``: ``CosyVoiceModel.llm_job`` drops silent/breath tokens
  (``SILENT_TOKENS``) from the flow input once a run of them exceeds ``MAX_SILENT_RUN`` (5); the LLM
  still saw them (our decode loop feeds every sampled token back, as upstream's).  The counter is
  reset only by a non-silent token, so in a run of 8, tokens 6..8 are dropped.

Voice conversion (``source_speech_tokens``) skips the LLM and the filter (upstream ``vc_job``), and
the flow prompt is used as given, without the 2:1 token/frame trim of zero-shot (SPEC 6).
``forced_tokens`` replaces the LLM's output (filter applied, like upstream's llm_job) for parity.

Randomness: one PRNG key per request drives the LLM sampler, and decode step i uses
``fold_in(key, i)``, so the tokens do not depend on how the decode is chunked: stream and
non-stream calls with the same key produce the same tokens.  The audio of two calls with the same
key and options is identical; stream and non-stream audio differ (chunk-causal attention and
held-back look-ahead; ``stream_seams`` measures by how much), and with a shared ``HopState`` a
stream's audio also depends on the requests before it (its hop sizes do).

Re-entrancy: the model holds no per-request state.  A request's bookkeeping lives in the objects
passed to ``tts``: ``trace`` (a ``Trace`` it fills) and ``hop_state`` (only for upstream's shared
hop), so two requests may run on one model at the same time.  The flow noise is the converted
model's fixed buffer and the HiFT source noise is fixed per model (``hift_noise``), as upstream's
construction-time buffers are.

Streaming cost: by default (``flow_carry=True``) each hop's flow frames are integrated once, with a
per-Euler-step, per-layer K/V cache (``cosyjax.flow.stream``), and the vocoder carries its state
(``hift_carry=True``), so a hop costs work for its new frames only; upstream re-runs both on the
growing prefix.  The hops give the same mel as the re-run (float32 summation order aside).
``flow_carry=False`` re-runs the flow as upstream does.

- ``final_full_attention=True`` (upstream): the last stream chunk re-runs the whole flow with full
  attention (``streaming=False``), so its frames see the future frames and the earlier ones are
  recomputed differently from what was streamed; that one call costs a non-stream flow pass.
  ``False`` computes the last chunk chunk-causally and incrementally like the others, so the stream
  equals one chunk-causal pass over all tokens (``flow_inference(..., streaming=True)``).

``stream_seams`` measures how far stream output is from offline.

Legend: B batch, N tokens, T mel frames, C mel bins.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.checkpoint import ConvertedModel, cast_params
from cosyjax.flow.flow import flow_inference
from cosyjax.flow.prompt import FlowPrompt
from cosyjax.flow.stream import FlowStreamState, flow_stream_push
from cosyjax.hift.generator import hift_inference, hift_stream_step
from cosyjax.hift.source import HiftNoise
from cosyjax.hift.stream import hift_stream_push
from cosyjax.limits import Limits
from cosyjax.llm import lm
from cosyjax.llm.sampling import SamplerSettings
from cosyjax.precision import PrecisionPolicy
from cosyjax.programs import ProgramCache, program_key
from cosyjax.request import (MAX_HOP_FACTOR, MAX_SILENT_RUN, SILENT_TOKENS, STREAM_SCALE_FACTOR, HopSchedule,
                             HopState, Request, RequestRun, SilentTokenFilter, Trace, _as_key, _ids,
                             interpolate_linear)

# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class CosyVoice3Model:
    """CosyVoice3 on token ids: LLM -> flow -> HiFT, non-stream and stream (upstream's contract).

    Args:
      converted: params, buffers and config (``cosyjax.checkpoint.ConvertedModel``).
      dtype: the precision policy (``cosyjax.precision.PrecisionPolicy``): "float32" (parity),
        "bfloat16" (every stage's matmuls/convs in bf16 with float32 accumulation), "auto" (per
        backend: float32 on CPU, bf16 on GPU/TPU), a ``PrecisionPolicy``, or None: "float32" for a
        float32 checkpoint, "bfloat16" for a bf16 one.  Each stage's params are cast to its compute
        dtype once, here (the HiFT f0 predictor and NSF merge stay float32).
      sampler: LLM sampler settings; default RAS with the release's ``sampling`` section.
      hift_noise: the HiFT source's random buffers, fixed for the model like upstream's
        construction-time ``torch.rand`` buffers: None (seed 0), an int seed, a key or ``HiftNoise``.
      upstream_hop_quirk: share one ``HopState`` (``self.hop_state``) across every stream request,
        as upstream's never-reset hop does (see the module docstring); off by default.
      silent_filter, silent_tokens, max_silent_run: upstream's silent-token filter.
      max_hop_factor, stream_scale_factor: hop growth (upstream literals 4 and 2).
      f0_float64: HiFT f0 net and NSF phase in float64 like upstream: None keeps the policy's (on for
        float32 on CPU, off on GPU/TPU and for bf16); a bool replaces the policy's ``f0_float64``.
      hift_carry: stream the vocoder with carried state (``cosyjax.hift.stream``: O(chunk) work per hop;
        equal to the re-run up to buffer-size-dependent float32 rounding, tests/test_hift_stream.py).
        False re-runs the vocoder on all mel so far at every hop, as upstream does (O(total) per hop).
      flow_carry: integrate each stream hop's flow frames once against a K/V cache
        (``cosyjax.flow.stream``; O(new frames) DiT work per hop, cache memory
        ``flow.stream.cache_bytes_per_frame`` per frame).  False re-runs the flow on the prefix.
      final_full_attention: upstream's last stream chunk with full attention over everything (see
        the module docstring); False keeps it chunk-causal and incremental.
      limits: what one request may ask for (``cosyjax.limits.Limits``): requests beyond them are
        refused with the numbers, the LLM's output is capped by ``max_output_seconds``, and the KV
        cache is sized once from them.  ``warmup`` compiles every program they allow.
    """

    def __init__(self, converted: ConvertedModel, dtype: str | PrecisionPolicy | None = None, *,
                 sampler: SamplerSettings | None = None, hift_noise: Any = None,
                 upstream_hop_quirk: bool = False, silent_filter: bool = True,
                 silent_tokens: Sequence[int] = SILENT_TOKENS, max_silent_run: int = MAX_SILENT_RUN,
                 max_hop_factor: int = MAX_HOP_FACTOR, stream_scale_factor: int = STREAM_SCALE_FACTOR,
                 f0_float64: bool | None = None, hift_carry: bool = True, flow_carry: bool = True,
                 final_full_attention: bool = True, limits: Limits | None = None):
        for stage in ("llm", "flow", "hift"):
            if stage not in converted.params:
                raise ValueError(f"converted model has no {stage!r} params")
        if "flow_rand_noise" not in converted.buffers:
            raise ValueError("converted model has no 'flow_rand_noise' buffer")
        self.config = converted.config
        self.policy = (dtype if isinstance(dtype, PrecisionPolicy)
                       else PrecisionPolicy.resolve(dtype if dtype is not None else converted.dtype))
        # float leaves take the stage's compute dtype, except checkpoint.FLOAT32_ONLY (the HiFT f0 path)
        self.params = {stage: jax.tree.map(jnp.asarray, cast_params(converted.params[stage],
                                                                    self.policy.stage(stage).compute, (stage,)))
                       for stage in ("llm", "flow", "hift")}
        self.flow_noise = np.asarray(converted.buffers["flow_rand_noise"], np.float32)
        self.sampler = sampler or SamplerSettings.from_config(self.config.llm.sampling)
        self.hift_noise = hift_noise
        if isinstance(hift_noise, HiftNoise):
            self.hift_noise = HiftNoise(np.asarray(hift_noise.rand_ini, np.float32),
                                        np.asarray(hift_noise.uniform, np.float32))
        self.schedule = HopSchedule.from_config(self.config, max_hop_factor, stream_scale_factor)
        self.upstream_hop_quirk = upstream_hop_quirk
        self.silent_filter = silent_filter
        self.silent_tokens = tuple(int(t) for t in silent_tokens)
        self.max_silent_run = max_silent_run
        if f0_float64 is not None:  # the policy is the one place the vocoder reads it from
            self.policy = dataclasses.replace(self.policy, f0_float64=bool(f0_float64))
        self.hift_carry = hift_carry
        self.flow_carry = flow_carry
        self.final_full_attention = final_full_attention
        # upstream's never-reset self.token_hop_len, shared by every request only with the quirk on
        self.hop_state = HopState(self.schedule.base)
        self.limits = limits or Limits()
        rate = self.config.token_frame_rate
        self.cache_len = self.limits.cache_len(rate, lm.bucket)
        # Compiled stage programs (shared by every request, like jit's own cache; see cosyjax.programs).
        self.programs = ProgramCache()

    @property
    def f0_float64(self) -> bool:
        """Whether the vocoder's f0 net and NSF phase run in float64 (the policy's ``f0_float64``)."""
        return self.policy.f0_float64

    @property
    def dtype(self) -> str:
        """The policy's name: "float32", "bfloat16" or "mixed" (what batch fingerprints and logs record)."""
        return self.policy.name

    # ---------------------------------------------------------------- validation

    def _request(self, text_ids, prompt_text_ids, llm_prompt_speech_tokens, flow_prompt_speech_tokens,
                 prompt_feat, embedding, source_speech_tokens, forced_tokens, speed, key, stream,
                 voice_prefix=None) -> Request:
        cfg = self.config
        c = cfg.flow.output_size
        text = _ids("text_ids", text_ids)
        prompt_text = _ids("prompt_text_ids", prompt_text_ids)
        llm_prompt = _ids("llm_prompt_speech_tokens", llm_prompt_speech_tokens)
        flow_prompt = _ids("flow_prompt_speech_tokens", flow_prompt_speech_tokens)
        source = None if source_speech_tokens is None else _ids("source_speech_tokens", source_speech_tokens)
        forced = None if forced_tokens is None else _ids("forced_tokens", forced_tokens)
        if source is not None and forced is not None:
            raise ValueError("give either source_speech_tokens (voice conversion) or forced_tokens, not both")
        if source is not None and source.size == 0:
            raise ValueError("source_speech_tokens is empty: voice conversion needs source tokens")
        if forced is not None and forced.size == 0:
            raise ValueError("forced_tokens is empty")
        self._check_limits(text, prompt_text, llm_prompt, flow_prompt, source if source is not None else forced,
                           uses_llm=source is None and forced is None)
        # The flow starts every frame from the fixed noise buffer: prompt + generated frames must fit,
        # which bounds the tokens before anything runs (the LLM is capped, given tokens are refused).
        noise_frames, ratio = self.flow_noise.shape[-1], cfg.flow.token_mel_ratio
        room = min(noise_frames // ratio - int(flow_prompt.size), self.limits.output_tokens(cfg.token_frame_rate))
        if room < 1:
            raise ValueError(f"flow_prompt_speech_tokens: {flow_prompt.size} prompt tokens fill the flow's "
                             f"{noise_frames}-frame noise buffer ({ratio} frames per token); nothing is left to generate")
        for name, ids in (("forced_tokens", forced), ("source_speech_tokens", source)):
            if ids is not None and ids.size > room:
                raise ValueError(f"{name}: {ids.size} tokens + {flow_prompt.size} prompt tokens need "
                                 f"{ratio * (ids.size + flow_prompt.size)} mel frames; the flow's noise buffer holds "
                                 f"{noise_frames}")
        if source is None and forced is None:
            req = lm.LMRequest(tuple(int(t) for t in text), tuple(int(t) for t in prompt_text),
                               tuple(int(t) for t in llm_prompt), max_tokens=room)
            lm.validate_request(cfg.llm, req)  # empty text / id ranges
        for name, ids in (("forced_tokens", forced), ("source_speech_tokens", source)):
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= cfg.flow.vocab_size):
                raise ValueError(f"{name}: ids must lie in [0, {cfg.flow.vocab_size}), found "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
        if embedding is None:
            raise ValueError(f"embedding: required, a [{cfg.flow.spk_embed_dim}] speaker embedding")
        feat = np.zeros((0, c), np.float32) if prompt_feat is None else np.asarray(prompt_feat)
        emb = np.asarray(embedding)
        try:  # one request: [F, C] / [E] (or upstream's leading batch of 1), checked once as a FlowPrompt
            prompt = FlowPrompt.check(cfg.flow, flow_prompt[None], feat if feat.ndim == 3 else feat[None],
                                      emb if emb.ndim == 2 else emb[None])
        except ValueError as e:
            raise ValueError(str(e).replace("prompt_token", "flow_prompt_speech_tokens")) from None
        if not (isinstance(speed, (int, float)) and not isinstance(speed, bool) and speed > 0 and math.isfinite(speed)):
            raise ValueError(f"speed={speed!r}: expected a positive number")
        if speed < self.limits.min_speed:
            raise ValueError(f"speed={speed}: below the model's limit min_speed={self.limits.min_speed} "
                             f"(Limits.min_speed bounds how far the output may be stretched)")
        if stream and speed != 1.0:
            # upstream: assert token_offset == 0 and finalize is True, 'speed change only support non-stream ...'
            raise ValueError(f"speed={speed} is only supported with stream=False (upstream asserts this)")
        if voice_prefix is not None and (not isinstance(voice_prefix, lm.VoicePrefix)
                                         or voice_prefix.prompt_text != tuple(prompt_text.tolist())):
            raise ValueError("voice_prefix: must be CosyVoice3Model.voice_prefix(prompt_text_ids) of this request's "
                             "prompt_text_ids")
        return Request(tuple(int(t) for t in text), tuple(int(t) for t in prompt_text),
                       tuple(int(t) for t in llm_prompt), prompt, forced, source, float(speed), _as_key(key), room,
                       voice_prefix)

    def _check_limits(self, text, prompt_text, llm_prompt, flow_prompt, given, *, uses_llm: bool) -> None:
        """Refuse a request outside ``self.limits`` (before any device work), naming field and numbers."""
        lim, rate = self.limits, self.config.token_frame_rate
        checks = [("flow_prompt_speech_tokens", flow_prompt.size, lim.prompt_speech_tokens(rate),
                   f"{lim.max_prompt_seconds:g} s of prompt"),
                  ("source/forced tokens", 0 if given is None else given.size, lim.output_tokens(rate),
                   f"{lim.max_output_seconds:g} s of output")]
        if uses_llm:
            checks += [("text_ids", text.size, lim.max_text_tokens, "max_text_tokens"),
                       ("prompt_text_ids", prompt_text.size, lim.max_prompt_text_tokens, "max_prompt_text_tokens"),
                       ("llm_prompt_speech_tokens", llm_prompt.size, lim.prompt_speech_tokens(rate),
                        f"{lim.max_prompt_seconds:g} s of prompt")]
        for name, n, limit, what in checks:
            if n > limit:
                raise ValueError(f"{name}: {n} tokens exceed the limit of {limit} ({what}; CosyVoice3Model(limits=...))")

    # ---------------------------------------------------------------- stages
    def _filter(self, vc: bool) -> SilentTokenFilter:
        return SilentTokenFilter(self.silent_tokens, self.max_silent_run, enabled=self.silent_filter and not vc)

    def prefill(self, req: Request) -> Any:
        """The LLM's decode state after the request's prompt (batch 1; from its voice prefix if any)."""
        return lm.start(self.params["llm"], self.config.llm, [req.lm_request], req.key[None], self.sampler,
                        precision=self.policy.llm, programs=self.programs, cache_len=self.cache_len,
                        prefix=req.voice_prefix)

    def voice_prefix(self, prompt_text_ids: Any) -> lm.VoicePrefix:
        """The reusable KV cache of a voice's prompt text (pass it as ``tts(..., voice_prefix=...)``)."""
        return lm.voice_prefix(self.params["llm"], self.config.llm, _ids("prompt_text_ids", prompt_text_ids),
                               precision=self.policy.llm, programs=self.programs)

    def _token_source(self, req: Request, chunk: int, trace: Trace) -> Iterator[tuple[np.ndarray, bool]]:
        """Yields (new LLM-output tokens, llm done) in decode order; one jitted chunk per item.
        Records the prefill's and the first decode chunk's time in ``trace.timings``."""
        if req.source_speech is not None:
            yield req.source_speech, True
            return
        if req.forced_tokens is not None:
            yield req.forced_tokens, True
            return
        start = time.perf_counter()
        state = self.prefill(req)
        done = bool(np.asarray(state.done)[0])  # waits for the device
        trace.timings["prefill"] = time.perf_counter() - start
        if done:
            yield np.zeros(0, np.int64), True
            return
        start = time.perf_counter()
        for new, state, _ in lm.stream(self.params["llm"], self.config.llm, state, self.sampler, chunk_size=chunk,
                                       precision=self.policy.llm, programs=self.programs):
            new = np.asarray(new[0], np.int64)
            trace.timings.setdefault("first_decode_chunk", time.perf_counter() - start)
            yield new, bool(np.asarray(state.done)[0])

    def _flow(self, tokens: Sequence[int], req: Request, calls: list, *, streaming: bool, finalize: bool
              ) -> np.ndarray:
        """flow_inference for one request -> mel [1, T, C] (numpy); the call is logged in ``calls``."""
        calls.append((len(tokens), int(streaming), int(finalize)))
        mel = flow_inference(self.params["flow"], np.asarray(tokens, np.int64)[None], prompt=req.prompt,
                             cfg=self.config.flow, noise=self.flow_noise, streaming=streaming, finalize=finalize,
                             precision=self.policy.flow, programs=self.programs)
        return np.asarray(mel)

    def _flow_hop(self, tokens: Sequence[int], req: Request, calls: list, state: FlowStreamState | None,
                  out_from: int, *, finalize: bool) -> np.ndarray:
        """One chunk-causal stream hop: generated frames ``out_from ..`` of the prefix ``tokens``."""
        if state is None:
            return self._flow(tokens, req, calls, streaming=True, finalize=finalize)[:, out_from:]
        calls.append((len(tokens), 1, int(finalize)))
        mel, _ = flow_stream_push(self.params["flow"], state, np.asarray(tokens, np.int64)[None], cfg=self.config.flow,
                                  noise=self.flow_noise, finalize=finalize, out_from=out_from,
                                  precision=self.policy.flow, programs=self.programs)
        return mel

    def _hift(self, mel: np.ndarray, finalize: bool) -> np.ndarray:
        return hift_inference(self.params["hift"], mel, cfg=self.config.hift, finalize=finalize,
                              noise=self.hift_noise, policy=self.policy, programs=self.programs)

    def _hift_stream(self, mel_all: np.ndarray, mel_new: np.ndarray, emitted: int, state: Any, *,
                     finalize: bool) -> tuple[np.ndarray, int, Any]:
        """Audio that became final after ``mel_new`` joined ``mel_all`` (carried state or re-run)."""
        if state is None:
            audio, emitted = hift_stream_step(self.params["hift"], mel_all, emitted, cfg=self.config.hift,
                                              finalize=finalize, noise=self.hift_noise, policy=self.policy,
                                              programs=self.programs)
            return audio, emitted, None
        state, audio = hift_stream_push(self.params["hift"], state, mel_new, cfg=self.config.hift,
                                        finalize=finalize, policy=self.policy, programs=self.programs)
        return audio, emitted + audio.shape[1], state

    # ---------------------------------------------------------------- public API
    def tts(self, text_ids: Any = (), *, prompt_text_ids: Any = (), llm_prompt_speech_tokens: Any = (),
            flow_prompt_speech_tokens: Any = (), prompt_feat: Any = None, embedding: Any = None,
            source_speech_tokens: Any = None, stream: bool = False, speed: float = 1.0, key: Any = None,
            forced_tokens: Any = None, trace: Trace | None = None, hop_state: HopState | None = None,
            voice_prefix: lm.VoicePrefix | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Synthesize one request; returns a generator of ``{"tts_speech": [1, samples] float32}``.

        Args:
          text_ids: [Lt] text token ids (the LLM's ``text``; cross-lingual carries the prompt
            marker in it).
          prompt_text_ids: [Lp] zero-shot transcript or instruct2 instruction ids (may be empty).
          llm_prompt_speech_tokens: [Np] zero-shot prompt speech tokens for the LLM (empty for
            cross-lingual and instruct2).
          flow_prompt_speech_tokens: [P] prompt tokens for the flow.
          prompt_feat: [F1, C] prompt mel, time-major (F1 = ratio * P for zero-shot).
          embedding: [E] speaker embedding (the flow's; CosyVoice3's LLM takes none).
          source_speech_tokens: [N] voice conversion: these tokens go to the flow, no LLM, no filter.
          stream: upstream's streaming schedule (several yields) instead of one yield.
          speed: non-stream only; the mel is resampled to int(T / speed) frames.
          key: the request's PRNG key (int seed, ``jax.random.key`` or a uint32[2] key).
          forced_tokens: [N] stand-in for the LLM output (the silent filter still applies).
          trace: a ``Trace`` to fill with what the call did (filled when the generator finishes).
          hop_state: stream only: a ``HopState`` shared on purpose with other requests (upstream's
            never-reset hop); default: ``self.hop_state`` with ``upstream_hop_quirk``, else a fresh
            schedule for this request.
          voice_prefix: the voice's cached prompt-text prefix (``voice_prefix``; its prompt text must
            be ``prompt_text_ids``): the LLM prefills only the rest of the prompt, same tokens.

        Raises:
          ValueError, at call time and before any device work, for empty text (when the LLM runs),
          ids out of range, a mis-shaped prompt_feat/embedding, NaN/inf, speed != 1 with stream, or
          a bad key.
        """
        req = self._request(text_ids, prompt_text_ids, llm_prompt_speech_tokens, flow_prompt_speech_tokens,
                            prompt_feat, embedding, source_speech_tokens, forced_tokens, speed, key, stream,
                            voice_prefix)
        if hop_state is not None and not isinstance(hop_state, HopState):
            raise ValueError(f"hop_state: expected a HopState, found {type(hop_state).__name__}")
        trace = trace if trace is not None else Trace()
        return self._run(self.start_run(req, trace, stream=stream, hop_state=hop_state))

    def start_run(self, req: Request, trace: Trace | None = None, *, stream: bool = False,
                  hop_state: HopState | None = None) -> RequestRun:
        """A ``RequestRun`` for a validated request (``validate``), fed by the caller's LLM tokens."""
        trace = trace if trace is not None else Trace()
        if not stream:
            return RequestRun(self, req, trace, stream=False)
        # A shared hop state also brings upstream's stale break test (see the module docstring).
        shared = hop_state is not None or self.upstream_hop_quirk
        if hop_state is None:
            hop_state = self.hop_state if self.upstream_hop_quirk else HopState(self.schedule.base)
        return RequestRun(self, req, trace, stream=True, hop_state=hop_state, shared=shared)

    def _run(self, run: RequestRun) -> Iterator[dict[str, np.ndarray]]:
        """Drive one request's run from its own LLM decode (one decode chunk per step)."""
        for new, done in self._token_source(run.req, self.schedule.base, run.trace):
            yield from run.feed(new, done)
            if run.finished:
                return
        if not run.finished:  # the source ended without flagging done
            yield from run.feed((), True)

    # ---------------------------------------------------------------- compile ahead
    def program_specs(self, *, offline: bool = True, stream: bool = True, batch_sizes: Sequence[int] = (1,),
                      voice_prefix: bool = False) -> list[tuple[Any, tuple, dict]]:
        """Every stage program a request inside ``self.limits`` can run: (function, argument specs,
        static arguments) triples for ``cosyjax.programs.ProgramCache.compile`` (and ``jax.export``).

        ``offline``/``stream``: the request kinds to cover; ``batch_sizes``: ``tts_batch`` sizes
        (1 is what ``tts`` runs); ``voice_prefix``: the programs of cached-voice prefixes too.
        """
        from cosyjax.flow import flow as flow_mod
        from cosyjax.flow import stream as stream_mod

        cfg, lim, rate = self.config, self.limits, self.config.token_frame_rate
        max_tokens = lim.prompt_speech_tokens(rate) + lim.output_tokens(rate)  # flow prompt + generated
        out: list[tuple[Any, tuple, dict]] = []
        for batch in sorted(set(int(b) for b in batch_sizes) | {1}):
            out += lm.programs(cfg.llm, self.params["llm"], max_prefill=lim.prefill_tokens(rate),
                               cache_len=self.cache_len, settings=self.sampler, chunk_size=self.schedule.base,
                               batch=batch, precision=self.policy.llm,
                               max_prefix=1 + lim.max_prompt_text_tokens if voice_prefix else None)
            if offline or (stream and self.final_full_attention):
                out += flow_mod.programs(cfg.flow, self.params["flow"], max_tokens=max_tokens, batch=batch,
                                         precision=self.policy.flow)
            if offline:
                out += self._hift_programs(batch, stream=False)
            if batch != 1 or not stream:
                continue
            if self.flow_carry:
                out += stream_mod.stream_programs(cfg.flow, self.params["flow"],
                                                  max_frames=cfg.flow.token_mel_ratio * max_tokens,
                                                  precision=self.policy.flow, cache_dtype=self.policy.flow.dtype)
            else:
                out += flow_mod.programs(cfg.flow, self.params["flow"], max_tokens=max_tokens, streaming=True,
                                         precision=self.policy.flow)
            out += self._hift_programs(1, stream=True)
        return list({program_key(*p): p for p in out}.values())  # a program listed twice compiles once

    def _hift_programs(self, batch: int, *, stream: bool) -> list:
        """The vocoder's programs: offline for the longest output at the slowest speed the limits allow,
        or, streaming, the carried-state push for the largest hop (or the re-run on all mel so far)."""
        from cosyjax.hift import generator, stream as hift_stream

        cfg, lim, sched = self.config, self.limits, self.schedule
        out_frames = sched.token_mel_ratio * lim.output_tokens(cfg.token_frame_rate)
        kw = dict(batch=batch, policy=self.policy, noise=self.hift_noise)
        if not stream:
            return generator.programs(cfg.hift, self.params["hift"], finalize=True,
                                      max_frames=int(math.ceil(out_frames / lim.min_speed)), **kw)
        if not self.hift_carry:
            return [p for fin in (False, True)
                    for p in generator.programs(cfg.hift, self.params["hift"], finalize=fin, max_frames=out_frames, **kw)]
        # A push carries one hop's frames: the first hop plus its prompt pad (< 2 hops) or the last
        # hop with the lookahead tokens (RequestRun).
        push = sched.token_mel_ratio * (2 * sched.max_hop + sched.lookahead)
        return hift_stream.stream_programs(cfg.hift, self.params["hift"], max_push_frames=min(push, out_frames), **kw)

    def warmup(self, *, offline: bool = True, stream: bool = True, batch_sizes: Sequence[int] = (1,),
               voice_prefix: bool = False, progress: bool = False) -> "WarmupReport":
        """Compile every program ``program_specs`` lists, then run one tiny request of each kind (for
        the few eager helper ops).  Afterwards a request inside ``self.limits`` compiles nothing.

        Returns how many programs were compiled and how long it took.
        """
        import time

        from tqdm.auto import tqdm

        start, before = time.perf_counter(), self.programs.compiles
        specs = self.program_specs(offline=offline, stream=stream, batch_sizes=batch_sizes, voice_prefix=voice_prefix)
        for fn, args, static in tqdm(specs, desc="compiling", disable=not progress):
            self.programs.compile(fn, *args, **static)
        cfg = self.config
        tiny = dict(forced_tokens=np.zeros(2 * self.schedule.base + cfg.flow.pre_lookahead_len + 1, np.int64),
                    flow_prompt_speech_tokens=np.zeros(1, np.int64),
                    prompt_feat=np.zeros((cfg.flow.token_mel_ratio, cfg.flow.output_size), np.float32),
                    embedding=np.ones(cfg.flow.spk_embed_dim, np.float32))
        text = dict(text_ids=np.zeros(1, np.int64), flow_prompt_speech_tokens=tiny["flow_prompt_speech_tokens"],
                    prompt_feat=tiny["prompt_feat"], embedding=tiny["embedding"])
        for kind in [False] * offline + [True] * stream:
            for request in (tiny, text):
                for _ in self.tts(**request, stream=kind):
                    pass
        for batch in sorted(set(int(b) for b in batch_sizes) - {1}):
            self.tts_batch([tiny] * batch)
        return WarmupReport(programs=self.programs.compiles - before, total=len(self.programs),
                            seconds=time.perf_counter() - start)

    def tts_batch(self, requests: Sequence[Mapping[str, Any]], keys: Sequence[Any] | None = None,
                  traces: Sequence[Trace] | None = None) -> list[np.ndarray]:
        """Non-stream synthesis of several requests at once (batched LLM, flow and HiFT).

        Args:
          requests: dicts of ``tts`` keyword arguments (text_ids, prompt_text_ids, ..., speed,
            forced_tokens, source_speech_tokens); ``stream`` is not accepted.
          keys: one key per request (default: each request's ``key`` entry, else seed 0).
          traces: one ``Trace`` per request to fill (llm_tokens, flow_tokens), as ``tts(trace=...)``
            (default: each request's ``trace`` entry, if any).
        Returns:
          one waveform [1, samples] per request, each equal (up to float32 rounding of the padded
          shapes) to ``next(tts(**request))["tts_speech"]``.
        """
        if not requests:
            raise ValueError("tts_batch: no requests")
        if keys is not None and len(keys) != len(requests):
            raise ValueError(f"tts_batch: {len(keys)} keys for {len(requests)} requests")
        if traces is not None and len(traces) != len(requests):
            raise ValueError(f"tts_batch: {len(traces)} traces for {len(requests)} requests")
        reqs, given = [], []
        for i, r in enumerate(requests):
            r = dict(r)
            if r.pop("stream", False):
                raise ValueError(f"request {i}: tts_batch is non-stream only")
            given.append(r.pop("trace", None))
            # A cached voice's prefix saves batch-1 prefill work only; the batched prefill gives the
            # same tokens without it.
            r.pop("voice_prefix", None)
            key = keys[i] if keys is not None else r.pop("key", None)
            r.pop("key", None)
            try:
                reqs.append(self._request(r.pop("text_ids", ()), r.pop("prompt_text_ids", ()),
                                          r.pop("llm_prompt_speech_tokens", ()), r.pop("flow_prompt_speech_tokens", ()),
                                          r.pop("prompt_feat", None), r.pop("embedding", None),
                                          r.pop("source_speech_tokens", None), r.pop("forced_tokens", None),
                                          r.pop("speed", 1.0), key, False))
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
            if r:
                raise ValueError(f"request {i}: unknown argument(s) {sorted(r)}")
        if traces is None and any(t is not None for t in given):
            traces = [t if t is not None else Trace() for t in given]
        # LLM rows, batched.
        raw: list[np.ndarray] = [np.zeros(0, np.int64)] * len(reqs)
        llm_rows = [i for i, q in enumerate(reqs) if q.uses_llm]
        if llm_rows:
            lm_reqs = [reqs[i].lm_request for i in llm_rows]
            keys_arr = jnp.stack([reqs[i].key for i in llm_rows])
            gens = lm.generate(self.params["llm"], self.config.llm, lm_reqs, keys_arr, self.sampler,
                               chunk_size=self.schedule.base, precision=self.policy.llm, programs=self.programs,
                               cache_len=self.cache_len)
            for i, g in zip(llm_rows, gens):
                raw[i] = g.tokens.astype(np.int64)
        for i, q in enumerate(reqs):
            if not q.uses_llm:
                raw[i] = q.forced_tokens if q.forced_tokens is not None else q.source_speech
        tokens = [np.asarray(self._filter(q.source_speech is not None)(raw[i]), np.int64) for i, q in enumerate(reqs)]
        if traces is not None:
            for i, trace in enumerate(traces):
                trace._record(raw[i], tokens[i], (), (), None)
        out: list[np.ndarray] = [np.zeros((1, 0), np.float32)] * len(reqs)
        rows = [i for i in range(len(reqs)) if tokens[i].size]
        if not rows:
            return out
        # Flow, batched with per-row lengths.
        c = self.config.flow.output_size
        n_max = max(tokens[i].size for i in rows)
        p_max = max(reqs[i].flow_prompt_speech.size for i in rows)
        f_max = max(reqs[i].prompt_feat.shape[0] for i in rows)
        tok = np.zeros((len(rows), n_max), np.int64)
        ptok = np.zeros((len(rows), p_max), np.int64)
        feat = np.zeros((len(rows), f_max, c), np.float32)
        emb = np.stack([reqs[i].embedding for i in rows])
        for b, i in enumerate(rows):
            tok[b, :tokens[i].size] = tokens[i]
            ptok[b, :reqs[i].flow_prompt_speech.size] = reqs[i].flow_prompt_speech
            feat[b, :reqs[i].prompt_feat.shape[0]] = reqs[i].prompt_feat
        tlen = np.asarray([tokens[i].size for i in rows])
        plen = np.asarray([reqs[i].flow_prompt_speech.size for i in rows])
        flen = np.asarray([reqs[i].prompt_feat.shape[0] for i in rows])
        # Each row's prompt was checked with its request; this is their padded batch.
        prompt = FlowPrompt(ptok, feat, emb, plen, flen)
        mel = flow_inference(self.params["flow"], tok, cfg=self.config.flow, noise=self.flow_noise, streaming=False,
                             finalize=True, token_len=tlen, prompt=prompt, precision=self.policy.flow,
                             programs=self.programs)
        mel_len = self.config.flow.token_mel_ratio * (plen + tlen) - flen
        mels = []
        for b, i in enumerate(rows):
            m = mel[b:b + 1, :mel_len[b]]
            if reqs[i].speed != 1.0:
                m = interpolate_linear(m, int(m.shape[1] / reqs[i].speed))
            mels.append(m)
        lens = np.asarray([m.shape[1] for m in mels])
        padded = np.zeros((len(rows), int(lens.max()), c), np.float32)
        for b, m in enumerate(mels):
            padded[b, :m.shape[1]] = m[0]
        audio = hift_inference(self.params["hift"], padded, cfg=self.config.hift, finalize=True,
                               noise=self.hift_noise, mel_len=lens, policy=self.policy, programs=self.programs)
        scale = self.config.hift.upsample_scale
        for b, i in enumerate(rows):
            out[i] = audio[b:b + 1, :scale * lens[b]]
        return out


@dataclasses.dataclass(frozen=True)
class WarmupReport:
    """What ``CosyVoice3Model.warmup`` did: programs compiled now, programs cached in all, seconds."""

    programs: int
    total: int
    seconds: float

    def __str__(self) -> str:
        return f"compiled {self.programs} programs ({self.total} cached) in {self.seconds:.1f} s"


def stream_seams(chunks: Sequence[np.ndarray], offline: np.ndarray, window: int = 480) -> dict[str, Any]:
    """How far a streamed waveform is from the offline one, overall and around each chunk seam.

    Stream hops run the flow with chunked attention and hold back look-ahead, so the streamed audio
    differs from the offline (full-attention) result; this measures by how much.

    Args:
      chunks: the stream's yields, each [1, n_k].  offline: [1, N], N = sum n_k.
      window: samples on each side of a seam to measure (default one mel frame).
    Returns:
      {"max_abs": overall max |stream - offline|, "snr_db": offline vs difference,
       "seams": [{"sample": boundary, "max_abs": max |diff| within +-window}, ...]}.
    """
    stream = np.concatenate([np.asarray(c) for c in chunks], axis=1)
    offline = np.asarray(offline)
    if stream.shape != offline.shape:
        raise ValueError(f"stream audio {stream.shape} and offline audio {offline.shape} differ in length")
    diff = np.abs(stream.astype(np.float64) - offline)
    err = float(np.sum(diff ** 2))
    snr = float("inf") if err == 0 else 10 * np.log10(float(np.sum(offline.astype(np.float64) ** 2)) / err)
    seams, edge = [], 0
    for c in chunks[:-1]:
        edge += c.shape[1]
        seams.append({"sample": edge, "max_abs": float(diff[:, max(0, edge - window):edge + window].max())})
    return {"max_abs": float(diff.max()) if diff.size else 0.0, "snr_db": snr, "seams": seams}
