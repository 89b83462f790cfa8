"""CausalConvRNNF0Predictor (cosyvoice/hifigan/f0_predictor.py), channels-last.

Legend: B batch, T mel frames, C channels.

Upstream casts this module and its input to float64 before running it (``CausalHiFTGenerator.
inference``: "f0_predictor precision is crucial for causal inference"), then casts f0 back to
float32.  ``F0Predictor(dtype=jnp.float64)`` reproduces that when the caller runs it under
``jax.enable_x64(True)`` (``generator.py`` does, inside its jitted function, without touching the
global config), which it does where the precision policy's ``f0_float64`` says so (the float32
policy on CPU); otherwise (GPU/TPU, bf16) it runs in float32 at HIGHEST, whatever the conv
stacks' compute dtype.

Unlike every other hift conv, the condnet convs keep their weight-norm factors (``weight_g`` [out],
``weight_v`` [K, in, out]) and fold ``g * v / ||v||`` at run time in the module's dtype.  Upstream's
``.to(torch.float64)`` casts the parametrization's g and v, so its effective weight is folded in
float64; a float32-folded kernel differs by ~1 ulp and moved 27 of 32 f0 values of tiny-a by 1-2
float32 ulp, while folding in float64 reproduces upstream's f0 bit for bit.

The layer sizes not in the config are fixed by upstream's class: the first conv has kernel 4 and a
right (look-ahead) context, then 4 left-causal convs of kernel 3, each followed by ELU.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import flax.linen as nn
import jax
import jax.numpy as jnp


Array = jax.Array

FIRST_KERNEL = 4  # condnet[0]: CausalConv1d(in, cond, kernel_size=4, causal_type='right')
KERNEL = 3  # condnet[2, 4, 6, 8]: CausalConv1d(cond, cond, kernel_size=3, causal_type='left')
NUM_CONVS = 5  # condnet indices 0, 2, 4, 6, 8 are convs; the odd ones are ELUs


def causal_padding(kernel_size: int, dilation: int = 1) -> int:
    """``CausalConv1d.causal_padding``: ``int((k*d - d) / 2) * 2 + (k + 1) % 2`` (= (k-1)*d when valid)."""
    return int((kernel_size * dilation - dilation) / 2) * 2 + (kernel_size + 1) % 2


LOOK_AHEAD = causal_padding(FIRST_KERNEL)  # frames of right context: 3


def float64_available() -> bool:
    """Whether this jax offers ``jax.enable_x64`` as a context manager (scoped float64)."""
    return hasattr(jax, "enable_x64")


def float64_scope(enabled: bool = True) -> ContextManager[Any]:
    """``jax.enable_x64(True)`` where available and ``enabled``, else a no-op context (callers then
    use float32).

    Entered inside a traced function it affects only that trace, never the global config.
    """
    return jax.enable_x64(True) if enabled and float64_available() else contextlib.nullcontext()


class WeightNormConv1d(nn.Module):
    """Conv1d [B, T, C_in] -> [B, T', C_out] with weight ``g * v / ||v||`` folded in ``dtype`` each call.

    Params: ``weight_g`` [C_out], ``weight_v`` [K, C_in, C_out] (torch's original0/original1 in the
    channels-last layout), ``bias`` [C_out].  The norm runs over K and C_in (torch weight_norm, dim=0).
    """

    features: int
    kernel_size: int
    padding: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        v = self.param("weight_v", nn.initializers.lecun_normal(), (self.kernel_size, x.shape[-1], self.features),
                       jnp.float32).astype(self.dtype)
        g = self.param("weight_g", nn.initializers.ones, (self.features,), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        # torch._weight_norm: v * (g / norm_except_dim(v, 2, 0))
        kernel = v * (g / jnp.sqrt(jnp.sum(v * v, axis=(0, 1))))
        # One matmul per tap: XLA's CPU convolution has no fast float64 path (~100x slower than this).
        x = jnp.pad(x.astype(self.dtype), ((0, 0), tuple(self.padding), (0, 0)))
        frames = x.shape[1] - self.kernel_size + 1
        y = None
        for k in range(self.kernel_size):
            tap = jnp.einsum("btc,co->bto", x[:, k:k + frames], kernel[k], precision=jax.lax.Precision.HIGHEST)
            y = tap if y is None else y + tap
        return y + bias  # [B, T, C_out]


class F0Predictor(nn.Module):
    """mel [B, T, C_in] -> f0 [B, T] (>= 0), with zero right context past the end (``finalize=True``).

    With ``finalize=False`` upstream uses the last ``LOOK_AHEAD`` frames as context and returns
    T - LOOK_AHEAD frames; those equal the first T - LOOK_AHEAD frames here, because every later
    layer is left-causal.
    """

    cond_channels: int
    num_class: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mel: Array) -> Array:
        x = mel.astype(self.dtype)
        for i in range(NUM_CONVS):
            kernel = FIRST_KERNEL if i == 0 else KERNEL
            pad = causal_padding(kernel)
            x = WeightNormConv1d(self.cond_channels, kernel, padding=(0, pad) if i == 0 else (pad, 0),
                                 dtype=self.dtype, name=f"condnet_{2 * i}")(x)
            x = jax.nn.elu(x)
        x = nn.Dense(self.num_class, dtype=self.dtype, precision=jax.lax.Precision.HIGHEST, name="classifier")(x)
        return jnp.abs(x[..., 0])  # [B, T]
