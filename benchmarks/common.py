"""Shared pieces of the benchmark entry: compile and memory probes, machine facts, rows and the table.

A *row* is a plain dict (JSON-ready) with these keys (``None`` where a value does not apply)::

    stage, name, workload, unit, batch
    dtype                  the cosyjax precision policy the row ran ("float32" or "bfloat16"; see
                           ``--dtypes``); a bf16 row's name ends in ", bf16" (``dtype_name``)
    cosyjax                timed value (best of the timed repeats) in ``unit``
    cosyjax_warmup_s       wall time of the warm-up call(s) that preceded the timed ones
    cosyjax_compile_s      JAX trace + lower + compile seconds spent in that warm-up (jax.monitoring)
    cosyjax_timed_compiles compilations seen *during* the timed calls (0 = warm-up fully excluded): executables
                           built, persistent-cache loads included (``cosyjax.programs.CompileCounter``)
    cosyjax_timed_compile_s their seconds (a ``warnings`` entry when > 1% of the timed wall time)
    upstream               the same workload through upstream's PyTorch modules, same weights
    upstream_device        where the PyTorch side ran ("cpu" / "cuda")
    ratio                  cosyjax / upstream (< 1: cosyjax is faster)
    agreement, max_diff    how the two outputs compare, where they are comparable (a bf16 row against
                           upstream's float32 output, computed as for the float32 row)
    error                  set when the row failed (a non-finite output): the run then exits 1
    memory                 {"cosyjax": {...}, "upstream": {...}} from ``MemoryProbe``
    extra                  stage-specific details (ms/step, RTF, token counts, ...); every row that ran
                           under a policy has ``precision`` (the stage's compute dtype, attention path,
                           f0_float64) and ``params_dtype`` (the float dtypes of the params it ran on), a
                           bf16 row ``vs_float32`` (its output against the float32 row's)
    warnings               list of strings (shown with a ⚠ in the table)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "cosyjax-benchmarks/1"


# --------------------------------------------------------------------------------------------
# Compile probe
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompileRecord:
    """JAX compilation events seen while the record was open (filled in when its block ends)."""

    seconds: float = 0.0  # trace + lower + backend compile
    compiles: int = 0  # executables built: backend compiles + persistent-cache loads (CompileCounter.count)


@contextlib.contextmanager
def compile_record() -> Iterator[CompileRecord]:
    """Collect JAX compile time and count while the block runs: ``cosyjax.programs.CompileCounter`` (the
    one definition of a compile, as the compile-count tests use), its ``count`` and ``total_seconds``."""
    from cosyjax.programs import CompileCounter

    rec = CompileRecord()
    with CompileCounter() as counter:
        try:
            yield rec
        finally:
            rec.seconds, rec.compiles = counter.total_seconds, counter.count


def wall(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds).  ``fn`` must return host values (np.asarray / block_until_ready inside)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Memory probe
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_host_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one side's run (warm-up and timed calls).

    Host: the process's peak RSS while the probe is open.  On Linux the kernel's high-water mark is
    reset at entry, so the peak belongs to this block ("host_peak_scope": "block"); otherwise it is
    ``ru_maxrss``, the process peak so far ("process").  Both sides' weights are resident in the
    process throughout, so ``host_peak_mb - host_start_mb`` (working memory of the block) is the
    number to compare between the sides.
    Device (GPU backends): JAX's ``peak_bytes_in_use`` (process peak so far: JAX has no reset) and
    torch's ``max_memory_allocated`` (reset at entry).
    """

    def __init__(self, torch_cuda: bool = False):
        self.torch_cuda = torch_cuda
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "MemoryProbe":
        self.scope = "block" if _reset_host_peak() else "process"
        self.start_kb = _status_kb("VmRSS")
        if self.torch_cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = _status_kb("VmHWM") if self.scope == "block" else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.scope = "process"
        res: dict[str, Any] = {"host_peak_mb": round(peak_kb / 1024, 1),
                               "host_start_mb": None if self.start_kb is None else round(self.start_kb / 1024, 1),
                               "host_peak_scope": self.scope}
        jax_dev = _jax_device_peak()
        if jax_dev is not None:
            res["jax_device_peak_mb"] = jax_dev
        if self.torch_cuda:
            import torch

            res["torch_device_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        self.result = res


def _jax_device_peak() -> float | None:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 20, 1)


