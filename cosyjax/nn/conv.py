"""Channels-last 1-D convolution with explicit (left, right) zero padding.

Legend: B batch, T time, C channels.  Params: ``kernel`` [K, C_in/groups, C_out] (torch Conv1d
weight transposed by ``convert.common.conv1d_t``) and ``bias`` [C_out].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.precision import FLOAT32, Precision


class Conv1d(nn.Module):
    """``y = conv(pad(x, (left, right)))`` on ``x`` of shape [B, T, C_in] -> [B, T', C_out].

    Causal convolutions are this module with ``padding=(k-1)*d, 0`` (left) or ``0, k-1`` (right).
    The operands take ``precision``'s compute dtype and accumulate in float32; the result (bias
    added) is float32, so elementwise work after it stays float32 and the next layer casts its input.
    """

    features: int
    kernel_size: int
    padding: tuple[int, int] = (0, 0)
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"Conv1d: {in_features} input channels not divisible by groups={self.groups}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, in_features // self.groups, self.features), jnp.float32)
        dtype = self.precision.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype),
            window_strides=(self.stride,),
            padding=(tuple(self.padding),),
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
            precision=self.precision.lax_precision,
            preferred_element_type=jnp.float32,
        )  # [B, T', C_out]
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(jnp.float32)
        return y
