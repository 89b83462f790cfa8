"""CosyVoice3LM entry points: lm_input assembly, teacher-forced forward, and speech-token generation.

lm_input (``Qwen2LM.inference``, SPEC 3.2) for one request is::

    [speech_embedding[sos], embed_tokens(prompt_text + text), speech_embedding[task_id],
     speech_embedding(prompt_speech)]

We carry it as a *token layout*: ids [T] plus ``is_speech`` [T] saying which table each id reads,
so the embedding lookup happens on device inside the jitted functions.  The three LLM modes differ
only in what they pass:

- zero-shot: prompt_text = prompt transcript, prompt_speech = prompt speech tokens;
- cross-lingual: no prompt text or speech (the text itself carries the ``<|endofprompt|>`` prefix);
- instruct2: prompt_text = the instruct text, no prompt speech.

min_len = int(len(text) * 2), max_len = int(len(text) * 20); prompt text is not counted.

All input checks raise ``ValueError`` on the host, before any device call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import LLMConfig
from cosyjax.llm import decode
from cosyjax.llm.qwen2 import build_model, precision_of
from cosyjax.llm.sampling import SamplerSettings
from cosyjax.precision import Precision
from cosyjax.programs import ProgramCache, specs_of
from cosyjax.programs import run as run_program

Array = jax.Array
MIN_TOKEN_TEXT_RATIO = 2.0  # Qwen2LM.inference defaults
MAX_TOKEN_TEXT_RATIO = 20.0
ENDOFPROMPT_ID = 151646  # <|endofprompt|> in the Qwen tokenizer; upstream asserts it is present


@dataclasses.dataclass(frozen=True)
class LMRequest:
    """Token ids of one LLM request (see the module docstring for the modes).

    ``max_tokens`` caps upstream's max_len (20 tokens per text token) for this request: the caller's
    output limit (the flow's noise buffer, a server's max output seconds).
    """

    text: tuple[int, ...]
    prompt_text: tuple[int, ...] = ()
    prompt_speech: tuple[int, ...] = ()
    max_tokens: int | None = None

    @classmethod
    def zero_shot(cls, text, prompt_text, prompt_speech) -> "LMRequest":
        return cls(_ids(text), _ids(prompt_text), _ids(prompt_speech))

    @classmethod
    def cross_lingual(cls, text) -> "LMRequest":
        return cls(_ids(text))

    @classmethod
    def instruct2(cls, text, instruct_text) -> "LMRequest":
        return cls(_ids(text), _ids(instruct_text))


def _ids(x) -> tuple[int, ...]:
    arr = np.asarray(x)
    if arr.ndim == 2 and arr.shape[0] == 1:  # upstream passes (1, L) tensors
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D (or (1, L)), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return tuple(int(v) for v in arr)


def _check_range(name: str, ids: Sequence[int], upper: int) -> None:
    arr = np.asarray(ids, np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= upper))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: id {int(arr[i])} at index {i} is outside [0, {upper})")


def validate_request(cfg: LLMConfig, request: LMRequest, *, require_endofprompt: bool = False) -> None:
    """Raise ValueError for empty text or out-of-range ids.

    ``require_endofprompt`` reproduces upstream's assert that id 151646 (``<|endofprompt|>``) is in
    prompt_text + text; it applies to the real Qwen tokenizer only, so it is off by default.
    """
    if len(request.text) == 0:
        raise ValueError("text is empty: the LLM needs at least one text token")
    if request.max_tokens is not None and (isinstance(request.max_tokens, bool) or int(request.max_tokens) < 1):
        raise ValueError(f"max_tokens={request.max_tokens!r}: expected a positive token count")
    _check_range("text", request.text, cfg.vocab_size)
    _check_range("prompt_text", request.prompt_text, cfg.vocab_size)
    # Prompt speech comes from the speech tokenizer: only real codes, never the special ids.
    _check_range("prompt_speech", request.prompt_speech, cfg.speech_token_size)
    if require_endofprompt and ENDOFPROMPT_ID not in request.prompt_text + request.text:
        raise ValueError(f"<|endofprompt|> (id {ENDOFPROMPT_ID}) not found in prompt_text or text")


def build_layout(cfg: LLMConfig, request: LMRequest, speech_targets: Sequence[int] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Token layout of lm_input, optionally followed by teacher-forced speech tokens.

    Returns:
      ids [T] int32 and is_speech [T] bool with T = 1 + Lp + Lt + 1 + Np (+ Nt).
    """
    validate_request(cfg, request)
    _check_range("speech_targets", speech_targets, cfg.speech_vocab_size)
    text = list(request.prompt_text) + list(request.text)
    speech = list(request.prompt_speech) + list(speech_targets)
    ids = [cfg.sos] + text + [cfg.task_id] + speech
    is_speech = [True] + [False] * len(text) + [True] * (1 + len(speech))
    return np.asarray(ids, np.int32), np.asarray(is_speech, bool)


