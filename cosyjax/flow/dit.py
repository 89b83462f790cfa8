"""DiT velocity estimator of the CosyVoice3 flow decoder (cosyvoice/flow/DiT/dit.py, DiT/modules.py).

Numerics follow upstream in float32 (SPEC 5.2, 5.3): the timestep sinusoid is scaled by 1000; the
input projection sees ``concat[x, cond, mu, spks]``; a causal grouped-conv position embedding with
Mish is added twice-convolved; each block is AdaLayerNormZero (shift, scale, gate) x 2 around
attention and a tanh-GELU feed-forward; the final AdaLN chunks as (scale, shift).

The attention reproduces x-transformers 2.11.24 ``apply_rotary_pos_emb`` as DiT calls it: the
rotary is applied to the full-width q and k *before* the head split, with ``rot_dim = dim_head``,
so only channels ``0..dim_head-1`` (head 0) are rotated, in interleaved (GPT-J) pairs.

Precision: the matmuls and convolutions take the flow stage's ``Precision`` (``cosyjax.precision``);
layer norms, the AdaLN modulations and the timestep embedding (Linear layers on ``temb`` only, B
rows), the rotary, the softmax and the residual stream stay float32.

Legend: B batch, T query frames, S key frames, N heads, H head dim, D model width, C mel bins.
"""

from __future__ import annotations

import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.nn import Conv1d, Dense
from cosyjax.nn.attention import attention
from cosyjax.precision import FLOAT32, Precision

Array = jax.Array
LN_EPS = 1e-6  # every LayerNorm in the DiT: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def rotary_inv_freq(rot_dim: int, base: float = 10000.0) -> np.ndarray:
    """x-transformers ``RotaryEmbedding(dim).inv_freq`` [rot_dim/2], float32.

    Upstream: ``1. / (base ** (arange(0, dim, 2).float() / dim))`` evaluated by torch in float32;
    we evaluate it with numpy's float32 ``power``.  Both are within float32 ``pow`` + division error
    of the exact value, and their bits can differ by an ulp, depending on the machine's ``pow``
    (tests/test_flow.py checks both against the float64 formula).
    """
    exponent = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)


def timestep_frequencies(freq_dim: int) -> np.ndarray:
    """``SinusPositionEmbedding`` frequencies exp(-i ln(10000)/(half-1)) [freq_dim/2], float32.

    Upstream multiplies a float32 arange by the python scalar (rounded to float32 by torch) and
    takes a float32 exp; we round the float64 exp of that same float32 product.
    """
    half = freq_dim // 2
    step = np.float32(-math.log(10000) / (half - 1))
    arg = np.arange(half, dtype=np.int64).astype(np.float32) * step
    return np.exp(arg.astype(np.float64)).astype(np.float32)


