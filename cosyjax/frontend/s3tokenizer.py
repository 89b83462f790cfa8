"""Speech tokenizer v3 (``speech_tokenizer_v3.onnx``) in Flax: whisper log-mel -> 25 Hz FSQ tokens.

The architecture is S3Tokenizer V2's with 12 blocks (facts from the ``s3tokenizer`` package, which
reads the released ONNX into torch; ``convert/frontend.py`` reads its initializers):

* mask the padded frames, ``conv1`` (k3, stride 2, pad 1) + GELU, mask, ``conv2`` (k3, stride 2,
  pad 1) + GELU: 100 Hz frames -> 25 Hz, ``len -> (len - 1) // 2 + 1`` twice;
* ``n_layer`` pre-LN residual blocks (LayerNorm eps 1e-5): ``x += attn(attn_ln(x))``,
  ``x += mlp_2(gelu(mlp_0(mlp_ln(x))))`` (GELU is the exact erf form, MLP width 4 D);
* attention: ``query``/``value``/``out`` with bias, ``key`` without; rotary on q and k (NeoX
  half-rotation, theta 1e4, frequencies repeated over both halves, positions from 0); q and k each
  scaled by ``head_dim ** -0.25``; key padding adds -1e10; softmax in float32. The FSMN memory is a
  depthwise conv (kernel 31, zero pad 15/15, no bias) of the masked **unrotated** value, plus that
  value, masked again; the block's attention output is ``out(attn) + memory``;
* FSQ: ``project_in`` (D -> 8) on every frame, ``round(0.999 * tanh(.)) + 1`` in {0, 1, 2} per
  dimension (round half to even, as torch and ONNX ``Round``), token = sum_i digit_i 3^i.

Legend: B batch, T frames (100 Hz), S tokens (25 Hz), D model, N heads, H head dim, M mels.

Batching: padded frames never reach a valid token (both convs see zeros there, padded keys get
-1e10), so a padded batch gives each utterance the tokens it gets alone, up to float32 summation
order.  :class:`SpeechTokenizerJAX` pads the frame axis to a multiple of ``bucket_frames`` and the
batch to a power of two, so one jitted program serves every length in a bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.nn.conv import Conv1d

HIGHEST = jax.lax.Precision.HIGHEST
MASK_BIAS = -1.0e10  # s3tokenizer's mask_to_bias
FSQ_SCALE = 0.9990000128746033  # the float32 0.999 the release multiplies tanh by
RELEASE_MAX_FRAMES = 3000  # 30 s at 100 Hz: upstream asserts it, the release was exported for it


@dataclasses.dataclass(frozen=True)
class S3TokenizerConfig:
    """Dimensions of the speech tokenizer; the defaults are the released v3 model's.

    ``n_head`` is not visible in the weights; the release's is 20 (head dim 64, the rotary size).
    """

    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 12
    fsmn_kernel: int = 31
    max_positions: int = 2048  # s3tokenizer: precompute_freqs_cis(64, 1024 * 2)
    rope_theta: float = 10000.0
    fsq_levels: int = 3
    fsq_dim: int = 8
    ln_eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_mels", "n_state", "n_head", "n_layer", "fsmn_kernel", "max_positions", "fsq_levels",
                     "fsq_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"S3TokenizerConfig: {name}={getattr(self, name)} must be >= 1")
        if self.n_state % self.n_head:
            raise ValueError(f"S3TokenizerConfig: n_state={self.n_state} not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"S3TokenizerConfig: head_dim={self.head_dim} must be even for the rotary")

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels ** self.fsq_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "S3TokenizerConfig":
        return cls(**d)


def token_lengths(frame_lengths: np.ndarray | jax.Array) -> Any:
    """Tokens per utterance: the two stride-2 convs' ``(len - 1) // 2 + 1`` (s3tokenizer's
    ``(len + 2 - 2 - 1) // 2 + 1``), so ``ceil(frames / 4)``."""
    half = (frame_lengths - 1) // 2 + 1
    return (half - 1) // 2 + 1


