"""Token-to-mel flow of CosyVoice3 (cosyvoice/flow/flow.py::CausalMaskedDiffWithDiT.inference).

Front (SPEC 4): the L2-normalised speaker embedding goes through ``spk_embed_affine_layer``; the
prompt + target tokens are embedded (ids clamped at 0), passed through the PreLookaheadLayer and
repeated ``token_mel_ratio`` times in time to give ``mu``; ``cond`` holds the prompt mel in the
first F1 frames and zeros after.  The CFM (SPEC 5) integrates from the fixed seed-0 noise over the
whole prompt + generated length and the output is sliced after F1.

Batching: rows are right-padded to a token-length bucket; every op that mixes frames is causal or
masked by each row's length, so a row's result does not depend on its padding or its neighbours.

Legend: B batch, N tokens, T mel frames, C mel bins (= token embedding width), E speaker embedding.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import FlowConfig
from cosyjax.flow.dit import HIGHEST, DiT
from cosyjax.flow.solver import solve_euler_cfg
from cosyjax.nn.conv import Conv1d

Array = jax.Array
LEAKY_SLOPE = 0.01  # F.leaky_relu default in PreLookaheadLayer


class PreLookaheadLayer(nn.Module):
    """conv1 (k = lookahead + 1, right context) -> leaky_relu(0.01) -> conv2 (k=3, left-causal) + residual.

    ``x`` [B, N, C] must be zero beyond each row's tokens: the right zero padding of the conv then
    equals upstream's ``finalize`` padding.  For ``finalize=False`` upstream feeds the last
    ``lookahead`` tokens as context and returns ``N - lookahead`` frames; the first ``N - lookahead``
    frames here are the same numbers, so the caller only shortens the valid length.
    """

    channels: int
    lookahead: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = Conv1d(self.channels, self.lookahead + 1, padding=(0, self.lookahead), name="conv1")(x)
        h = jax.nn.leaky_relu(h, LEAKY_SLOPE)
        h = Conv1d(x.shape[-1], 3, padding=(2, 0), name="conv2")(h)
        return h + x


class Flow(nn.Module):
    """Params holder and the two halves of the flow: ``encode`` (front) and ``estimate`` (DiT)."""

    vocab_size: int
    input_size: int
    output_size: int
    pre_lookahead_channels: int
    pre_lookahead_len: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    time_freq_dim: int
    conv_pos_kernel: int
    conv_pos_groups: int
    static_chunk_size: int
    dropout: float = 0.0  # active only in ``estimate(..., deterministic=False)`` (training)

    def setup(self):
        self.input_embedding = nn.Embed(self.vocab_size, self.input_size)
        self.spk_embed_affine_layer = nn.Dense(self.output_size, precision=HIGHEST)
        self.pre_lookahead_layer = PreLookaheadLayer(self.pre_lookahead_channels, self.pre_lookahead_len)
        self.estimator = DiT(self.dim, self.depth, self.heads, self.dim_head, self.ff_mult, self.output_size,
                             self.time_freq_dim, self.conv_pos_kernel, self.conv_pos_groups,
                             self.static_chunk_size, self.dropout)

    def encode(self, tokens: Array, token_mask: Array, embedding: Array) -> tuple[Array, Array]:
        """tokens [B, N] int, token_mask [B, N] bool, embedding [B, E] -> (spks [B, C], h [B, N, C])."""
        # F.normalize(dim=1): x / max(||x||, 1e-12)
        norm = jnp.sqrt(jnp.sum(jnp.square(embedding), axis=-1, keepdims=True))
        spks = self.spk_embed_affine_layer(embedding / jnp.maximum(norm, 1e-12))
        x = self.input_embedding(jnp.maximum(tokens, 0)) * token_mask[..., None].astype(jnp.float32)
        return spks, self.pre_lookahead_layer(x)

    def estimate(self, x: Array, mu: Array, t: Array, spks: Array, cond: Array, lengths: Array,
                 streaming: bool = False, deterministic: bool = True, cache: Mapping[str, Array] | None = None):
        """DiT velocity: x, mu, cond [B, T, C], t [B], spks [B, C], lengths [B] -> [B, T, C].

        ``deterministic=False`` applies the config's dropout (needs a ``"dropout"`` rng).  With
        ``cache`` the DiT runs incrementally and also returns its new cache entries (``DiT``)."""
        return self.estimator(x, mu, t, spks, cond, lengths, streaming, deterministic, cache)

    def __call__(self, tokens: Array, embedding: Array, x: Array) -> Array:
        """Touches every param (for init): a full-attention estimator call on the encoded tokens."""
        spks, h = self.encode(tokens, jnp.ones(tokens.shape, bool), embedding)
        lengths = jnp.full((x.shape[0],), x.shape[1])
        return self.estimate(x, h, jnp.zeros((x.shape[0],)), spks, h, lengths)


def make_flow(cfg: FlowConfig) -> Flow:
    """The Flow module for a config (every dimension from ``cfg``)."""
    return Flow(vocab_size=cfg.vocab_size, input_size=cfg.input_size, output_size=cfg.output_size,
                pre_lookahead_channels=cfg.pre_lookahead_channels, pre_lookahead_len=cfg.pre_lookahead_len,
                dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                time_freq_dim=cfg.time_freq_dim, conv_pos_kernel=cfg.conv_pos_kernel,
                conv_pos_groups=cfg.conv_pos_groups, static_chunk_size=cfg.static_chunk_size,
                dropout=cfg.dropout)


def param_shapes(cfg: FlowConfig) -> dict[str, Any]:
    """Pytree of ``jax.ShapeDtypeStruct`` of the flow params (without the ``{"params": ...}`` wrapper)."""
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    embedding = jax.ShapeDtypeStruct((1, cfg.spk_embed_dim), jnp.float32)
    # __call__ feeds encode's h to the estimator as mu and cond, so x has as many frames as tokens.
    x = jax.ShapeDtypeStruct((1, 4, cfg.output_size), jnp.float32)
    variables = jax.eval_shape(make_flow(cfg).init, jax.random.PRNGKey(0), tokens, embedding, x)
    return variables["params"]


def _as_f32(params: Mapping[str, Any]) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


# --------------------------------------------------------------------------------------------
# Jitted pieces (also used by the parity runner)
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",))
def flow_encode(params: Mapping[str, Any], tokens: Array, token_mask: Array, embedding: Array, *,
                cfg: FlowConfig) -> tuple[Array, Array]:
    """Front half: tokens [B, N] (prompt + target), token_mask [B, N], embedding [B, E] ->
    (spk_proj [B, C], h [B, N, C]); with finalize=False only the first N - pre_lookahead_len frames of h
    are upstream's h."""
    return make_flow(cfg).apply({"params": _as_f32(params)}, tokens, token_mask, embedding, method=Flow.encode)