def length_limits(request: LMRequest, min_ratio: float = MIN_TOKEN_TEXT_RATIO,
                  max_ratio: float = MAX_TOKEN_TEXT_RATIO) -> tuple[int, int]:
    """(min_len, max_len) = int(len(text) * ratio), prompt text excluded (Qwen2LM.inference);
    max_len is further capped by ``request.max_tokens``."""
    max_len = int(len(request.text) * max_ratio)
    if request.max_tokens is not None:
        max_len = min(max_len, int(request.max_tokens))
    return int(len(request.text) * min_ratio), max_len


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): static lengths that few shapes share."""
    size = minimum
    while size < n:
        size *= 2
    return size


def pad_layouts(layouts: Sequence[tuple[np.ndarray, np.ndarray]], length: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad layouts to ``length`` (default: the longest) -> ids [B, T], is_speech [B, T], lengths [B]."""
    lengths = np.asarray([len(ids) for ids, _ in layouts], np.int32)
    length = int(lengths.max()) if length is None else length
    if lengths.max() > length:
        raise ValueError(f"a layout of length {int(lengths.max())} does not fit the padded length {length}")
    ids = np.zeros((len(layouts), length), np.int32)
    is_speech = np.zeros((len(layouts), length), bool)
    for b, (row_ids, row_speech) in enumerate(layouts):
        ids[b, :len(row_ids)] = row_ids
        is_speech[b, :len(row_ids)] = row_speech
    return ids, is_speech, lengths


# --------------------------------------------------------------------------------------------
# Teacher-forced forward (no cache)
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "precision"))
def forward_embeddings(params, x: Array, lengths: Array, *, cfg: LLMConfig,
                       precision: Precision | None = None) -> tuple[Array, Array]:
    """Qwen2Encoder.forward + llm_decoder on embeddings.

    Args:
      x: [B, T, D] lm_input, right-padded; lengths: [B] int32.
    Returns:
      hidden [B, T, D] (after the final norm) and logits [B, T, V] float32.  Padded positions hold
      unspecified values.
    """
    model = build_model(cfg, precision if precision is not None else precision_of(params))
    batch, length, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    key_valid = jnp.arange(length)[None, :] < lengths[:, None]  # [B, S]
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & key_valid[:, None, :]  # [B, T, S]
    hidden, _ = model.apply({"params": params}, x, positions, mask)
    return hidden, model.apply({"params": params}, hidden, method=model.logits)


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_layout(params, ids: Array, is_speech: Array, *, cfg: LLMConfig) -> Array:
    """Token layout [B, T] -> lm_input [B, T, D] float32 (rows of the embedding tables)."""
    model = build_model(cfg)
    return model.apply({"params": params}, ids, is_speech, method=model.embed)


