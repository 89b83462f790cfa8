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

from benchmarks.common import markdown_report, markdown_table, new_row, finish_row  # noqa: E402
from benchmarks.workload import make_workload  # noqa: E402

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
    for row in result["rows"]:
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
