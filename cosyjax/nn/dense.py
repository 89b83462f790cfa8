"""Dense layer under a stage's ``Precision`` (params named as flax's ``nn.Dense``: kernel [in, out], bias [out])."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.precision import FLOAT32, Precision


class Dense(nn.Module):
    """``x @ kernel + bias`` with operands in the compute dtype and float32 accumulation; the result
    (bias added) is float32, so elementwise work after it stays float32 and the next layer casts its input."""

    features: int
    use_bias: bool = True
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        dtype = self.precision.dtype
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision.lax_precision, preferred_element_type=jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y
