"""Scaled dot-product attention with an explicit boolean mask, written once for the LLM and the DiT.

Legend: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.

``attention(q, k, v, mask, scale=..., precision=...)`` with ``precision.attention``:

- "xla": scores [B, K, G, T, S] materialised, masked with the float32 minimum, float32 softmax,
  then the weighted sum.  Upstream's numerics (HF Qwen2's sdpa and x-transformers' attention in
  float32 give the same products), and the fastest form on CPU.
- "blockwise": the keys in blocks of ``BLOCK``; a scan keeps the running max, normaliser and
  weighted sum per query (the online softmax of flash attention), so no [B, N, T, S] array exists.
  Equal to "xla" up to float32 rounding of the re-scaled sums.  Runs on every backend (TPU too).
- "cudnn": ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on NVIDIA
  GPUs, bf16/fp16 operands).

The mask must leave at least one key visible per query (every caller's does: key 0, or the query's
own position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cosyjax.precision import FLOAT32, Precision

Array = jax.Array
BLOCK = 128  # keys per step of the blockwise scan
NEG = jnp.finfo(jnp.float32).min


def attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float, precision: Precision = FLOAT32) -> Array:
    """q [B, T, N, H], k/v [B, S, K, H] (K divides N), mask [B, T, S] bool -> [B, T, N, H] float32."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"attention: {heads} query heads are not a multiple of {kv_heads} kv heads")
    if precision.attention == "cudnn":
        dtype = precision.dtype
        out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask[:, None],
                                           scale=scale, implementation="cudnn")
        return out.astype(jnp.float32)
    # HF repeat_kv gives query head n the kv head n // G, i.e. n = k * G + g.
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)  # [B, T, K, G, H]
    if precision.attention == "blockwise":
        out = _blockwise(qg, k, v, mask, scale, precision)
    else:
        out = _materialised(qg, k, v, mask, scale, precision)
    return out.reshape(batch, length, heads, dim)


def _scores(qg: Array, k: Array, scale: float, precision: Precision) -> Array:
    dtype = precision.dtype
    s = jnp.einsum("btkgh,bskh->bkgts", qg.astype(dtype), k.astype(dtype), precision=precision.lax_precision,
                   preferred_element_type=jnp.float32)  # [B, K, G, T, S]
    return s * jnp.float32(scale)


def _weighted(p: Array, v: Array, precision: Precision) -> Array:
    dtype = precision.dtype
    return jnp.einsum("bkgts,bskh->btkgh", p.astype(dtype), v.astype(dtype), precision=precision.lax_precision,
                      preferred_element_type=jnp.float32)  # [B, T, K, G, H]


def _materialised(qg, k, v, mask, scale, precision):
    scores = jnp.where(mask[:, None, None], _scores(qg, k, scale, precision), NEG)
    return _weighted(jax.nn.softmax(scores, axis=-1), v, precision)


def _blockwise(qg, k, v, mask, scale, precision):
    batch, length, kv_heads, groups, dim = qg.shape
    keys = k.shape[1]
    blocks = -(-keys // BLOCK)
    pad = blocks * BLOCK - keys
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
    kb = jnp.moveaxis(k.reshape(batch, blocks, BLOCK, kv_heads, dim), 1, 0)  # [nb, B, BLOCK, K, H]
    vb = jnp.moveaxis(v.reshape(batch, blocks, BLOCK, kv_heads, dim), 1, 0)
    mb = jnp.moveaxis(mask.reshape(batch, length, blocks, BLOCK), 2, 0)  # [nb, B, T, BLOCK]

    def step(carry, block):
        top, norm, acc = carry  # [B, K, G, T], [B, K, G, T], [B, T, K, G, H]
        kk, vv, mm = block
        visible = mm[:, None, None]  # [B, 1, 1, T, BLOCK]
        s = jnp.where(visible, _scores(qg, kk, scale, precision), NEG)  # [B, K, G, T, BLOCK]
        new_top = jnp.maximum(top, s.max(axis=-1))
        # Hidden keys weigh 0 even while a query has seen no visible key yet (new_top still NEG).
        p = jnp.where(visible, jnp.exp(s - new_top[..., None]), 0.0)
        shrink = jnp.exp(top - new_top)
        norm = norm * shrink + p.sum(axis=-1)
        acc = acc * jnp.moveaxis(shrink, 3, 1)[..., None] + _weighted(p, vv, precision)
        return (new_top, norm, acc), None

    start = (jnp.full((batch, kv_heads, groups, length), NEG), jnp.zeros((batch, kv_heads, groups, length)),
             jnp.zeros((batch, length, kv_heads, groups, dim)))
    (_, norm, acc), _ = jax.lax.scan(step, start, (kb, vb, mb))
    return acc / jnp.moveaxis(norm, 3, 1)[..., None]


__all__ = ["BLOCK", "attention"]
