"""The benchmark entry (``python -m benchmarks``): a tiny-dims smoke run and its output formats."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # ``benchmarks`` is a top-level directory of the repo, not an installed package

from benchmarks.common import (dtype_comparison, markdown_report, markdown_table, new_row, finish_row,  # noqa: E402
                               non_finite)
from benchmarks.workload import make_workload  # noqa: E402

REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")

EXPECTED_ROWS = ["LLM prefill, bs 1", "LLM decode, bs 1", "Flow", "HiFT", "E2E non-stream, bs 1",
                 "Stream first chunk, bs 1"]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_quick_run_writes_every_row(tmp_path):
    """--quick at tiny dims, no reference: every stage row is there with sane values, JSON and markdown."""
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = _run("--quick", "--batch-sizes", "1", "--json", str(out_json), "--markdown", str(out_md))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["schema"] == "cosyjax-benchmarks/1"
    assert result["errors"] == []
    names = [r["name"] for r in result["rows"]]
    assert names == EXPECTED_ROWS
    assert result["settings"]["dtypes"] == ["float32"]
    for row in result["rows"]:
        assert row["dtype"] == "float32" and not row.get("error"), row
        assert math.isfinite(row["cosyjax"]) and row["cosyjax"] > 0, row
        assert row["upstream"] is None and row["ratio"] is None, row
        assert row["cosyjax_timed_compiles"] == 0, row  # warm-up really excluded from the timed calls
        mem = row["memory"]["cosyjax"]
        assert 0 < mem["host_start_mb"] <= mem["host_peak_mb"], row
    by_name = {r["name"]: r for r in result["rows"]}
    for name in ("LLM prefill, bs 1", "Flow", "HiFT", "Stream first chunk, bs 1"):
        assert by_name[name]["cosyjax_warmup_s"] > 0 and by_name[name]["cosyjax_compile_s"] > 0
    e2e = by_name["E2E non-stream, bs 1"]
    sizes = result["settings"]["sizes"]
    # the random LLM never stops early: exactly max_len tokens reach the flow
    assert e2e["extra"]["cosyjax_llm_tokens"] == e2e["extra"]["cosyjax_flow_tokens"] == sizes["e2e_speech_tokens"]
    assert e2e["cosyjax"] == pytest.approx(e2e["extra"]["cosyjax_wall_s"] / e2e["extra"]["cosyjax_audio_s"])
    assert by_name["Stream first chunk, bs 1"]["extra"]["cosyjax_first_chunk_s"] > 0
    machine = result["machine"]
    for key in ("cpu_model", "cpu_count", "date_utc", "device_kind", "jax_backend", "versions"):
        assert machine[key], key
    assert machine["versions"]["jax"]
    md = out_md.read_text()
    assert md.strip() in proc.stdout
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in md


def test_quick_flow_stream_rows(tmp_path):
    """The extra ``flow_stream`` stage: one row per non-final hop of upstream's schedule."""
    out_json = tmp_path / "bench.json"
    proc = _run("--quick", "--stages", "flow_stream", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows][:2] == ["Flow stream hop 1", "Flow stream hop 2"]
    assert all(math.isfinite(r["cosyjax"]) and r["cosyjax"] > 0 for r in rows)


