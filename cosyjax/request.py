"""One request's orchestration after validation: tokens in as the LLM emits them, audio chunks out.

``RequestRun`` is upstream's ``CosyVoice2Model.tts`` loop (SPEC 8) as a state machine: ``feed(new
tokens, llm_done)`` applies the silent-token filter, runs every stream hop (or, non-stream, the
final flow + vocoder) that the tokens so far allow, and returns the chunks that became ready.
``CosyVoice3Model.tts`` drives it from its own LLM decode; the serving engine
(``cosyjax.serving``) drives many of them from one batched decode, so the hop schedule exists once.
The model (``CosyVoice3Model``) holds no per-request state; a run holds all of it.

Also here: the validated ``Request``, its ``Trace``, upstream's hop schedule (``HopSchedule``,
``HopState``), the silent-token filter and the speed resampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import ModelConfig
from cosyjax.flow.prompt import FlowPrompt
from cosyjax.flow.stream import flow_stream_init
from cosyjax.hift.stream import hift_stream_init
from cosyjax.llm import lm

if TYPE_CHECKING:
    from cosyjax.model import CosyVoice3Model

# CosyVoice3Model.silent_tokens: FSQ codes of silence and breath.
SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)
MAX_SILENT_RUN = 5  # CosyVoiceModel.llm_job: max_silent_token_num
# CosyVoice2Model.__init__: token_max_hop_len = 4 * token_hop_len, stream_scale_factor = 2.
MAX_HOP_FACTOR = 4
STREAM_SCALE_FACTOR = 2


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------
class SilentTokenFilter:
    """Upstream ``llm_job``'s filter: silent tokens past a run of ``max_run`` do not reach the flow."""

    def __init__(self, silent_tokens: Sequence[int] = SILENT_TOKENS, max_run: int = MAX_SILENT_RUN,
                 enabled: bool = True):
        self.silent = frozenset(int(t) for t in silent_tokens)
        self.max_run = max_run
        self.enabled = enabled
        self.run = 0

    def __call__(self, tokens: Sequence[int]) -> list[int]:
        """Feed tokens in LLM order; returns those passed to the flow."""
        kept = []
        for t in tokens:
            t = int(t)
            if self.enabled and t in self.silent:
                self.run += 1
                if self.run > self.max_run:
                    continue
            else:
                self.run = 0
            kept.append(t)
        return kept


def interpolate_linear(mel: np.ndarray, size: int) -> np.ndarray:
    """``F.interpolate(mel, size=size, mode='linear', align_corners=False)`` along time.

    Args:
      mel: [B, T, C] float32 (time-major).  size: output frames (>= 1).
    Returns:
      [B, size, C] float32.  Like torch's CPU kernel, the scale T/size and the source positions are
      float32 (negative ones clamp to 0).
    """
    t_in = mel.shape[1]
    scale = np.float32(t_in) / np.float32(size)
    # torch's CPU kernel is compiled with fused multiply-adds: src = fma(scale, i + 0.5, -0.5) and
    # out = fma(l0, x0, l1 * x1).  float32 products are exact in float64, so evaluating those in
    # float64 and rounding once reproduces torch's bits (checked in tests/test_model.py).
    half = np.arange(size, dtype=np.float32) + np.float32(0.5)
    src = (half.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), t_in - 1)
    i1 = np.minimum(i0 + 1, t_in - 1)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    mel = np.asarray(mel, np.float32)
    second = (lam1[None, :, None] * mel[:, i1]).astype(np.float32)
    out = lam0[None, :, None].astype(np.float64) * mel[:, i0] + second
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class HopSchedule:
    """Stream hop sizes in tokens, from the config (release: base 25, max 100, x2 per hop).

    Attributes:
      base: first hop = static_chunk_size // token_mel_ratio (one DiT attention chunk).
      max_hop: base * MAX_HOP_FACTOR.
      scale: hop growth factor per processed hop.
      lookahead: flow pre_lookahead_len tokens held back as right context.
      token_mel_ratio: mel frames per token.
    """

    base: int
    max_hop: int
    scale: int
    lookahead: int
    token_mel_ratio: int

    @classmethod
    def from_config(cls, config: ModelConfig, max_hop_factor: int = MAX_HOP_FACTOR,
                    scale: int = STREAM_SCALE_FACTOR) -> "HopSchedule":
        flow = config.flow
        if flow.static_chunk_size % flow.token_mel_ratio:
            raise ValueError(f"static_chunk_size={flow.static_chunk_size} is not a multiple of "
                             f"token_mel_ratio={flow.token_mel_ratio}: stream hops cannot align to DiT chunks")
        base = flow.static_chunk_size // flow.token_mel_ratio
        if base < 1 or max_hop_factor < 1 or scale < 1:
            raise ValueError(f"hop schedule: base={base}, max_hop_factor={max_hop_factor}, scale={scale} must be >= 1")
        return cls(base, base * max_hop_factor, scale, flow.pre_lookahead_len, flow.token_mel_ratio)

    def pad(self, hop: int, num_prompt_tokens: int) -> int:
        """Tokens added to the first hop so prompt + first hop is a multiple of ``hop``."""
        return int(math.ceil(num_prompt_tokens / hop) * hop - num_prompt_tokens)

    def next_hop(self, hop: int) -> int:
        return min(self.max_hop, hop * self.scale)


