"""Qwen2 decoder and the CosyVoice3LM heads around it (cosyvoice/llm/llm.py::CosyVoice3LM, Qwen2Encoder).

Numerics follow HF transformers 4.51.3 ``modeling_qwen2`` in float32 (SPEC 3.1): RMSNorm statistics
in float32 with ``rsqrt``, half-split (NeoX) rotary over the whole head, GQA with q/k/v biases, SwiGLU
MLP, a final RMSNorm.  Per-layer params are separate submodules (``layers_0``, ``layers_1``, ...)
with Dense kernels [in, out]: on CPU that is about 2x faster than scanning stacked weights.

Legend: B batch, T query positions, S key slots, N query heads, K kv heads, G = N // K group,
H head dim, D model width, F MLP width, V speech vocabulary (speech_token_size + 200).

The attention is written once for both uses: a full teacher-forced pass (``cache=None``: keys are
the T positions themselves) and a KV-cache step (keys are the S cache slots, the new ones written
at ``write_index``).  Which keys a query may see is always an explicit boolean ``mask`` [B, T, S].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import LLMConfig
from cosyjax.nn import Dense
from cosyjax.nn.attention import attention
from cosyjax.precision import BFLOAT16, FLOAT32, Precision

Array = jax.Array


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Rotary inverse frequencies [H/2], float32, as HF's default rope init computes them.

    HF: ``1 / base ** (arange(0, dim, 2).float() / dim)`` evaluated in float32 by torch.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin tables [B, T, H] (float32) for integer ``positions`` [B, T].

    HF builds ``emb = cat(freqs, freqs)`` from ``inv_freq @ positions`` in float32 (its
    Qwen2RotaryEmbedding forces autocast off), so the angle is one float32 product per entry.
    """
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Half-split rotary: ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = [-x2, x1].

    Args:
      x: [B, T, heads, H].
      cos, sin: [B, T, H] float32.
    Returns:
      [B, T, heads, H] in x's dtype (the rotation itself runs in float32).
    """
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` in float32 (HF Qwen2RMSNorm on float32 activations)."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        variance = jnp.mean(xf * xf, axis=-1, keepdims=True)
        normed = xf * jax.lax.rsqrt(variance + jnp.float32(self.eps))  # HF uses torch.rsqrt
        return weight.astype(jnp.float32) * normed


class Attention(nn.Module):
    """Causal GQA self-attention with rotary and q/k/v biases; o_proj has no bias."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, cache: dict[str, Array] | None = None,
                 write_index: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
        """Args:
          x: [B, T, D].
          positions: [B, T] int rotary positions of the queries (and of the keys they write).
          mask: [B, T, S] bool, True where query t may attend key slot s (S = T without a cache).
          cache: None, or {"k", "v": [B, S, K, H]} slots to write the new keys/values into.
          write_index: [B] int32, each row's first cache slot of the new keys (with a cache only).
        Returns:
          out [B, T, D] float32 and the updated cache (None without one).
        """
        batch, length, _ = x.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q = Dense(n * h, precision=self.precision, name="q_proj")(x).reshape(batch, length, n, h)  # [B, T, N, H]
        key = Dense(k * h, precision=self.precision, name="k_proj")(x).reshape(batch, length, k, h)  # [B, T, K, H]
        value = Dense(k * h, precision=self.precision, name="v_proj")(x).reshape(batch, length, k, h)
        cos, sin = rope_cos_sin(positions, h, self.rope_theta)
        q = apply_rope(q, cos, sin)
        key = apply_rope(key, cos, sin)
        new_cache = None
        if cache is not None:
            def write(slots, new, start):  # one row: [S, K, H] <- [T, K, H] at slot ``start``
                return jax.lax.dynamic_update_slice(slots, new.astype(slots.dtype), (start, 0, 0))

            key = jax.vmap(write)(cache["k"], key, write_index)  # [B, S, K, H]
            value = jax.vmap(write)(cache["v"], value, write_index)
            new_cache = {"k": key, "v": value}
        out = attention(q, key, value, mask, scale=float(np.float32(1.0 / np.sqrt(h))), precision=self.precision)
        out = out.reshape(batch, length, n * h)  # [B, T, N*H]
        return Dense(x.shape[-1], use_bias=False, precision=self.precision, name="o_proj")(out), new_cache


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    intermediate_size: int
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate = Dense(self.intermediate_size, use_bias=False, precision=self.precision, name="gate_proj")(x)  # [B, T, F]
        up = Dense(self.intermediate_size, use_bias=False, precision=self.precision, name="up_proj")(x)
        return Dense(x.shape[-1], use_bias=False, precision=self.precision, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Qwen2 block: ``h = x + attn(norm(x)); y = h + mlp(norm(h))`` (float32 residual stream)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, cache: dict[str, Array] | None = None,
                 write_index: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
        attn_out, new_cache = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta,
                                        self.precision, name="self_attn")(
            RMSNorm(self.rms_norm_eps, name="input_layernorm")(x), positions, mask, cache, write_index)
        h = x.astype(jnp.float32) + attn_out
        mlp_out = MLP(self.intermediate_size, self.precision, name="mlp")(
            RMSNorm(self.rms_norm_eps, name="post_attention_layernorm")(h))
        return h + mlp_out, new_cache


