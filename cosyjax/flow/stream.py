"""Incremental (linear-cost) streaming of the flow: each mel frame is integrated once.

Upstream streams by re-running the whole flow (10 Euler steps x CFG over prompt + every token so
far) at every hop and keeping the new frames: the work per hop grows with the stream.  With
chunked attention (``streaming=True``) a frame only sees frames of its own and earlier DiT chunks
(``static_chunk_size`` frames, counted from frame 0), the position embedding is a causal conv and
every other op is per frame, so the frames of complete chunks do not change when more tokens
arrive.  This module keeps, per Euler step and CFG branch, every layer's attention keys/values and
the conv position embedding's input tails, and at each push integrates only:

- the frames after the last complete chunk (an incomplete chunk is recomputed on the next push,
  with the keys that arrived since, exactly as the re-run sees them), and
- the new frames, whose queries attend to the cached keys of all earlier frames.

With upstream's hop schedule (hops aligned to DiT chunks) each push therefore computes exactly the
new frames, and the result equals the re-run up to float32 summation order (tests/test_flow_stream.py
checks both against ``flow_inference``).  ``mu`` for the new frames comes from a token window
(``pre_lookahead_len`` tokens of right context and the conv's 2 of left context), so no push
touches the whole sequence except through attention.

Cost: per push, DiT work for the new frames plus attention over the cache; memory: the cache holds
2 (k, v) x n_timesteps x depth x 2 (CFG) x heads x dim_head values per frame (3.6 MB per frame
for the release in float32, ``cache_dtype=bfloat16`` halves it).

Compiled shapes.  A push integrates its new frames in pieces of at most ``MAX_PUSH_CHUNKS`` DiT
chunks (complete chunks never change later, so a long first push over the prompt is the same as
several short ones), each padded to 1, 2, 4 or 8 chunks; the cache capacity is a power of two of
chunks (8 to start with, doubled when full).  So the programs are (frames bucket x capacity), plus
the first piece of a stream, which has no left token context: ``stream_programs`` lists them.

Rows of a batch advance together: they share the prompt token/mel lengths and the pushed token
count (the streaming server path is one request per state).

Legend: B batch, S Euler steps, L DiT depth, N heads, H head dim, D DiT width, T frames, C mel bins.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import FlowConfig
from cosyjax.flow.flow import Flow, make_flow
from cosyjax.flow.prompt import FlowPrompt, int_rows
from cosyjax.flow.solver import cfg_batch, solve_euler_cfg
from cosyjax.precision import FLOAT32, Precision
from cosyjax.programs import ProgramCache, specs_of
from cosyjax.programs import run as run_program

Array = jax.Array
CONV2_LEFT = 2  # PreLookaheadLayer.conv2: kernel 3, left-causal
MIN_CAPACITY_CHUNKS = 8
MAX_PUSH_CHUNKS = 8  # frames one core call integrates, in DiT chunks (more are split into pieces)


@dataclasses.dataclass
class FlowStreamState:
    """One stream's flow state (host object holding device arrays).

    Attributes:
      cache: {"k", "v": [S, L, 2B, capacity, N, H], "tail1", "tail2": [S, 2B, K-1, D]}.
      frames: frames whose keys/values and tails are final (a multiple of the chunk size).
      mel: [B, frames_computed, C] every frame computed so far (host; frames past ``frames`` are
        provisional and recomputed by the next push).
      prompt_tokens: [B, P]; prompt_feat: [B, F1, C]; embedding: [B, E].
      finished: True after a ``finalize`` push.
    """

    cache: dict[str, Array]
    frames: int
    mel: np.ndarray
    prompt_tokens: np.ndarray
    prompt_feat: np.ndarray
    embedding: np.ndarray
    finished: bool = False

    @property
    def capacity(self) -> int:
        return int(self.cache["k"].shape[3])


def _chunk(cfg: FlowConfig) -> int:
    if cfg.static_chunk_size <= 0:
        raise ValueError("incremental flow streaming needs chunked attention (static_chunk_size > 0)")
    if cfg.static_chunk_size % cfg.token_mel_ratio:
        raise ValueError(f"static_chunk_size={cfg.static_chunk_size} is not a multiple of "
                         f"token_mel_ratio={cfg.token_mel_ratio}")
    return cfg.static_chunk_size


def cache_bytes_per_frame(cfg: FlowConfig, batch: int = 1, dtype: Any = jnp.float32) -> int:
    """Bytes of K/V cache per mel frame (the memory cost of incremental streaming)."""
    return 2 * cfg.n_timesteps * cfg.depth * 2 * batch * cfg.heads * cfg.dim_head * jnp.dtype(dtype).itemsize


def _empty_cache(cfg: FlowConfig, batch: int, capacity: int, dtype: Any) -> dict[str, Array]:
    """Zeros made on the host and copied over: no device program to compile per shape."""
    kv = (cfg.n_timesteps, cfg.depth, 2 * batch, capacity, cfg.heads, cfg.dim_head)
    tail = (cfg.n_timesteps, 2 * batch, cfg.conv_pos_kernel - 1, cfg.dim)
    dtype = jnp.dtype(dtype)
    return {"k": jax.device_put(np.zeros(kv, dtype)), "v": jax.device_put(np.zeros(kv, dtype)),
            "tail1": jax.device_put(np.zeros(tail, np.float32)), "tail2": jax.device_put(np.zeros(tail, np.float32))}


def frames_bucket(new_frames: int, chunk: int) -> int:
    """Frames one core call computes for ``new_frames`` (<= MAX_PUSH_CHUNKS chunks): 1, 2, 4 or 8 chunks."""
    chunks = max(1, -(-new_frames // chunk))
    return chunk * (1 << (chunks - 1).bit_length())


def flow_stream_init(cfg: FlowConfig, prompt_token: Any = None, prompt_feat: Any = None, embedding: Any = None, *,
                     prompt: FlowPrompt | None = None, capacity: int | None = None,
                     cache_dtype: Any = jnp.float32) -> FlowStreamState:
    """Start a stream.

    Args:
      prompt_token: [B, P] prompt speech tokens (P may be 0); prompt_feat: [B, F1, C] prompt mel;
      embedding: [B, E] raw speaker embedding.  Same meaning as in ``flow_inference``.
      prompt: instead of those three, a ``FlowPrompt`` checked before (full-length rows).
      capacity: initial cache capacity in frames (grows by doubling when exceeded).
      cache_dtype: float32 (default, parity) or bfloat16 (half the memory).
    """
    if prompt is None:
        prompt = FlowPrompt.check(cfg, prompt_token, prompt_feat, embedding)
    elif any(a is not None for a in (prompt_token, prompt_feat, embedding)):
        raise ValueError("give either prompt (a FlowPrompt) or prompt_token/prompt_feat/embedding, not both")
    if (prompt.token_len != prompt.tokens.shape[1]).any() or (prompt.feat_len != prompt.feat.shape[1]).any():
        raise ValueError("prompt: stream rows advance together; give full-length prompts (no per-row lengths)")
    chunk = _chunk(cfg)
    # A power of two of chunks, as every later doubling: few distinct cache shapes to compile.
    chunks = max(MIN_CAPACITY_CHUNKS, -(-(capacity or 0) // chunk))
    cap = chunk * (1 << (chunks - 1).bit_length())
    return FlowStreamState(_empty_cache(cfg, prompt.batch, cap, cache_dtype), 0,
                           np.zeros((prompt.batch, 0, cfg.output_size), np.float32), prompt.tokens, prompt.feat,
                           prompt.embedding)


@functools.partial(jax.jit, static_argnames=("capacity",))
def _grow(cache: dict[str, Array], *, capacity: int) -> dict[str, Array]:
    """The cache with its K/V capacity extended to ``capacity`` frames (zeros after the old ones)."""
    extra = capacity - cache["k"].shape[3]
    pad = [(0, 0)] * 3 + [(0, extra)] + [(0, 0)] * 2
    return {**cache, "k": jnp.pad(cache["k"], pad), "v": jnp.pad(cache["v"], pad)}


@functools.partial(jax.jit, static_argnames=("cfg", "window_offset", "precision"), donate_argnames=("cache",))
def _push_core(params: Mapping[str, Any], cache: dict[str, Array], tokens: Array, token_mask: Array,
               embedding: Array, feat: Array, noise: Array, start: Array, valid: Array, keep: Array, *,
               cfg: FlowConfig, window_offset: int, precision: Precision = FLOAT32) -> tuple[Array, dict[str, Array]]:
    """Integrate frames start .. start+T-1 (T static) against the cache.

    tokens/token_mask [B, W]: the token window (W = T/ratio + left + lookahead), whose position
    ``window_offset`` is the token of frame ``start``; feat [B, T, C] cond (prompt mel or zeros);
    noise [1, T, C]; valid: frames among T that exist; keep: frames among T whose keys become final.
    Returns (x [B, T, C], the cache with the new frames' keys/values written at ``start``).
    """
    model = make_flow(cfg, precision)
    variables = {"params": params}
    frames = feat.shape[1]
    batch = feat.shape[0]
    spks, h = model.apply(variables, tokens, token_mask, embedding, method=Flow.encode)  # h [B, W, C]
    h = jax.lax.dynamic_slice_in_dim(h, window_offset, frames // cfg.token_mel_ratio, axis=1)
    mu = jnp.repeat(h, cfg.token_mel_ratio, axis=1)  # [B, T, C]
    mu2, spks2, cond2 = cfg_batch(mu, spks, feat)
    lengths2 = jnp.full((2 * batch,), valid, jnp.int32)
    keep2 = jnp.full((2 * batch,), keep, jnp.int32)

    def velocity(x2, t2, step_cache):  # step_cache: this Euler step's slice of the cache
        k, v, tail1, tail2 = step_cache
        step_cache = {"k": k, "v": v, "tail1": tail1, "tail2": tail2, "start": start, "tail_at": keep2}
        vel, new = model.apply(variables, x2, mu2, t2, spks2, cond2, lengths2, True, True, step_cache,
                               method=Flow.estimate)
        return vel, (new["k"].astype(k.dtype), new["v"].astype(v.dtype), new["tail1"], new["tail2"])

    x, (k_new, v_new, tail1, tail2), _ = solve_euler_cfg(
        velocity, jnp.broadcast_to(noise, mu.shape), n_timesteps=cfg.n_timesteps, cfg_rate=cfg.inference_cfg_rate,
        per_step=(cache["k"], cache["v"], cache["tail1"], cache["tail2"]))
    zero = jnp.zeros((), jnp.int32)
    index = (zero, zero, zero, start, zero, zero)
    return x, {"k": jax.lax.dynamic_update_slice(cache["k"], k_new, index),
               "v": jax.lax.dynamic_update_slice(cache["v"], v_new, index),
               "tail1": tail1, "tail2": tail2}


def flow_stream_push(params: Mapping[str, Any], state: FlowStreamState, token: Any, *, cfg: FlowConfig,
                     noise: Any, finalize: bool, out_from: int | None = None, precision: Precision = FLOAT32,
                     programs: ProgramCache | None = None) -> tuple[np.ndarray, FlowStreamState]:
    """Extend the stream to the target tokens ``token`` [B, Nt] (all so far, as upstream passes them).

    Equivalent to ``flow_inference(params, token, prompt, ..., streaming=True, finalize=finalize)``
    on the whole prefix, computing only frames not computed before.

    Args:
      token: every target token so far [B, Nt]; must extend the tokens of earlier pushes.
      finalize: False holds the last ``pre_lookahead_len`` tokens back as look-ahead (upstream's
        non-final hop); True ends the stream.
      out_from: first generated frame (counted after the prompt mel, like ``flow_inference``'s
        output) to return; default: the first frame this push computed or recomputed, clipped to
        the prompt end.
      precision: the flow stage's ``Precision`` (static).
      programs: run through this ``cosyjax.programs.ProgramCache`` (compiled ahead of time by warm-up).
    Returns:
      (mel [B, T_out, C] generated frames ``out_from ..`` of the prefix, the new state).  The state
      is updated in place as well (its cache buffers are donated).
    """
    if state.finished:
        raise ValueError("flow stream already finalized")
    token = int_rows("token", token, state.prompt_tokens.shape[0])
    if token.size and (token.min() < 0 or token.max() >= cfg.vocab_size):
        raise ValueError(f"token: ids must lie in [0, {cfg.vocab_size})")
    chunk = _chunk(cfg)
    ratio = cfg.token_mel_ratio
    feat_len = state.prompt_feat.shape[1]
    all_tokens = np.concatenate([state.prompt_tokens, token], axis=1)  # [B, P + Nt]
    total = all_tokens.shape[1]
    held = 0 if finalize else cfg.pre_lookahead_len
    mel_len = ratio * (total - held)
    if mel_len <= feat_len:
        raise ValueError(f"{total} tokens give {mel_len} mel frames, not more than the {feat_len} prompt frames")
    if mel_len < state.mel.shape[1]:
        raise ValueError(f"token: {token.shape[1]} tokens give fewer frames ({mel_len}) than already computed "
                         f"({state.mel.shape[1]}); pushes must extend the stream")
    noise = np.asarray(noise)
    if mel_len > noise.shape[2]:
        raise ValueError(f"{mel_len} mel frames exceed the {noise.shape[2]}-frame noise buffer")
    begin_frames = state.frames
    end_keep = mel_len if finalize else (mel_len // chunk) * chunk
    while True:  # pieces of at most MAX_PUSH_CHUNKS chunks; each piece's frames before the last are whole chunks
        start = state.frames
        piece_end = min(mel_len, start + MAX_PUSH_CHUNKS * chunk)
        last = piece_end == mel_len
        _push_piece(params, state, all_tokens, noise, cfg, start, piece_end, end_keep if last else piece_end,
                    precision, programs)
        if last:
            break
    state.frames = end_keep
    state.finished = finalize
    if out_from is not None and out_from < 0:
        raise ValueError(f"out_from={out_from} must be >= 0")
    begin = (max(begin_frames, feat_len) - feat_len if out_from is None
             else min(out_from, mel_len - feat_len))
    return state.mel[:, feat_len + begin:], state


def _push_piece(params: Any, state: FlowStreamState, all_tokens: np.ndarray, noise: np.ndarray, cfg: FlowConfig,
                start: int, end: int, keep: int, precision: Precision, programs: ProgramCache | None) -> None:
    """Integrate frames [start, end) into ``state`` (mel and cache); frames < ``keep`` become final."""
    chunk, ratio = _chunk(cfg), cfg.token_mel_ratio
    batch = all_tokens.shape[0]
    feat_len = state.prompt_feat.shape[1]
    new = end - start
    frames = frames_bucket(new, chunk)  # static bucket
    if start + frames > state.capacity:
        capacity = state.capacity
        while capacity < start + frames:
            capacity *= 2
        state.cache = run_program(programs, _grow, state.cache, capacity=capacity)
    # token window: CONV2_LEFT tokens of left context (none at the start), lookahead on the right
    first = start // ratio
    w0 = max(0, first - CONV2_LEFT)
    width = frames // ratio + CONV2_LEFT + cfg.pre_lookahead_len
    window = np.zeros((batch, width), np.int32)
    avail = all_tokens[:, w0:w0 + width]
    window[:, :avail.shape[1]] = avail
    mask = np.zeros((batch, width), bool)
    mask[:, :avail.shape[1]] = True
    feat = np.zeros((batch, frames, cfg.output_size), np.float32)
    if start < feat_len:
        part = state.prompt_feat[:, start:min(feat_len, start + frames)]
        feat[:, :part.shape[1]] = part
    noise_t = np.zeros((1, frames, cfg.output_size), np.float32)
    used = max(0, min(frames, noise.shape[2] - start))
    noise_t[0, :used] = np.transpose(noise[0, :, start:start + used])
    x, state.cache = run_program(programs, _push_core, params, state.cache, window, mask, state.embedding, feat,
                                 noise_t, np.int32(start), np.int32(new), np.int32(keep - start), cfg=cfg,
                                 window_offset=first - w0, precision=precision)
    state.mel = np.concatenate([state.mel[:, :start], np.asarray(x)[:, :new]], axis=1)
    state.frames = keep


def stream_programs(cfg: FlowConfig, params: Any, *, max_frames: int, batch: int = 1,
                    precision: Precision = FLOAT32, cache_dtype: Any = jnp.float32) -> list[tuple[Any, tuple, dict]]:
    """Every program ``flow_stream_push`` can run for streams of up to ``max_frames`` mel frames
    (prompt + generated): the core per (frames bucket, cache capacity, left context) and the
    capacity doublings, as (function, argument specs, static arguments)."""
    chunk, ratio = _chunk(cfg), cfg.token_mel_ratio
    i32, f32 = np.int32, np.float32
    p = specs_of(params)
    capacities, cap = [], MIN_CAPACITY_CHUNKS * chunk
    while True:  # the last capacity must hold max_frames plus a padded piece
        capacities.append(cap)
        if cap >= max_frames + MAX_PUSH_CHUNKS * chunk:
            break
        cap *= 2

    def cache(capacity):
        kv = jax.ShapeDtypeStruct((cfg.n_timesteps, cfg.depth, 2 * batch, capacity, cfg.heads, cfg.dim_head),
                                  jnp.dtype(cache_dtype))
        tail = jax.ShapeDtypeStruct((cfg.n_timesteps, 2 * batch, cfg.conv_pos_kernel - 1, cfg.dim), f32)
        return {"k": kv, "v": kv, "tail1": tail, "tail2": tail}

    out = []
    buckets = [chunk * (1 << k) for k in range(MAX_PUSH_CHUNKS.bit_length()) if (1 << k) <= MAX_PUSH_CHUNKS]
    later_offsets = sorted({min(CONV2_LEFT, k * chunk // ratio) for k in (1, 2)})
    scalar = jax.ShapeDtypeStruct((), i32)
    for capacity in capacities:
        for frames in buckets:
            width = frames // ratio + CONV2_LEFT + cfg.pre_lookahead_len
            offsets = ([0] if capacity == capacities[0] else []) + later_offsets
            for offset in offsets:
                args = (p, cache(capacity), jax.ShapeDtypeStruct((batch, width), i32),
                        jax.ShapeDtypeStruct((batch, width), bool),
                        jax.ShapeDtypeStruct((batch, cfg.spk_embed_dim), f32),
                        jax.ShapeDtypeStruct((batch, frames, cfg.output_size), f32),
                        jax.ShapeDtypeStruct((1, frames, cfg.output_size), f32), scalar, scalar, scalar)
                out.append((_push_core, args, dict(cfg=cfg, window_offset=offset, precision=precision)))
        if capacity != capacities[-1]:
            out.append((_grow, (cache(capacity),), dict(capacity=2 * capacity)))
    return out
