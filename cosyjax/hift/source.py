"""NSF source: SourceModuleHnNSF with SineGen2(causal=True), and its random buffers.

Legend: B batch, T f0 frames, L = T * S samples (S = ``cfg.upsample_scale``), H harmonics + 1.

Every float32 step follows upstream's operation order, because the phase reaches thousands of
radians and a one-ulp change in it moves ``sin`` by ~1e-4:

* ``rad = (f0 * h / sr) % 1`` per sample, float32 (the division done in float64 and rounded, since
  XLA compiles division by a constant as a multiply by its reciprocal);
* linear interpolation by 1/S with ``align_corners=False``: frame k mixes samples
  ``floor(S (k + 0.5) - 0.5)`` and the next one with torch's float32 weights;
* ``cumsum`` over frames, accumulated in float64 and rounded to float32 as torch's CPU kernel does
  (a float32 running sum differs from it in ~90 % of entries);
* the float64 steps (the division and the cumsum) only where the precision policy's
  ``f0_float64`` asks for them (the float32 policy on CPU: parity); otherwise float32, the
  cumsum as a double-float32 sum (``phase_cumsum``) that rounds like the float64 one;
* ``* 2``, then ``* float32(pi)``, then ``* S``, each rounded to float32 (torch casts Python
  scalars to the tensor's dtype; XLA must not fold the constants); nearest upsampling by S repeats
  each frame S times.

Random buffers.  Upstream draws ``rand_ini`` [1, 9] and ``sine_waves`` [1, 300 * 24000, 9]
(uniform [0, 1), *not* Gaussian) once at construction and slices ``sine_waves[:, :L]`` per call.
It hardcodes 9 columns, which equals ``nb_harmonics + 1`` for the release; other harmonic counts
would fail upstream, while here the width follows the config.  ``source_signal`` takes both buffers
as inputs so parity can inject the reference's; ``make_noise`` draws them from a PRNG key with a
counter-based hash of the sample index, so a call of any length (or a streaming re-run) sees the
same noise at the same sample, and only the samples a call needs are made.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from cosyjax.config import HiftConfig
from cosyjax.hift.f0 import float64_available, float64_scope
from cosyjax.programs import exportable
from cosyjax.programs import run as run_program

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


@exportable
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HiftNoise:
    """The source's random buffers.

    Attributes:
      rand_ini: [H] initial phase offsets added to sample 0's rad values (column 0 is 0 upstream).
      uniform: [N, H] uniform [0, 1) values; sample i of every row uses ``uniform[i]``.
    """

    rand_ini: Array
    uniform: Array


def make_noise(key: Array, num_samples: int, cfg: HiftConfig, programs: Any = None) -> HiftNoise:
    """Deterministic buffers for ``num_samples`` samples from a PRNG key (position-consistent).

    ``uniform[i, h]`` is the first word of threefry2x32(key, (i * H + h, 0)) mapped to [0, 1): a
    counter-based draw, so a sample's value depends only on its index (and the key), never on
    ``num_samples``.

    Args:
      key: a threefry ``jax.random`` key (typed, or raw uint32[2]).
      num_samples: static count N.
      cfg: the hift config (H = nb_harmonics + 1).
      programs: run through this ``cosyjax.programs.ProgramCache`` (compiled ahead by warm-up).

    Returns:
      HiftNoise with rand_ini [H] (column 0 zeroed, as upstream) and uniform [N, H].
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"noise key: expected a threefry key (uint32[2]), "
                         f"found {key.dtype}{list(key.shape)}")
    return run_program(programs, _make_noise, key, num_samples=int(num_samples), width=cfg.num_harmonic_channels)