def llm_forward(params, cfg: LLMConfig, requests: Sequence[LMRequest],
                speech_targets: Sequence[Sequence[int]] | None = None,
                precision: Precision | None = None) -> dict[str, np.ndarray]:
    """Teacher-forced CosyVoice3LM over a batch of requests (padded; each row as if run alone).

    Args:
      requests: B requests.  speech_targets: per request, speech tokens appended after the prompt.
    Returns:
      {"lm_input": [B, T, D], "hidden": [B, T, D], "logits": [B, T, V], "lengths": [B],
       "prefix_lengths": [B]} as numpy; T is the padded length.
    """
    targets = speech_targets if speech_targets is not None else [()] * len(requests)
    if len(targets) != len(requests):
        raise ValueError(f"{len(targets)} speech_targets for {len(requests)} requests")
    layouts = [build_layout(cfg, r, t) for r, t in zip(requests, targets)]
    ids, is_speech, lengths = pad_layouts(layouts)
    prefix = np.asarray([len(layout[0]) - len(t) for layout, t in zip(layouts, targets)], np.int32)
    x = embed_layout(params, ids, is_speech, cfg=cfg)
    hidden, logits = forward_embeddings(params, x, lengths, cfg=cfg, precision=precision)
    return {"lm_input": np.asarray(x), "hidden": np.asarray(hidden), "logits": np.asarray(logits),
            "lengths": lengths, "prefix_lengths": prefix}


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    """One request's result.

    Attributes:
      tokens: [N] int32 emitted speech tokens (the stop id is not included).
      stop_token: the id that ended the run, or -1 when max_len did.
      step_logits: [S, V] llm_decoder outputs per step (S = N + 1 when a stop id ended the run),
        when recorded.
    """

    tokens: np.ndarray
    stop_token: int
    step_logits: np.ndarray | None = None

    @property
    def stopped_by_token(self) -> bool:
        return self.stop_token >= 0


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """Host-side, validated inputs of ``decode.prefill`` (numpy; no device call made yet)."""

    ids: np.ndarray  # [B, P] int32
    is_speech: np.ndarray  # [B, P] bool
    lengths: np.ndarray  # [B] int32
    min_len: np.ndarray  # [B] int32
    max_len: np.ndarray  # [B] int32
    cache_len: int


def prepare(cfg: LLMConfig, requests: Sequence[LMRequest], keys, *, cache_len: int | None = None,
            min_ratio: float = MIN_TOKEN_TEXT_RATIO, max_ratio: float = MAX_TOKEN_TEXT_RATIO,
            require_endofprompt: bool = False) -> PreparedBatch:
    """Validate requests and keys, pad to length buckets; pure host work.

    Args:
      keys: [B] typed PRNG keys (``jax.random.key``), one per request (only checked here).
      cache_len: KV-cache slots; by default the power-of-two bucket of prefill bucket + max max_len.
    Raises:
      ValueError for bad requests or keys, or when the padded prompt plus max_len decode slots do
      not fit ``cache_len``.
    """
    if not requests:
        raise ValueError("no requests")
    for i, r in enumerate(requests):
        try:
            validate_request(cfg, r, require_endofprompt=require_endofprompt)
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from None
    if (not isinstance(keys, jax.Array) or keys.shape != (len(requests),)
            or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)):
        raise ValueError(f"keys must be {len(requests)} typed PRNG keys (jax.random.key), got "
                         f"{getattr(keys, 'shape', None)} {getattr(keys, 'dtype', type(keys).__name__)}")
    layouts = [build_layout(cfg, r) for r in requests]
    limits = np.asarray([length_limits(r, min_ratio, max_ratio) for r in requests], np.int32)
    longest = max(len(ids) for ids, _ in layouts)
    prefill_len = bucket(longest)
    needed = prefill_len + int(limits[:, 1].max())
    if cache_len is None:
        cache_len = bucket(needed, 64)
    if cache_len < needed:
        raise ValueError(f"cache_len={cache_len} is too small: the prompt needs {longest} slots "
                         f"(padded to {prefill_len}) plus max_len={int(limits[:, 1].max())} decode slots")
    ids, is_speech, lengths = pad_layouts(layouts, prefill_len)
    return PreparedBatch(ids, is_speech, lengths, limits[:, 0], limits[:, 1], cache_len)


@dataclasses.dataclass(frozen=True)
class VoicePrefix:
    """The KV cache of a voice's fixed layout prefix: sos + its prompt text (``voice_prefix``).

    Every request of a cached voice starts its layout with these tokens; only the rest (its text,
    the task id, the prompt speech tokens, which follow the text) needs a prefill.  Holds the
    prefix's keys/values only ([1, P1, K, H] per layer, P1 its bucket), not a full cache.
    """

    prompt_text: tuple[int, ...]
    kv: dict
    slots: int


def voice_prefix(params, cfg: LLMConfig, prompt_text: Sequence[int], *, precision: Precision | None = None,
                 programs: ProgramCache | None = None) -> VoicePrefix:
    """Prefill sos + ``prompt_text`` once and keep its keys/values (a voice's reusable prefix)."""
    text = _ids(prompt_text)
    _check_range("prompt_text", text, cfg.vocab_size)
    ids = [cfg.sos] + list(text)
    slots = bucket(len(ids))
    layout_ids = np.zeros((1, slots), np.int32)
    layout_ids[0, :len(ids)] = ids
    is_speech = np.zeros((1, slots), bool)
    is_speech[0, 0] = True
    kv = run_program(programs, decode.prefill_prefix, params, layout_ids, is_speech, np.array([len(ids)], np.int32),
                     cfg=cfg, slots=slots, precision=precision)
    return VoicePrefix(text, kv, slots)