@dataclasses.dataclass
class HopState:
    """Upstream's stream hop that outlives a request (``CosyVoice2Model.token_hop_len``).

    Requests given the same ``HopState`` continue each other's hop schedule, exactly as upstream's
    never-reset instance attribute does; share one only on purpose (parity with upstream).
    """

    hop: int


@dataclasses.dataclass
class Trace:
    """What one ``tts`` call did; pass one in to have it filled (tests, parity, metrics).

    Attributes:
      llm_tokens: [N] tokens the LLM emitted (or the forced / source tokens).
      flow_tokens: [N'] tokens given to the flow (after the silent-token filter).
      hops: stream hop sizes in tokens (empty for non-stream).
      flow_calls: [K, 3] (target tokens, streaming, finalize) per flow call.
      mel: with ``record_mel``, the whole mel [1, T, C] the vocoder received (after ``speed``).
      timings: seconds of the first chunk's stages: "prefill", "first_decode_chunk", "first_flow",
        "first_vocoder" (whichever ran), and "first_chunk" from the run's start to its first chunk.
    """

    record_mel: bool = False
    llm_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    flow_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    hops: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    flow_calls: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int64))
    mel: np.ndarray | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    def _record(self, raw: Sequence[int], tokens: Sequence[int], hops: Sequence[int],
                calls: Sequence[tuple[int, int, int]], mel: np.ndarray | None) -> None:
        self.llm_tokens = np.asarray(raw, np.int64)
        self.flow_tokens = np.asarray(tokens, np.int64)
        self.hops = np.asarray(hops, np.int64)
        self.flow_calls = np.asarray(calls, np.int64).reshape(-1, 3)
        if self.record_mel:
            self.mel = mel


@dataclasses.dataclass
class Request:
    """One validated request (host arrays).  See ``CosyVoice3Model.tts`` for the fields."""

    text: tuple[int, ...]
    prompt_text: tuple[int, ...]
    llm_prompt_speech: tuple[int, ...]
    prompt: FlowPrompt  # the flow prompt, checked (batch of 1)
    forced_tokens: np.ndarray | None  # [N] int (LLM output stand-in)
    source_speech: np.ndarray | None  # [N] int (voice conversion)
    speed: float
    key: Any
    max_tokens: int  # LLM output cap: what the flow's noise buffer leaves after the prompt
    voice_prefix: Any = None  # lm.VoicePrefix of the voice's prompt text, prefilled once

    @property
    def flow_prompt_speech(self) -> np.ndarray:  # [P] int
        return self.prompt.tokens[0]

    @property
    def prompt_feat(self) -> np.ndarray:  # [F1, C] float32
        return self.prompt.feat[0]

    @property
    def embedding(self) -> np.ndarray:  # [E] float32
        return self.prompt.embedding[0]

    @property
    def lm_request(self) -> lm.LMRequest:
        return lm.LMRequest(self.text, self.prompt_text, self.llm_prompt_speech, self.max_tokens)

    @property
    def uses_llm(self) -> bool:
        return self.forced_tokens is None and self.source_speech is None