@functools.partial(jax.jit, static_argnames=("cfg", "streaming"))
def estimator_forward(params: Mapping[str, Any], x: Array, mu: Array, t: Array, spks: Array, cond: Array,
                      lengths: Array, *, cfg: FlowConfig, streaming: bool) -> Array:
    """DiT alone: x, mu, cond [B, T, C], t [B], spks [B, C], lengths [B] -> velocity [B, T, C]."""
    return make_flow(cfg).apply({"params": _as_f32(params)}, x, mu, t, spks, cond, lengths, streaming,
                                method=Flow.estimate)


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "trajectory"))
def _flow_core(params: Mapping[str, Any], tokens: Array, token_len: Array, feat: Array, feat_len: Array,
               mel_len: Array, embedding: Array, noise: Array, *, cfg: FlowConfig, streaming: bool,
               trajectory: bool = False) -> tuple[Array, Array | None]:
    """Padded batch -> generated mel, left-aligned per row.

    tokens [B, N] (prompt + target, right-padded), token_len [B] (tokens per row), feat [B, T, C]
    (prompt mel, right-padded to T = ratio * N), feat_len [B] (F1), mel_len [B] (valid frames, ratio
    times the valid h length), embedding [B, E], noise [1, T, C].
    Returns (mel [B, T, C] with row b's frames F1..mel_len-1 at 0.. and zeros after, trajectory).
    """
    model = make_flow(cfg)
    variables = {"params": _as_f32(params)}
    num_tokens = tokens.shape[1]
    token_mask = jnp.arange(num_tokens)[None, :] < token_len[:, None]
    spks, h = model.apply(variables, tokens, token_mask, embedding, method=Flow.encode)
    mu = jnp.repeat(h, cfg.token_mel_ratio, axis=1)  # [B, T, C]
    frames = jnp.arange(mu.shape[1])
    cond = jnp.where((frames[None, :] < feat_len[:, None])[..., None], feat, 0.0)
    x0 = jnp.broadcast_to(noise, mu.shape)

    def estimate(x, mu_, t, spks_, cond_, lengths):
        return model.apply(variables, x, mu_, t, spks_, cond_, lengths, streaming, method=Flow.estimate)

    x, xs = solve_euler_cfg(estimate, x0, mu, spks, cond, mel_len, n_timesteps=cfg.n_timesteps,
                            cfg_rate=cfg.inference_cfg_rate, trajectory=trajectory)
    # Row b's output is x[b, F1:mel_len]; move it to the front with a gather.
    index = jnp.clip(feat_len[:, None] + frames[None, :], 0, mu.shape[1] - 1)  # [B, T]
    out = jnp.take_along_axis(x, index[..., None], axis=1)
    out = jnp.where((frames[None, :] < (mel_len - feat_len)[:, None])[..., None], out, 0.0)
    return out, xs


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def token_bucket(n: int) -> int:
    """Padded token length for ``n`` tokens: multiples of 32 up to 512, of 64 up to 1024, then of 128.

    Fine enough that padding costs at most ~10% of the DiT work past 320 tokens, coarse enough that
    a streaming session (hops of 25..100 tokens) reuses a handful of compiled shapes.
    """
    step = 32 if n <= 512 else 64 if n <= 1024 else 128
    return max(step, -(-n // step) * step)


def _int_rows(name: str, value: Any, batch: int | None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [batch, length] integer array, found shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, found dtype {arr.dtype}")
    if batch is not None and arr.shape[0] != batch:
        raise ValueError(f"{name}: batch {arr.shape[0]} != token batch {batch}")
    return arr.astype(np.int64)


def _lengths(name: str, value: Any, batch: int, full: int) -> np.ndarray:
    if value is None:
        return np.full((batch,), full, np.int64)
    arr = np.asarray(value)
    if arr.shape != (batch,) or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected integer lengths of shape ({batch},), found {arr.dtype} {arr.shape}")
    if (arr < 0).any() or (arr > full).any():
        raise ValueError(f"{name}: lengths {arr.tolist()} must lie in [0, {full}]")
    return arr.astype(np.int64)


def output_lengths(cfg: FlowConfig, token_len: Any, prompt_token_len: Any, prompt_feat_len: Any,
                   finalize: bool) -> np.ndarray:
    """Generated frames per row: ratio * (Np + Nt - (0 if finalize else pre_lookahead_len)) - F1 [B]."""
    held_back = 0 if finalize else cfg.pre_lookahead_len
    total = np.asarray(prompt_token_len, np.int64) + np.asarray(token_len, np.int64) - held_back
    return cfg.token_mel_ratio * total - np.asarray(prompt_feat_len, np.int64)


def flow_inference(params: Mapping[str, Any], token: Any, prompt_token: Any, prompt_feat: Any, embedding: Any, *,
                   cfg: FlowConfig, noise: Any, streaming: bool, finalize: bool, token_len: Any = None,
                   prompt_token_len: Any = None, prompt_feat_len: Any = None) -> Array:
    """CausalMaskedDiffWithDiT.inference for a batch of rows.

    Args:
      params: flow params (from ``cosyjax.convert.flow.convert``), float32 or bfloat16.
      token: target speech tokens [B, Nt] (right-padded when rows differ; see ``token_len``).
        Negative ids are clamped to 0 as upstream does; ids >= vocab_size are refused.
      prompt_token: prompt speech tokens [B, Np] (Np may be 0).
      prompt_feat: prompt mel [B, F1, C], time-major (upstream's layout), C = cfg.output_size.
        Like upstream, F1 need not be ratio * Np (voice conversion passes them unaligned): the
        first F1 frames of ``cond`` hold it and the output starts after frame F1.
      embedding: raw speaker embedding [B, E] (L2-normalised here).
      cfg: the flow config (static).
      noise: the fixed noise buffer [1, C, frames] (``ConvertedModel.buffers["flow_rand_noise"]``);
        frame i of every row starts from noise[:, :, i].
      streaming: chunked attention (``static_chunk_size`` frames) instead of full attention.
      finalize: False holds the last ``pre_lookahead_len`` tokens back as look-ahead context.
      token_len, prompt_token_len, prompt_feat_len: per-row lengths [B] (default: full widths).

    Returns:
      mel [B, T_out, C] float32, T_out = max over rows of ``output_lengths(...)``; a shorter row is
      followed by zeros.

    Raises:
      ValueError (before any device work) for: ids >= vocab_size, an empty target token sequence,
      prompt mel channels != C, a prompt mel longer than the mel the tokens give (upstream fails),
      nothing to generate, non-finite embedding or prompt mel, a batch mismatch, or more frames than
      the noise buffer holds.
    """
    token = _int_rows("token", token, None)
    batch = token.shape[0]
    if batch == 0:
        raise ValueError("token: empty batch")
    prompt_token = _int_rows("prompt_token", prompt_token, batch)
    prompt_feat = np.asarray(prompt_feat)
    embedding = np.asarray(embedding)
    channels = cfg.output_size
    if prompt_feat.ndim != 3 or prompt_feat.shape[0] != batch or prompt_feat.shape[2] != channels:
        raise ValueError(f"prompt_feat: expected [batch={batch}, frames, {channels}] (time-major mel), "
                         f"found shape {prompt_feat.shape}")
    if embedding.shape != (batch, cfg.spk_embed_dim):
        raise ValueError(f"embedding: expected shape ({batch}, {cfg.spk_embed_dim}), found {embedding.shape}")
    token_len = _lengths("token_len", token_len, batch, token.shape[1])
    prompt_token_len = _lengths("prompt_token_len", prompt_token_len, batch, prompt_token.shape[1])
    feat_len = _lengths("prompt_feat_len", prompt_feat_len, batch, prompt_feat.shape[1])
    if (token_len == 0).any():
        raise ValueError(f"token: empty target token sequence in row(s) {np.flatnonzero(token_len == 0).tolist()}")
    for name, ids, lens in (("token", token, token_len), ("prompt_token", prompt_token, prompt_token_len)):
        valid = np.arange(ids.shape[1])[None, :] < lens[:, None]
        if (np.where(valid, ids, 0) >= cfg.vocab_size).any():
            bad = int(np.where(valid, ids, 0).max())
            raise ValueError(f"{name}: id {bad} is outside the speech vocabulary [0, {cfg.vocab_size})")
    if not np.isfinite(embedding).all():
        raise ValueError("embedding: contains NaN or inf")
    if not np.isfinite(prompt_feat).all():
        raise ValueError("prompt_feat: contains NaN or inf")
    noise = np.asarray(noise)
    if noise.ndim != 3 or noise.shape[:2] != (1, channels):
        raise ValueError(f"noise: expected shape (1, {channels}, frames), found {noise.shape}")

    total_tokens = prompt_token_len + token_len
    held_back = 0 if finalize else cfg.pre_lookahead_len
    mel_len = cfg.token_mel_ratio * (total_tokens - held_back)
    out_len = mel_len - feat_len
    for b in range(batch):
        if total_tokens[b] <= held_back:
            raise ValueError(f"row {b}: {total_tokens[b]} tokens in all, but finalize=False holds back "
                             f"{held_back} look-ahead tokens")
        if out_len[b] < 0:
            raise ValueError(f"row {b}: prompt_feat has {feat_len[b]} frames but the tokens give only "
                             f"{mel_len[b]} mel frames (upstream fails here)")
        if out_len[b] == 0:
            raise ValueError(f"row {b}: nothing to generate ({mel_len[b]} mel frames, all prompt)")
        if mel_len[b] > noise.shape[2]:
            raise ValueError(f"row {b}: {mel_len[b]} mel frames exceed the {noise.shape[2]}-frame noise buffer")

    num_tokens = token_bucket(int(total_tokens.max()))
    frames = cfg.token_mel_ratio * num_tokens
    tokens = np.zeros((batch, num_tokens), np.int32)
    feat = np.zeros((batch, frames, channels), np.float32)
    for b in range(batch):
        np_, nt = prompt_token_len[b], token_len[b]
        tokens[b, :np_] = prompt_token[b, :np_]
        tokens[b, np_:np_ + nt] = token[b, :nt]
        feat[b, :feat_len[b]] = prompt_feat[b, :feat_len[b]]
    noise_t = np.zeros((1, frames, channels), np.float32)  # frames past the buffer are never valid
    used = min(frames, noise.shape[2])
    noise_t[0, :used] = np.transpose(noise[0, :, :used])
    mel, _ = _flow_core(params, tokens, total_tokens.astype(np.int32), feat, feat_len.astype(np.int32),
                        mel_len.astype(np.int32), embedding.astype(np.float32), noise_t, cfg=cfg,
                        streaming=bool(streaming))
    return mel[:, :int(out_len.max())]