def start(params, cfg: LLMConfig, requests: Sequence[LMRequest], keys: Array, settings: SamplerSettings,
          precision: Precision | None = None, programs: ProgramCache | None = None,
          prefix: VoicePrefix | None = None, **prepare_kwargs) -> decode.DecodeState:
    """``prepare`` (host checks) then ``decode.prefill``; returns the decode state.

    ``programs``: run through this ``cosyjax.programs.ProgramCache`` (compiled ahead of time by warm-up).
    ``prefix``: the cached prefix of the (one) request's voice (``voice_prefix``; its prompt text must
    be the request's): only the rest of the layout is prefilled (``decode.prefill_from_prefix``).
    """
    batch = prepare(cfg, requests, keys, **prepare_kwargs)
    if prefix is None:
        return run_program(programs, decode.prefill, params, batch.ids, batch.is_speech, batch.lengths,
                           batch.min_len, batch.max_len, keys, cfg=cfg, cache_len=batch.cache_len,
                           window=settings.win_size, precision=precision)
    if len(requests) != 1 or requests[0].prompt_text != prefix.prompt_text:
        raise ValueError("prefix: a voice prefix serves one request with the same prompt_text")
    cut = 1 + len(prefix.prompt_text)
    rest = int(batch.lengths[0]) - cut
    size = bucket(rest)
    if prefix.slots + size + int(batch.max_len[0]) > batch.cache_len:
        raise ValueError(f"cache_len={batch.cache_len} is too small for the {prefix.slots} prefix slots, the "
                         f"{size}-slot rest and max_len={int(batch.max_len[0])}")
    ids = np.zeros((1, size), np.int32)
    is_speech = np.zeros((1, size), bool)
    ids[0, :rest] = batch.ids[0, cut:cut + rest]
    is_speech[0, :rest] = batch.is_speech[0, cut:cut + rest]
    return run_program(programs, decode.prefill_from_prefix, params, prefix.kv, ids, is_speech,
                       np.array([rest], np.int32), batch.min_len, batch.max_len, keys, cfg=cfg,
                       cache_len=batch.cache_len, window=settings.win_size, precision=precision)


def stream(params, cfg: LLMConfig, state: decode.DecodeState, settings: SamplerSettings, *,
           chunk_size: int = 25, record_logits: bool = False, precision: Precision | None = None,
           programs: ProgramCache | None = None
           ) -> Iterator[tuple[list[np.ndarray], decode.DecodeState, decode.ChunkOutput]]:
    """Decode chunk by chunk until every row is done; yields (new tokens per row, state, chunk).

    One host read per chunk: the chunk's tokens and counts, and ``done``.
    """
    while True:
        done = np.asarray(state.done)
        if done.all():
            return
        if (np.asarray(state.end_index)[~done] >= state.valid.shape[1]).any():
            raise ValueError(f"KV cache full ({state.valid.shape[1]} slots) before every row finished")
        state, chunk = run_program(programs, decode.decode_chunk, params, state, cfg=cfg, settings=settings,
                                   num_steps=chunk_size, record_logits=record_logits, precision=precision,
                                   fixed_trip=None)
        tokens, count = np.asarray(chunk.tokens), np.asarray(chunk.count)
        yield [tokens[b, :count[b]] for b in range(tokens.shape[0])], state, chunk


