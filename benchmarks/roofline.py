"""Roofline of the stage programs at release dims: XLA's flop and byte counts against accelerator peaks.

    python -m benchmarks.roofline [--quick] [--dtypes float32,bfloat16] [--batch-sizes 1,16,64]
                                  [--json FILE] [--markdown FILE]

Nothing is allocated: the params are ``jax.ShapeDtypeStruct`` trees (``param_shapes`` of each stage,
cast to the policy's weight dtype) and every program is the one the model runs (``lm.programs``:
``decode.prefill`` / ``decode.decode_chunk``; ``flow.programs``: ``_flow_core``; the HiFT
``_hift_core``), lowered with its static arguments and compiled for the local backend.  From
``compiled.cost_analysis()`` we read ``flops`` and ``bytes accessed``; the roofline time of a program
on a device is

    t = max(flops / peak_flops, bytes / peak_bandwidth)

and its arithmetic intensity flops / bytes says which side bounds it.  Two byte counts bracket the
accelerator's traffic: the *floor*, the argument bytes (every weight, input and KV-cache entry read
once, nothing else: the time no fusion can beat), and XLA's ``bytes accessed`` of the compiled
program.  The flops are those of the lowered program (``lowered.cost_analysis()``: what the model
computes, before the backend rewrites it; the CPU compiler turns bf16 products into float32 ones
and counts the converts as flops, so its ``flops`` are kept as ``xla_flops`` in the JSON only).  The counts are XLA's
(``HloCostAnalysis`` of the optimised module of the backend that compiled it, here the CPU's): its
fusion decisions set the bytes, and a loop's body is counted once (so every ``lax.scan`` is unrolled
while lowering, ``unrolled_scans``; the decode step runs ``num_steps=1`` with the scores of its one
query materialised; the flow is counted at 1 and 2 Euler steps and extrapolated linearly to 10); a GPU/TPU compile of the
same program fuses differently, and the CPU keeps bf16 tensors' float32 copies, so XLA's bytes are an
estimate of an accelerator's (an upper one for bf16), the flops are not.

Programs (``--quick``: the same at the tiny smoke dims of ``benchmarks.workload.quick_config``):

* ``llm prefill``: one prompt of ``PREFILL_TOKENS`` (prompt text + prompt speech + text) per row;
* ``llm decode step``: ``decode_chunk`` with ``num_steps=1`` against the ``Limits()`` KV cache
  (attention over every cache slot: the cost of a step late in a long request);
* ``flow 10 s``: ``_flow_core`` (10 Euler steps of the DiT with CFG) on the token bucket of 10 s;
* ``hift 10 s``: ``_hift_core`` on the mel bucket of 10 s.

Peaks (dense, no sparsity; vendor data sheets): ``PEAKS``.  The float32 policy runs its matmuls at
``Precision.HIGHEST``, i.e. true float32: on H100/H200 that is the FP32 (non-tensor-core) peak, 67
TFLOP/s, not TF32's 495; on TPU v5e, which has no float32 MXU, HIGHEST is six bf16 passes, so
197 / 6 = 32.8 TFLOP/s.  bf16 uses the bf16 tensor-core / MXU peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (name, {compute dtype: peak FLOP/s}, HBM bytes/s)
PEAKS = {
    "H100 SXM": ({"bfloat16": 989e12, "float32": 67e12}, 3.35e12),
    "H200": ({"bfloat16": 989e12, "float32": 67e12}, 4.8e12),
    "TPU v5e": ({"bfloat16": 197e12, "float32": 197e12 / 6}, 0.82e12),
}
PREFILL_TOKENS = 512  # a 10-15 s prompt (~250-375 speech tokens at 25 Hz) + its text
SECONDS = 10.0


@dataclasses.dataclass
class Program:
    stage: str
    name: str
    batch: int
    fn: Any
    args: tuple
    static: dict
    steps: int | None = None  # the flow: counted at 1 and 2 Euler steps, extrapolated to ``steps``


def _stage_weights(config: Any, stage: str, dtype: str) -> Any:
    """The stage's param specs as ``CosyVoice3Model`` holds them (``checkpoint.cast_params``: float leaves
    in ``dtype``, except ``FLOAT32_ONLY``, the HiFT f0 path and NSF merge, which stay float32)."""
    from cosyjax.checkpoint import FLOAT32_ONLY
    from cosyjax.flow.flow import param_shapes as flow_shapes
    from cosyjax.hift.generator import param_shapes as hift_shapes
    from cosyjax.llm.qwen2 import param_shapes as llm_shapes

    shapes = {"llm": llm_shapes, "flow": flow_shapes, "hift": hift_shapes}[stage](getattr(config, stage))

    def one(path, leaf):
        keys = (stage,) + tuple(getattr(k, "key", str(k)) for k in path)
        keep = any(keys[:len(prefix)] == prefix for prefix in FLOAT32_ONLY)
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        target = jnp.bfloat16 if dtype == "bfloat16" and floating and not keep else leaf.dtype
        return jax.ShapeDtypeStruct(leaf.shape, jnp.float32 if floating and target != jnp.bfloat16 else target)

    return jax.tree_util.tree_map_with_path(one, shapes)


def programs(config: Any, dtype: str, batch_sizes: tuple[int, ...], *, seconds: float = SECONDS,
             prefill_tokens: int = PREFILL_TOKENS, cache_len: int | None = None) -> list[Program]:
    """The stage programs of one policy (``dtype``) at ``config``'s dims, as ShapeDtypeStruct calls
    (``cache_len``: the decode step's KV cache; default ``Limits()``'s)."""
    from cosyjax.flow import flow as flow_mod
    from cosyjax.hift import generator as hift_mod
    from cosyjax.hift.source import HiftNoise
    from cosyjax.limits import Limits
    from cosyjax.llm import lm
    from cosyjax.llm.sampling import SamplerSettings
    from cosyjax.precision import Precision, PrecisionPolicy

    policy = PrecisionPolicy.resolve(dtype, "gpu")  # the accelerator policy (blockwise attention, no float64)
    out: list[Program] = []
    llm_p = _stage_weights(config, "llm", dtype)
    if cache_len is None:
        cache_len = Limits().cache_len(config.token_frame_rate, lm.bucket)
    settings = SamplerSettings.from_config(config.llm.sampling)
    # The decode step's one query attends over every cache slot with the scores materialised
    # ([B, heads, 1, S]: the same products as blockwise, and a few MB next to the cache's GBs), so
    # its 30-block scan need not be unrolled 24 times to be counted.
    one_query = Precision(policy.llm.compute, "xla")
    for batch in batch_sizes:
        specs = lm.programs(config.llm, llm_p, max_prefill=prefill_tokens, cache_len=cache_len, settings=settings,
                            chunk_size=1, batch=batch, precision=policy.llm)
        prefill = [s for s in specs if s[0].__name__ == "prefill"][-1]  # the largest bucket
        step = next(s for s in specs if s[0].__name__ == "decode_chunk")
        step = (step[0], step[1], dict(step[2], precision=one_query))
        size = prefill[1][1].shape[1]
        out.append(Program("llm", f"prefill {size} tokens", batch, *prefill))
        out.append(Program("llm", f"decode step (cache {cache_len})", batch, *step))
    mel_frames = int(round(seconds * config.hift.sampling_rate / config.hift.upsample_scale))
    tokens = -(-mel_frames // config.flow.token_mel_ratio)
    flow_specs = flow_mod.programs(config.flow, _stage_weights(config, "flow", dtype), max_tokens=tokens,
                                   precision=policy.flow)
    fn, args, static = flow_specs[-1]
    name = f"{seconds:g} s ({args[1].shape[1]} token bucket, {config.flow.n_timesteps} Euler steps, CFG)"
    out.append(Program("flow", name, 1, fn, args, static, steps=config.flow.n_timesteps))
    hc = config.hift
    bucket = hift_mod.mel_bucket(mel_frames)
    samples = bucket * hc.upsample_scale
    noise = HiftNoise(jax.ShapeDtypeStruct((hc.num_harmonic_channels,), np.float32),
                      jax.ShapeDtypeStruct((samples, hc.num_harmonic_channels), np.float32))
    precision, use64 = hift_mod.hift_numerics(policy)
    hift_args = (_stage_weights(config, "hift", dtype), jax.ShapeDtypeStruct((1, bucket, hc.in_channels), np.float32),
                 jax.ShapeDtypeStruct((1,), np.int32), noise)
    out.append(Program("hift", f"{seconds:g} s ({bucket} mel frame bucket)", 1, hift_mod._hift_core, hift_args,
                       dict(cfg=hc, finalize=True, precision=precision, f0_float64=use64, intermediates=False)))
    return out


def cost(program: Program) -> dict[str, float]:
    """XLA's counts: ``flops`` of the lowered (backend-independent) program, ``xla_flops`` and ``bytes``
    accessed of the compiled one, the argument bytes, and the lower + compile seconds."""
    start = time.perf_counter()
    if program.steps is None:
        counts = _count(program.fn, program.args, program.static)
    else:  # every Euler step is the same program: count 1 and 2 steps, extrapolate linearly
        one, two = (_count(program.fn, program.args,
                           dict(program.static, cfg=dataclasses.replace(program.static["cfg"], n_timesteps=n)))
                    for n in (1, 2))
        counts = {k: one[k] + (program.steps - 1) * (two[k] - one[k]) for k in one}
    arg_bytes = sum(_nbytes(leaf) for leaf in jax.tree.leaves(program.args))
    return {**counts, "arg_bytes": float(arg_bytes), "compile_s": time.perf_counter() - start}


def _count(fn: Any, args: tuple, static: dict) -> dict[str, float]:
    with unrolled_scans():
        lowered = fn.lower(*args, **static)
    model = _first(lowered.cost_analysis())
    analysis = _first(lowered.compile().cost_analysis())
    return {"flops": float(model.get("flops", 0.0)), "xla_flops": float(analysis.get("flops", 0.0)),
            "bytes": float(analysis.get("bytes accessed", 0.0))}


@contextlib.contextmanager
def unrolled_scans():
    """Every ``jax.lax.scan`` traced inside is fully unrolled.

    XLA's cost analysis counts a loop body once, whatever its trip count, so the flow's 10-step Euler
    scan and the blockwise attention's scan over key blocks would count one iteration.  Unrolled, the
    program is the same arithmetic with every iteration visible (for counting only; nothing runs).
    """
    original = jax.lax.scan

    def scan(*args, **kwargs):
        kwargs["unroll"] = True
        return original(*args, **kwargs)

    jax.clear_caches()  # a trace cached before (scans rolled) would be reused as it is
    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = original
        jax.clear_caches()  # ... and the unrolled traces must not serve later calls


def _nbytes(leaf: Any) -> int:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return int(np.prod(leaf.shape)) * 8  # threefry: 2 uint32 words
    return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _first(analysis: Any) -> dict:
    return analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})


def roofline(flops: float, nbytes: float, dtype: str) -> dict[str, dict[str, Any]]:
    """Per device: roofline seconds and which side bounds it."""
    out = {}
    for device, (peaks, bandwidth) in PEAKS.items():
        t_compute, t_memory = flops / peaks[dtype], nbytes / bandwidth
        out[device] = {"seconds": max(t_compute, t_memory), "bound": "compute" if t_compute >= t_memory else "memory"}
    return out


def run(config: Any, dtypes: tuple[str, ...], batch_sizes: tuple[int, ...], *, seconds: float = SECONDS,
        prefill_tokens: int = PREFILL_TOKENS, cache_len: int | None = None,
        log=lambda msg: None) -> list[dict[str, Any]]:
    """One row per program and dtype (``programs``' arguments); see the module docstring."""
    rows = []
    for dtype in dtypes:
        for p in programs(config, dtype, batch_sizes, seconds=seconds, prefill_tokens=prefill_tokens,
                          cache_len=cache_len):
            c = cost(p)
            row = {"stage": p.stage, "program": p.name, "batch": p.batch, "dtype": dtype, **c,
                   "intensity": c["flops"] / c["bytes"] if c["bytes"] else float("inf"),
                   "roofline": roofline(c["flops"], c["bytes"], dtype),
                   "floor": roofline(c["flops"], c["arg_bytes"], dtype)}
            log(f"[roofline] {dtype} {p.stage} {p.name} b={p.batch}: {c['flops']:.3g} flop, {c['bytes']:.3g} B "
                f"({c['compile_s']:.1f} s compile)")
            rows.append(row)
    return rows


def _time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def markdown(rows: list[dict[str, Any]]) -> str:
    devices = list(PEAKS)
    head = ("| stage | program | batch | dtype | GFLOP | GB accessed (XLA) | GB arguments | flop/byte | "
            + " | ".join(f"{d}: floor / XLA bytes" for d in devices) + " |")
    lines = [head, "|" + "---|" * (8 + len(devices))]
    for r in rows:
        cells = []
        for d in devices:
            lo, hi = r["floor"][d], r["roofline"][d]
            bound = lo["bound"][0] + hi["bound"][0]
            cells.append(f"{_time(lo['seconds'])} / {_time(hi['seconds'])} ({bound})")
        lines.append(f"| {r['stage']} | {r['program']} | {r['batch']} | {r['dtype']} | {r['flops'] / 1e9:.4g} | "
                     f"{r['bytes'] / 1e9:.3g} | {r['arg_bytes'] / 1e9:.3g} | {r['intensity']:.3g} | "
                     + " | ".join(cells) + " |")
    peaks = "; ".join(f"{d}: {p['bfloat16'] / 1e12:g} TFLOP/s bf16, {p['float32'] / 1e12:.3g} TFLOP/s float32 "
                      f"(HIGHEST), {bw / 1e12:g} TB/s" for d, (p, bw) in PEAKS.items())
    return "\n".join(lines) + f"\n\nPeaks: {peaks}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny dims (a smoke test)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    from benchmarks.workload import quick_config, release_config

    config = quick_config() if args.quick else release_config()
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    rows = run(config, dtypes, batch_sizes, seconds=args.seconds, prefill_tokens=args.prefill_tokens,
               log=lambda m: print(m, file=sys.stderr, flush=True))
    table = markdown(rows)
    print(table)
    meta = {"date": datetime.date.today().isoformat(), "backend": jax.default_backend(), "jax": jax.__version__,
            "quick": args.quick, "peaks": {d: {"flops": p, "bandwidth": bw} for d, (p, bw) in PEAKS.items()}}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
