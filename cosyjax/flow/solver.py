"""Euler ODE solver with classifier-free guidance (cosyvoice/flow/flow_matching.py::ConditionalCFM.solve_euler).

The step count is static and the loop is a ``lax.scan`` inside the caller's jit.  CFG runs as one
doubled batch: rows [0, B) are conditioned, rows [B, 2B) see mu, spks and cond zeroed (upstream's
batch of 2 for B = 1), and v = (1 + rate) * v_cond - rate * v_uncond.

Legend: B batch, T frames, C mel bins.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# velocity(x2, t2, step_in) -> (v2, step_out); x2 [2B, T, C], t2 [2B]
Velocity = Callable[[Array, Array, Any], tuple[Array, Any]]


def _torch_linspace_f32(steps: int) -> np.ndarray:
    """``torch.linspace(0, 1, steps)`` in float32: start + i*step below halfway, end - (n-1-i)*step above."""
    step = np.float32(1.0) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.int64)
    low = step * i.astype(np.float32)
    high = np.float32(1.0) - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def cosine_t_schedule(n_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (t, dt) of upstream's Euler loop, float32 [n] each.

    t_span = 1 - cos(linspace(0, 1, n+1) * 0.5 * pi) in float32; then upstream does
    ``t = t_span[0]; dt = t_span[1] - t_span[0]`` and, after each step, ``t = t + dt;
    dt = t_span[k+1] - t``, all in float32, which we replay exactly.  The cosine is the float64
    cosine rounded to float32; for n = 10 (what CausalMaskedDiffWithDiT.inference passes) it gives
    torch's float32 bits exactly (tests/test_flow.py checks it against torch).
    """
    if n_timesteps < 1:
        raise ValueError(f"n_timesteps={n_timesteps} must be >= 1")
    lin = _torch_linspace_f32(n_timesteps + 1)
    arg = (lin * np.float32(0.5) * np.float32(np.pi)).astype(np.float32)
    t_span = (np.float32(1.0) - np.cos(arg.astype(np.float64)).astype(np.float32)).astype(np.float32)
    ts, dts = [], []
    t, dt = t_span[0], np.float32(t_span[1] - t_span[0])
    for step in range(1, n_timesteps + 1):
        ts.append(t)
        dts.append(dt)
        t = np.float32(t + dt)
        if step < n_timesteps:
            dt = np.float32(t_span[step + 1] - t)
    return np.asarray(ts, np.float32), np.asarray(dts, np.float32)


def cfg_batch(mu: Array, spks: Array, cond: Array) -> tuple[Array, Array, Array]:
    """The doubled CFG batch of the conditioning: rows [0, B) as given, rows [B, 2B) zeroed."""
    return tuple(jnp.concatenate([a, jnp.zeros_like(a)], axis=0) for a in (mu, spks, cond))


def solve_euler_cfg(velocity: Velocity, x0: Array, *, n_timesteps: int, cfg_rate: float, per_step: Any = None,
                    trajectory: bool = False) -> tuple[Array, Any, Array | None]:
    """Upstream's 10-step Euler loop with CFG, as one ``lax.scan`` (the offline and the streaming flow
    both run this).

    Args:
      velocity: ``velocity(x2, t2, step_in) -> (v2, step_out)``: the estimator on the doubled batch
        x2 [2B, T, C] at times t2 [2B] (rows [B, 2B) unconditioned, see ``cfg_batch``), given this
        step's slice of ``per_step`` (None without it); ``step_out`` is collected per step (e.g. the
        streaming K/V cache entries) or None.
      x0: initial noise [B, T, C] (float32: the Euler state stays float32 under every policy).
      n_timesteps: Euler steps (static).  cfg_rate: inference_cfg_rate.
      per_step: a pytree whose leaves have a leading [n_timesteps] axis, scanned with the steps.
      trajectory: also return the x fed to the estimator at every step.

    Returns:
      (x after the last step [B, T, C], the stacked step outputs, the per-step inputs [n, B, T, C] or None).
    """
    batch = x0.shape[0]
    ts, dts = cosine_t_schedule(n_timesteps)
    # torch multiplies by the python floats 1.0 + rate and rate rounded to float32.
    w_cond, w_uncond = np.float32(1.0 + cfg_rate), np.float32(cfg_rate)

    def step(x, inputs):
        t, dt, step_in = inputs
        x2 = jnp.concatenate([x, x], axis=0)  # [2B, T, C]
        v, step_out = velocity(x2, jnp.full((2 * batch,), t, jnp.float32), step_in)
        v = v.astype(jnp.float32)
        v = w_cond * v[:batch] - w_uncond * v[batch:]
        return x + dt * v, (step_out, x if trajectory else None)

    x, (outs, xs) = jax.lax.scan(step, x0.astype(jnp.float32), (jnp.asarray(ts), jnp.asarray(dts), per_step))
    return x, outs, xs