def generate(params, cfg: LLMConfig, requests: Sequence[LMRequest], keys: Array, settings: SamplerSettings,
             *, chunk_size: int = 25, record_logits: bool = False, cache_len: int | None = None,
             precision: Precision | None = None, programs: ProgramCache | None = None,
             **prepare_kwargs) -> list[Generation]:
    """Generate speech tokens for a batch of requests (rows stop independently).

    Args:
      params: CosyVoice3LM params (numpy or jax; moved to the device once here).
      keys: [B] typed PRNG keys (``jax.random.key``), one per request.
      settings: sampler settings (``SamplerSettings(method="greedy")`` for parity).
      chunk_size: decode steps per host round-trip.
      record_logits: keep each step's llm_decoder output (parity; costs B*chunk*V floats per chunk).
      cache_len, prepare_kwargs: passed to ``prepare`` (min_ratio, max_ratio, require_endofprompt).
      precision: the LLM stage's ``Precision`` (None: from the params' dtype).
      programs: run through this ``cosyjax.programs.ProgramCache``.
    Returns:
      one Generation per request.
    """
    # Every check runs before anything reaches the device.
    prepare(cfg, requests, keys, cache_len=cache_len, **prepare_kwargs)
    params = jax.tree.map(jnp.asarray, params)
    state = start(params, cfg, requests, keys, settings, precision, programs, cache_len=cache_len, **prepare_kwargs)
    batch = len(requests)
    tokens: list[list[np.ndarray]] = [[] for _ in range(batch)]
    logits: list[list[np.ndarray]] = [[] for _ in range(batch)]
    live = ~np.asarray(state.done)
    for new, state, chunk in stream(params, cfg, state, settings, chunk_size=chunk_size,
                                    record_logits=record_logits, precision=precision, programs=programs):
        stop = np.asarray(state.stop_token)
        chunk_logits = np.asarray(chunk.step_logits) if record_logits else None
        for b in range(batch):
            tokens[b].append(new[b])
            if record_logits and live[b]:
                # A live row ran one step per emitted token, plus the step that chose its stop id.
                logits[b].append(chunk_logits[b, :len(new[b]) + int(stop[b] >= 0)])
        live = ~np.asarray(state.done)
    stop = np.asarray(state.stop_token)
    no_logits = np.zeros((0, cfg.speech_vocab_size), np.float32)
    return [Generation(tokens=np.concatenate([np.zeros(0, np.int32)] + tokens[b]).astype(np.int32),
                       stop_token=int(stop[b]),
                       step_logits=np.concatenate([no_logits] + logits[b]) if record_logits else None)
            for b in range(batch)]


def programs(cfg: LLMConfig, params, *, max_prefill: int, cache_len: int, settings: SamplerSettings,
             chunk_size: int, batch: int = 1, precision: Precision | None = None,
             max_prefix: int | None = None) -> list[tuple]:
    """Every program ``start`` + ``stream`` run for prompts of up to ``max_prefill`` tokens with a
    ``cache_len``-slot cache: prefill per prompt bucket, and the decode chunk (cosyjax.programs).
    ``max_prefix``: also the voice-prefix programs (``voice_prefix``, ``start(prefix=...)``) for
    prefixes of up to that many tokens (sos + prompt text)."""
    p = specs_of(params)
    i32 = np.int32
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    out, size = [], bucket(1)
    rows = jax.ShapeDtypeStruct((batch,), i32)
    while True:
        prefill_static = dict(cfg=cfg, cache_len=cache_len, window=settings.win_size, precision=precision)
        args = (p, jax.ShapeDtypeStruct((batch, size), i32), jax.ShapeDtypeStruct((batch, size), bool), rows, rows,
                rows, keys)
        out.append((decode.prefill, args, prefill_static))
        if size >= max_prefill:
            break
        size *= 2
    state = jax.eval_shape(functools.partial(decode.prefill, **prefill_static), *args)
    out.append((decode.decode_chunk, (p, state), dict(cfg=cfg, settings=settings, num_steps=chunk_size,
                                                      record_logits=False, precision=precision, fixed_trip=None)))
    if max_prefix is None or batch != 1:
        return out
    one = jax.ShapeDtypeStruct((1,), i32)
    slots = bucket(1)
    while True:
        prefix_args = (p, jax.ShapeDtypeStruct((1, slots), i32), jax.ShapeDtypeStruct((1, slots), bool), one)
        prefix_static = dict(cfg=cfg, slots=slots, precision=precision)
        out.append((decode.prefill_prefix, prefix_args, prefix_static))
        kv = jax.eval_shape(functools.partial(decode.prefill_prefix, **prefix_static), *prefix_args)
        rest = bucket(1)
        while True:
            out.append((decode.prefill_from_prefix, (p, kv, jax.ShapeDtypeStruct((1, rest), i32),
                                                     jax.ShapeDtypeStruct((1, rest), bool), one, one, one, keys),
                        dict(cfg=cfg, cache_len=cache_len, window=settings.win_size, precision=precision)))
            if rest >= max_prefill - 1:
                break
            rest *= 2
        if slots >= max_prefix:
            return out
        slots *= 2
