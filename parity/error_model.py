"""Parity tolerances from an error model: float32 rounding, propagated by the model's own Jacobian.

A tolerance fitted to the errors seen on a few cases fails on cases at other dims (a wider HiFT, a
deeper DiT, longer sequences) and on another machine's kernels, because float32 error scales with
the signal and with how a network amplifies it (a mel error moves the HiFT f0, whose NSF phase
integrates over every sample; conv_post's log-magnitude goes through ``exp``).  So no float
tolerance of the harness is a number: each is computed, per case and per compared array, as

    tolerance = KAPPA * sigma,     sigma = max over probes of max |f(probe) - f(base)|

where ``f`` is our own stage on the case's inputs and a probe is the same computation with **every
float32 parameter moved by one ulp** (a random direction per entry; ``ulp_perturb``).

Why that measures float32 rounding.  Backward error analysis: a float32 dot product
``sum_i a_i b_i`` returns ``sum_i a_i b_i (1 + theta_i)`` with |theta_i| a few units of roundoff,
so a float32 evaluation of a layer is an exact evaluation with its weights perturbed at the ulp
level.  Ours and upstream are two float32 evaluations with different summation orders, i.e. two
different ulp-level perturbations of the same weights; a probe is a third one.  Pushing it through
the model measures, with the model's own Jacobian, how far a rounding-sized difference moves each
output (including every amplification: exp, the phase integral, 10 chained Euler steps with CFG),
at the case's dims and lengths.  Nothing in it is fitted to an observed error.

What is not a float32 weight is handled where it arises:

- Parts both sides compute in float64 (the HiFT f0 predictor) round at 2^-53 and are not perturbed
  (``skip``); their outputs are compared to one float32 ulp of their rounding (``ulp_floor``).
- Float32 *constants* computed by a formula round like weights.  torch's float32 ``exp`` is not
  correctly rounded (1 ulp in ~1/128 entries of the DiT timestep frequencies, multiplied by
  1000 t), so the DiT-alone group also moves its timestep input by one ulp in a probe: for
  ``1000 t f`` that is the same relative change as moving every frequency by one ulp.  Paths that
  run the whole solver (the flow's mel, the end-to-end requests) move the frequencies themselves by
  one ulp in each probe (``rounded_constants``).  That error is not like a weight's: the timestep
  embedding is added to every frame, so it shifts the whole mel coherently, the HiFT f0 follows, and
  the NSF phase sums the shift over every sample instead of averaging it out.  Measured on a random
  config (seed 106 of tests/test_random_configs.py): one-ulp weight probes moved the end-to-end
  audio by 1.2e-5, frequency probes by 3.3e-5, and upstream differed from us by 1.1e-4.
- Exact quantities (copies, ids, lengths, flags, masks) are compared exactly, not through this.

KAPPA.  ``|ours - ref|`` is the difference of two independent rounding patterns, sqrt(2) times the
size of one; a probe measures one.  Over up to ~1e6 compared entries the largest of a Gaussian
difference lies within 5 standard deviations (P(|N(0,1)| > 5) = 6e-7): 5 * sqrt(2) ~ 7, rounded
up to KAPPA = 8.  ``PROBES`` = 2 draws per array make sigma a maximum over two patterns.  The
result is never below ``ulp_floor`` (2 ulp of the array's largest value), so an output that no
weight reaches (sigma = 0) still allows its own rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: one float32 ulp at 1.0
KAPPA = 8.0
PROBES = 2


def ulp_floor(ref: Any, ulps: float = 2.0) -> float:
    """``ulps`` float32 ulps of the largest finite ``|ref|``: the smallest tolerance a float array gets."""
    ref = np.asarray(ref, np.float64)
    finite = ref[np.isfinite(ref)]
    return ulps * EPS32 * (float(np.max(np.abs(finite))) if finite.size else 0.0)


def ulp_perturb(tree: Any, seed: int, skip: Callable[[str], bool] = lambda path: False) -> Any:
    """Every float32 leaf of ``tree`` moved by one ulp, up or down at random per entry.

    ``skip(path)`` (a "/"-joined key path) leaves a leaf unchanged; other dtypes are left as they are.
    """
    rng = np.random.default_rng(seed)

    def move(path, leaf):
        arr = np.asarray(leaf)
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if arr.dtype != np.float32 or skip(name):
            return leaf
        up = rng.integers(0, 2, arr.shape, dtype=np.int8).astype(bool)
        return np.where(up, np.nextafter(arr, np.float32(np.inf)), np.nextafter(arr, np.float32(-np.inf)))

    return jax.tree_util.tree_map_with_path(move, tree)


def perturb_model(model: Any, seed: int, skip: Callable[[str], bool] = lambda path: False) -> Any:
    """A ``ConvertedModel`` whose params are ``ulp_perturb``-ed (paths start with the stage name)."""
    return dataclasses.replace(model, params=ulp_perturb(model.params, seed, skip))


@contextlib.contextmanager
def rounded_constants(seed: int | None) -> Iterator[None]:
    """Inside the block, the DiT's timestep frequencies (a float32 ``exp`` that torch rounds its own
    way) are moved by one ulp per entry (random direction, ``seed``); ``None`` leaves them as they are.

    The frequencies are a constant of the traced programs, so jax's caches are cleared on the way in
    and out: the programs compiled inside see the moved frequencies and none of them outlives the block.
    """
    if seed is None:
        yield
        return
    from cosyjax.flow import dit

    exact = dit.timestep_frequencies

    def moved(freq_dim: int) -> np.ndarray:
        return np.asarray(ulp_perturb({"f": exact(freq_dim)}, 20_000 + seed)["f"], np.float32)

    jax.clear_caches()
    dit.timestep_frequencies = moved
    try:
        yield
    finally:
        dit.timestep_frequencies = exact
        jax.clear_caches()


def probe_sigmas(compute: Callable[[Any, int | None], Mapping[str, np.ndarray]], model: Any, *,
                 skip: Callable[[str], bool] = lambda path: False, probes: int = PROBES,
                 constants: bool = False) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Run ``compute(model, None)`` and ``probes`` perturbed runs ``compute(perturbed, seed)``.

    ``compute`` returns our outputs by name; given a seed it may also perturb float inputs that
    stand for rounded constants (see the module docstring).  ``constants``: the probes also move the
    DiT's timestep frequencies (``rounded_constants``; for computations that run the flow solver).
    Returns (base outputs, sigma per float output: the largest |probe - base| over the finite
    entries and probes).
    """
    base = {k: np.asarray(v) for k, v in compute(model, None).items()}
    sigma = {k: 0.0 for k, v in base.items() if np.issubdtype(v.dtype, np.floating)}
    for seed in range(1, probes + 1):
        with rounded_constants(seed if constants else None):
            out = compute(perturb_model(model, seed, skip), seed)
        for k in sigma:
            moved = np.asarray(out[k], np.float64)
            if moved.shape != base[k].shape:
                raise ValueError(f"{k}: a perturbed run gave shape {moved.shape}, the base run {base[k].shape}")
            with np.errstate(invalid="ignore"):  # -inf - -inf where both mask an entry
                diff = np.where(moved == base[k], 0.0, np.abs(moved - base[k]))
            finite = np.isfinite(diff)
            sigma[k] = max(sigma[k], float(diff[finite].max()) if finite.any() else 0.0)
    return base, sigma