@dataclasses.dataclass
class Measured:
    """One side of a row: warm-up, then ``repeats`` timed calls, under one MemoryProbe."""

    best: float
    times: list[float]
    warmup_s: float | None
    compile_s: float | None
    timed_compiles: int
    timed_compile_s: float
    memory: dict[str, Any]
    outputs: list[Any]  # one per timed call

    @property
    def output(self) -> Any:
        return self.outputs[-1]


def measure(fn: Callable[[], Any], repeats: int, *, warmup: Callable[[], Any] | None | bool = None,
            torch_cuda: bool = False) -> Measured:
    """Run ``warmup`` (default: ``fn`` itself; False: none), then ``fn`` ``repeats`` times.

    ``fn`` returns host values (so the device work is done when it returns).  ``best`` is the fastest
    timed call; ``compile_s`` counts JAX compile time inside the warm-up and ``timed_compiles`` the
    compilations inside the timed calls (should be 0).
    """
    with MemoryProbe(torch_cuda) as mem:
        warm_s = compile_s = None
        if warmup is not False:
            with compile_record() as rec:
                _, warm_s = wall(warmup or fn)
            compile_s = rec.seconds
        times, outputs = [], []
        with compile_record() as timed_rec:
            for _ in range(repeats):
                out, seconds = wall(fn)
                times.append(seconds)
                outputs.append(out)
    return Measured(min(times), times, warm_s, compile_s, timed_rec.compiles, timed_rec.seconds, mem.result, outputs)


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: str) -> dict[str, Any] | None:
    """{"commit", "dirty"} of a git checkout, None when it is not one."""
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken (CPU, cores, versions, device, date, commits)."""
    import jax

    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gb": _mem_total_gb(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers",
                                              "x-transformers")},
        "cosyjax_git": git_state(REPO),
    }
    return info


# --------------------------------------------------------------------------------------------
# Rows and the table
# --------------------------------------------------------------------------------------------
DTYPE_SUFFIX = {"float32": "", "bfloat16": ", bf16"}


def dtype_name(name: str, dtype: str) -> str:
    """A row's name under ``dtype``: "Flow" (float32, the rows' names before --dtypes) / "Flow, bf16"."""
    return name + DTYPE_SUFFIX[dtype]


def base_name(row: dict[str, Any]) -> str:
    """The row's name without its dtype suffix (what the float32 and bf16 rows of one workload share)."""
    suffix = DTYPE_SUFFIX.get(row.get("dtype") or "float32", "")
    return row["name"][:-len(suffix)] if suffix and row["name"].endswith(suffix) else row["name"]


def new_row(stage: str, name: str, workload: str, unit: str, batch: int | None = None,
            dtype: str = "float32") -> dict[str, Any]:
    """An empty row; ``name`` is the float32 name, a bf16 row gets ``dtype_name``'s suffix."""
    return {"stage": stage, "name": dtype_name(name, dtype), "workload": workload, "unit": unit, "batch": batch,
            "dtype": dtype, "cosyjax": None, "cosyjax_warmup_s": None, "cosyjax_compile_s": None, "cosyjax_timed_compiles": None,
            "cosyjax_timed_compile_s": None, "upstream": None, "upstream_device": None, "ratio": None,
            "agreement": None, "max_diff": None, "memory": {}, "extra": {}, "warnings": []}


