"""Array comparisons that say where and by how much two results differ."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Comparison:
    """Result of comparing one of our outputs with the reference's.

    ``max_abs`` is max |ours - ref|; ``index`` is where it happens with both values there;
    ``rel`` is max_abs / max |ref|; ``snr_db`` = 10 log10(sum ref^2 / sum (ours-ref)^2) for audio.
    A comparison passes when max_abs <= atol (and snr_db >= snr_min where given, and shapes agree).
    ``model`` says where the tolerance comes from (``cosyjax.parity.error_model``).
    """

    key: str
    passed: bool
    atol: float | None = None
    max_abs: float | None = None
    rel: float | None = None
    index: list[int] | None = None
    ours_at: float | None = None
    ref_at: float | None = None
    snr_db: float | None = None
    snr_min: float | None = None
    shape: list[int] | None = None
    message: str = ""
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def snr_db(ours: np.ndarray, ref: np.ndarray) -> float:
    err = float(np.sum((np.asarray(ours, np.float64) - np.asarray(ref, np.float64)) ** 2))
    sig = float(np.sum(np.asarray(ref, np.float64) ** 2))
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 10.0 * np.log10(sig / err)


def compare_close(key: str, ours: Any, ref: Any, atol: float, *, snr_min: float | None = None,
                  model: str = "") -> Comparison:
    """Float comparison with an absolute tolerance (and an SNR floor for audio); ``model`` names its origin."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    if ours.shape != ref.shape:
        return Comparison(key, False, atol=atol, shape=list(ref.shape), snr_min=snr_min,
                          message=f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    if ref.size == 0:
        return Comparison(key, True, atol=atol, max_abs=0.0, rel=0.0, shape=list(ref.shape))
    o = ours.astype(np.float64)
    r = ref.astype(np.float64)
    nonfinite = ~np.isfinite(o) & ~(o == r)  # an infinity where the reference has the same one is a match
    if nonfinite.any():
        idx = [int(i) for i in np.unravel_index(int(np.argmax(nonfinite)), o.shape)]
        return Comparison(key, False, atol=atol, index=idx, ours_at=float(o[tuple(idx)]),
                          ref_at=float(r[tuple(idx)]), shape=list(ref.shape), snr_min=snr_min,
                          message="non-finite value in our output")
    diff = np.abs(o - r)
    diff = np.where(np.isfinite(r), diff, np.where(o == r, 0.0, np.inf))
    flat = int(np.argmax(diff))
    idx = [int(i) for i in np.unravel_index(flat, diff.shape)]
    max_abs = float(diff.reshape(-1)[flat])
    scale = float(np.max(np.abs(r[np.isfinite(r)]))) if np.isfinite(r).any() else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    snr = snr_db(o[np.isfinite(r)], r[np.isfinite(r)]) if snr_min is not None else None
    passed = max_abs <= atol and (snr_min is None or snr >= snr_min)
    return Comparison(key, bool(passed), atol=atol, max_abs=max_abs, rel=rel, index=idx,
                      ours_at=float(o[tuple(idx)]), ref_at=float(r[tuple(idx)]), snr_db=snr,
                      snr_min=snr_min, shape=list(ref.shape), model=model)


def compare_probed(key: str, ours: Any, ref: Any, sigma: float, *, snr_min: float | None = None) -> Comparison:
    """``compare_close`` with the error-model tolerance ``KAPPA * sigma`` (``cosyjax.parity.error_model``)."""
    from cosyjax.parity import error_model as em

    return compare_close(key, ours, ref, em.tolerance(sigma, ref), snr_min=snr_min, model=em.describe(sigma, ref))


def compare_equal(key: str, ours: Any, ref: Any) -> Comparison:
    """Exact comparison (token ids, flags); reports the first differing index."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    if ours.shape != ref.shape:
        return Comparison(key, False, atol=0.0, shape=list(ref.shape),
                          message=f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    ne = ours != ref
    if not ne.any():
        return Comparison(key, True, atol=0.0, max_abs=0.0, rel=0.0, shape=list(ref.shape))
    idx = [int(i) for i in np.unravel_index(int(np.argmax(ne)), ne.shape)]
    return Comparison(key, False, atol=0.0, index=idx, ours_at=float(ours[tuple(idx)]),
                      ref_at=float(ref[tuple(idx)]), shape=list(ref.shape),
                      message=f"{int(ne.sum())} of {ne.size} entries differ")


def format_comparison(c: Comparison) -> str:
    """One line: key, verdict, max error with index and both values."""
    parts = [f"{c.key}: {'ok' if c.passed else 'FAIL'}"]
    if c.max_abs is not None:
        parts.append(f"max_abs={c.max_abs:.3g} (tol {c.atol:.3g})")
    if c.index is not None and c.ours_at is not None:
        parts.append(f"at {tuple(c.index)} ours={c.ours_at:.7g} ref={c.ref_at:.7g}")
    if c.snr_db is not None:
        parts.append(f"snr={c.snr_db:.1f} dB (min {c.snr_min})")
    if c.message:
        parts.append(c.message)
    if not c.passed and c.model:
        parts.append(f"[{c.model}]")
    return " ".join(parts)
