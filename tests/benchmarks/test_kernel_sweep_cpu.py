"""CPU smoke test of ``benchmarks/kernel_sweep.py``: it runs end to end at tiny sizes, and what it writes is a
kernel profile ringplan loads plus held-out step records, both with provenance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ringplan.profiles.timing import KernelProfile, load_timing_profile  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_sweep.py"


def test_cpu_smoke_writes_a_loadable_kernel_profile_and_steps(tmp_path):
    """The smoke run exits 0; its kernel file loads as ringplan.kernels/1 with forward and backward rows of
    GQA ratios 1 and 2 and merge rows; its steps file holds every smoke step with a positive time."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (kernels,) = tmp_path.glob("kernels_*.json")
    profile = load_timing_profile(kernels)
    assert isinstance(profile, KernelProfile)
    attention = [r for r in profile.rows if r.op == "attention"]
    assert {r.pass_name for r in attention} == {"forward", "backward"}
    assert {r.n_heads // r.n_kv_heads for r in attention} == {1, 2}
    assert {r.causal for r in attention} == {False, True}
    assert any(r.op == "merge" for r in profile.rows)
    for key in ("gpu_driver_name", "torch_version", "git_sha", "date", "command", "method"):
        assert profile.provenance[key], key
    (steps,) = tmp_path.glob("steps_*.json")
    data = json.loads(steps.read_text())
    assert data["schema"] == "ringplan.kernel_steps/1"
    assert len(data["rows"]) == 2 and all(r["step_time_s"] > 0 for r in data["rows"])