def probe_tolerance(fn: Callable[[Any], Any], params: Any, *, skip: Callable[[str], bool] = lambda path: False,
                    probes: int = PROBES) -> float:
    """``tolerance`` for comparing two float32 evaluations of ``fn(params)`` (e.g. streamed vs offline).

    ``fn`` maps a params tree to an array; the probes move every float32 leaf of ``params`` by one ulp.
    """
    base = np.asarray(fn(params), np.float64)
    sigma = max(float(np.max(np.abs(np.asarray(fn(ulp_perturb(params, seed, skip)), np.float64) - base), initial=0.0))
                for seed in range(1, probes + 1))
    return tolerance(sigma, base)


def tolerance(sigma: float, ref: Any) -> float:
    """``max(KAPPA * sigma, ulp_floor(ref))``."""
    return max(KAPPA * sigma, ulp_floor(ref))


def describe(sigma: float, ref: Any) -> str:
    """How a tolerance was made, for the report."""
    floor = ulp_floor(ref)
    if KAPPA * sigma >= floor:
        return f"KAPPA={KAPPA:g} x sigma={sigma:.3g} (one-ulp weight probes, error_model)"
    return f"2 ulp of max|ref| = {floor:.3g} (probes moved it by {sigma:.3g})"


def perturb_input(x: np.ndarray, seed: int | None) -> np.ndarray:
    """``x`` moved by one float32 ulp per entry (random direction) for a probe, unchanged for the base run."""
    x = np.asarray(x, np.float32)
    if seed is None:
        return x
    return ulp_perturb(x, 10_000 + seed)


def logit_tie_margin(tau: float) -> float:
    """Two logits within ``2 tau`` may swap order when each is off by up to ``tau``."""
    return 2.0 * tau


def kl_bound(tau: float) -> float:
    """Largest KL(p || q) between softmax(z) and softmax(z + d) with |d_i| <= tau.

    log(q_i / p_i) = d_i - (LSE(z + d) - LSE(z)) lies in [-2 tau, 2 tau]; with r = q / p,
    E_p[r] = 1 and -log r <= (1 - r) + (1 - r)^2 e^{4 tau} / 2 on that range, so
    KL = E_p[-log r] <= e^{4 tau} (e^{2 tau} - 1)^2 / 2  (~ 2 tau^2).
    """
    return float(np.exp(4 * tau) * np.expm1(2 * tau) ** 2 / 2)


__all__ = ["EPS32", "KAPPA", "PROBES", "describe", "kl_bound", "logit_tie_margin", "perturb_input",
           "perturb_model", "probe_sigmas", "probe_tolerance", "rounded_constants", "tolerance", "ulp_floor",
           "ulp_perturb"]