def set_cosyjax(row: dict[str, Any], m: Measured, value: float) -> dict[str, Any]:
    """Fill the cosyjax fields of ``row`` from a measurement (``value`` in the row's unit).

    Compilations inside the timed calls are recorded; when they took more than 1% of the timed
    wall time the row gets a warning (the value then includes compile time).
    """
    row.update(cosyjax=value, cosyjax_warmup_s=m.warmup_s, cosyjax_compile_s=m.compile_s,
               cosyjax_timed_compiles=m.timed_compiles, cosyjax_timed_compile_s=m.timed_compile_s)
    row["memory"]["cosyjax"] = m.memory
    if m.timed_compile_s > 0.01 * sum(m.times):
        row.setdefault("warnings", []).append(
            f"{m.timed_compiles} compilation(s), {m.timed_compile_s:.2f} s, inside the timed calls")
    return row


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """Fill ``ratio`` from the two values."""
    if row["cosyjax"] is not None and row["upstream"]:
        row["ratio"] = row["cosyjax"] / row["upstream"]
    return row


# --------------------------------------------------------------------------------------------
# Precision: what a row ran under, and its output checks
# --------------------------------------------------------------------------------------------
def set_precision(row: dict[str, Any], policy: Any, stage: str | None, params: Any) -> dict[str, Any]:
    """Record the ``PrecisionPolicy`` a row ran under (``stage``: its stage's ``Precision``; None: the whole
    policy, the e2e rows) and the float dtypes of the params it ran on."""
    if stage is None:
        prec = {s: policy.stage(s).compute for s in ("llm", "flow", "hift")} | {"compute": policy.name}
    else:
        p = policy.stage(stage)
        prec = {"compute": p.compute, "attention": p.attention}
    if stage in (None, "hift"):
        prec["f0_float64"] = bool(policy.f0_float64)
    row["extra"]["precision"] = prec
    row["extra"]["params_dtype"] = params_dtype(params)
    return row


def params_dtype(tree: Any) -> str:
    """The float dtypes of a params tree's leaves, e.g. "bfloat16+float32" (HiFT keeps its f0 net float32)."""
    import jax
    import numpy as np

    kinds = set()
    for leaf in jax.tree.leaves(tree):
        dt = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if dt.kind == "f" or dt.name == "bfloat16":
            kinds.add(dt.name)
    return "+".join(sorted(kinds))


def non_finite(row: dict[str, Any], what: str, value: Any) -> bool:
    """Fail ``row`` (its ``error``, shown in the table; the run exits 1) when ``value`` holds NaN/inf."""
    import numpy as np

    arr = np.asarray(value, np.float64)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        msg = f"{what}: {bad} of {arr.size} values are NaN/inf"
        row["error"] = msg if not row.get("error") else f"{row['error']}; {msg}"
    return bool(bad)


def snr_db(out: Any, ref: Any) -> float:
    """10 log10(|ref|^2 / |out - ref|^2) in float64 (both floored at 1e-30)."""
    import numpy as np

    ref = np.asarray(ref, np.float64)
    err = max(float(np.sum((np.asarray(out, np.float64) - ref) ** 2)), 1e-30)
    return float(10 * np.log10(max(float(np.sum(ref ** 2)), 1e-30) / err))


def stage_row(stage: str, name: str, workload: str, dtype: str, m: Measured, policy: Any, params: Any,
              audio_s: float, output: str) -> dict[str, Any]:
    """The cosyjax row of one whole-stage measurement (flow, HiFT) under ``policy``: time, precision, RTF
    over ``audio_s``, and a failure when its ``output`` (named for the error) is not finite."""
    row = new_row(stage, name, workload, "s", dtype=dtype)
    set_cosyjax(row, m, m.best)
    set_precision(row, policy, stage, params)
    row["extra"]["cosyjax_rtf"] = m.best / audio_s
    non_finite(row, output, m.output)
    return row


def rows_vs_float32(rows: list[dict[str, Any]], outputs: dict[str, Any]) -> None:
    """``vs_float32`` for every non-float32 row of one workload (``outputs``: by dtype)."""
    for row in rows:
        if row["dtype"] != "float32" and "float32" in outputs:
            vs_float32(row, outputs[row["dtype"]], outputs["float32"])