def rotary_tables(max_positions: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [P, H] float32 of s3tokenizer's ``precompute_freqs_cis(H, P)``.

    The angles are formed in float32 as torch does (``theta ** (2i / H)`` then ``t * f``); cos/sin
    are rounded once from float64, so they are within an ulp of torch's float32 ``polar``.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim)
    freqs = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = np.outer(np.arange(max_positions, dtype=np.float32), freqs).astype(np.float32)  # [P, H/2]
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """NeoX rotary on [B, S, N, H] with cos/sin [S, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics (torch ``F.layer_norm``)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, precision=HIGHEST, name=name)


class FSMNAttention(nn.Module):
    """Rotary multi-head attention plus the FSMN memory of the value.

    Einsums: ``bsnh,btnh->bnst`` (scores), ``bnst,btnh->bsnh`` (weighted values).
    """

    n_state: int
    n_head: int
    fsmn_kernel: int

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, S, D], valid [B, S] bool, cos/sin [S, H] -> [B, S, D]."""
        b, s, d = x.shape
        head_dim = d // self.n_head
        q = _dense(d, "query")(x).reshape(b, s, self.n_head, head_dim)  # [B, S, N, H]
        k = _dense(d, "key", use_bias=False)(x).reshape(b, s, self.n_head, head_dim)
        v = _dense(d, "value")(x)  # [B, S, D]
        scale = float(head_dim) ** -0.25
        q = _rotate(q, cos, sin) * scale
        k = _rotate(k, cos, sin) * scale
        scores = jnp.einsum("bsnh,btnh->bnst", q, k, precision=HIGHEST)  # [B, N, S, S]
        scores = scores + jnp.where(valid, 0.0, MASK_BIAS)[:, None, None, :]
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
        attn = jnp.einsum("bnst,btnh->bsnh", weights, v.reshape(b, s, self.n_head, head_dim),
                          precision=HIGHEST).reshape(b, s, d)
        keep = valid[..., None].astype(x.dtype)  # [B, S, 1]
        left = (self.fsmn_kernel - 1) // 2
        memory = Conv1d(d, self.fsmn_kernel, padding=(left, self.fsmn_kernel - 1 - left), groups=d,
                        use_bias=False, name="fsmn_block")(v * keep)
        memory = (memory + v * keep) * keep
        return _dense(d, "out")(attn) + memory


class ResidualBlock(nn.Module):
    n_state: int
    n_head: int
    fsmn_kernel: int
    ln_eps: float

    @nn.compact
    def __call__(self, x, valid, cos, sin):
        x = x + FSMNAttention(self.n_state, self.n_head, self.fsmn_kernel, name="attn")(
            LayerNorm(self.ln_eps, name="attn_ln")(x), valid, cos, sin)
        h = _dense(4 * self.n_state, "mlp_0")(LayerNorm(self.ln_eps, name="mlp_ln")(x))
        return x + _dense(self.n_state, "mlp_2")(jax.nn.gelu(h, approximate=False))


class S3TokenizerV3(nn.Module):
    """Log-mel frames -> FSQ tokens (and the pre-rounding values, for tie analysis)."""

    cfg: S3TokenizerConfig

    @nn.compact
    def __call__(self, feats: jax.Array, frame_lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """feats [B, T, M] float32, frame_lengths [B] int -> (tokens [B, S] int32, z [B, S, 8], z_scale [B, S, 8]).

        ``z = project_in(h)`` is the FSQ input before tanh and rounding, and ``z_scale`` is
        ``|h| @ |W| + |b|``, the size of the terms summed into it (the float32 error model of a tie,
        ``cosyjax.parity.stages.frontend``). Positions past ``token_lengths(frame_lengths)`` are padding.
        """
        cfg = self.cfg
        t = feats.shape[1]
        frames = jnp.arange(t)[None, :] < frame_lengths[:, None]
        x = feats * frames[..., None]
        x = jax.nn.gelu(Conv1d(cfg.n_state, 3, padding=(1, 1), stride=2, name="conv1")(x), approximate=False)
        half_len = (frame_lengths - 1) // 2 + 1
        x = x * (jnp.arange(x.shape[1])[None, :] < half_len[:, None])[..., None]
        x = jax.nn.gelu(Conv1d(cfg.n_state, 3, padding=(1, 1), stride=2, name="conv2")(x), approximate=False)
        s = x.shape[1]
        valid = jnp.arange(s)[None, :] < token_lengths(frame_lengths)[:, None]  # [B, S]
        cos, sin = rotary_tables(cfg.max_positions, cfg.head_dim, cfg.rope_theta)
        cos, sin = jnp.asarray(cos[:s]), jnp.asarray(sin[:s])
        for i in range(cfg.n_layer):
            x = ResidualBlock(cfg.n_state, cfg.n_head, cfg.fsmn_kernel, cfg.ln_eps, name=f"blocks_{i}")(
                x, valid, cos, sin)
        project = _dense(cfg.fsq_dim, "project_in")
        z = project(x).astype(jnp.float32)  # [B, S, 8]
        digits = (jnp.round(FSQ_SCALE * jnp.tanh(z)) + 1).astype(jnp.int32)
        powers = jnp.asarray([cfg.fsq_levels ** i for i in range(cfg.fsq_dim)], jnp.int32)
        w = project.variables["params"]
        z_scale = jnp.dot(jnp.abs(x), jnp.abs(w["kernel"]), precision=HIGHEST) + jnp.abs(w["bias"])
        return jnp.sum(digits * powers, axis=-1), z, z_scale


def init_shapes(cfg: S3TokenizerConfig) -> Any:
    """Param tree of ``S3TokenizerV3(cfg)`` as ``jax.ShapeDtypeStruct`` (no memory)."""
    model = S3TokenizerV3(cfg)
    feats = jax.ShapeDtypeStruct((1, 8, cfg.n_mels), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), feats, lengths)["params"]


@functools.partial(jax.jit, static_argnames=("cfg", "diagnostics"))
def _apply(params, feats, frame_lengths, *, cfg: S3TokenizerConfig, diagnostics: bool):
    tokens, z, z_scale = S3TokenizerV3(cfg).apply({"params": params}, feats, frame_lengths)
    return (tokens, z, z_scale) if diagnostics else (tokens,)  # XLA drops the unused |h| @ |W|


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def tokenize_batch(params: Any, feats: Sequence[np.ndarray], *, cfg: S3TokenizerConfig,
                   bucket_frames: int = 400, diagnostics: bool = False):
    """Tokens of several utterances in one padded, jitted call.

    Args:
      params: converted tokenizer params.
      feats: list of [M, T_i] float32 whisper log-mels (``whisper_log_mel`` layout).
      cfg: the tokenizer config.
      bucket_frames: the frame axis is padded to a multiple of this (one compile per bucket).
      diagnostics: also return each utterance's FSQ input ``z`` [S_i, 8] and its term size
        ``z_scale`` [S_i, 8] (see ``S3TokenizerV3``).
    Returns:
      list of [S_i] int64 tokens (``S_i = ceil(T_i / 4)``); with ``diagnostics``, (tokens, z, z_scale).
    Raises:
      ValueError: a feature array of the wrong shape, or longer than the rotary table allows.
    """
    arrays = []
    for i, f in enumerate(feats):
        f = np.asarray(f, np.float32)
        if f.ndim != 2 or f.shape[0] != cfg.n_mels or f.shape[1] == 0:
            raise ValueError(f"speech tokenizer: features {i} must be [{cfg.n_mels}, T>0], got shape {f.shape}")
        arrays.append(f)
    if not arrays:
        return ([], [], []) if diagnostics else []
    lengths = np.array([f.shape[1] for f in arrays], np.int32)
    t = _bucket(int(lengths.max()), bucket_frames)
    if int(token_lengths(np.int64(t))) > cfg.max_positions:
        raise ValueError(f"speech tokenizer: {int(lengths.max())} frames need more than the model's "
                         f"{cfg.max_positions} rotary positions")
    b = 1 << max(0, math.ceil(math.log2(len(arrays))))
    batch = np.zeros((b, t, cfg.n_mels), np.float32)
    for i, f in enumerate(arrays):
        batch[i, : f.shape[1]] = f.T
    padded_lengths = np.ones((b,), np.int32)  # dummy rows: one frame, discarded
    padded_lengths[: len(arrays)] = lengths
    outputs = jax.device_get(_apply(params, jnp.asarray(batch), jnp.asarray(padded_lengths), cfg=cfg,
                                    diagnostics=diagnostics))
    n = token_lengths(lengths)
    per_utt = [[np.asarray(o[i, : n[i]]) for i in range(len(arrays))] for o in outputs]
    tokens = [t.astype(np.int64) for t in per_utt[0]]
    return (tokens, per_utt[1], per_utt[2]) if diagnostics else tokens
