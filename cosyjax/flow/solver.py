"""Euler ODE solver with classifier-free guidance (cosyvoice/flow/flow_matching.py::ConditionalCFM.solve_euler).

The step count is static and the loop is a ``lax.scan`` inside the caller's jit.  CFG runs as one
doubled batch: rows [0, B) are conditioned, rows [B, 2B) see mu, spks and cond zeroed (upstream's
batch of 2 for B = 1), and v = (1 + rate) * v_cond - rate * v_uncond.

Legend: B batch, T frames, C mel bins.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# estimate(x, mu, t, spks, cond, lengths) -> velocity; x, mu, cond [2B, T, C], t [2B], spks [2B, C]
Estimator = Callable[[Array, Array, Array, Array, Array, Array], Array]


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


def solve_euler_cfg(estimate: Estimator, x0: Array, mu: Array, spks: Array, cond: Array, lengths: Array, *,
                    n_timesteps: int, cfg_rate: float, trajectory: bool = False) -> tuple[Array, Array | None]:
    """Integrate dx/dt = v(x, t) from the noise ``x0`` with CFG; call inside jit.

    Args:
      estimate: the velocity estimator (see ``Estimator``).
      x0: initial noise [B, T, C].
      mu, cond: [B, T, C]; spks: [B, C_spk]; lengths: valid frames [B].
      n_timesteps: Euler steps (static).
      cfg_rate: inference_cfg_rate.
      trajectory: also return the x fed to the estimator at every step.

    Returns:
      (x after the last step [B, T, C], the per-step inputs [n, B, T, C] or None).
    """
    batch = x0.shape[0]
    ts, dts = cosine_t_schedule(n_timesteps)
    mu2 = jnp.concatenate([mu, jnp.zeros_like(mu)], axis=0)  # [2B, T, C]
    spks2 = jnp.concatenate([spks, jnp.zeros_like(spks)], axis=0)  # [2B, C_spk]
    cond2 = jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0)  # [2B, T, C]
    lengths2 = jnp.concatenate([lengths, lengths], axis=0)
    # torch multiplies by the python floats 1.0 + rate and rate rounded to float32.
    w_cond, w_uncond = np.float32(1.0 + cfg_rate), np.float32(cfg_rate)

    def step(x, t_dt):
        t, dt = t_dt
        x2 = jnp.concatenate([x, x], axis=0)  # [2B, T, C]
        v = estimate(x2, mu2, jnp.full((2 * batch,), t, x.dtype), spks2, cond2, lengths2)
        v = w_cond * v[:batch] - w_uncond * v[batch:]
        return x + dt * v, (x if trajectory else None)

    x, xs = jax.lax.scan(step, x0, (jnp.asarray(ts), jnp.asarray(dts)))
    return x, xs
