"""Jitted prefill + chunked decode over a static-shape KV cache (Qwen2LM.inference_wrapper, non-vLLM).

Cache layout: one {"k", "v": [B, S, K, H]} per layer, plus ``valid`` [B, S] (which slots hold a real
token of that row), ``positions`` [B] (the rotary position the row's next token gets) and
``end_index`` [B] (the next slot each row writes).  A batch of prompts of different lengths is
right-padded to one prefill length P: row b's prompt sits in slots [0, len_b), its pad slots stay
invalid, and its decode step i writes slot P + i with rotary position len_b + i.  So each row sees
exactly its own tokens at its own positions, as if decoded alone.  Every per-row quantity (write
slot, step, positions) is a vector, so rows need not start together: ``insert_row`` puts a freshly
prefilled request into one row of a running batch (the serving engine's decode slots), and a
finished row stops writing.  Rows never mix, so ``decode_rows`` may decode only the first rows of a
batch and ``move_row`` may move a row to another index (the engine packs its live rows this way).

The loop mirrors upstream step for step: the scores for step i come from the forward of the
previous token (or of the prompt for i = 0); a sampled id >= speech_token_size stops the row and is
not emitted; otherwise it is emitted and fed back.  Rows stop independently; a row also stops after
emitting max_len tokens.  For i < min_len upstream masks index speech_token_size only (SPEC 3.3).

Legend: B batch, P prefill length, S cache slots, K kv heads, H head dim, D model width,
V speech vocabulary, N tokens per chunk, W repetition window.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cosyjax.config import LLMConfig
from cosyjax.llm.qwen2 import build_model, precision_of
from cosyjax.llm.sampling import SamplerSettings, sample
from cosyjax.precision import Precision
from cosyjax.programs import exportable

Array = jax.Array


@exportable  # jax.export serialises the pytree structure of a program's inputs and outputs
@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries between steps and chunks (all device arrays).

    Attributes:
      cache: list over layers of {"k", "v": [B, S, K, H]}.
      valid: [B, S] bool, slots holding a real token of the row.
      positions: [B] int32, rotary position of the row's next token.
      end_index: [B] int32, next cache slot each row writes.
      logits: [B, V] float32 llm_decoder output that the next step samples from.
      step: [B] int32, decode steps the row has taken.
      num_tokens: [B] int32, tokens emitted so far.
      done: [B] bool.
      stop_token: [B] int32, the stop id that ended the row, -1 otherwise.
      recent: [B, W] int32, the last W emitted tokens (-1 where fewer), for RAS.
      min_len, max_len: [B] int32 per-row limits (traced: no recompile when they change).
      keys: [B] PRNG keys, one per request; step i uses ``fold_in(key, i)``, so a row's draws do not
        depend on batching or chunking.
    """

    cache: list
    valid: Array
    positions: Array
    end_index: Array
    logits: Array
    step: Array
    num_tokens: Array
    done: Array
    stop_token: Array
    recent: Array
    min_len: Array
    max_len: Array
    keys: Array


@exportable
@flax.struct.dataclass
class ChunkOutput:
    """One decode chunk.

    Attributes:
      tokens: [B, N] int32; row b emitted ``tokens[b, :count[b]]`` in this chunk (-1 elsewhere).
      count: [B] int32.
      step_logits: [B, N, V] float32 llm_decoder output of each step run in the chunk (rows of a
        finished row are stale), or None when not recorded.
      steps: int32 scalar, steps run in this chunk.
    """

    tokens: Array
    count: Array
    step_logits: Any
    steps: Array


def _model(cfg: LLMConfig, params, precision: Precision | None) -> Any:
    """The module under ``precision`` (None: what the params' dtype implies, ``qwen2.precision_of``)."""
    return build_model(cfg, precision if precision is not None else precision_of(params))