def _ids(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value if value is not None else (), dtype=None)
    if arr.ndim == 2 and arr.shape[0] == 1:  # upstream passes (1, L)
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected 1-D token ids (or (1, L)), found shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, found dtype {arr.dtype}")
    return arr.astype(np.int64)


def _as_key(key: Any) -> jax.Array:
    """A typed PRNG key from a typed key, a raw uint32[2] key or an int seed."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key: expected one PRNG key, found shape {key.shape}")
        return key
    arr = np.asarray(key)
    if arr.shape == (2,) and arr.dtype == np.uint32:
        return jax.random.wrap_key_data(jnp.asarray(arr))
    raise ValueError(f"key: expected an int seed, jax.random.key(...) or a uint32[2] PRNGKey, found {key!r}")


# --------------------------------------------------------------------------------------------
# One request's run
# --------------------------------------------------------------------------------------------
class RequestRun:
    """The orchestration of one validated request after its LLM (see the module docstring).

    Args:
      model: the ``CosyVoice3Model`` whose stages run (it keeps no state of this run).
      req: the validated request.
      trace: filled when the run finishes.
      stream: upstream's stream schedule (several chunks) instead of one chunk.
      hop_state: stream: the hop this run starts from, advanced as it goes.
      shared: the hop state outlives the request (upstream's quirk), which also brings upstream's
        stale break test.
    """

    def __init__(self, model: "CosyVoice3Model", req: Request, trace: Trace, *, stream: bool,
                 hop_state: HopState | None = None, shared: bool = False):
        self.model, self.req, self.trace, self.stream, self.shared = model, req, trace, stream, shared
        self.filter = model._filter(req.source_speech is not None)
        self.raw: list[int] = []
        self.tokens: list[int] = []
        self.calls: list[tuple[int, int, int]] = []
        self.hops: list[int] = []
        self.finished = False
        self.started = time.perf_counter()
        if stream:
            self.hop_state = hop_state if hop_state is not None else HopState(model.schedule.base)
            self.pad = model.schedule.pad(self.hop_state.hop, int(req.flow_prompt_speech.size))
            self.offset = 0
            self.mel_all = np.zeros((1, 0, model.config.flow.output_size), np.float32)
            self.flow_state = (flow_stream_init(model.config.flow, prompt=req.prompt,
                                                cache_dtype=model.policy.flow.dtype) if model.flow_carry else None)
            self.emitted = 0
            self.vocoder = (hift_stream_init(model.config.hift, 1, noise=model.hift_noise)
                            if model.hift_carry else None)

    def feed(self, new: Sequence[int], llm_done: bool) -> list[dict[str, np.ndarray]]:
        """Take the LLM's next tokens (all of them once ``llm_done``); return the chunks now ready."""
        if self.finished:
            raise ValueError("this request has finished")
        self.raw.extend(int(t) for t in new)
        self.tokens.extend(self.filter(new))
        if not self.stream:
            return [self._offline()] if llm_done else []
        return self._advance(llm_done)

    @property
    def tokens_needed(self) -> int:
        """Flow tokens the next stream hop needs (0 when the run is finished or non-stream)."""
        if self.finished or not self.stream:
            return 0
        this_hop = self.hop_state.hop + (self.pad if self.offset == 0 else 0)
        return self.offset + this_hop + self.model.schedule.lookahead

    def _offline(self) -> dict[str, np.ndarray]:
        m, req = self.model, self.req
        self.finished = True
        if not self.tokens:
            self.trace._record(self.raw, self.tokens, (), self.calls, None)
            return _empty()
        with self._timed("first_flow"):
            mel = m._flow(self.tokens, req, self.calls, streaming=False, finalize=True)
        if req.speed != 1.0:
            mel = interpolate_linear(mel, int(mel.shape[1] / req.speed))
        self.trace._record(self.raw, self.tokens, (), self.calls, mel)
        with self._timed("first_vocoder"):
            audio = m._hift(mel, finalize=True)
        return self._chunk(audio)

    def _advance(self, llm_done: bool) -> list[dict[str, np.ndarray]]:
        m, sched, out = self.model, self.model.schedule, []
        while True:
            hop = self.hop_state.hop
            this_hop = hop + (self.pad if self.offset == 0 else 0)
            need = self.offset + this_hop + sched.lookahead
            if len(self.tokens) >= need:
                with self._timed("first_flow"):
                    mel = m._flow_hop(self.tokens[:need], self.req, self.calls, self.flow_state,
                                      sched.token_mel_ratio * self.offset, finalize=False)
                self.mel_all = np.concatenate([self.mel_all, mel], axis=1)
                with self._timed("first_vocoder"):
                    audio, self.emitted, self.vocoder = m._hift_stream(self.mel_all, mel, self.emitted, self.vocoder,
                                                                       finalize=False)
                self.offset += this_hop
                self.hops.append(this_hop)
                hop = self.hop_state.hop = sched.next_hop(hop)
                out.append(self._chunk(audio))
            elif not llm_done:
                return out
            # Upstream tests the stale hop (the one just processed); the fresh schedule tests the next.
            check = this_hop if self.shared else hop + (self.pad if self.offset == 0 else 0)
            if llm_done and len(self.tokens) - self.offset < check + sched.lookahead:
                out.append(self._final())
                return out

    def _final(self) -> dict[str, np.ndarray]:
        m, sched = self.model, self.model.schedule
        self.finished = True
        if not self.tokens:
            self.trace._record(self.raw, self.tokens, self.hops, self.calls, None)
            return _empty()
        with self._timed("first_flow"):
            if m.final_full_attention:
                mel = m._flow(self.tokens, self.req, self.calls, streaming=False,
                              finalize=True)[:, sched.token_mel_ratio * self.offset:]
            else:
                mel = m._flow_hop(self.tokens, self.req, self.calls, self.flow_state,
                                  sched.token_mel_ratio * self.offset, finalize=True)
        self.mel_all = np.concatenate([self.mel_all, mel], axis=1)
        self.trace._record(self.raw, self.tokens, self.hops, self.calls, self.mel_all)
        with self._timed("first_vocoder"):
            audio, self.emitted, self.vocoder = m._hift_stream(self.mel_all, mel, self.emitted, self.vocoder,
                                                               finalize=True)
        return self._chunk(audio)

    @contextlib.contextmanager
    def _timed(self, name: str):
        """Record ``name``'s time in the trace the first time it runs (the first chunk's stages)."""
        start = time.perf_counter()
        yield
        self.trace.timings.setdefault(name, time.perf_counter() - start)

    def _chunk(self, audio: Any) -> dict[str, np.ndarray]:
        self.trace.timings.setdefault("first_chunk", time.perf_counter() - self.started)
        return {"tts_speech": np.asarray(audio)}


def _empty() -> dict[str, np.ndarray]:
    return {"tts_speech": np.zeros((1, 0), np.float32)}


__all__ = ["HopSchedule", "HopState", "MAX_HOP_FACTOR", "MAX_SILENT_RUN", "Request", "RequestRun", "SILENT_TOKENS",
           "STREAM_SCALE_FACTOR", "SilentTokenFilter", "Trace", "interpolate_linear"]
