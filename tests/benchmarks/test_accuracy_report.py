"""benchmarks/accuracy_report.py on synthetic profiles made from known coefficients (round trip):
the held-out error is ~0 when the data follow the analytic model, and the capacity check finds
the boundary the synthetic device was given."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ringplan.memory.attention_fits import row_inputs
from ringplan.memory.attention_terms import terms_at
from ringplan.profiles.attention import Measurement, Profile, write_profile
from ringplan.profiles.envelope import Provenance

REPO = Path(__file__).resolve().parents[2]
#: A refit of exact synthetic data must reproduce it (bounded least squares, weak prior).
ROUND_TRIP_REL_TOL = 1e-3
OVERHEAD_BYTES = 600e6
RESERVE_FACTOR = 1.02


def _report_module():
    spec = importlib.util.spec_from_file_location("accuracy_report", REPO / "benchmarks" / "accuracy_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(seq_len_tokens: int, ring_size: int, n_heads: int, n_kv_heads: int, **extra) -> Measurement:
    row = Measurement(gpu="h100", seq_len_tokens=seq_len_tokens, ring_size=ring_size, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=128, embed_dim=n_heads * 128, dtype="bf16", backend="cudnn",
                      **extra)
    allocated = sum(terms_at(row_inputs(row)).values())
    return Measurement(**{**{f: getattr(row, f) for f in row.__dataclass_fields__},
                          "peak_allocated_bytes": allocated, "peak_reserved_bytes": allocated * RESERVE_FACTOR,
                          "device_used_bytes": allocated * RESERVE_FACTOR + OVERHEAD_BYTES})


def test_round_trip_held_out_error_is_zero_and_boundary_is_found(tmp_path):
    """Rows generated from θ = 1 and a constant overhead: every held-out error ≤ ROUND_TRIP_REL_TOL;
    a synthetic OOM at the model's own limit gives a capacity error ≤ 1 % and never above."""
    report = _report_module()
    rows = [_row(s, p, h, kv) for p in (1, 2) for (h, kv) in ((32, 32), (32, 8))
            for s in (8192 * p, 16384 * p, 32768 * p, 49152 * p)]
    write_profile(tmp_path / "profile-h100.json", Profile(provenance=Provenance(source="synthetic"), rows=tuple(rows)))
    usable = 85_520_809_984
    probes = []
    for s in range(1_000_000, 3_000_000, 20_000):
        row = _row(s, 1, 32, 32)
        probes.append(Measurement(**{**{f: getattr(row, f) for f in row.__dataclass_fields__},
                                     "oom": row.device_used_bytes > usable}))
    write_profile(tmp_path / "bisect-h100.json", Profile(provenance=Provenance(source="synthetic"), rows=tuple(probes)))
    payload = report.report(sorted(tmp_path.glob("*.json")), tmp_path / "out")
    assert payload["memory"], "no held-out comparison was made"
    for line in payload["memory"]:
        assert line["max_abs_error"] <= ROUND_TRIP_REL_TOL, line
    margin_zero = [c for c in payload["capacity"] if c["safety_margin"] == 0.0]
    assert margin_zero and all(abs(c["error"]) <= 0.01 and c["never_above"] in (True, "unresolved")
                               for c in margin_zero), margin_zero
    assert json.loads((tmp_path / "out" / "accuracy.json").read_text())["capacity"]
    assert "| h100-80gb-sxm | 1 | dense/forward" in (tmp_path / "out" / "accuracy.md").read_text()


def test_held_out_split_alternates_within_each_series():
    """Sorted by tokens, the 2nd and 4th rows of each series are held out; the 1st and 3rd fitted."""
    report = _report_module()
    rows = [_row(s, 1, 32, 32) for s in (4096, 1024, 3072, 2048)]
    fit, held = report.split_held_out(rows)
    assert [r.seq_len_tokens for r in fit] == [1024, 3072]
    assert [r.seq_len_tokens for r in held] == [2048, 4096]


@pytest.mark.parametrize("probes, expected", [
    ([(100, False), (110, False), (120, True), (130, True)], (110, 120)),
    ([(100, False), (200, False)], (200, None)),
    ([(100, True)], (None, 100)),
])
def test_measured_boundary_is_last_run_below_first_oom(probes, expected):
    """The boundary is the largest feasible length below the smallest OOM length."""
    report = _report_module()
    rows = [Measurement(**{**{f: getattr(_row(s, 1, 32, 32), f) for f in Measurement.__dataclass_fields__},
                           "oom": oom}) for s, oom in probes]
    assert report.measured_boundary(rows) == expected


def _sweep_module():
    spec = importlib.util.spec_from_file_location("gpu_sweep", REPO / "benchmarks" / "gpu_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_sweep_dry_run_lists_every_part(tmp_path, capsys):
    """--dry-run prints the ringplan commands of a part (1 and 2 GPUs) and runs nothing."""
    sweep = _sweep_module()
    for part, count in (("profile", 4), ("bisect-h100", 2), ("bisect-emulated", 4)):
        assert sweep.main([str(tmp_path), "--part", part, "--dry-run"]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ringplan ")]
        assert len(lines) == count, lines
    assert not list(tmp_path.glob("summary-*.json"))


def test_gpu_sweep_step_failures_are_recorded_not_raised(tmp_path):
    """A step that fails or outlives its time is a record (exit code / 'timeout'), never an exception."""
    sweep = _sweep_module()
    import sys

    failed = sweep.run_step("profile-fails", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path, timeout_s=60)
    hung = sweep.run_step("profile-hangs", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path,
                          timeout_s=1)
    assert failed["exit_code"] == 3 and hung["exit_code"] == "timeout"
