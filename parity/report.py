"""HTML report with matplotlib plots for a parity check."""

from __future__ import annotations

import html
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from cosyjax.parity.case import Case

_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "error": "#cf222e", "not-implemented": "#9a6700"}


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}"
    return html.escape(str(x))


def _plot(path: str, title: str, ours: np.ndarray, ref: np.ndarray) -> bool:
    """Overlay (1-D) or side-by-side images (2-D) plus the absolute error; False if not plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = np.squeeze(np.asarray(ours, np.float64))
    r = np.squeeze(np.asarray(ref, np.float64))
    if o.shape != r.shape or o.size == 0:
        return False
    while o.ndim > 2:  # plot the first item of leading axes (batch, step, ...)
        o, r = o[0], r[0]
    err = np.abs(o - r)
    if o.ndim == 1:
        fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
        axes[0].plot(r, label="reference", lw=0.8)
        axes[0].plot(o, label="cosyjax", lw=0.8, ls="--")
        axes[0].legend(loc="upper right")
        axes[1].semilogy(np.maximum(err, 1e-12), lw=0.6, color="tab:red")
        axes[1].set_ylabel("|error|")
    else:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        vmin, vmax = float(r.min()), float(r.max())
        for ax, data, name in ((axes[0], r, "reference"), (axes[1], o, "cosyjax")):
            im = ax.imshow(data, aspect="auto", origin="lower", vmin=vmin, vmax=vmax)
            ax.set_title(name)
        fig.colorbar(im, ax=axes[:2].tolist())
        im = axes[2].imshow(err, aspect="auto", origin="lower", cmap="magma")
        axes[2].set_title("|error|")
        fig.colorbar(im, ax=axes[2])
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_html(out_dir: str, report: Mapping[str, Any], case: Case, outputs: Mapping[str, np.ndarray],
               plots: Sequence[tuple[str, str]]) -> None:
    """Write report.html (and plot PNGs) into ``out_dir``."""
    images = []
    for title, key in plots:
        if key in outputs and key in case.arrays:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"
            if _plot(os.path.join(out_dir, name), f"{title} ({key})", outputs[key], case.arrays[key]):
                images.append((title, key, name))
    rows = []
    for g in report["groups"]:
        color = _COLORS.get(g["status"], "#000")
        rows.append(
            f"<tr><td>{_fmt(g['group'])}</td><td style='color:{color};font-weight:bold'>{_fmt(g['status'])}</td>"
            f"<td>{_fmt(g['max_abs_err'])}</td><td>{_fmt(g['max_rel_err'])}</td><td>{_fmt(g['min_snr_db'])}</td>"
            f"<td>{_fmt(g['worst'])}</td><td>{_fmt(g['seconds'])}</td></tr>")
    details = []
    for g in report["groups"]:
        lines = []
        for c in g["comparisons"]:
            color = _COLORS["pass" if c["passed"] else "fail"]
            where = f"{tuple(c['index'])}: ours {_fmt(c['ours_at'])}, ref {_fmt(c['ref_at'])}" if c["index"] else ""
            lines.append(
                f"<tr><td>{_fmt(c['key'])}</td><td style='color:{color}'>{'ok' if c['passed'] else 'FAIL'}</td>"
                f"<td>{_fmt(c['max_abs'])}</td><td>{_fmt(c['atol'])}</td><td>{_fmt(c['rel'])}</td>"
                f"<td>{_fmt(c['snr_db'])}</td><td>{_fmt(c['snr_min'])}</td><td>{html.escape(where)}</td>"
                f"<td>{_fmt(c['message'])}</td></tr>")
        msg = f"<pre>{html.escape(g['message'])}</pre>" if g["message"] else ""
        details.append(
            f"<h3>{_fmt(g['group'])}</h3>{msg}<table><tr><th>key</th><th></th><th>max abs</th><th>tol</th>"
            f"<th>rel</th><th>SNR dB</th><th>min SNR</th><th>worst index</th><th>note</th></tr>"
            + "".join(lines) + "</table>")
    figs = "".join(f"<figure><img src='{n}' alt='{html.escape(k)}'><figcaption>{html.escape(t)} – "
                   f"{html.escape(k)}</figcaption></figure>" for t, k, n in images)
    verdict = "PASSED" if report["passed"] else "FAILED"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cosyjax parity: {html.escape(verdict)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>cosyjax parity check: {html.escape(verdict)}</h1>
<p>case <code>{html.escape(str(report['case']))}</code> · dtype {html.escape(report['dtype'])} ·
backend {html.escape(report['backend'])} · jax {html.escape(report['jax'])}</p>
<table><tr><th>group</th><th>status</th><th>max abs err</th><th>max rel err</th><th>min SNR dB</th>
<th>worst key</th><th>seconds</th></tr>{''.join(rows)}</table>
{''.join(details)}<h2>Plots</h2>{figs or '<p>none</p>'}</body></html>"""
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