def _forward(cfg: LLMConfig, params, state: DecodeState, x: Array, new_valid: Array,
             precision: Precision | None) -> tuple[Array, DecodeState]:
    """Run T new tokens [B, T, D] through the transformer into slots end_index.. of the cache.

    ``new_valid`` [B, T] marks which of them are real (prefill padding is not).  Returns the
    final-normed hidden [B, T, D] and the state with cache/valid/positions/end_index advanced.
    """
    model = _model(cfg, params, precision)
    length = x.shape[1]
    slots = state.valid.shape[1]
    write = state.end_index  # [B]
    valid = jax.vmap(lambda v, n, i: jax.lax.dynamic_update_slice(v, n, (i,)))(state.valid, new_valid, write)  # [B, S]
    positions = state.positions[:, None] + jnp.arange(length, dtype=jnp.int32)  # [B, T]
    query_slot = write[:, None] + jnp.arange(length, dtype=jnp.int32)  # [B, T]
    causal = jnp.arange(slots, dtype=jnp.int32)[None, None, :] <= query_slot[:, :, None]  # [B, T, S]
    mask = valid[:, None, :] & causal  # [B, T, S]
    hidden, cache = model.apply({"params": params}, x, positions, mask, state.cache, write)
    # A row advances by the tokens it really wrote: a finished row keeps its slot (its writes stay invalid).
    advance = jnp.where(jnp.any(new_valid, axis=1), length, 0).astype(jnp.int32)
    return hidden, state.replace(
        cache=cache, valid=valid, end_index=write + advance,
        positions=state.positions + jnp.sum(new_valid, axis=1, dtype=jnp.int32))


def _feed(cfg: LLMConfig, params, state: DecodeState, tokens: Array, precision: Precision | None,
          live: Array | None = None) -> DecodeState:
    """Feed one speech token per row [B]; the state's logits become the next step's.

    ``live`` [B]: rows whose token is real (default all); the others' writes stay invalid and their
    write slot does not advance.
    """
    model = _model(cfg, params, precision)
    x = model.apply({"params": params}, tokens[:, None], jnp.ones_like(tokens[:, None], bool),
                    method=model.embed)  # [B, 1, D]
    live = jnp.ones(x.shape[:1], bool) if live is None else live
    hidden, state = _forward(cfg, params, state, x, live[:, None], precision)
    logits = model.apply({"params": params}, hidden[:, 0], method=model.logits)  # [B, V]
    return state.replace(logits=logits)


def _run_prompt(cfg: LLMConfig, params, model, precision: Precision | None, cache: list, valid: Array,
                positions: Array, end_index: Array, ids: Array, is_speech: Array, lengths: Array, min_len: Array,
                max_len: Array, keys: Array, window: int) -> DecodeState:
    """A fresh decode state on ``cache`` (its ``valid`` slots at rotary ``positions``, the next write at
    ``end_index``) after running the prompt ``ids`` [B, R] (``lengths`` real tokens) through the model;
    its logits are the first step's.  ``prefill`` starts from an empty cache, ``prefill_from_prefix``
    from a cached prefix."""
    batch = ids.shape[0]
    state = DecodeState(
        cache=cache,
        valid=valid,
        positions=positions,
        end_index=end_index,
        logits=jnp.zeros((batch, cfg.speech_vocab_size), jnp.float32),
        step=jnp.zeros((batch,), jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32),
        done=max_len <= 0,
        stop_token=jnp.full((batch,), -1, jnp.int32),
        recent=jnp.full((batch, window), -1, jnp.int32),
        min_len=min_len.astype(jnp.int32),
        max_len=max_len.astype(jnp.int32),
        keys=keys,
    )
    x = model.apply({"params": params}, ids, is_speech, method=model.embed)  # [B, R, D]
    new_valid = jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, R]
    hidden, state = _forward(cfg, params, state, x, new_valid, precision)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, D]
    return state.replace(logits=model.apply({"params": params}, last, method=model.logits))


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "window", "precision"))
def prefill(params, ids: Array, is_speech: Array, lengths: Array, min_len: Array, max_len: Array,
            keys: Array, *, cfg: LLMConfig, cache_len: int, window: int,
            precision: Precision | None = None) -> DecodeState:
    """Run the prompts and build the decode state.

    Args:
      params: CosyVoice3LM params (float32 or bfloat16; the cache takes their dtype).
      ids, is_speech: [B, P] prompt token layout (see ``lm.build_layout``), right-padded.
      lengths: [B] int32 real prompt lengths (>= 1).
      min_len, max_len: [B] int32 per-row limits.
      keys: [B] PRNG keys.
      cfg: static config.  cache_len: static S >= P.  window: static W (RAS win_size).
      precision: the LLM stage's ``Precision`` (static; None: from the params' dtype).
    Returns:
      DecodeState whose ``logits`` are the first step's.
    """
    model = _model(cfg, params, precision)
    batch = ids.shape[0]
    dtype = model.precision.dtype  # the cache holds keys/values in the compute dtype
    shape = (batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
    cache = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]
    return _run_prompt(cfg, params, model, precision, cache, jnp.zeros((batch, cache_len), bool),
                       jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), ids, is_speech, lengths,
                       min_len, max_len, keys, window)


