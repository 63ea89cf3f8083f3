"""``ringplan calibrate`` through CliRunner on CPU (the hidden ``--device cpu`` switch): the plumbing end to
end into a throwaway profiles tree (rows with provenance, merged on a second run, the refit), the budget
cut-off, and bad input as one ``Error:`` line with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ringplan.cli import main

torch = pytest.importorskip("torch")

from ringplan.profiles.attention import load_profile  # noqa: E402
from ringplan.profiles.gemm import load_gemm_profile  # noqa: E402
from ringplan.profiles.timing import load_timing_profile  # noqa: E402

REPO_PROFILES = Path(__file__).resolve().parents[2] / "profiles"
CPU = ["calibrate", "--device", "cpu", "--record-as", "h100", "--no-progress", "--format", "json"]
GPU_NAME = "h100-80gb-sxm"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the committed profiles: calibrate writes and refits here, never in the checkout."""
    target = tmp_path_factory.mktemp("profiles") / "profiles"
    shutil.copytree(REPO_PROFILES, target, ignore=shutil.ignore_patterns("*.lock"))
    return target


@pytest.fixture(scope="module")
def first_run(tree):
    """One CPU calibration into ``tree`` (exit code, output, the attention file's rows after it)."""
    result = CliRunner().invoke(main, [*CPU, "--profiles-dir", str(tree), "--budget-s", "120"])
    rows = load_profile(tree / "measured" / f"{GPU_NAME}-calibrate.json").rows
    return result, rows


def test_rows_are_written_with_provenance(first_run, tree):
    """Every planned attention point is a measured row recorded as the catalog GPU, with provenance naming
    the command; the kernel and GEMM files load with the standard readers and carry the command too."""
    result, rows = first_run
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["complete"] and answer["gpu"] == GPU_NAME
    attention = next(p for p in answer["phases"] if p["name"] == "attention")
    assert attention["done"] == attention["planned"] == len(rows) > 0
    assert {r.gpu for r in rows} == {GPU_NAME} and all(r.kind == "measured" for r in rows)
    assert {r.training for r in rows} == {False, True} and any(r.projections for r in rows)
    profile = load_profile(tree / "measured" / f"{GPU_NAME}-calibrate.json")
    command = profile.provenance.command
    assert command.startswith("ringplan calibrate ") and "--record-as h100" in command and "--budget-s 120" in command
    assert profile.provenance.torch_version == torch.__version__
    kernels = load_timing_profile(next(p for p in answer["phases"] if p["name"] == "kernels")["written"][0])
    gemm = load_gemm_profile(next(p for p in answer["phases"] if p["name"] == "gemm")["written"][0])
    for timing in (kernels, gemm):
        assert timing.rows and timing.provenance["command"] == profile.provenance.command


def test_refit_includes_the_new_profile(first_run, tree):
    """The refit wrote the fit file of the tree, whose inputs now hash the calibrate profile."""
    result, _ = first_run
    fitted = json.loads((tree / "fitted" / "memory-fit.json").read_text())
    assert f"{GPU_NAME}-calibrate.json" in fitted["inputs"]["profiles"]
    assert GPU_NAME in fitted["calibrations"]
    answer = json.loads(result.stdout)
    assert answer["default_query"]["after"]["uncertainty_bytes"] >= 0
    assert GPU_NAME in answer["default_query"]["after"]["provenance"]


def test_second_run_merges_rows(first_run, tree):
    """A second run keeps the rows on disk (merged by key: same points, same count) and adds its provenance
    to the file's history instead of truncating the file; the first run's timing files stay."""
    _, rows = first_run
    timing_before = set((tree / "measured" / "timing").glob("*.json"))
    stale = tree / "measured" / f"{GPU_NAME}-calibrate.json"
    data = json.loads(stale.read_text())
    data["provenance"]["hostname"] = "an earlier machine"
    stale.write_text(json.dumps(data))
    result = CliRunner().invoke(main, [*CPU, "--profiles-dir", str(tree), "--budget-s", "120"])
    assert result.exit_code == 0, result.output
    again = load_profile(stale)
    assert {r.key for r in again.rows} == {r.key for r in rows}
    assert any(entry.get("hostname") == "an earlier machine" for entry in again.history)
    assert timing_before <= set((tree / "measured" / "timing").glob("*.json"))


def test_a_tiny_budget_is_cut_and_says_so(tmp_path):
    """With a budget too short to start a ring, the attention points are skipped (listed), the run exits 1,
    and whatever was written still loads (the kernel file: merges only)."""
    tree = tmp_path / "profiles"
    shutil.copytree(REPO_PROFILES, tree, ignore=shutil.ignore_patterns("*.lock"))
    result = CliRunner().invoke(main, [*CPU[:-2], "--profiles-dir", str(tree), "--budget-s", "0.05"])
    assert result.exit_code == 1, result.output
    assert "(budget)" in result.stderr and "cut some measurements" in result.stdout
    assert not (tree / "measured" / f"{GPU_NAME}-calibrate.json").exists()
    for path in (tree / "measured" / "timing").glob("*calibrate*.json"):
        assert load_timing_profile(path).rows


@pytest.mark.parametrize("args, message", [
    (["calibrate"], "calibrate needs a CUDA GPU"),
    (["calibrate", "--device", "cpu"], "--record-as"),
    (["calibrate", "--device", "cpu", "--record-as", "no-such-gpu"], "no-such-gpu"),
    (["calibrate", "--budget-s", "0"], "--budget-s"),
    (["calibrate", "--budget-s", "-5"], "--budget-s"),
    (["calibrate", "--budget-s", "nan"], "--budget-s"),
    (["calibrate", "--profiles-dir", "/no/such/dir"], "--profiles-dir"),
])
def test_bad_input_is_one_error_line(args, message):
    """Bad input (no GPU without the CPU switch, a CPU run without a catalog name, an unknown name, a budget
    that is not a positive finite number, a missing profiles tree): exit 2, one ``Error:`` line naming it."""
    if args == ["calibrate"] and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
