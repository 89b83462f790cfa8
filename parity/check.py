"""``cosyjax parity check``: convert a case's model with our converter, run each stage, compare.

Writes, atomically, into the report directory:
  report.json   per group and per stage: status (pass / fail / not-implemented / error), max abs err,
                rel err, SNR where audio, tolerance, dtype, backend, and every comparison
  report.html   the same as a page, with PNG plots (overlays and error curves)
  outputs.npz   our outputs under the same keys as the reference's
A selected group without an implementation is ``not-implemented`` and fails the check.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
import traceback
from typing import Any, Iterable

import numpy as np

from cosyjax.atomic import publish_dir
from cosyjax.parity.case import Case, load_case
from cosyjax.parity.stages import STAGES, GroupResult, release_free_groups, runners, stage_of

PASS, FAIL, NOT_IMPLEMENTED, ERROR = "pass", "fail", "not-implemented", "error"


class CheckError(ValueError):
    """Bad arguments to ``check`` (unknown stage, existing output directory, ...)."""


def select_groups(case: Case, stages: Iterable[str] | None) -> list[str]:
    """Groups of ``case`` selected by stage names (``llm``) or group names (``llm_greedy``)."""
    groups = case.groups
    if stages is None:
        return groups
    wanted = [s.strip() for s in stages if s.strip()]
    known = set(STAGES) | set(groups)
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise CheckError(f"unknown stage(s) {', '.join(unknown)}; this case has stages "
                         f"{', '.join(sorted({stage_of(g) for g in groups}))} and groups {', '.join(groups)}")
    return [g for g in groups if g in wanted or stage_of(g) in wanted]


def _group_entry(group: str, status: str, result: GroupResult | None, message: str, dtype: str,
                 backend: str, seconds: float) -> dict[str, Any]:
    comps = [c.to_dict() for c in result.comparisons] if result else []
    worst = max((c for c in comps if c["max_abs"] is not None), key=lambda c: c["rel"] or 0.0, default=None)
    snrs = [c["snr_db"] for c in comps if c["snr_db"] is not None]
    return {
        "group": group,
        "stage": stage_of(group),
        "status": status,
        "message": message,
        "dtype": dtype,
        "backend": backend,
        "seconds": round(seconds, 3),
        "max_abs_err": max((c["max_abs"] for c in comps if c["max_abs"] is not None), default=None),
        "max_rel_err": max((c["rel"] for c in comps if c["rel"] is not None), default=None),
        "min_snr_db": min(snrs) if snrs else None,
        "worst": worst["key"] if worst else None,
        "comparisons": comps,
    }


def _stage_rollup(groups: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in groups:
        s = out.setdefault(g["stage"], {"status": PASS, "groups": [], "max_abs_err": None, "min_snr_db": None})
        s["groups"].append(g["group"])
        if g["status"] != PASS:
            s["status"] = g["status"] if s["status"] == PASS else s["status"]
        for key, pick in (("max_abs_err", max), ("min_snr_db", min)):
            if g[key] is not None:
                s[key] = g[key] if s[key] is None else pick(s[key], g[key])
    return out


def run_check(case_dir: str, out_dir: str, *, stages: Iterable[str] | None = None, dtype: str = "float32",
              overwrite: bool = False, progress: bool = True, plots: bool = True) -> dict[str, Any]:
    """Run the parity check of one case; returns the report dict (also written to ``out_dir``).

    Args:
      case_dir: a case directory in the shared/golden/FORMAT.md layout.
      out_dir: report directory; refused if it exists unless ``overwrite``.
      stages: stage or group names to check (default: every group the case holds).
      dtype: conversion dtype ("float32" for parity; "bfloat16" reports bf16 error).
    """
    import jax

    from cosyjax.checkpoint import load_converted
    from cosyjax.convert import convert_to_dir

    if os.path.exists(out_dir) and not overwrite:
        raise CheckError(f"{out_dir}: output exists (pass --overwrite to replace it)")
    case = load_case(case_dir)
    selected = select_groups(case, stages)
    backend = jax.default_backend()
    available = runners()
    scratch = tempfile.mkdtemp(prefix="cosyjax-check-")
    try:
        model = None
        if set(selected) - release_free_groups():
            converted_dir = convert_to_dir(case.model_dir, os.path.join(scratch, "converted"), dtype=dtype,
                                           progress=progress)
            model = load_converted(converted_dir)
        group_entries, outputs, plot_specs = [], {}, []
        for group in selected:
            start = time.perf_counter()
            runner = available.get(group)
            if runner is None:
                entry = _group_entry(group, NOT_IMPLEMENTED, None, "no cosyjax runner for this group yet",
                                     dtype, backend, 0.0)
            else:
                try:
                    result = runner(case, group, model)
                except Exception as e:  # a crash is a failure with its reason, not an abort
                    tb = traceback.format_exc(limit=3)
                    entry = _group_entry(group, ERROR, None, f"{type(e).__name__}: {e}\n{tb}", dtype, backend,
                                         time.perf_counter() - start)
                else:
                    ok = bool(result.comparisons) and all(c.passed for c in result.comparisons)
                    entry = _group_entry(group, PASS if ok else FAIL, result,
                                         "; ".join(result.notes) if result.comparisons else "runner compared nothing",
                                         dtype, backend, time.perf_counter() - start)
                    outputs.update(result.outputs)
                    plot_specs.extend(result.plots)
            group_entries.append(entry)
            if progress:
                print(f"[parity] {group:22s} {entry['status']:16s} max_abs={entry['max_abs_err']}")
        report = {
            "case": case.path,
            "case_meta": {k: case.meta.get(k) for k in ("config_name", "seed", "upstream_commit")},
            "dtype": dtype,
            "backend": backend,
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
            "python": platform.python_version(),
            "selected": selected,
            "passed": bool(group_entries) and all(g["status"] == PASS for g in group_entries),
            "stages": _stage_rollup(group_entries),
            "groups": group_entries,
        }
        staging = os.path.join(scratch, "report")
        os.makedirs(staging)
        np.savez(os.path.join(staging, "outputs.npz"), **outputs)
        with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=float)
        from cosyjax.parity.report import write_html

        write_html(staging, report, case, outputs, plot_specs if plots else [])
        publish_dir(staging, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report