def step_scores(cfg: LLMConfig, settings: SamplerSettings, logits: Array, step: Array, min_len: Array
                ) -> Array:
    """log_softmax of ``logits`` [B, V] with the min_len mask upstream applies before sampling.

    While ``step < min_len`` upstream sets index speech_token_size (sos in CosyVoice3) to -inf;
    with ``settings.mask_all_stop_ids_before_min_len`` every id >= speech_token_size is masked.
    """
    scores = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ids = jnp.arange(scores.shape[-1])
    if settings.mask_all_stop_ids_before_min_len:
        masked_ids = ids >= cfg.speech_token_size
    else:
        masked_ids = ids == cfg.speech_token_size
    masked = (step < min_len)[:, None] & masked_ids[None, :]
    return jnp.where(masked, -jnp.inf, scores)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "num_steps", "record_logits", "precision",
                                           "fixed_trip"), donate_argnames=("state",))
def decode_chunk(params, state: DecodeState, *, cfg: LLMConfig, settings: SamplerSettings, num_steps: int,
                 record_logits: bool = False, precision: Precision | None = None,
                 fixed_trip: bool | None = None) -> tuple[DecodeState, ChunkOutput]:
    """Up to ``num_steps`` decode steps in one jitted loop (one host round-trip per chunk).

    Stops early when every row is done or the cache is full.  Returns the advanced state and the
    chunk's tokens (see ``ChunkOutput``).

    ``fixed_trip`` (default: on for GPU/TPU, off on CPU): the loop runs exactly ``num_steps``
    iterations, and once every row is done an iteration changes nothing (its results are masked
    out).  A ``lax.while_loop`` whose condition depends on the tokens, or a ``lax.cond`` in its body,
    makes an accelerator copy the predicate to the host on every step; a fixed trip count does not,
    so the host reads the device once per chunk (the tokens and ``done``).  On CPU there is no such
    copy and the early exit saves the steps after the last row finishes.  Both give the same tokens.
    """
    batch = state.done.shape[0]
    slots = state.valid.shape[1]
    stop_id = cfg.speech_token_size
    if fixed_trip is None:
        fixed_trip = jax.default_backend() != "cpu"

    def sample_step(i, st, tokens, logits_buf):
        """Upstream's step: score, sample, stop or emit; returns the state before the feed."""
        if record_logits:
            logits_buf = logits_buf.at[:, i].set(st.logits)
        scores = step_scores(cfg, settings, st.logits, st.step, st.min_len)
        keys = jax.vmap(jax.random.fold_in)(st.keys, st.step)
        token = sample(keys, scores, st.recent, settings)  # [B]
        active = ~st.done
        is_stop = token >= stop_id
        emit = active & ~is_stop
        num_tokens = st.num_tokens + emit.astype(jnp.int32)
        tokens = tokens.at[:, i].set(jnp.where(emit, token, -1))
        recent = jnp.where(emit[:, None], jnp.concatenate([st.recent[:, 1:], token[:, None]], axis=1),
                           st.recent)
        st = st.replace(
            step=st.step + 1, num_tokens=num_tokens, recent=recent,
            done=st.done | is_stop | (num_tokens >= st.max_len),
            stop_token=jnp.where(active & is_stop, token, st.stop_token))
        # Feed the emitted tokens back (finished rows feed a dummy id; their outputs are ignored).
        return st, jnp.where(emit, token, 0), tokens, logits_buf

    def feed(st, token):
        return _feed(cfg, params, st, token, precision, live=~st.done)

    def cache_full(st):  # a live row with no slot left to write
        return jnp.any(~st.done & (st.end_index >= slots))

    tokens = jnp.full((batch, num_steps), -1, jnp.int32)
    logits_buf = (jnp.zeros((batch, num_steps, cfg.speech_vocab_size), jnp.float32) if record_logits
                  else jnp.zeros((), jnp.float32))
    start_tokens = state.num_tokens
    carry = (jnp.zeros((), jnp.int32), state, tokens, logits_buf)
    if fixed_trip:
        def select(pred, a, b):
            return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)

        def scan_body(carry, _):
            i, st, tokens, logits_buf = carry
            idle = jnp.all(st.done) | cache_full(st)
            new, token, new_tokens, new_buf = sample_step(i, st, tokens, logits_buf)
            fed = feed(new, token)
            # The cache is always taken as fed: a feed that is masked out wrote one slot at end_index,
            # which stays invalid and is overwritten by the next real write (selecting the whole cache
            # per step would double its memory traffic).  Upstream feeds nothing once every row is done.
            stepped = select(jnp.all(new.done), new.replace(cache=fed.cache), fed)
            # A step after every row finished changes nothing.
            return select(idle, (i, st.replace(cache=fed.cache), tokens, logits_buf),
                          (i + 1, stepped, new_tokens, new_buf)), None

        (steps, state, tokens, logits_buf), _ = jax.lax.scan(scan_body, carry, None, length=num_steps)
    else:
        def cond(carry):
            i, st, _, _ = carry
            return (i < num_steps) & ~jnp.all(st.done) & ~cache_full(st)

        def body(carry):
            i, st, tokens, logits_buf = carry
            st, token, tokens, logits_buf = sample_step(i, st, tokens, logits_buf)
            st = jax.lax.cond(jnp.all(st.done), lambda s: s, lambda s: feed(s, token), st)
            return i + 1, st, tokens, logits_buf

        steps, state, tokens, logits_buf = jax.lax.while_loop(cond, body, carry)
    return state, ChunkOutput(tokens=tokens, count=state.num_tokens - start_tokens,
                              step_logits=logits_buf if record_logits else None, steps=steps)