class Qwen2Model(nn.Module):
    """Qwen2 body: ``embed_tokens``, ``layers_{i}``, final ``norm`` (HF ``Qwen2Model``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    precision: Precision = FLOAT32

    def setup(self):
        self.embed_tokens = nn.Embed(self.vocab_size, self.hidden_size)
        self.layers = [
            DecoderLayer(self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size,
                         self.rms_norm_eps, self.rope_theta, self.precision)
            for _ in range(self.num_layers)
        ]
        self.norm = RMSNorm(self.rms_norm_eps)

    def embed(self, ids: Array) -> Array:
        """[B, T] text ids -> [B, T, D]."""
        return self.embed_tokens(ids)

    def __call__(self, x: Array, positions: Array, mask: Array, cache: list[dict[str, Array]] | None = None,
                 write_index: Array | None = None) -> tuple[Array, list[dict[str, Array]] | None]:
        """Embeddings [B, T, D] -> final-normed hidden [B, T, D] (HF ``hidden_states[-1]``).

        ``cache`` is a list with one {"k", "v"} per layer, or None for a cache-free pass.
        """
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, mask, None if cache is None else cache[i], write_index)
            if cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache


class CosyVoice3LM(nn.Module):
    """Params: ``llm`` (Qwen2Model), ``speech_embedding`` [V, D], ``llm_decoder`` kernel [D, V] (no bias).

    Methods (call with ``apply(..., method=...)``): ``embed`` (two-table lookup), ``__call__``
    (transformer), ``logits`` (float32 llm_decoder output).
    """

    vocab_size: int
    speech_vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    precision: Precision = FLOAT32

    def setup(self):
        self.llm = Qwen2Model(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads,
                              self.num_kv_heads, self.head_dim, self.intermediate_size, self.rms_norm_eps,
                              self.rope_theta, self.precision)
        self.speech_embedding = nn.Embed(self.speech_vocab_size, self.hidden_size)
        # Logits and log_softmax stay float32 whatever the stage's precision.
        self.llm_decoder = Dense(self.speech_vocab_size, use_bias=False)

    def embed(self, ids: Array, is_speech: Array) -> Array:
        """Token layout -> embeddings [B, T, D].

        Args:
          ids: [B, T] ids, into ``embed_tokens`` where ``is_speech`` is False and into
            ``speech_embedding`` where True (sos / task_id / speech tokens).
          is_speech: [B, T] bool.
        """
        text = self.llm.embed(jnp.where(is_speech, 0, ids))
        speech = self.speech_embedding(jnp.where(is_speech, ids, 0))
        return jnp.where(is_speech[..., None], speech, text).astype(jnp.float32)

    def __call__(self, x, positions, mask, cache=None, write_index=None):
        """See ``Qwen2Model.__call__``."""
        return self.llm(x, positions, mask, cache, write_index)

    def logits(self, hidden: Array) -> Array:
        """[..., D] -> float32 [..., V] (``llm_decoder``; log_softmax is applied by callers)."""
        return self.llm_decoder(hidden.astype(jnp.float32))

    def init_all(self, ids: Array, is_speech: Array) -> Array:
        """Touches every param (for ``init`` / ``eval_shape``)."""
        x = self.embed(ids, is_speech)
        length = ids.shape[1]
        positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (ids.shape[0], length, length))
        hidden, _ = self(x, positions, mask)
        return self.logits(hidden)


def precision_of(params: Any) -> Precision:
    """The LLM precision its params imply when none is given: bf16 compute for a bf16 checkpoint."""
    dtype = jnp.dtype(params["llm_decoder"]["kernel"].dtype)
    return BFLOAT16 if dtype == jnp.bfloat16 else FLOAT32


def build_model(cfg: LLMConfig, precision: Precision = FLOAT32) -> CosyVoice3LM:
    """The module for ``cfg`` computing under ``precision`` (float32: HIGHEST, upstream's numerics)."""
    return CosyVoice3LM(
        vocab_size=cfg.vocab_size, speech_vocab_size=cfg.speech_vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, precision=precision)


def param_shapes(cfg: LLMConfig) -> dict[str, Any]:
    """Pytree of ``jax.ShapeDtypeStruct`` (float32) of CosyVoice3LM's params, without the "params" wrapper."""
    model = build_model(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    is_speech = jnp.zeros((1, 2), bool)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, is_speech, method=model.init_all))
    return shapes["params"]