def vs_float32(row: dict[str, Any], out: Any, ref32: Any) -> None:
    """A bf16 row's output against the float32 row's (same inputs, same weights): max diff, largest
    float32 value and SNR in ``extra["vs_float32"]``."""
    import numpy as np

    out, ref32 = np.asarray(out, np.float64), np.asarray(ref32, np.float64)
    if out.shape != ref32.shape:
        row["extra"]["vs_float32"] = {"shape": list(out.shape), "float32_shape": list(ref32.shape)}
        return
    row["extra"]["vs_float32"] = {"max_diff": float(np.abs(out - ref32).max()) if out.size else 0.0,
                                  "largest_float32": float(np.abs(ref32).max()) if out.size else 0.0,
                                  "snr_db": snr_db(out, ref32)}


def auto_policy(backend: str) -> dict[str, Any]:
    """What ``PrecisionPolicy.resolve("auto", backend)`` picks per stage (JSON-ready)."""
    from cosyjax.precision import PrecisionPolicy

    p = PrecisionPolicy.resolve("auto", backend)
    return {"backend": backend, "llm": p.llm.compute, "flow": p.flow.compute, "hift": p.hift.compute,
            "attention": p.llm.attention, "f0_float64": bool(p.f0_float64), "name": p.name}


def dtype_comparison(rows: list[dict[str, Any]], auto: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each workload measured under float32 and bf16: bf16 / float32 time, the faster dtype and whether
    the auto policy picks it (the rows' values are times: lower is faster)."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("cosyjax") is not None and not r.get("error"):
            by.setdefault((r["stage"], base_name(r)), {})[r.get("dtype") or "float32"] = r
    out = []
    for (stage, name), pair in by.items():
        if not {"float32", "bfloat16"} <= set(pair):
            continue
        f32, bf16 = pair["float32"]["cosyjax"], pair["bfloat16"]["cosyjax"]
        faster = "bfloat16" if bf16 < f32 else "float32"
        picks = None
        if auto:
            picks = auto.get(stage) if stage in ("llm", "flow", "hift") else auto.get("name")
        out.append({"stage": stage, "name": name, "float32": f32, "bfloat16": bf16,
                    "bf16_over_float32": bf16 / f32 if f32 else None, "faster": faster, "auto": picks,
                    "auto_picks_faster": None if picks is None else picks == faster})
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "RTF":
        return f"RTF {value:.3g}"
    if unit in ("ms", "ms/token", "ms/step"):
        return f"{value:.1f} {unit}"
    return f"{value:.3g} {unit}" if value < 10 else f"{value:.1f} {unit}"


def _mem_cell(mem: dict[str, Any]) -> str:
    parts = []
    for side in ("cosyjax", "upstream"):
        m = mem.get(side)
        if not m:
            parts.append("–")
            continue
        dev = m.get("jax_device_peak_mb" if side == "cosyjax" else "torch_device_peak_mb")
        if dev is not None:  # GPU: device memory (JAX: process peak so far; torch: this block's peak)
            parts.append(f"{dev / 1024:.2f} GB dev")
            continue
        delta = None if m.get("host_start_mb") is None else m["host_peak_mb"] - m["host_start_mb"]
        parts.append(f"{m['host_peak_mb'] / 1024:.1f} GB" + ("" if delta is None else f" (+{delta / 1024:.2f})"))
    return " / ".join(parts)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table (one line per row)."""
    head = ("| stage | workload | cosyjax | warm-up (compile) | upstream | cosyjax / upstream | outputs | "
            "peak RSS cosyjax / upstream (+ working) |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        warm = "–" if r["cosyjax_warmup_s"] is None else f"{r['cosyjax_warmup_s']:.1f} s"
        if r["cosyjax_compile_s"] is not None:
            warm += f" ({r['cosyjax_compile_s']:.1f} s)"
        for w in r.get("warnings") or []:
            warm += f" ⚠ {w}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        outputs = r["agreement"] or "–"
        if r.get("error"):
            outputs = f"✗ {r['error']}" + ("" if outputs == "–" else f"; {outputs}")
        lines.append(f"| {r['name']} | {r['workload']} | {_fmt(r['cosyjax'], r['unit'])} | {warm} | "
                     f"{_fmt(r['upstream'], r['unit'])} | {ratio} | {outputs} | "
                     f"{_mem_cell(r['memory'])} |")
    return head + "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """Header (machine, settings) + table + notes."""
    m, s = result["machine"], result["settings"]
    v = m["versions"]
    up = s.get("upstream_commit") or "unknown commit"
    lines = [f"## cosyjax benchmarks — {m['date_utc']}", "",
             f"{m['jax_backend']} ({m['device_kind']}), {m['cpu_model']}, {m['cpu_count']} cores, "
             f"load average at start {m['load_average_start']}; jax {v['jax']}, flax {v['flax']}, "
             f"torch {v['torch']}, transformers {v['transformers']}, Python {m['python']}; "
             + (f"upstream {s['reference_repo']} @ {up}" if s.get("reference_repo") else "no upstream (cosyjax only)")
             + f"; {'quick (tiny dims)' if s['quick'] else 'full-size release dims'}, random weights, "
             + _precision_header(s) + " "
             f"Wall time {result.get('elapsed_s') or 0:.0f} s"
             + (f" (estimate for a quiet 2-core CPU {result['estimate_s']:.0f} s)." if result.get("estimate_s") else "."),
             "",
             markdown_table(result["rows"])]
    comparison = result.get("dtype_comparison") or []
    if comparison:
        lines += ["", "bf16 / float32 cosyjax time per workload (same run, weights and inputs; < 1: bf16 faster) and "
                  "the `auto` policy's pick (✓ / ✗: the faster / the slower dtype here): " + "; ".join(
                      f"{c['name']} {c['bf16_over_float32']:.2f}"
                      + ("" if c["auto"] is None else
                         f" (auto {_SHORT.get(c['auto'], c['auto'])} {'✓' if c['auto_picks_faster'] else '✗'})")
                      for c in comparison if c["bf16_over_float32"] is not None) + "."]
    busy = busy_warning(m)
    if busy:
        lines.insert(3, f"⚠ {busy}\n")
    notes = result.get("notes") or []
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


_SHORT = {"float32": "float32", "bfloat16": "bf16"}


def _precision_header(settings: dict[str, Any]) -> str:
    """The header's precision sentence: the rows' dtypes and what ``auto`` picks on this backend."""
    dtypes = settings.get("dtypes") or ["float32"]
    text = ("cosyjax " + " and ".join(dtypes) + (" (bf16 rows: ', bf16')" if "bfloat16" in dtypes else "")
            + (", upstream float32" if settings.get("reference_repo") else "") + ".")
    auto = settings.get("auto_policy")
    if auto:
        picks = {s: auto[s] for s in ("llm", "flow", "hift")}
        what = (f"{_SHORT.get(picks['llm'], picks['llm'])} for every stage" if len(set(picks.values())) == 1
                else ", ".join(f"{s} {_SHORT.get(d, d)}" for s, d in picks.items()))
        text += f" `auto` on {auto['backend']} picks {what}."
    return text


def busy_warning(machine: dict[str, Any]) -> str | None:
    """A warning when other work shared the CPU.

    Before the run the 1-minute load average should be below half the cores; during it (sampled
    after every stage) the run's own threads count, so only a load above cores + 1 is blamed on others.
    """
    cores = machine.get("cpu_affinity") or machine.get("cpu_count") or 1
    start = (machine.get("load_average_start") or [0.0])[0]
    during = max((x[0] for x in (machine.get("load_average_stages") or {}).values()), default=0.0)
    if start > max(1.0, 0.5 * cores) or during > cores + 1:
        return (f"the machine was busy (1-min load average {start:.1f} at the start, up to {during:.1f} during the "
                f"run, on {cores} cores): other processes shared the CPU, so these timings (PyTorch's OpenMP "
                "threads most of all) are not representative")
    return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
