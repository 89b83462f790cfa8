"""`cosyjax parity check`: report files, stage selection, not-implemented groups fail, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cosyjax.parity.case import CaseError, load_case
from cosyjax.parity.check import CheckError, run_check, select_groups
from cosyjax.parity.compare import compare_close, compare_equal, format_comparison

from conftest import DATA, case_dirs

TINY_CASE = os.path.join(DATA, "tiny-a")


def test_compare_close_reports_index_and_values():
    ref = np.zeros((2, 3), np.float32)
    ours = ref.copy()
    ours[1, 2] = 0.5
    c = compare_close("k", ours, ref, atol=0.1)
    assert not c.passed and c.index == [1, 2] and c.ours_at == 0.5 and c.ref_at == 0.0
    assert "at (1, 2) ours=0.5 ref=0" in format_comparison(c)
    assert compare_close("k", ref, ref, atol=0.0).passed
    assert not compare_close("k", np.zeros(3), ref, atol=1.0).passed  # shape mismatch
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_close("k", nan, ref, atol=1.0).passed


def test_compare_snr_floor():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1000)
    ours = ref + 1e-4 * rng.standard_normal(1000)
    assert compare_close("a", ours, ref, atol=1e-2, snr_min=60).passed
    assert not compare_close("a", ours, ref, atol=1e-2, snr_min=100).passed


def test_compare_equal():
    assert compare_equal("t", np.arange(4), np.arange(4)).passed
    c = compare_equal("t", np.array([1, 2, 9]), np.array([1, 2, 3]))
    assert not c.passed and c.index == [2]


def test_select_groups():
    case = load_case(TINY_CASE)
    assert select_groups(case, ["hift"]) == ["hift", "hift_partial"]
    assert select_groups(case, ["llm_greedy", "flow"]) == ["llm_greedy", "flow", "flow_stream", "flow_stream_partial"]
    with pytest.raises(CheckError, match="unknown stage"):
        select_groups(case, ["vocoder"])


def test_bad_case_dir(tmp_path):
    with pytest.raises(CaseError, match="not found"):
        load_case(str(tmp_path / "none"))
    with pytest.raises(CaseError, match="missing golden.npz"):
        load_case(str(tmp_path))


def _full_check_params() -> list:
    """tiny-a (the independently made case) runs in the default suite; the other committed cases are ``slow``
    here because every group of theirs is already checked in the default suite by its stage's test file
    (test_llm/test_flow/test_hift/test_model/test_train_losses ``test_parity``-style tests, same runners)."""
    return [pytest.param(d, marks=() if d == TINY_CASE else pytest.mark.slow) for d in case_dirs()]


@pytest.mark.parametrize("case_dir", _full_check_params(), ids=os.path.basename)
def test_check_every_committed_case_passes(case_dir, tmp_path):
    """The acceptance run: every group of every committed case passes, with all report files written."""
    out = tmp_path / "report"
    report = run_check(case_dir, str(out), progress=False)
    failing = [(g["group"], g["status"], g["message"][:200], g["worst"]) for g in report["groups"]
               if g["status"] != "pass"]
    assert not failing, failing
    assert report["passed"]
    for name in ("report.json", "report.html", "outputs.npz"):
        assert (out / name).is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["passed"] and on_disk["dtype"] == "float32" and on_disk["backend"] == "cpu"
    case = load_case(case_dir)
    with np.load(out / "outputs.npz") as z:
        for key in z.files:  # our outputs use the reference's keys and shapes
            assert key in case.arrays and z[key].shape == case.arrays[key].shape, key
    assert any(name.endswith(".png") for name in os.listdir(out))


def test_unknown_group_is_not_implemented_and_fails(tmp_path):
    """A group the harness does not know counts as a failure, never as passed."""
    case = tmp_path / "case"
    shutil.copytree(TINY_CASE, case)
    with np.load(case / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["e2e/audio"] = np.zeros((1, 10), np.float32)
    np.savez(case / "golden.npz", **arrays)
    out = tmp_path / "r"
    report = run_check(str(case), str(out), stages=["e2e", "hift"], progress=False)
    status = {g["group"]: g["status"] for g in report["groups"]}
    assert status["e2e"] == "not-implemented"
    assert status["hift"] == "pass"
    assert not report["passed"]


def test_existing_report_dir_is_refused(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    with pytest.raises(CheckError, match="output exists"):
        run_check(TINY_CASE, str(out), stages=["hift"], progress=False)


def test_cli_check_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "cosyjax.cli", "parity", "check", "--case", TINY_CASE, "--out",
                         str(tmp_path / "r"), "--stages", "hift", "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASSED" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cosyjax.cli", "parity", "check", "--case", TINY_CASE, "--out",
                          str(tmp_path / "r2"), "--stages", "nonsense", "--quiet"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


@pytest.mark.upstream
def test_live_on_a_release_dir(tmp_path):
    """`parity live` builds upstream from a release dir, captures every group and passes the check."""
    repo = os.environ.get("COSYJAX_REFERENCE_REPO")
    if not repo:
        pytest.skip("set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout to run upstream live")
    from cosyjax.parity.live import run_live

    report = run_live(repo, os.path.join(DATA, "tiny-b", "model"), str(tmp_path / "live"))
    assert report["passed"], [(g["group"], g["status"]) for g in report["groups"]]
    assert set(report["selected"]) >= {"llm", "llm_greedy", "flow", "flow_stream", "hift", "hift_partial"}
    assert (tmp_path / "live" / "live-case.npz").is_file()


def test_bfloat16_check_passes_its_measured_bounds(tmp_path):
    """bf16 conversion: each stage stays inside the bf16 bounds measured in parity/TOLERANCES.md."""
    report = run_check(TINY_CASE, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    assert report["dtype"] == "bfloat16"
    assert report["passed"], [(g["group"], g["status"], g["worst"]) for g in report["groups"]]
    hift = next(g for g in report["groups"] if g["group"] == "hift")
    assert hift["min_snr_db"] >= 25.0