def test_dry_run_estimates_the_full_run_under_15_minutes():
    """The acceptance run (--all --reference-repo, full size, CPU) is budgeted below 15 minutes."""
    proc = _run("--all", "--reference-repo", REPO, "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("# expected on a quiet 2-core CPU"))
    seconds = float(line.split(":")[1].split()[0])
    assert 300 < seconds < 15 * 60, line


@pytest.mark.slow
def test_quick_batch_stage(tmp_path):
    """The extra ``batch`` stage (cosyjax batch on the tiny release): a row per batch size, lines identical."""
    out_json = tmp_path / "bench.json"
    proc = _run("--quick", "--stages", "batch", "--json", str(out_json), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows] == ["Batch synthesis, bs 1", "Batch synthesis, bs 2"]
    for row in rows:
        assert math.isfinite(row["cosyjax"]) and row["cosyjax"] > 0, row
        assert row["extra"]["lines"] == 8 and row["extra"]["failed"] == 0, row
        assert row["cosyjax_timed_compiles"] == 0, row
        assert row["agreement"].startswith("tokens and seconds of every line equal"), row


def test_quick_first_chunk_stage(tmp_path):
    """The extra ``first_chunk`` stage (--quick: onnx frontend + cached voice on the tiny release): the
    per-stage breakdown adds up to the latency, no compile is timed, and the cached voice decodes the new
    voice's tokens while prefilling fewer positions and no prompt audio."""
    from benchmarks.first_chunk import BREAKDOWN_KEYS, PROMPT_STAGES

    out_json = tmp_path / "bench.json"
    proc = _run("--quick", "--stages", "first_chunk", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["errors"] == []
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["First chunk, new voice (onnx frontend)", "First chunk, cached voice"]
    new, cached = rows.values()
    for row in (new, cached):
        assert row["unit"] == "s" and 0 < row["cosyjax"] < 30, row
        assert row["cosyjax_timed_compiles"] == 0, row
        extra = row["extra"]
        assert set(BREAKDOWN_KEYS) <= set(extra["breakdown_s"]), extra["breakdown_s"]
        parts = extra["breakdown_s"]
        assert all(v >= -1e-3 for v in parts.values()), parts
        assert parts["prefill"] > 0 and parts["first_flow"] > 0 and parts["first_vocoder"] > 0, parts
        main = sum(parts[k] for k in BREAKDOWN_KEYS if not k.endswith(("_features", "_model")))
        assert main == pytest.approx(row["cosyjax"], abs=1e-4), (main, row["cosyjax"])
        assert extra["tokens_identical"] is True and extra["first_chunk_identical"] is True, extra
        assert extra["first_chunk_audio_s"] > 0 and extra["llm_tokens"] > 0
    assert all(new["extra"]["breakdown_s"][k] > 0 for k in PROMPT_STAGES)
    assert all(cached["extra"]["breakdown_s"][k] == 0 for k in PROMPT_STAGES)  # no prompt audio work
    e_new, e_cached = new["extra"], cached["extra"]
    assert e_cached["layout_tokens"] == e_new["layout_tokens"] == e_new["prefill_tokens"]
    assert e_cached["prefill_tokens"] == e_new["prefill_tokens"] - e_cached["prefix_tokens"]
    assert e_cached["prefix_tokens"] > 1 and e_cached["same_prompt_text_ids"] is True
    assert e_cached["llm_tokens"] == e_new["llm_tokens"]


def test_quick_serve_stage(tmp_path):
    """The extra ``serve`` stage (--quick: 2 requests on the tiny release, the real app under uvicorn on
    127.0.0.1): a baseline row and a row per concurrency, finite positive throughput and latencies, no compile
    inside the timed runs, and the server's PCM identical to the sequential pipeline's for every request."""
    from benchmarks.serve import CONCURRENCY, REQUESTS

    out_json = tmp_path / "bench.json"
    proc = _run("--quick", "--stages", "serve", "--json", str(out_json), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["errors"] == []
    rows = result["rows"]
    levels = CONCURRENCY[True]
    assert [r["name"] for r in rows] == (["Serve baseline, one at a time"]
                                         + [f"Serve engine, concurrency {c}" for c in levels])
    n = REQUESTS[True]
    for row in rows:
        extra = row["extra"]
        assert row["unit"] == "req/s" and row["cosyjax_timed_compiles"] == 0, row
        assert row["cosyjax"] == pytest.approx(extra["requests_per_s"]), row
        assert extra["requests_per_s"] == pytest.approx(n / extra["wall_s"]), row
        for key in ("requests_per_s", "audio_s_per_s", "audio_s", "first_chunk_p50_s", "first_chunk_p99_s"):
            assert math.isfinite(extra[key]) and extra[key] > 0, (key, row)
        assert extra["first_chunk_p50_s"] <= extra["first_chunk_p99_s"] <= extra["first_chunk_max_s"] < extra["wall_s"]
        assert extra["requests"] == n and row["cosyjax_warmup_s"] > 0, row
    base, engine = rows[0], rows[1:]
    passes = base["extra"]["pass_requests_per_s"]  # timed before and after the server; the row is the faster
    assert len(passes) == 2 and base["cosyjax"] == pytest.approx(max(passes))
    assert base["extra"]["pcm_equal_between_passes"] == n
    assert [r["extra"]["concurrency"] for r in engine] == list(levels)
    for row in engine:
        assert row["extra"]["pcm_equal_to_baseline"] == n, row  # same seeds: the engine's audio is the plain model's
        assert row["extra"]["audio_s"] == pytest.approx(base["extra"]["audio_s"])
        assert row["extra"]["throughput_ratio_vs_baseline"] == pytest.approx(row["cosyjax"] / base["cosyjax"])
        assert row["extra"]["slots"] == max(levels)


def test_bad_arguments_are_refused():
    proc = _run("--stages", "llm,vocoder", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "vocoder" in proc.stderr


@pytest.mark.parametrize("value,named", [("float32,float16", "float16"), ("bfloat16,bfloat16", "bfloat16"),
                                         ("auto", "auto")])
def test_bad_dtypes_are_refused(value, named):
    """--dtypes takes float32 / bfloat16, each once; anything else exits 2 naming the value."""
    proc = _run("--dtypes", value, "--dry-run", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.splitlines()[-1]
    assert "--dtypes" in err and named in err, err


# ---------------------------------------------------------------------------------------------- --dtypes
DTYPE_STAGES = "llm,flow,hift"


def _pairs(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{float32 row name: {dtype: row}} for the rows of a --dtypes float32,bfloat16 run."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        base = r["name"][:-len(", bf16")] if r["dtype"] == "bfloat16" else r["name"]
        out.setdefault(base, {})[r["dtype"]] = r
    return out


def _check_dtype_rows(result: dict, md: str) -> dict[str, dict[str, dict]]:
    """What every ``--dtypes float32,bfloat16 --stages llm,flow,hift --batch-sizes 1`` run must show."""
    from cosyjax.precision import PrecisionPolicy

    assert result["errors"] == []
    names = [r["name"] for r in result["rows"]]
    assert names == ["LLM prefill, bs 1", "LLM prefill, bs 1, bf16", "LLM decode, bs 1", "LLM decode, bs 1, bf16",
                     "Flow", "Flow, bf16", "HiFT", "HiFT, bf16"]
    settings = result["settings"]
    assert settings["dtypes"] == ["float32", "bfloat16"]
    auto = PrecisionPolicy.resolve("auto", result["machine"]["jax_backend"])
    assert {s: settings["auto_policy"][s] for s in ("llm", "flow", "hift")} == {
        "llm": auto.llm.compute, "flow": auto.flow.compute, "hift": auto.hift.compute}
    pick = "float32" if auto.name == "float32" else "bf16"
    assert f"`auto` on {result['machine']['jax_backend']} picks {pick} for every stage" in md
    pairs = _pairs(result["rows"])
    assert all(set(p) == {"float32", "bfloat16"} for p in pairs.values()), pairs.keys()
    for base, pair in pairs.items():
        f32, bf16 = pair["float32"], pair["bfloat16"]
        for dtype, row in pair.items():
            assert math.isfinite(row["cosyjax"]) and row["cosyjax"] > 0 and not row.get("error"), row
            assert row["cosyjax_timed_compiles"] == 0, row
            stage = row["stage"]
            # the row ran the policy it names: its stage's compute dtype and params of that dtype
            assert row["extra"]["precision"]["compute"] == dtype, row["extra"]
            assert row["extra"]["precision"]["compute"] == PrecisionPolicy.resolve(dtype).stage(stage).compute
            assert dtype in row["extra"]["params_dtype"].split("+"), row["extra"]
        assert bf16["extra"]["params_dtype"] != f32["extra"]["params_dtype"]
        assert f32["workload"] == bf16["workload"]
        assert f"| {bf16['name']} |" in md and f"| {f32['name']} |" in md
        if base.startswith("LLM decode"):
            continue  # sampled tokens: compared on the prefill row
        # same inputs and weights, bf16 arithmetic: a finite output that is not the float32 one
        vs = bf16["extra"]["vs_float32"]
        assert 0 < vs["max_diff"] < 0.5 * vs["largest_float32"] and math.isfinite(vs["snr_db"]), (base, vs)
    assert pairs["HiFT"]["bfloat16"]["extra"]["precision"]["f0_float64"] is False
    comparison = {c["name"]: c for c in result["dtype_comparison"]}
    assert set(comparison) == set(pairs)
    for name, c in comparison.items():
        assert c["bf16_over_float32"] == pytest.approx(pairs[name]["bfloat16"]["cosyjax"]
                                                       / pairs[name]["float32"]["cosyjax"])
        assert c["auto"] == auto.stage(pairs[name]["float32"]["stage"]).compute
    assert "bf16 / float32 cosyjax time" in md
    return pairs


def test_quick_dtypes_run_float32_and_bf16_rows(tmp_path):
    """--dtypes float32,bfloat16 (no reference): a float32 and a bf16 row per workload, both finite, the bf16
    one computed in bf16 (params, policy and an output that moved by bf16 rounding), auto's pick recorded."""
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = _run("--quick", "--stages", DTYPE_STAGES, "--batch-sizes", "1", "--dtypes", "float32,bfloat16",
                "--json", str(out_json), "--markdown", str(out_md))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    pairs = _check_dtype_rows(result, out_md.read_text())
    assert all(r["upstream"] is None and r["ratio"] is None for p in pairs.values() for r in p.values())


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
def test_quick_dtypes_share_one_upstream_timing(tmp_path):
    """With upstream: each workload's upstream (float32) timing is measured once and both rows' ratios divide
    by it; the bf16 row's output is compared with upstream's the float32 row's way (further off, finite)."""
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = _run("--quick", "--stages", DTYPE_STAGES, "--batch-sizes", "1", "--dtypes", "float32,bfloat16",
                "--reference-repo", REFERENCE_REPO, "--json", str(out_json), "--markdown", str(out_md), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    pairs = _check_dtype_rows(result, out_md.read_text())
    for name, pair in pairs.items():
        f32, bf16 = pair["float32"], pair["bfloat16"]
        assert f32["upstream"] > 0 and bf16["upstream"] == f32["upstream"], name  # one measurement, shared
        assert bf16["memory"]["upstream"] == f32["memory"]["upstream"], name
        for row in (f32, bf16):
            assert row["ratio"] == pytest.approx(row["cosyjax"] / f32["upstream"]), row
        if name.startswith("LLM decode"):
            assert bf16["agreement"] == f32["agreement"] == "sampled tokens differ (own RNGs)"
            continue
        assert math.isfinite(bf16["max_diff"]) and bf16["max_diff"] > f32["max_diff"], (name, f32, bf16)
        head = f32["agreement"].split(" max diff")[0]
        assert bf16["agreement"].startswith(head + " max diff"), (f32["agreement"], bf16["agreement"])
    assert "SNR" in pairs["HiFT"]["bfloat16"]["agreement"]
    assert math.isfinite(pairs["HiFT"]["bfloat16"]["extra"]["snr_db"])


def test_dtypes_scale_the_cosyjax_estimate_only():
    """--dry-run: every extra dtype adds the cosyjax part of llm/flow/hift/e2e again; upstream is counted once."""
    from benchmarks.cli import CPU_COST, estimate

    stages = ["llm", "flow", "hift", "e2e"]

    def est(dtypes, reference):
        wl = make_workload(quick=False, seconds=2, batch_sizes=(1, 8), repeats=None, backend="cpu", dtypes=dtypes)
        return estimate(wl, stages, reference)

    one, two, bf16 = (est(d, True) for d in (("float32",), ("float32", "bfloat16"), ("bfloat16",)))
    ours_one, ours_two, ours_bf16 = (est(d, False) for d in (("float32",), ("float32", "bfloat16"), ("bfloat16",)))
    for s in stages:
        # upstream's part (and its module builds) does not depend on the dtypes
        assert two[s] - ours_two[s] == pytest.approx(one[s] - ours_one[s]), s
        assert ours_two[s] > ours_one[s], s
    build = {s: CPU_COST["build"][s] for s in ("llm", "flow", "hift")}
    for s in ("flow", "hift"):  # no bf16 factor: the cosyjax part doubles
        assert ours_two[s] - build[s] == pytest.approx(2 * (ours_one[s] - build[s])), s
    assert ours_bf16["llm"] > ours_one["llm"]  # the measured bf16 decode-step slow path on XLA:CPU
    assert ours_two["llm"] == pytest.approx(ours_one["llm"] + ours_bf16["llm"] - build["llm"])
    quick = make_workload(quick=True, seconds=None, batch_sizes=None, repeats=None, backend="cpu",
                          dtypes=("float32", "bfloat16"))
    assert estimate(quick, ["flow", "stream"], False) == {"flow": 12.0, "stream": 6.0, "startup": CPU_COST["startup"]}


def test_full_size_e2e_request_shares_the_stage_rows_shapes():
    """At the release dims the e2e request pads to the flow and HiFT rows' buckets (so in one process the
    stage rows are its warm-up) and its first stream chunk fits in the generated tokens."""
    from cosyjax.flow.flow import token_bucket
    from cosyjax.hift.generator import mel_bucket

    wl = make_workload(quick=False, seconds=None, batch_sizes=None, repeats=None, backend="cpu")
    ratio = wl.config.flow.token_mel_ratio
    assert (wl.flow_tokens, wl.hift_frames, wl.e2e_tokens, wl.llm_steps) == (250, 500, 240, 25)
    assert token_bucket(wl.prompt_tokens + wl.e2e_tokens) == token_bucket(wl.prompt_tokens + wl.flow_tokens)
    assert mel_bucket(ratio * wl.e2e_tokens) == mel_bucket(wl.hift_frames)
    assert wl.batch_sizes == (1, 8, 32)
    assert make_workload(quick=False, seconds=None, batch_sizes=None, repeats=None, backend="gpu").batch_sizes == (
        1, 16, 64)
    with pytest.raises(ValueError, match="seconds"):
        make_workload(quick=False, seconds=0.5, batch_sizes=None, repeats=None, backend="cpu")


def _fake_rows(with_upstream: bool, gpu: bool) -> list[dict]:
    rows = []
    for name, unit, ours, up in (("Flow", "s", 53.2, 54.7), ("LLM decode, bs 8", "ms/token", 46.1, 83.0),
                                 ("E2E non-stream, bs 1", "RTF", 8.9, 12.1)):
        row = new_row("x", name, "workload", unit)
        row.update(cosyjax=ours, cosyjax_warmup_s=60.0, cosyjax_compile_s=8.0, cosyjax_timed_compiles=0)
        mem = ({"host_peak_mb": 4000.0, "host_start_mb": 3000.0, "host_peak_scope": "block",
                "jax_device_peak_mb": 2048.0} if gpu else
               {"host_peak_mb": 4000.0, "host_start_mb": 3000.0, "host_peak_scope": "block"})
        row["memory"]["cosyjax"] = mem
        if with_upstream:
            row.update(upstream=up, upstream_device="cuda" if gpu else "cpu", agreement="mel max diff 2e-06")
            row["memory"]["upstream"] = dict(mem, torch_device_peak_mb=1024.0) if gpu else dict(mem)
        rows.append(finish_row(row))
    return rows


@pytest.mark.parametrize("with_upstream", [False, True])
@pytest.mark.parametrize("gpu", [False, True])
def test_table_formats(with_upstream, gpu):
    """The table with and without upstream columns filled, with host and device memory."""
    rows = _fake_rows(with_upstream, gpu)
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    flow = lines[2]
    if with_upstream:
        assert f"| {53.2 / 54.7:.2f} |" in flow and "mel max diff" in flow
    else:
        assert rows[0]["ratio"] is None and "| – | – | – |" in flow
    if gpu:
        assert "2.00 GB dev" in flow and (("2.00 GB dev / 1.00 GB dev" in flow) if with_upstream else True)
    else:
        assert "3.9 GB (+0.98)" in flow
    assert "RTF 8.9" in lines[4]
    result = {"machine": {"date_utc": "2026-11-25T00:00:00+00:00", "jax_backend": "gpu" if gpu else "cpu",
                          "device_kind": "NVIDIA H100" if gpu else "cpu", "cpu_model": "x", "cpu_count": 2,
                          "load_average_start": [0.1, 0.1, 0.1], "python": "3.11",
                          "versions": {"jax": "0.10.2", "flax": "0.12.8", "torch": "2.13.0", "transformers": "4.51.3"}},
              "settings": {"quick": False, "reference_repo": "/up" if with_upstream else None,
                           "upstream_commit": None},
              "rows": rows, "notes": ["a note"], "elapsed_s": 1.0, "estimate_s": None if gpu else 2.0}
    report = markdown_report(result)
    assert table in report and "- a note" in report
    assert ("upstream /up" in report) if with_upstream else ("no upstream" in report)
    assert "busy" not in report
    result["machine"]["load_average_start"] = [5.0, 5.0, 5.0]
    assert "⚠ the machine was busy" in markdown_report(result)
    json.dumps(result)  # JSON-ready


def test_dtype_rows_in_the_table_and_a_non_finite_row_fails():
    """bf16 rows next to float32 ones: names, the auto line of the header, the bf16 / float32 line, and a row
    whose output holds NaN shows ✗ and its error."""
    rows = _fake_rows(True, False)[:1]
    bf16 = new_row("flow", "Flow", "workload", "s", dtype="bfloat16")
    bf16.update(cosyjax=26.6, upstream=54.7, agreement="mel max diff 0.03", memory={"cosyjax": {}})
    assert bf16["name"] == "Flow, bf16" and bf16["dtype"] == "bfloat16"
    rows.append(finish_row(bf16))
    bad = new_row("hift", "HiFT", "workload", "s", dtype="bfloat16")
    bad.update(cosyjax=1.0, memory={"cosyjax": {}})
    assert non_finite(bad, "audio", [0.0, float("nan"), float("inf")]) is True
    assert not non_finite(rows[1], "mel", [[0.0, 1.0]]) and "error" not in rows[1]
    rows.append(finish_row(bad))
    rows[0]["stage"] = "flow"
    auto = {"backend": "cpu", "llm": "float32", "flow": "float32", "hift": "float32", "name": "float32"}
    comparison = dtype_comparison(rows, auto)
    assert comparison == [{"stage": "flow", "name": "Flow", "float32": 53.2, "bfloat16": 26.6, "bf16_over_float32": 0.5,
                           "faster": "bfloat16", "auto": "float32", "auto_picks_faster": False}]
    result = {"machine": {"date_utc": "2026-11-25T00:00:00+00:00", "jax_backend": "cpu", "device_kind": "cpu",
                          "cpu_model": "x", "cpu_count": 2, "load_average_start": [0.1, 0.1, 0.1], "python": "3.11",
                          "versions": {"jax": "0.10.2", "flax": "0.12.8", "torch": "2.13.0", "transformers": "4.51.3"}},
              "settings": {"quick": True, "reference_repo": "/up", "upstream_commit": None,
                           "dtypes": ["float32", "bfloat16"], "auto_policy": auto},
              "rows": rows, "dtype_comparison": comparison, "notes": [], "elapsed_s": 1.0, "estimate_s": None}
    report = markdown_report(result)
    assert "cosyjax float32 and bfloat16 (bf16 rows: ', bf16'), upstream float32." in report
    assert "`auto` on cpu picks float32 for every stage." in report
    assert "Flow 0.50 (auto float32 ✗)" in report
    lines = [ln for ln in report.splitlines() if ln.startswith("| Flow, bf16 |")]
    assert len(lines) == 1 and f"| {26.6 / 54.7:.2f} |" in lines[0]
    bad_line = next(ln for ln in report.splitlines() if ln.startswith("| HiFT, bf16 |"))
    assert "✗ audio: 2 of 3 values are NaN/inf" in bad_line
    json.dumps(result)


def test_a_non_finite_row_fails_the_run(monkeypatch, tmp_path):
    """The run exits 1 and names the row when a stage returns a row with NaN/inf output (the rows stay)."""
    from benchmarks import cli, hift

    def fake(bundle):
        row = new_row("hift", "HiFT", "workload", "s", dtype="bfloat16")
        row.update(cosyjax=1.0)
        non_finite(row, "audio", [float("nan")])
        return [finish_row(row)]

    monkeypatch.setattr(hift, "run", fake)
    out_json = tmp_path / "bench.json"
    assert cli.main(["--quick", "--stages", "hift", "--dtypes", "bfloat16", "--json", str(out_json)]) == 1
    result = json.loads(out_json.read_text())
    assert [r["name"] for r in result["rows"]] == ["HiFT, bf16"]
    assert result["errors"] == [{"stage": "hift", "row": "HiFT, bf16",
                                 "error": "HiFT, bf16: audio: 1 of 1 values are NaN/inf"}]