@functools.partial(jax.jit, static_argnames=("rows", "cfg", "settings", "num_steps", "record_logits", "precision",
                                           "fixed_trip"), donate_argnames=("state",))
def decode_rows(params, state: DecodeState, *, rows: int, cfg: LLMConfig, settings: SamplerSettings, num_steps: int,
                record_logits: bool = False, precision: Precision | None = None,
                fixed_trip: bool | None = None) -> tuple[DecodeState, ChunkOutput]:
    """``decode_chunk`` over rows [0, rows) of ``state`` only; the rows after them are left as they are.

    A decode step costs in proportion to the rows it runs (each reads its whole cache), so a batch
    of fixed slots that decodes every slot makes one request pay for all of them.  The serving engine
    keeps its requests packed in the first rows and decodes a bucket of rows that holds them
    (``rows`` is static: one program per bucket).  Rows are independent (their own keys, steps,
    positions and cache), so a row decodes the same tokens in any bucket and at any row index.

    Returns the whole state (rows [0, rows) advanced, written back in place: ``state`` is donated)
    and the ``ChunkOutput`` of those ``rows`` rows only.
    """
    batch = state.done.shape[0]
    if not 1 <= rows <= batch:
        raise ValueError(f"rows={rows}: expected 1 <= rows <= {batch} (the state's batch)")
    head = jax.tree.map(lambda a: a[:rows], state)
    head, chunk = decode_chunk(params, head, cfg=cfg, settings=settings, num_steps=num_steps,
                               record_logits=record_logits, precision=precision, fixed_trip=fixed_trip)
    state = jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, 0, axis=0), state, head)
    return state, chunk


@functools.partial(jax.jit, static_argnames=("cfg", "precision"))
def decode_forced(params, state: DecodeState, tokens: Array, *, cfg: LLMConfig,
                  precision: Precision | None = None) -> tuple[DecodeState, Array]:
    """Teacher-forced decode through the same cache step the sampler loop uses.

    Args:
      state: from ``prefill``.
      tokens: [B, N] int32 speech tokens fed one per step.
    Returns:
      (state after feeding all N, step_logits [B, N, V]) where step_logits[:, j] are the
      llm_decoder outputs before feeding tokens[:, j] (row 0 is the prefill's).
    """
    def body(st, token):
        return _feed(cfg, params, st, token, precision), st.logits

    state, logits = jax.lax.scan(body, state, tokens.T)
    return state, jnp.swapaxes(logits, 0, 1)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_row(state: DecodeState, row: DecodeState, slot: Array) -> DecodeState:
    """``state`` with row ``slot`` replaced by the one row of ``row`` (a batch-1 ``prefill`` state of the
    same cache length): a new request joins a running batch between decode chunks."""
    return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), slot, axis=0),
                        state, row)


@functools.partial(jax.jit, donate_argnames=("state",))
def release_row(state: DecodeState, slot: Array) -> DecodeState:
    """``state`` with row ``slot`` marked done (a cancelled or finished request frees its slot)."""
    return state.replace(done=state.done.at[slot].set(True))


