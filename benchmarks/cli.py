"""``python -m benchmarks``: per-stage and end-to-end timings of cosyjax, optionally against upstream.

    python -m benchmarks [--all | --stages llm,flow,hift,e2e,stream] [--reference-repo PATH]
                         [--json FILE] [--markdown FILE] [--quick] [--seconds N] [--batch-sizes 1,8,32]
                         [--repeats N] [--dtypes float32,bfloat16] [--isolate] [--dry-run] [--batch-release DIR]

Extra stages, only when named in --stages: hift_stream, flow_stream, batch (``cosyjax batch`` throughput
on a 64-line manifest per batch size, tiny release dims: see benchmarks/batch.py), first_chunk (a streamed
zero-shot request's first chunk, per stage, new voice with the jax / onnx prompt models and a cached voice,
tiny release: see benchmarks/first_chunk.py), serve (``cosyjax serve`` under concurrent streamed HTTP
requests vs one at a time, tiny release: see benchmarks/serve.py).

Stages always run in the order llm, flow, hift, e2e, stream, in one process that builds each random
model once (the flow and HiFT rows compile the e2e request's flow and vocoder programs; its LLM runs in
the model's own KV cache, so e2e makes one warm-up call).  ``--isolate`` runs every stage in a fresh subprocess instead
(per-stage memory from a clean process; slower: each stage then builds and warms up by itself).

``--dtypes float32,bfloat16``: the llm, flow, hift and e2e stages run one cosyjax row per precision policy
(``PrecisionPolicy.resolve(dtype)``; bf16 rows are named "..., bf16"), on the same random weights and inputs;
upstream (PyTorch, float32) is timed once per workload and every row's ratio is against that timing.  The
JSON records each row's ``dtype`` and what ``auto`` picks per stage on this backend (``settings.auto_policy``),
the markdown prints both, and bf16 / float32 time per workload next to the auto pick.  Default: float32.
A row whose output holds NaN/inf fails (its ``error``; exit status 1).

Defaults: batch sizes 1,8,32 on CPU and 1,16,64 on GPU; one timed repeat after the warm-up on CPU
(three for HiFT), three on GPU; 10 s of speech.  ``--quick``: tiny dims, 2 s, batch sizes 1,2.
The markdown table goes to stdout (progress to stderr); ``--json`` adds machine facts and every
detail.  Exit status 1 when a stage failed (its error is in the JSON; the other stages still run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from benchmarks.common import SCHEMA, REPO, auto_policy, dtype_comparison, log, machine_info, markdown_report
from benchmarks.workload import DTYPE_STAGES, EXTRA_STAGES, STAGES, Workload, make_workload, parse_dtypes

# Quiet 2-core CPU (project machine, 2026-11-25), full size, seconds: BENCHMARKS.md and the
# measurements of this entry.  Only used to print the expected run time.
CPU_COST = {
    "startup": 10.0,
    "build": {"llm": 12.0, "flow": 3.0, "hift": 2.0},
    "build_reference": {"llm": 4.0, "flow": 10.0, "hift": 3.0},
    "llm_compile": 12.0,  # prefill + one decode chunk, per batch size
    "llm_step_ms": {"cosyjax": {1: 115.0, 8: 369.0, 32: 802.0}, "upstream": {1: 253.0, 8: 664.0, 32: 986.0}},
    "llm_prefill_token_ms": {"cosyjax": 8.0, "upstream": 10.0},  # per prompt token (padded for cosyjax)
    "flow_frame_s": {"cosyjax": 0.093, "upstream": 0.0995},  # per mel frame (cosyjax: padded bucket)
    "flow_compile": 9.0,
    "hift_audio_s": {"cosyjax": 0.33, "upstream": 0.332},  # per second of audio
    "hift_compile": 7.0,
    "stream_compile": 18.0,  # streaming flow + carried-state HiFT
    "model_build": 6.0,  # CosyVoice3Model device copies
    # batch stage, warm-up + timed run of the 64-line tiny-release manifest per batch size (2026-12-02, Intel,
    # load ~5 from other jobs: an upper bound); other batch sizes interpolate
    "batch_s": {1: 270.0, 8: 240.0, 32: 506.0},
    # first_chunk stage: tiny release, 3 pipelines' builds + warm-ups + 3 x 3 timed requests (2026-12-04, busy
    # AMD 2-core); upstream_build: its CosyVoice3 on the tiny release (--reference-repo)
    "first_chunk": 60.0,
    "upstream_build": 20.0,
    # serve stage: tiny release, 16 requests x (3 sequential passes + server start-up + 4 server passes), 711 s
    # and 754 s (2026-12-04, AMD 2-core, load 2-9 from other jobs)
    "serve": 730.0,
    # --dtypes: a row's cosyjax time (compile and model build included) relative to its float32 row.  Only the
    # LLM decode step is measured apart (../shared/ENV.md: a release-dims decode step 200-500 ms in bf16 against
    # 70-90 ms in float32, XLA:CPU's bf16 matrix-vector slow path); everything else is taken as float32's,
    # i.e. the cosyjax part scales with the number of dtypes.
    "dtype_factor": {"float32": {}, "bfloat16": {"llm_step": 4.0}},
}


def _interp(table: dict[int, float], x: int) -> float:
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]]
    for a, b in zip(keys, keys[1:]):
        if x <= b:
            return table[a] + (table[b] - table[a]) * (x - a) / (b - a)
    a, b = keys[-2], keys[-1]
    return table[b] + (table[b] - table[a]) * (x - b) / (b - a)


def _e2e_prewarmed(wl: Workload) -> bool:
    """Whether the llm, flow and hift rows compile every program the e2e request uses (what
    ``benchmarks.e2e._ours_prewarmed`` finds at run time): an LLM row at bs 1 decoding in the model's KV-cache
    size, and the same flow token and HiFT mel buckets.  The LLM rows decode in their request's own cache
    (``lm.prepare``'s default) and ``CosyVoice3Model`` in the one size its ``Limits`` give, so today the e2e
    row makes a full warm-up call."""
    import jax

    from cosyjax.flow.flow import token_bucket
    from cosyjax.hift.generator import mel_bucket
    from cosyjax.limits import Limits
    from cosyjax.llm import lm

    req = wl.llm_request(0)
    prepared = lm.prepare(wl.config.llm, [lm.LMRequest.zero_shot(req["text"], req["prompt_text"],
                                                                 req["prompt_speech"])],
                          jax.random.split(jax.random.key(0), 1))
    ratio = wl.config.flow.token_mel_ratio
    return (1 in wl.batch_sizes
            and prepared.cache_len == Limits().cache_len(wl.config.token_frame_rate, lm.bucket)
            and token_bucket(wl.prompt_tokens + wl.flow_tokens) == token_bucket(wl.prompt_tokens + wl.e2e_tokens)
            and mel_bucket(wl.hift_frames) == mel_bucket(ratio * wl.e2e_tokens))


def estimate(wl: Workload, stages: list[str], reference: bool, isolate: bool = False) -> dict[str, float] | None:
    """Expected seconds per stage on the quiet 2-core CPU machine (None: no model for this setup).

    The cosyjax part of the llm, flow, hift and e2e stages is summed over ``wl.dtypes`` (times
    ``CPU_COST["dtype_factor"]``); upstream's part is counted once.
    """
    if wl.quick:
        return {s: 6.0 * (len(wl.dtypes) if s in DTYPE_STAGES else 1) for s in stages} | {"startup": CPU_COST["startup"]}
    from cosyjax.flow.flow import token_bucket
    from cosyjax.hift.generator import mel_bucket
    from cosyjax.llm.lm import bucket

    c = CPU_COST
    sides = ("cosyjax", "upstream") if reference else ("cosyjax",)
    # (side, dtype) of every measurement of a --dtypes stage: cosyjax once per dtype, upstream once
    runs = [("cosyjax", d) for d in wl.dtypes] + ([("upstream", "float32")] if reference else [])

    def factor(dtype, what):
        return c["dtype_factor"].get(dtype, {}).get(what, 1.0)
    flow_cfg, hift_cfg = wl.config.flow, wl.config.hift
    prompt_len = 1 + wl.prompt_text_len + wl.e2e_text_len + 1 + wl.prompt_tokens

    def flow_s(side, tokens, prompt):
        frames = flow_cfg.token_mel_ratio * (token_bucket(tokens + prompt) if side == "cosyjax" else tokens + prompt)
        return c["flow_frame_s"][side] * frames

    def hift_s(side, frames):
        frames = mel_bucket(frames) if side == "cosyjax" else frames
        return c["hift_audio_s"][side] * frames * hift_cfg.upsample_scale / hift_cfg.sampling_rate

    def llm_s(side, batch, steps, dtype="float32"):
        prefill = c["llm_prefill_token_ms"][side] * batch * (bucket(prompt_len) if side == "cosyjax" else prompt_len)
        return 1e-3 * (prefill * factor(dtype, "llm_prefill")
                       + steps * _interp(c["llm_step_ms"][side], batch) * factor(dtype, "llm_step"))

    def build(names):
        return sum(c["build"][n] + (c["build_reference"][n] if reference else 0.0) for n in names)

    est: dict[str, float] = {"startup": c["startup"]}
    built: set[str] = set()

    def need(names):
        new = [n for n in names if isolate or n not in built]
        built.update(names)
        return build(new)

    if "llm" in stages:
        t = need(["llm"])
        for i, b in enumerate(wl.batch_sizes):
            for side, d in runs:
                if side == "cosyjax":
                    t += (c["llm_compile"] + llm_s(side, b, 1, d)
                          + wl.repeats["llm"] * llm_s(side, b, wl.llm_steps, d))
                else:
                    t += (0.0 if i else llm_s(side, b, 1)) + wl.repeats["llm"] * llm_s(side, b, wl.llm_steps)
        est["llm"] = t
    if "flow" in stages:
        t = need(["flow"])
        for side, d in runs:
            one = flow_s(side, wl.flow_tokens, wl.prompt_tokens) * factor(d, "flow")
            warm = c["flow_compile"] + one if side == "cosyjax" else 1.0
            t += warm + wl.repeats["flow"] * one
        est["flow"] = t
    if "hift" in stages:
        t = need(["hift"])
        for side, d in runs:
            one = hift_s(side, wl.hift_frames) * factor(d, "hift")
            warm = c["hift_compile"] + one if side == "cosyjax" else 0.5
            t += warm + wl.repeats["hift"] * one
        est["hift"] = t
    e2e_frames = flow_cfg.token_mel_ratio * wl.e2e_tokens
    shared = not isolate and {"llm", "flow", "hift"} <= set(stages)
    if "e2e" in stages:
        prewarmed = shared and _e2e_prewarmed(wl)
        t = need(["llm", "flow", "hift"]) + c["model_build"] * len(wl.dtypes)
        for side, d in runs:
            one = (llm_s(side, 1, wl.e2e_tokens, d) + flow_s(side, wl.e2e_tokens, wl.prompt_tokens) * factor(d, "flow")
                   + hift_s(side, e2e_frames) * factor(d, "hift"))
            if side == "cosyjax":
                warm = 0.0 if prewarmed else one + c["llm_compile"] + c["flow_compile"] + c["hift_compile"]
            else:
                warm = 0.0 if shared else 0.3 * one  # eager torch: a short request unless its modules ran
            t += warm + wl.repeats["e2e"] * one
        est["e2e"] = t
    if "stream" in stages:
        t = need(["llm", "flow", "hift"]) + (0.0 if "e2e" in stages and not isolate else c["model_build"])
        first = wl.hop + flow_cfg.pre_lookahead_len
        for side in sides:
            steps = (-(-first // wl.hop) * wl.hop) if side == "cosyjax" else first
            one = (llm_s(side, 1, steps) + flow_s(side, first, wl.prompt_tokens)
                   + hift_s(side, flow_cfg.token_mel_ratio * first))
            if side == "upstream":
                one += 0.3 * llm_s(side, 1, first)  # the LLM thread competes with the first flow call
            warm = one + c["stream_compile"] if side == "cosyjax" else (0.0 if "e2e" in stages else one)
            t += warm + wl.repeats["stream"] * one
        est["stream"] = t
    if "hift_stream" in stages:
        from cosyjax.model import MAX_HOP_FACTOR

        t = need(["hift"])
        chunk = MAX_HOP_FACTOR * wl.hop * flow_cfg.token_mel_ratio
        for total in (wl.seconds * wl.mel_rate, 3 * wl.seconds * wl.mel_rate):
            per_chunk = 1.4 * hift_s("cosyjax", chunk)  # carried-state push: chunk + look-ahead overhead
            t += c["hift_compile"] + (total / chunk + wl.repeats["hift"]) * per_chunk
            if reference:
                t += (1 + wl.repeats["hift"]) * hift_s("upstream", int(total))
        est["hift_stream"] = t
    if "flow_stream" in stages:
        from cosyjax.model import MAX_HOP_FACTOR

        t = need(["flow"])
        new_tokens = wl.flow_tokens - MAX_HOP_FACTOR * wl.hop  # roughly what the non-final hops cover
        t += 3 * c["flow_compile"] + 2 * flow_s("cosyjax", new_tokens, 0)  # warm-up stream + timed stream
        if reference:  # the re-run of each growing prefix
            off, hop = 0, wl.hop
            while off + hop + flow_cfg.pre_lookahead_len <= wl.flow_tokens:
                off += hop
                t += flow_s("upstream", off, wl.prompt_tokens)
                hop = min(MAX_HOP_FACTOR * wl.hop, 2 * hop)
        est["flow_stream"] = t
    if "first_chunk" in stages:
        est["first_chunk"] = CPU_COST["first_chunk"] + (CPU_COST["upstream_build"] if reference else 0.0)
    if "serve" in stages:
        est["serve"] = CPU_COST["serve"]
    if "batch" in stages:
        est["batch"] = 5.0 + sum(_interp(c["batch_s"], b) for b in wl.batch_sizes)
    if isolate:
        est["startup"] *= 1 + len(stages)
    return est


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="every stage (the default)")
    group.add_argument("--stages", default=None,
                       help=f"comma-separated subset of {','.join(STAGES)}, or extra: {','.join(EXTRA_STAGES)}")
    ap.add_argument("--reference-repo", default=None,
                    help="upstream CosyVoice source checkout: also time upstream on the same weights")
    ap.add_argument("--json", default=None, help="write the full results (machine facts included) here")
    ap.add_argument("--markdown", default=None, help="write the markdown report here (it is printed anyway)")
    ap.add_argument("--quick", action="store_true", help="tiny dims: a fast smoke test of the entry")
    ap.add_argument("--seconds", type=float, default=None, help="seconds of speech per workload (10; quick 2.4)")
    ap.add_argument("--batch-sizes", default=None, help="LLM batch sizes (default CPU 1,8,32; GPU 1,16,64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after the warm-up, every stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32",
                    help="comma-separated cosyjax precision policies, one row each in the llm, flow, hift and e2e "
                         "stages: float32 (default), bfloat16 (e.g. float32,bfloat16); upstream runs float32 once")
    ap.add_argument("--isolate", action="store_true", help="one fresh subprocess per stage")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate only")
    ap.add_argument("--batch-release", default=None,
                    help="batch stage: release directory to run (default: tests/data/tiny-release)")
    args = ap.parse_args(argv)
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES + EXTRA_STAGES]
        if bad or not stages:
            ap.error(f"--stages {args.stages!r}: unknown stage(s) {bad}; choose from "
                     f"{','.join(STAGES + EXTRA_STAGES)}")
        args.stage_list = [s for s in STAGES + EXTRA_STAGES if s in stages]
    else:
        args.stage_list = list(STAGES)
    if args.batch_sizes:
        try:
            args.batch_tuple = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
        except ValueError:
            ap.error(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers")
    else:
        args.batch_tuple = None
    try:
        args.dtype_tuple = parse_dtypes(args.dtypes)
    except ValueError as e:
        ap.error(str(e))
    if args.reference_repo and not os.path.isdir(args.reference_repo):
        ap.error(f"--reference-repo {args.reference_repo}: no such directory")
    return args


def _notes(wl: Workload, reference: bool, stages: list[str]) -> list[str]:
    notes = [
        "Times are the best of the timed repeats after a warm-up call; 'warm-up (compile)' is the warm-up "
        "wall time and the JAX trace+compile seconds inside it. A ⚠ marks compilations inside timed calls.",
        f"LLM: one decode chunk of {wl.llm_steps} steps (the model's stream hop) per batch size; ms/token = "
        "step time / batch. Upstream has no batched decode: its own forward_one_step + llm_decoder + "
        "sampling_ids run over the batch, RAS per row.",
        f"E2E: token ids in, waveform out through each side's CosyVoice3Model.tts (LLM → silent-token filter → "
        f"flow → HiFT; no text/audio frontend). The random LLM's stop-id logits are 0 against speech logits of "
        f"std ~6, so both sides decode exactly max_len = 20 × {wl.e2e_text_len} text tokens = {wl.e2e_tokens} "
        "speech tokens. Upstream runs its LLM in a thread, as in production.",
        "Stream: time from the tts(stream=True) call to its first yielded chunk (fresh hop schedule); upstream "
        "polls its LLM thread every 0.1 s and that thread keeps decoding while the first chunk is vocoded.",
        "Peak RSS: process peak during that side's calls (kernel high-water mark reset before them); "
        "(+x) is the growth over the RSS at their start. Both sides' weights stay resident throughout.",
    ]
    if "bfloat16" in wl.dtypes and set(stages) & set(DTYPE_STAGES):
        notes.append("bf16 rows (', bf16'): cosyjax under PrecisionPolicy.resolve('bfloat16') (matmuls and convs with "
                     "bf16 operands and float32 accumulation, params cast to bf16 except HiFT's f0 net; no float64) on "
                     "the float32 rows' weights and inputs. Their outputs column compares with upstream's float32 "
                     "output as the float32 row does, so it shows bf16 rounding (not a failure; NaN/inf is); "
                     "extra.vs_float32 compares with the float32 row. Upstream ran once per workload (float32): "
                     "every row's ratio divides by that one timing. The stream rows and the extra stages run float32.")
    if "batch" in stages:
        notes.append("Batch: cosyjax.batch.run_batch on the whole manifest (frontend, prompt features, LLM, flow and "
                     "HiFT batched, wav writing), timed after a warm-up run of the same manifest; the tiny release's "
                     "dims (release dims do not fit the CPU budget), its random LLM decodes max_len = 20 x text "
                     "tokens on every line. Upstream has no batch path.")
    if "first_chunk" in stages:
        notes.append("First chunk: CosyVoice3.inference_zero_shot(stream=True) on the tiny release, call to first "
                     "chunk (best of the timed requests after a warm-up); the per-stage seconds are in each row's "
                     "extra.breakdown_s, the prefilled LLM positions in extra.prefill_tokens (see "
                     "benchmarks/first_chunk.py).")
    if "serve" in stages:
        notes.append("Serve: the real cosyjax serve app (engine) under uvicorn on 127.0.0.1, streamed HTTP requests "
                     "of a fixed seeded mix at each concurrency (value: requests/s; audio-s/s and first-chunk "
                     "p50/p99 in the outputs column); baseline: the same requests as sequential pipeline calls "
                     "without the engine; tiny release (see benchmarks/serve.py).")
    if not reference:
        notes.append("No --reference-repo: cosyjax only, random weights drawn in numpy.")
    return notes


def _run_isolated(args: argparse.Namespace, argv: list[str] | None, loads: dict) -> tuple[list, list, dict]:
    """Every stage in its own ``python -m benchmarks --stages S`` subprocess; their rows merged."""
    rows, errors, elapsed = [], [], {}
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    # drop the options this driver owns
    drop = {"--all", "--isolate", "--dry-run"}
    keep, skip = [], False
    for a in base:
        if skip:
            skip = False
            continue
        if a in drop:
            continue
        if a in ("--stages", "--json", "--markdown"):
            skip = True
            continue
        if a.startswith(("--stages=", "--json=", "--markdown=")):
            continue
        keep.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stage_list:
            out = os.path.join(tmp, f"{stage}.json")
            cmd = [sys.executable, "-m", "benchmarks", "--stages", stage, "--json", out] + keep
            log(f"[isolate] {' '.join(cmd)}")
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
            elapsed[stage] = time.perf_counter() - start
            loads[stage] = [round(x, 2) for x in os.getloadavg()]
            if os.path.exists(out):
                with open(out, encoding="utf-8") as f:
                    part = json.load(f)
                rows += part["rows"]
                errors += part["errors"]
            if proc.returncode != 0 and not os.path.exists(out):
                errors.append({"stage": stage, "error": f"subprocess exited with status {proc.returncode}"})
    return rows, errors, elapsed


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.reference_repo:
        # On a GPU, JAX would otherwise take 75% of its memory up front and leave torch too little.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    backend = jax.default_backend()
    wl = make_workload(quick=args.quick, seconds=args.seconds, batch_sizes=args.batch_tuple,
                       repeats=args.repeats, backend=backend, seed=args.seed, dtypes=args.dtype_tuple)
    reference = args.reference_repo is not None
    est = estimate(wl, args.stage_list, reference, args.isolate) if backend == "cpu" else None
    total_est = sum(est.values()) if est else None
    size = "quick (tiny dims)" if wl.quick else "full size"
    log(f"# cosyjax benchmarks: stages {','.join(args.stage_list)}; {size}, "
        f"{wl.seconds:g} s of speech, batch sizes {','.join(map(str, wl.batch_sizes))}, repeats {dict(wl.repeats)}, "
        f"dtypes {','.join(wl.dtypes)}, backend {backend}; upstream: {args.reference_repo or 'no'}")
    if est and backend == "cpu":
        per = ", ".join(f"{k} {v:.0f} s" for k, v in est.items())
        log(f"# expected on a quiet 2-core CPU: {total_est:.0f} s ({total_est / 60:.1f} min): {per}")
    if args.dry_run:
        return 0

    start = time.perf_counter()
    machine = machine_info()
    machine["load_average_stages"] = {}
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    elapsed: dict[str, float] = {}
    upstream_commit = os.environ.get("COSYJAX_REFERENCE_COMMIT")
    if args.isolate:
        rows, errors, elapsed = _run_isolated(args, argv, machine["load_average_stages"])
        if reference:
            from cosyjax.parity.upstream import git_commit

            upstream_commit = git_commit(args.reference_repo) or upstream_commit
    else:
        from benchmarks import batch, e2e, first_chunk, flow, hift, llm, serve
        from benchmarks.models import Bundle

        runners = {"llm": llm.run, "flow": flow.run, "hift": hift.run, "e2e": e2e.run_e2e, "stream": e2e.run_stream,
                   "hift_stream": hift.run_stream, "flow_stream": flow.run_stream,
                   "batch": lambda b: batch.run(b, args.batch_release), "first_chunk": first_chunk.run,
                   "serve": lambda b: serve.run(b, args.batch_release)}
        bundle = Bundle(wl, args.reference_repo)
        if bundle.upstream_info is not None:
            upstream_commit = bundle.upstream_info.commit or upstream_commit
        for stage in args.stage_list:
            t0 = time.perf_counter()
            try:
                stage_rows = runners[stage](bundle)
                rows += stage_rows
                for row in stage_rows:  # a failed row (NaN/inf output) fails the run, its stage's rows stay
                    if row.get("error"):
                        log(f"[{stage}] FAILED: {row['name']}: {row['error']}")
                        errors.append({"stage": stage, "row": row["name"], "error": f"{row['name']}: {row['error']}"})
            except Exception as e:  # noqa: BLE001 - report, go on with the other stages
                log(f"[{stage}] FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                errors.append({"stage": stage, "error": f"{type(e).__name__}: {e}"})
            elapsed[stage] = time.perf_counter() - t0
            machine["load_average_stages"][stage] = [round(x, 2) for x in os.getloadavg()]
            log(f"[{stage}] done in {elapsed[stage]:.0f} s")
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    auto = auto_policy(backend)
    result = {
        "schema": SCHEMA,
        "machine": machine,
        "settings": {"stages": args.stage_list, "quick": wl.quick, "seconds": wl.seconds,
                     "batch_sizes": list(wl.batch_sizes), "repeats": dict(wl.repeats), "seed": wl.seed,
                     "isolate": args.isolate, "reference_repo": args.reference_repo,
                     "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                     "upstream_commit": upstream_commit,
                     "dtypes": list(wl.dtypes), "dtype_stages": list(DTYPE_STAGES), "upstream_dtype": "float32",
                     "auto_policy": auto,
                     "sizes": {"prompt_tokens": wl.prompt_tokens, "prompt_text_tokens": wl.prompt_text_len,
                               "flow_tokens": wl.flow_tokens, "hift_frames": wl.hift_frames,
                               "e2e_text_tokens": wl.e2e_text_len, "e2e_speech_tokens": wl.e2e_tokens,
                               "llm_steps": wl.llm_steps}},
        "estimate_s": total_est,
        "estimate_by_stage_s": est,
        "elapsed_s": time.perf_counter() - start,
        "elapsed_by_stage_s": elapsed,
        "rows": rows,
        "dtype_comparison": dtype_comparison(rows, auto),
        "errors": errors,
        "notes": _notes(wl, reference, args.stage_list),
    }
    report = markdown_report(result)
    if errors:
        report += "\nFailed stages: " + "; ".join(f"{e['stage']}: {e['error']}" for e in errors) + "\n"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report)
    print(report, flush=True)
    return 1 if errors else 0