def noise_program(num_samples: int, cfg: HiftConfig) -> tuple[Any, tuple, dict]:
    """The ``make_noise`` program for ``num_samples`` samples: (function, argument specs, static arguments)."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return _make_noise, (key,), dict(num_samples=int(num_samples), width=cfg.num_harmonic_channels)


def _unit_float(bits: Array) -> Array:
    """uint32 -> float32 in [0, 1) from the top 23 bits (as jax.random.uniform does)."""
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - jnp.float32(1.0)


@functools.partial(jax.jit, static_argnames=("num_samples", "width"))
def _make_noise(key: Array, num_samples: int, width: int) -> HiftNoise:
    ini_key, counter_key = jax.random.split(key)
    rand_ini = jax.random.uniform(ini_key, (width,), jnp.float32).at[0].set(0.0)
    count = num_samples * width
    # threefry_2x32 hashes (first half, second half) word pairs of its input; pairing each counter
    # with 0 keeps entry i a function of i alone.
    counters = jnp.concatenate([jnp.arange(count, dtype=jnp.uint32), jnp.zeros((count,), jnp.uint32)])
    uniform = _unit_float(threefry_2x32(counter_key, counters)[:count]).reshape(num_samples, width)
    return HiftNoise(rand_ini, uniform)


@functools.lru_cache(maxsize=None)
def _downsample_taps(length: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of ``F.interpolate(linear, scale_factor=1/scale, align_corners=False)``.

    torch (UpSampleKernel, ``area_pixel_compute_source_index``) uses the float32 scale
    ``float(1.0 / (1.0 / scale))`` and computes ``scale * (k + 0.5) - 0.5`` in float32.
    """
    out = int(np.floor(length * (1.0 / scale)))
    step = np.float32(1.0 / (1.0 / scale))
    real = np.maximum(step * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.floor(real).astype(np.int64)
    w1 = np.clip(real - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    i1 = i0 + (i0 < length - 1)
    return i0, i1, w0, w1


def source_signal(params: dict, f0: Array, noise: HiftNoise, *, cfg: HiftConfig, float64: bool = False) -> Array:
    """``SourceModuleHnNSF.forward`` (eval, causal) on frame-rate f0: the merged excitation.

    Args:
      params: ``{"l_linear": {"kernel": [H, 1], "bias": [1]}}``.
      f0: [B, T] float32 f0 in Hz (``f0_upsamp`` to sample rate happens here).
      noise: HiftNoise with ``uniform`` of at least L = T * S rows.
      cfg: hift config (static).
      float64: the division by the sampling rate and the phase cumsum in float64 like upstream's
        CPU run (the policy's ``f0_float64``; float32 otherwise).

    Returns:
      [B, L] float32 ``tanh(l_linear(sine * uv + noise))``.  Sample i depends only on f0 frames
      <= i // S, ``rand_ini`` and ``uniform[i]``, so a longer buffer leaves a prefix unchanged.
    """
    scale = cfg.upsample_scale
    f0 = f0.astype(jnp.float32)
    f0_up = jnp.repeat(f0, scale, axis=1)  # [B, L]
    length = f0_up.shape[1]
    rad = harmonic_rad(f0_up, cfg, float64)  # [B, L, H]
    rad = rad.at[:, 0, :].add(noise.rand_ini.astype(jnp.float32))
    i0, i1, w0, w1 = _downsample_taps(length, scale)
    rad_frames = rad[:, i0] * w0[:, None] + rad[:, i1] * w1[:, None]  # [B, T, H]
    with float64_scope(float64):
        phase = phase_round(phase_cumsum(rad_frames, float64))
    return merge_excitation(params, phase, f0, noise.uniform[:length], cfg)


# The three pieces of the NSF source that the offline call above and the carried-state stream
# (``cosyjax.hift.stream._source_window``) share; only the frame interpolation taps, the phase carry
# and the noise indexing differ between them.
def harmonic_rad(f0: Array, cfg: HiftConfig, float64: bool) -> Array:
    """``(f0 * h / sr) % 1`` for harmonics h = 1..H: [...] float32 Hz -> [..., H] float32.

    With ``float64`` the division runs in float64 and is rounded once to float32: XLA turns
    x / const into x * (1 / const), which is not float32 division; float64 division rounded to
    float32 is (53 >= 2 * 24 + 2 bits, so the double rounding is innocuous).
    """
    harmonics = jnp.arange(1, cfg.num_harmonic_channels + 1, dtype=jnp.float32)
    fn = f0[..., None] * harmonics  # [..., H]
    if float64 and float64_available():
        with float64_scope():
            fn = (fn.astype(jnp.float64) / cfg.sampling_rate).astype(jnp.float32)
    else:
        fn = fn / jnp.float32(cfg.sampling_rate)
    return jnp.remainder(fn, jnp.float32(1.0))


def phase_cumsum(rad_frames: Array, float64: bool) -> Any:
    """Running sum of ``rad_frames`` [B, T, H] over T: the accumulator (call under ``float64_scope(float64)``).

    ``float64`` (and available): a float64 array, as torch's CPU cumsum accumulates float32 input in
    double.  Otherwise a double-float32 pair (hi, lo) with hi + lo the sum to ~2^-44 relative: an
    ``associative_scan`` of error-free additions (TwoSum), so no float64 is needed (TPUs lack it)
    and the rounded phase is, like float64's, the correctly rounded sum except within ~2^-20 ulp of
    a rounding tie, whatever the grouping: the offline call (one scan over the utterance) and the
    stream (a carried sum plus a scan of the chunk) then give the same float32 phase.  A plain
    float32 cumsum would differ from it by a few ulp, grouping-dependent, at thousands of radians.
    """
    if float64 and float64_available():
        return jnp.cumsum(rad_frames.astype(jnp.float64), axis=1)
    hi = rad_frames.astype(jnp.float32)
    return jax.lax.associative_scan(phase_add, (hi, jnp.zeros_like(hi)), axis=1)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """s = fl(a + b) and the exact error e: a + b = s + e (Knuth's TwoSum, any magnitudes)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def phase_add(x: Any, y: Any) -> Any:
    """The sum of two accumulators of ``phase_cumsum`` (float64 arrays or (hi, lo) float32 pairs)."""
    if not isinstance(x, tuple):
        return x + y
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)  # renormalised: hi = fl(hi + lo)


def phase_round(acc: Any) -> Array:
    """An accumulator rounded to the float32 phase."""
    if isinstance(acc, tuple):
        return acc[0] + acc[1]  # hi is already fl(hi + lo); this is the same value
    return acc.astype(jnp.float32)


def merge_excitation(params: dict, phase: Array, f0: Array, uniform: Array, cfg: HiftConfig) -> Array:
    """Sines of the frame phase, voicing, noise and ``l_linear`` + tanh: the merged source [B, T * S].

    Args:
      params: ``{"l_linear": ...}``.
      phase: [B, T, H] float32 running sum of rad (cycles / S) per frame.
      f0: [B, T] float32 f0 (the voiced/unvoiced decision).
      uniform: [T * S, H] or [B, T * S, H] noise of these samples.
      cfg: hift config.

    ``* 2``, ``* float32(pi)``, ``* S`` are each rounded to float32 as torch does (it casts Python
    scalars to the tensor's dtype): the barrier stops XLA from folding 2 * pi * S into one constant
    (folding 2 with pi is exact, so only the S multiply needs it).  Nearest upsampling by S repeats
    each frame's sine S times.
    """
    scale = cfg.upsample_scale
    phase = jax.lax.optimization_barrier(phase * jnp.float32(2.0) * jnp.float32(np.pi)) * jnp.float32(scale)
    sines = jnp.repeat(jnp.sin(phase) * jnp.float32(cfg.nsf_alpha), scale, axis=1)  # [B, T*S, H]
    f0_up = jnp.repeat(f0, scale, axis=1)[..., None]  # [B, T*S, 1]
    uv = (f0_up > cfg.nsf_voiced_threshold).astype(jnp.float32)
    noise_amp = uv * jnp.float32(cfg.nsf_sigma) + (1 - uv) * jnp.float32(cfg.nsf_alpha / 3)
    excitation = sines * uv + noise_amp * uniform.astype(jnp.float32)
    lin = params["l_linear"]
    merged = jnp.einsum("blh,ho->blo", excitation, jnp.asarray(lin["kernel"], jnp.float32), precision=HIGHEST)
    return jnp.tanh(merged + jnp.asarray(lin["bias"], jnp.float32))[..., 0]


def checked_buffers(noise: HiftNoise, cfg: HiftConfig) -> tuple[np.ndarray, np.ndarray]:
    """Validate injected noise buffers; returns (rand_ini [H], uniform [L, H]) as float32 numpy.

    Raises ValueError naming the problem (wrong width, empty, NaN/inf) before any device call.
    """
    width = cfg.num_harmonic_channels
    rand_ini = np.asarray(noise.rand_ini, np.float32).reshape(-1)
    uniform = np.asarray(noise.uniform, np.float32)
    if uniform.ndim == 3 and uniform.shape[0] == 1:
        uniform = uniform[0]
    if rand_ini.shape != (width,):
        raise ValueError(f"noise.rand_ini: expected {width} values (nb_harmonics + 1), found {rand_ini.size}")
    if uniform.ndim != 2 or uniform.shape[1] != width or uniform.shape[0] == 0:
        raise ValueError(f"noise.uniform: expected [samples > 0, {width}], found shape {uniform.shape}")
    if not (np.isfinite(uniform).all() and np.isfinite(rand_ini).all()):
        raise ValueError("noise: contains NaN or inf")
    return rand_ini, uniform
