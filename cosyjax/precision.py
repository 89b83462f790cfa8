"""One precision policy for the three stages: which dtype the matmuls and convolutions run in.

``Precision`` (per stage) says what the heavy operations (Dense, Conv1d, attention products) take as
operands: float32 at ``HIGHEST`` (the parity path: what upstream computes) or bfloat16 with float32
accumulation (``preferred_element_type``), the accelerator path.  Everything whose error would
grow or that is cheap stays float32 whatever the stage's dtype: norm statistics, softmax, RoPE and
the DiT timestep embedding, the Euler state of the flow solver, the HiFT f0 predictor, the NSF
phase (a running sum over the whole utterance, kept as a double-float32 sum when float64 is off:
``cosyjax.hift.source.phase_cumsum``) and sines, conv_post's log-magnitude and the iSTFT.  The
heavy operations exist once each, in ``cosyjax.nn`` (``Dense``, ``Conv1d``, ``attention``) and
``einsum`` below, and take the stage's ``Precision``, so the policy is applied in one place; their
results are float32.

``PrecisionPolicy.resolve("float32" | "bfloat16" | "auto", backend)`` builds the policy:

- ``float32``: today's parity numerics everywhere.  On the CPU backend ``f0_float64`` is on:
  upstream runs the HiFT f0 predictor, the NSF ``f0 / sampling_rate`` and the phase cumsum in
  float64, so CPU parity does too (only where jax offers scoped float64).  On GPU/TPU it is off:
  float64 is slow on GPUs and absent on TPUs, and those stages run in float32.
- ``bfloat16``: all three stages in bf16 compute; ``f0_float64`` off (no float64 anywhere).
- ``auto``: per backend, from the measurements in BENCHMARKS.md: bf16 on GPU and TPU; float32 on
  CPU, where XLA's bf16 matrix-vector products (the LLM decode) run below float32 (bandwidth 16x
  lower on the Intel machine; a batch-1 decode step 2.3x slower on the AMD one, whose bf16 flow is
  1.6x faster: the CPU default keeps upstream's float32 numerics; BENCHMARKS.md has the rows).

``f0_float64`` is decided here and nowhere else: the vocoder entry points (``cosyjax.hift``) take
the policy and read it; ``dataclasses.replace(policy, f0_float64=...)`` is the one way to ask for
something else.

Attention runs materialised ("xla") on CPU, where that is both the fastest and upstream's exact
numerics, and blockwise (never holding the [B, N, T, S] scores) on accelerators.

Weights are stored in whatever dtype the converted checkpoint has; a stage casts them to its
compute dtype when it runs (``cast``), so a float32 checkpoint serves both policies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")
POLICIES = DTYPES + ("auto",)
STAGES = ("llm", "flow", "hift")
ATTENTION = ("xla", "blockwise", "cudnn")


@dataclasses.dataclass(frozen=True)
class Precision:
    """How one stage runs its matmuls/convs (frozen and hashable: a static jit argument).

    Attributes:
      compute: "float32" or "bfloat16", the operand dtype of the heavy operations.
      attention: how attention runs (``cosyjax.nn.attention``): "xla" (the scores materialised,
        upstream's numerics; the CPU path), "blockwise" (online softmax over key blocks: never holds
        [B, N, T, S] scores; the accelerator default) or "cudnn" (``jax.nn.dot_product_attention``'s
        cuDNN kernel, GPU only).
    """

    compute: str = "float32"
    attention: str = "xla"

    def __post_init__(self):
        if self.compute not in DTYPES:
            raise ValueError(f"Precision: compute={self.compute!r}, expected one of {DTYPES}")
        if self.attention not in ATTENTION:
            raise ValueError(f"Precision: attention={self.attention!r}, expected one of {ATTENTION}")

    @property
    def dtype(self) -> Any:
        return jnp.bfloat16 if self.compute == "bfloat16" else jnp.float32

    @property
    def lax_precision(self) -> Any:
        """HIGHEST keeps float32 products exact on every backend (TPU/GPU default to bf16/tf32 passes)."""
        return jax.lax.Precision.HIGHEST if self.compute == "float32" else jax.lax.Precision.DEFAULT

    @property
    def is_float32(self) -> bool:
        return self.compute == "float32"


FLOAT32 = Precision("float32")
BFLOAT16 = Precision("bfloat16")


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """Per-stage ``Precision`` plus the HiFT float64 switch (see the module docstring).

    ``f0_float64``: the HiFT f0 predictor, the NSF ``f0 / sampling_rate`` division and the NSF phase
    cumsum in float64 (upstream's CPU numerics); float32 when off.  The field default is the CPU
    float32 policy's; ``resolve`` sets it per backend.
    """

    llm: Precision = FLOAT32
    flow: Precision = FLOAT32
    hift: Precision = FLOAT32
    f0_float64: bool = True

    @classmethod
    def resolve(cls, name: str | None = "float32", backend: str | None = None) -> "PrecisionPolicy":
        """The policy named ``name`` ("float32", "bfloat16", "auto"; None = "float32") on ``backend``
        (a jax platform name; default: jax's default backend)."""
        name = "float32" if name is None else str(name)
        if name not in POLICIES:
            raise ValueError(f"dtype={name!r}: expected one of {', '.join(POLICIES)}")
        backend = backend or jax.default_backend()
        if name == "auto":
            name = "float32" if backend == "cpu" else "bfloat16"
        attention = "xla" if backend == "cpu" else "blockwise"
        if name == "float32":
            f32 = Precision("float32", attention)
            return cls(f32, f32, f32, f0_float64=backend == "cpu")
        bf16 = Precision("bfloat16", attention)
        return cls(bf16, bf16, bf16, f0_float64=False)

    def stage(self, name: str) -> Precision:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        return getattr(self, name)

    @property
    def name(self) -> str:
        """"float32", "bfloat16", or "mixed" when the stages differ."""
        kinds = {self.llm.compute, self.flow.compute, self.hift.compute}
        return kinds.pop() if len(kinds) == 1 else "mixed"


def cast(x: Any, precision: Precision) -> Any:
    """``x`` (an array or a params tree) in the stage's compute dtype (float leaves only)."""
    dtype = precision.dtype

    def one(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(one, x)


def as_float32(x: Any) -> Any:
    """``x`` (an array or a params tree) with every float leaf in float32."""
    return cast(x, FLOAT32)


def einsum(spec: str, a: Any, b: Any, precision: Precision) -> Any:
    """``jnp.einsum`` on operands in the compute dtype, accumulated and returned in float32."""
    return jnp.einsum(spec, a.astype(precision.dtype), b.astype(precision.dtype),
                      precision=precision.lax_precision, preferred_element_type=jnp.float32)


__all__ = ["BFLOAT16", "DTYPES", "FLOAT32", "POLICIES", "Precision", "PrecisionPolicy", "as_float32", "cast",
           "einsum"]