@functools.partial(jax.jit, donate_argnames=("state",))
def move_row(state: DecodeState, src: Array, dst: Array) -> DecodeState:
    """``state`` with row ``src`` copied into row ``dst`` (every leaf) and row ``src`` then marked done.

    The serving engine keeps its live rows packed at the front (so ``decode_rows`` runs a small
    bucket): when a row frees up below the last live one, the last one moves into it.  A row carries
    all of its own decode state (cache, valid slots, positions, step, keys), so the moved row decodes
    exactly as it would have in place; the source row is left done, a free row that emits nothing.
    ``src == dst`` changes nothing.
    """
    moved = jax.tree.map(lambda a: jax.lax.dynamic_update_slice_in_dim(
        a, jax.lax.dynamic_slice_in_dim(a, src, 1, axis=0), dst, axis=0), state)
    return moved.replace(done=moved.done.at[src].set(moved.done[src] | (src != dst)))


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "precision"))
def prefill_prefix(params, ids: Array, is_speech: Array, length: Array, *, cfg: LLMConfig, slots: int,
                   precision: Precision | None = None) -> dict[str, Any]:
    """The K/V of one request's fixed prefix (sos + prompt text), for ``prefill_from_prefix``.

    Args:
      ids, is_speech: [1, P1] the prefix's token layout, right-padded to a bucket; length: [1] real tokens.
      slots: P1 (static).
    Returns:
      {"k", "v": lists over layers of [1, P1, K, H], "length": [1]}: a voice's reusable prefix.
    """
    model = _model(cfg, params, precision)
    dtype = model.precision.dtype
    shape = (1, slots, cfg.num_kv_heads, cfg.head_dim)
    state = DecodeState(
        cache=[{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)],
        valid=jnp.zeros((1, slots), bool), positions=jnp.zeros((1,), jnp.int32), end_index=jnp.zeros((1,), jnp.int32),
        logits=jnp.zeros((1, cfg.speech_vocab_size), jnp.float32), step=jnp.zeros((1,), jnp.int32),
        num_tokens=jnp.zeros((1,), jnp.int32), done=jnp.zeros((1,), bool), stop_token=jnp.full((1,), -1, jnp.int32),
        recent=jnp.zeros((1, 1), jnp.int32), min_len=jnp.zeros((1,), jnp.int32), max_len=jnp.zeros((1,), jnp.int32),
        keys=jax.random.split(jax.random.key(0), 1))
    x = model.apply({"params": params}, ids, is_speech, method=model.embed)
    new_valid = jnp.arange(slots, dtype=jnp.int32)[None, :] < length[:, None]
    _, state = _forward(cfg, params, state, x, new_valid, precision)
    return {"k": [c["k"] for c in state.cache], "v": [c["v"] for c in state.cache], "length": length}


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "window", "precision"))
def prefill_from_prefix(params, prefix: dict[str, Any], ids: Array, is_speech: Array, lengths: Array, min_len: Array,
                        max_len: Array, keys: Array, *, cfg: LLMConfig, cache_len: int, window: int,
                        precision: Precision | None = None) -> DecodeState:
    """``prefill`` of a request whose layout starts with a cached prefix (``prefill_prefix``).

    The prefix's keys/values are copied into slots [0, P1) (its pad slots stay invalid) and only the
    rest of the layout (text, task id, prompt speech; [1, R] ``ids``/``is_speech``, ``lengths`` real
    tokens) runs through the model, at slots P1.. and rotary positions that continue the prefix's.
    The state is the one ``prefill`` makes for the whole layout, so decoding continues the same.
    """
    model = _model(cfg, params, precision)
    dtype = model.precision.dtype
    batch = ids.shape[0]
    p1 = prefix["k"][0].shape[1]
    shape = (batch, cache_len, cfg.num_kv_heads, cfg.head_dim)

    def place(a):
        return jax.lax.dynamic_update_slice(jnp.zeros(shape, dtype), a.astype(dtype), (0, 0, 0, 0))

    length = prefix["length"]
    cache = [{"k": place(k), "v": place(v)} for k, v in zip(prefix["k"], prefix["v"])]
    return _run_prompt(cfg, params, model, precision, cache, jnp.arange(cache_len)[None, :] < length[:, None],
                       length.astype(jnp.int32), jnp.full((batch,), p1, jnp.int32), ids, is_speech, lengths,
                       min_len, max_len, keys, window)