def layer_norm(x: Array, eps: float = LN_EPS) -> Array:
    """LayerNorm over the last axis without affine params, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def mish(x: Array) -> Array:
    """torch ``nn.Mish``: x * tanh(log1p(exp(x))) (the same formula as ATen's kernel)."""
    return x * jnp.tanh(jnp.log1p(jnp.exp(x)))


def apply_interleaved_rotary(x: Array, positions: Array, rot_dim: int) -> Array:
    """x-transformers ``apply_rotary_pos_emb`` on the first ``rot_dim`` channels of x [B, T, W].

    Frequencies are ``[f0, f0, f1, f1, ...]`` with f_i = pos * inv_freq_i; ``rotate_half`` maps the
    pair (a, b) to (-b, a); channels ``rot_dim..W-1`` pass through unchanged.  float32 throughout.
    """
    inv_freq = jnp.asarray(rotary_inv_freq(rot_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, rot_dim/2]
    freqs = jnp.repeat(freqs, 2, axis=-1)  # [T, rot_dim], interleaved pairs
    x32 = x.astype(jnp.float32)
    rot, rest = x32[..., :rot_dim], x32[..., rot_dim:]
    pairs = rot.reshape(rot.shape[:-1] + (rot_dim // 2, 2))
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
    out = rot * jnp.cos(freqs) + rotated * jnp.sin(freqs)
    return jnp.concatenate([out, rest], axis=-1).astype(x.dtype)


def attention_mask(lengths: Array, num_frames: int, chunk_size: int, streaming: bool | Array) -> Array:
    """Boolean attention mask [B, T, S] of DiT.forward (cosyvoice/utils/mask.py::add_optional_chunk_mask).

    Keys at or beyond a row's length are hidden (the padding mask).  With ``streaming`` and
    ``chunk_size > 0``, query i also only sees keys j < (i // chunk_size + 1) * chunk_size
    (``subsequent_chunk_mask``): chunks counted from frame 0, every left chunk visible.  DiT.forward
    passes ``num_decoding_left_chunks=-1`` literally (and the ONNX-friendly ``subsequent_chunk_mask``
    ignores it anyway), so the config's ``num_decoding_left_chunks`` never changes the mask.
    Upstream turns an all-False row into all-True; with lengths >= 1 key 0 is always visible, so no
    row is ever all-False here.  ``streaming`` may be a traced bool (training draws it per batch).
    """
    frames = jnp.arange(num_frames)
    mask = jnp.broadcast_to((frames[None, :] < lengths[:, None])[:, None, :],
                            (lengths.shape[0], num_frames, num_frames))  # [B, T, S]
    if chunk_size > 0 and streaming is not False:
        visible_end = (frames // chunk_size + 1) * chunk_size  # [T]
        chunked = (frames[None, :] < visible_end[:, None])[None]
        mask = mask & (chunked if streaming is True else chunked | ~jnp.asarray(streaming, bool))
    return mask


class TimestepEmbedding(nn.Module):
    """Sinusoid(1000 t) -> Linear -> SiLU -> Linear: [B] -> [B, D]."""

    dim: int
    freq_dim: int

    @nn.compact
    def __call__(self, t: Array) -> Array:
        freqs = jnp.asarray(timestep_frequencies(self.freq_dim))
        arg = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None, :]  # [B, F/2]
        emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)  # [B, F]
        h = Dense(self.dim, name="time_mlp_0")(emb)
        return Dense(self.dim, name="time_mlp_2")(nn.silu(h))


class CausalConvPositionEmbedding(nn.Module):
    """Two (left-pad k-1, grouped conv, Mish) stages: [B, T, D] -> [B, T, D]."""

    dim: int
    kernel_size: int
    groups: int
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, tails: tuple[Array, Array] | None = None, valid: Array | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """x [B, T, D] -> (out [B, T, D], new tails or None).

        ``tails`` (incremental use): each conv's last ``kernel_size - 1`` input frames before x
        ([B, K-1, D] each; zeros at the start of a sequence, which is the causal zero padding).
        The new tails end at frame ``valid[b]`` of each row (frames past it are padding).
        """
        pad = self.kernel_size - 1
        new_tails = []
        for i, name in enumerate(("conv1", "conv2")):
            if tails is None:
                x = mish(Conv1d(self.dim, self.kernel_size, padding=(pad, 0), groups=self.groups,
                                precision=self.precision, name=name)(x))
                continue
            full = jnp.concatenate([tails[i].astype(x.dtype), x], axis=1)  # [B, K-1+T, D]
            index = valid[:, None] + jnp.arange(pad)[None, :]  # frames valid-K+1 .. valid-1 of x
            new_tails.append(jnp.take_along_axis(full, index[..., None], axis=1))
            x = mish(Conv1d(self.dim, self.kernel_size, padding=(0, 0), groups=self.groups,
                            precision=self.precision, name=name)(full))
        return x, (tuple(new_tails) if tails is not None else None)


class InputEmbedding(nn.Module):
    """proj(concat[x, cond, mu, spks]) plus its causal conv position embedding: -> [B, T, D]."""

    dim: int
    conv_pos_kernel: int
    conv_pos_groups: int
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, cond: Array, mu: Array, spks: Array, tails=None, valid=None):
        """-> h [B, T, D], or (h, new conv tails) when ``tails`` is given (incremental use)."""
        spks = jnp.broadcast_to(spks[:, None, :], x.shape[:2] + spks.shape[-1:])  # [B, T, C_spk]
        h = Dense(self.dim, precision=self.precision, name="proj")(jnp.concatenate(
            [a.astype(jnp.float32) for a in (x, cond, mu, spks)], axis=-1))
        pos, new_tails = CausalConvPositionEmbedding(self.dim, self.conv_pos_kernel, self.conv_pos_groups,
                                                     self.precision, name="conv_pos_embed")(h, tails, valid)
        return pos + h if tails is None else (pos + h, new_tails)


class Attention(nn.Module):
    """Multi-head self-attention with DiT's partial interleaved rotary: [B, T, D] -> [B, T, D]."""

    dim: int
    heads: int
    dim_head: int
    dropout: float = 0.0
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, mask: Array, positions: Array, deterministic: bool = True,
                 past: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
        """x [B, T, D] at ``positions`` [T] -> (out [B, T, D], k, v [B, T, N, H] of these frames).

        ``past`` (incremental use): earlier frames' (k, v) [B, S0, N, H]; the keys are then
        ``past + these frames`` and ``mask`` is [B, T, S0 + T].
        """
        batch, frames = x.shape[:2]
        inner = self.heads * self.dim_head
        q = Dense(inner, precision=self.precision, name="to_q")(x)  # [B, T, N*H]
        k = Dense(inner, precision=self.precision, name="to_k")(x)
        v = Dense(inner, precision=self.precision, name="to_v")(x)
        # x-transformers rotates before the head split, rot_dim = dim_head: only head 0 rotates.
        q = apply_interleaved_rotary(q, positions, self.dim_head)
        k = apply_interleaved_rotary(k, positions, self.dim_head)
        q = q.reshape(batch, frames, self.heads, self.dim_head)  # [B, T, N, H]
        k = k.reshape(batch, frames, self.heads, self.dim_head)  # [B, S, N, H]
        v = v.reshape(batch, frames, self.heads, self.dim_head)  # [B, S, N, H]
        keys, values = k, v
        if past is not None:
            keys = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
            values = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        out = attention(q, keys, values, mask, scale=1.0 / math.sqrt(self.dim_head), precision=self.precision)
        # Upstream then zeroes rows where mask[:, 0, -1] is False; that only matters for its own
        # right-padded batches (never used at inference), so it is left out.
        out = Dense(self.dim, precision=self.precision, name="to_out_0")(out.reshape(batch, frames, inner))
        return nn.Dropout(self.dropout)(out, deterministic=deterministic), k, v


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear: [B, T, D] -> [B, T, D]."""

    dim: int
    mult: int
    dropout: float = 0.0
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = Dense(self.dim * self.mult, precision=self.precision, name="ff_0_0")(x)
        h = jax.nn.gelu(h, approximate=True)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return Dense(self.dim, precision=self.precision, name="ff_2")(h)


class AdaLayerNormZero(nn.Module):
    """Linear(SiLU(temb)) -> 6 chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""

    dim: int

    @nn.compact
    def __call__(self, temb: Array) -> tuple[Array, ...]:
        emb = Dense(6 * self.dim, name="linear")(nn.silu(temb))  # [B, 6D]
        return tuple(jnp.split(emb, 6, axis=-1))


class AdaLayerNormZeroFinal(nn.Module):
    """Linear(SiLU(temb)) -> 2 chunks in the order (scale, shift) (upstream's order, not shift first)."""

    dim: int

    @nn.compact
    def __call__(self, temb: Array) -> tuple[Array, Array]:
        emb = Dense(2 * self.dim, name="linear")(nn.silu(temb))  # [B, 2D]
        scale, shift = jnp.split(emb, 2, axis=-1)
        return scale, shift


class DiTBlock(nn.Module):
    """AdaLN-zero attention + feed-forward block: [B, T, D] -> [B, T, D]."""

    dim: int
    heads: int
    dim_head: int
    ff_mult: int
    dropout: float = 0.0
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, temb: Array, mask: Array, positions: Array, deterministic: bool = True,
                 past: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
        """-> (x, k, v): the block output and its attention's k, v [B, T, N, H] (see ``Attention``)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(
            self.dim, name="attn_norm")(temb)
        norm = layer_norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        attn, k, v = Attention(self.dim, self.heads, self.dim_head, self.dropout, self.precision, name="attn")(
            norm, mask, positions, deterministic, past)
        x = x + gate_msa[:, None] * attn
        norm = layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * FeedForward(self.dim, self.ff_mult, self.dropout, self.precision, name="ff")(
            norm, deterministic)
        return x, k, v


class DiT(nn.Module):
    """The CFM velocity estimator.

    ``__call__(x, mu, t, spks, cond, lengths, streaming)``: x, mu, cond [B, T, C], t [B],
    spks [B, C_spk], lengths [B] (valid frames) -> velocity [B, T, C].
    """

    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    mel_dim: int
    time_freq_dim: int
    conv_pos_kernel: int
    conv_pos_groups: int
    static_chunk_size: int
    dropout: float = 0.0  # upstream trains with 0.1 (DiT default); inference is deterministic
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, mu: Array, t: Array, spks: Array, cond: Array, lengths: Array,
                 streaming: bool = False, deterministic: bool = True, cache: Mapping[str, Array] | None = None):
        """-> velocity [B, T, C]; with ``cache``, (velocity, new cache entries).

        Incremental use (``cache`` given): x, mu, cond hold only the frames ``start .. start+T-1``
        of a longer sequence whose earlier frames were computed before; ``lengths`` [B] counts the
        valid frames among these T.  ``cache`` = {"k", "v": [depth, B, S0, N, H] keys/values of the
        earlier frames (slots at or past ``start`` are ignored), "tail1", "tail2": [B, K-1, D] the
        conv position embedding's input tails, "start": int32 scalar, optionally "tail_at": [B] the
        frame the new tails end at (default ``lengths``)}.  Returns the velocity of the
        new frames and {"k", "v": [depth, B, T, N, H], "tail1", "tail2"} for the next call.  Every
        earlier frame is visible (they lie in earlier chunks), so with chunk-aligned calls this
        equals the full-sequence forward on these frames.
        """
        frames = x.shape[1]
        temb = TimestepEmbedding(self.dim, self.time_freq_dim, name="time_embed")(t)  # [B, D]
        embed = InputEmbedding(self.dim, self.conv_pos_kernel, self.conv_pos_groups, self.precision,
                               name="input_embed")
        if cache is None:
            h = embed(x, cond, mu, spks)  # [B, T, D]
            mask = attention_mask(lengths, frames, self.static_chunk_size, streaming)
            positions = jnp.arange(frames)
        else:
            h, tails = embed(x, cond, mu, spks, (cache["tail1"], cache["tail2"]), cache.get("tail_at", lengths))
            start = cache["start"]
            positions = start + jnp.arange(frames)
            past_frames = cache["k"].shape[2]
            new_mask = jnp.broadcast_to((jnp.arange(frames)[None, :] < lengths[:, None])[:, None, :],
                                        (x.shape[0], frames, frames))  # new keys that exist
            if streaming and self.static_chunk_size > 0:  # chunks count from absolute frame 0
                end = (positions // self.static_chunk_size + 1) * self.static_chunk_size  # [T]
                new_mask = new_mask & (positions[None, :] < end[:, None])[None]
            past_mask = jnp.broadcast_to((jnp.arange(past_frames) < start)[None, None, :],
                                         (x.shape[0], frames, past_frames))
            mask = jnp.concatenate([past_mask, new_mask], axis=-1)  # [B, T, S0 + T]
        ks, vs = [], []
        for i in range(self.depth):
            past = None if cache is None else (cache["k"][i], cache["v"][i])
            h, k, v = DiTBlock(self.dim, self.heads, self.dim_head, self.ff_mult, self.dropout, self.precision,
                               name=f"transformer_blocks_{i}")(h, temb, mask, positions, deterministic, past)
            ks.append(k)
            vs.append(v)
        scale, shift = AdaLayerNormZeroFinal(self.dim, name="norm_out")(temb)
        h = layer_norm(h) * (1 + scale[:, None]) + shift[:, None]
        out = Dense(self.mel_dim, precision=self.precision, name="proj_out")(h)
        if cache is None:
            return out
        return out, {"k": jnp.stack(ks), "v": jnp.stack(vs), "tail1": tails[0], "tail2": tails[1]}
