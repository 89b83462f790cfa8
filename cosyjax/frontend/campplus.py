"""CAM++ speaker encoder (``campplus.onnx``) in Flax: mean-normalised fbank -> speaker embedding.

3D-Speaker's ``CAMPPlus`` (``speakerlab/models/campplus/DTDNN.py``, also in FunASR), in the form
the release's ONNX export has: eval-mode export folds every BatchNorm that directly follows a
convolution whose output has no other use into that convolution (a conv with bias), and keeps the
others as BatchNormalization.  So here:

* ``head`` (FCM, 2-D over [freq, time]): conv1 3x3 + ReLU; ``layer1``/``layer2``: two
  BasicResBlocks each (the first with frequency stride 2 and a 1x1 shortcut), ``relu(conv2(relu(
  conv1(x))) + shortcut(x))``; conv2 3x3 with frequency stride 2 + ReLU; then
  [C, F/8, T] -> [C * F/8, T] (channel-major);
* ``xvector.tdnn``: conv k5, time stride 2, pad 2 + ReLU;
* three CAM dense blocks (12, 24, 16 layers; kernel 3; dilation 1, 2, 2). Each layer:
  ``h = relu(linear1(relu(bn1(x))))``; ``y = linear_local(h) * sigmoid(linear2(relu(linear1'(c))))``
  with context ``c = mean_t(h) + segment means of 100 frames`` (the last segment partial, as
  ``avg_pool1d(ceil_mode=True)``); ``x = concat(x, y)``. After each block a transit layer halves the
  channels: ``linear(relu(bn(x)))`` (the last one with the final BatchNorm folded in, then ReLU);
* statistics pooling (mean and unbiased std over time), ``dense`` (1x1, no bias) and a
  BatchNorm without affine -> embedding.

BatchNorm here is inference-mode ``(x - mean) / sqrt(var + eps) * scale + bias`` with eps 1e-5.

Layouts: channels-last throughout, [B, F, T, C] in the head and [B, T, C] after it.  Padded frames
are zeroed after every layer, so each convolution sees zeros past an utterance's end exactly as the
unpadded one sees its zero padding, and the means use the valid frames only: a padded batch gives
every utterance its own embedding (up to float32 summation order).
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


@dataclasses.dataclass(frozen=True)
class CAMPPlusConfig:
    """Dimensions of CAM++; the defaults are the released ``campplus.onnx``'s
    (``CAMPPlus(feat_dim=80, embedding_size=192)``: 7.18 M params)."""

    feat_dim: int = 80
    embedding_size: int = 192
    m_channels: int = 32
    init_channels: int = 128
    growth_rate: int = 32
    bn_channels: int = 128  # bn_size (4) * growth_rate
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    seg_len: int = 100
    cam_reduction: int = 2
    bn_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "block_layers", tuple(int(n) for n in self.block_layers))
        object.__setattr__(self, "block_kernels", tuple(int(k) for k in self.block_kernels))
        object.__setattr__(self, "block_dilations", tuple(int(d) for d in self.block_dilations))
        if not len(self.block_layers) == len(self.block_kernels) == len(self.block_dilations):
            raise ValueError(f"CAMPPlusConfig: {len(self.block_layers)} blocks but {len(self.block_kernels)} "
                             f"kernels and {len(self.block_dilations)} dilations")
        if self.feat_dim % 8:
            raise ValueError(f"CAMPPlusConfig: feat_dim={self.feat_dim} must be a multiple of 8 (three stride-2 "
                             "frequency steps)")
        if any(k % 2 == 0 for k in self.block_kernels):
            raise ValueError(f"CAMPPlusConfig: block kernels {self.block_kernels} must be odd")
        for name in ("embedding_size", "m_channels", "init_channels", "growth_rate", "bn_channels", "seg_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CAMPPlusConfig: {name}={getattr(self, name)} must be >= 1")
        if self.bn_channels % self.cam_reduction:
            raise ValueError(f"CAMPPlusConfig: bn_channels={self.bn_channels} not divisible by "
                             f"cam_reduction={self.cam_reduction}")

    def block_channels(self) -> list[tuple[int, int]]:
        """(input channels, channels after the transit layer) per dense block."""
        out, channels = [], self.init_channels
        for n in self.block_layers:
            grown = channels + n * self.growth_rate
            out.append((channels, grown // 2))
            channels = grown // 2
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CAMPPlusConfig":
        return cls(**d)


class BatchNorm(nn.Module):
    """Inference BatchNorm over the last axis (ONNX ``BatchNormalization``)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class Conv2d(nn.Module):
    """3x3/1x1 conv on [B, F, T, C] with zero padding; stride on the frequency axis only."""

    features: int
    kernel_size: int
    freq_stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        pad = (k - 1) // 2
        y = jax.lax.conv_general_dilated(x, kernel, window_strides=(self.freq_stride, 1),
                                         padding=((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        return y + bias


class BasicResBlock(nn.Module):
    planes: int
    freq_stride: int

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
        """x [B, F, T, C], keep [B, 1, T, 1] -> [B, F / stride, T, planes]."""
        out = jax.nn.relu(Conv2d(self.planes, 3, self.freq_stride, name="conv1")(x)) * keep
        out = Conv2d(self.planes, 3, name="conv2")(out)
        if self.freq_stride != 1 or x.shape[-1] != self.planes:
            x = Conv2d(self.planes, 1, self.freq_stride, name="shortcut_0")(x)
        return jax.nn.relu(out + x) * keep


class CAMDenseLayer(nn.Module):
    growth_rate: int
    bn_channels: int
    kernel_size: int
    dilation: int
    seg_len: int
    reduction: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array, lengths: jax.Array) -> jax.Array:
        """x [B, T, C], keep [B, T, 1], lengths [B] -> the new features [B, T, growth_rate]."""
        h = jax.nn.relu(BatchNorm(self.eps, name="nonlinear1_batchnorm")(x)) * keep
        h = jax.nn.relu(Conv1d(self.bn_channels, 1, name="linear1")(h)) * keep
        pad = (self.kernel_size - 1) // 2 * self.dilation
        y = Conv1d(self.growth_rate, self.kernel_size, padding=(pad, pad), dilation=self.dilation,
                   use_bias=False, name="cam_layer_linear_local")(h)
        context = _masked_mean(h, keep, lengths) + _segment_means(h, lengths, self.seg_len)
        context = jax.nn.relu(Conv1d(self.bn_channels // self.reduction, 1, name="cam_layer_linear1")(context))
        gate = jax.nn.sigmoid(Conv1d(self.growth_rate, 1, name="cam_layer_linear2")(context))
        return y * gate * keep


def _masked_mean(x: jax.Array, keep: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mean over the valid frames: [B, T, C] -> [B, 1, C]."""
    return jnp.sum(x * keep, axis=1, keepdims=True) / lengths[:, None, None].astype(x.dtype)


def _segment_means(x: jax.Array, lengths: jax.Array, seg_len: int) -> jax.Array:
    """Each frame gets the mean of its ``seg_len``-frame segment (valid frames only): [B, T, C]."""
    b, t, c = x.shape
    n_seg = -(-t // seg_len)
    padded = jnp.pad(x, ((0, 0), (0, n_seg * seg_len - t), (0, 0))).reshape(b, n_seg, seg_len, c)
    starts = jnp.arange(n_seg)[None, :] * seg_len
    counts = jnp.clip(lengths[:, None] - starts, 1, seg_len).astype(x.dtype)  # [B, n_seg]
    means = jnp.sum(padded, axis=2) / counts[..., None]  # padded frames are zero
    return jnp.repeat(means, seg_len, axis=1)[:, :t]


class CAMPPlus(nn.Module):
    cfg: CAMPPlusConfig

    @nn.compact
    def __call__(self, feats: jax.Array, lengths: jax.Array) -> jax.Array:
        """feats [B, T, feat_dim] float32, lengths [B] int -> embeddings [B, embedding_size]."""
        cfg = self.cfg
        t = feats.shape[1]
        keep2d = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)[:, None, :, None]  # [B,1,T,1]
        x = jnp.transpose(feats, (0, 2, 1))[..., None] * keep2d  # [B, F, T, 1]
        x = jax.nn.relu(Conv2d(cfg.m_channels, 3, name="head_conv1")(x)) * keep2d
        for layer in (1, 2):
            x = BasicResBlock(cfg.m_channels, 2, name=f"head_layer{layer}_0")(x, keep2d)
            x = BasicResBlock(cfg.m_channels, 1, name=f"head_layer{layer}_1")(x, keep2d)
        x = jax.nn.relu(Conv2d(cfg.m_channels, 3, 2, name="head_conv2")(x)) * keep2d  # [B, F/8, T, C]
        b, f, _, c = x.shape
        x = jnp.transpose(x, (0, 2, 3, 1)).reshape(b, t, c * f)  # torch's [C, F] -> C*F, channel-major
        lengths = (lengths - 1) // 2 + 1  # tdnn: k5, stride 2, pad 2
        keep = (jnp.arange((t - 1) // 2 + 1)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]
        x = jax.nn.relu(Conv1d(cfg.init_channels, 5, padding=(2, 2), stride=2, name="xvector_tdnn_linear")(x))
        x = x * keep
        last = len(cfg.block_layers)
        for i, (n, k, d) in enumerate(zip(cfg.block_layers, cfg.block_kernels, cfg.block_dilations), start=1):
            for j in range(1, n + 1):
                y = CAMDenseLayer(cfg.growth_rate, cfg.bn_channels, k, d, cfg.seg_len, cfg.cam_reduction,
                                  cfg.bn_eps, name=f"xvector_block{i}_tdnnd{j}")(x, keep, lengths)
                x = jnp.concatenate([x, y], axis=-1)
            h = jax.nn.relu(BatchNorm(cfg.bn_eps, name=f"xvector_transit{i}_nonlinear_batchnorm")(x)) * keep
            # the last transit conv carries the folded out_nonlinear BatchNorm (so a bias), then its ReLU
            x = Conv1d(x.shape[-1] // 2, 1, use_bias=i == last, name=f"xvector_transit{i}_linear")(h) * keep
        x = jax.nn.relu(x) * keep
        mean = _masked_mean(x, keep, lengths)  # [B, 1, C]
        var = jnp.sum(jnp.square(x - mean) * keep, axis=1) / (lengths[:, None] - 1).astype(x.dtype)
        stats = jnp.concatenate([mean[:, 0], jnp.sqrt(var)], axis=-1)  # [B, 2C]
        emb = Conv1d(cfg.embedding_size, 1, use_bias=False, name="xvector_dense_linear")(stats[:, None, :])[:, 0]
        return BatchNorm(cfg.bn_eps, name="xvector_dense_nonlinear_batchnorm")(emb)


def min_frames() -> int:
    """Frames an utterance needs: the unbiased std divides by (tdnn frames - 1)."""
    return 3


def init_shapes(cfg: CAMPPlusConfig) -> Any:
    """Param tree of ``CAMPPlus(cfg)`` as ``jax.ShapeDtypeStruct``."""
    feats = jax.ShapeDtypeStruct((1, 8, cfg.feat_dim), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(CAMPPlus(cfg).init, jax.random.key(0), feats, lengths)["params"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _apply(params, feats, lengths, *, cfg: CAMPPlusConfig):
    return CAMPPlus(cfg).apply({"params": params}, feats, lengths)


def embed_batch(params: Any, feats: Sequence[np.ndarray], *, cfg: CAMPPlusConfig,
                bucket_frames: int = 400) -> list[np.ndarray]:
    """Embeddings of several utterances in one padded, jitted call.

    Args:
      params: converted CAM++ params.
      feats: list of [T_i, feat_dim] float32 mean-normalised fbanks (``spk_fbank`` layout).
      cfg: the CAM++ config.
      bucket_frames: the frame axis is padded to a multiple of this (one compile per bucket).
    Returns:
      list of [embedding_size] float32 embeddings.
    Raises:
      ValueError: a feature array of the wrong shape or with fewer than ``min_frames()`` frames.
    """
    arrays = []
    for i, f in enumerate(feats):
        f = np.asarray(f, np.float32)
        if f.ndim != 2 or f.shape[1] != cfg.feat_dim or f.shape[0] < min_frames():
            raise ValueError(f"speaker encoder: features {i} must be [T>={min_frames()}, {cfg.feat_dim}], "
                             f"got shape {f.shape}")
        arrays.append(f)
    if not arrays:
        return []
    lengths = np.array([f.shape[0] for f in arrays], np.int32)
    t = max(bucket_frames, -(-int(lengths.max()) // bucket_frames) * bucket_frames)
    b = 1 << max(0, math.ceil(math.log2(len(arrays))))
    batch = np.zeros((b, t, cfg.feat_dim), np.float32)
    for i, f in enumerate(arrays):
        batch[i, : f.shape[0]] = f
    padded_lengths = np.full((b,), t, np.int32)  # dummy rows: all-zero input, discarded
    padded_lengths[: len(arrays)] = lengths
    emb = jax.device_get(_apply(params, jnp.asarray(batch), jnp.asarray(padded_lengths), cfg=cfg))
    return [np.asarray(emb[i], np.float32) for i in range(len(arrays))]
