"""ringplan_runtime.host_pinned (parsing, readings, the tensor census) and benchmarks/pinned_host_check.py's
rows and records on a fake measurement. CPU only, fast; the CUDA host allocator path is skipped without CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ringplan_runtime.host_pinned import (PinnedHostReading, PinnedSampler, allocator_figures, census_of,
                                          host_tensor_census, max_reading, parse_proc_status, power_of_two_at_least,
                                          reading_from)

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30

PROC_STATUS = """Name:\tpython3
Umask:\t0022
State:\tR (running)
VmPeak:\t 9000000 kB
VmSize:\t 8000000 kB
VmLck:\t       4 kB
VmPin:\t       0 kB
VmHWM:\t 2000000 kB
VmRSS:\t 1500000 kB
Threads:\t4
"""
OLD_STATS = {"allocated_bytes.current": 10, "allocated_bytes.peak": 30, "reserved_bytes.current": 40,
             "reserved_bytes.peak": 64, "allocation.current": 2, "segment.current": 2, "num_host_alloc": 3}
NEW_STATS = {"active_bytes.current": 10, "active_bytes.peak": 30, "allocated_bytes.current": 40,
             "allocated_bytes.peak": 64, "active_requests.current": 2, "allocations.current": 2}


def test_parse_proc_status_in_bytes():
    got = parse_proc_status(PROC_STATUS)
    assert got == {"VmLck": 4096, "VmPin": 0, "VmHWM": 2_000_000 * 1024, "VmRSS": 1_500_000 * 1024}
    assert parse_proc_status("VmLck:\t12 kB\n", names=("VmLck", "VmPin")) == {"VmLck": 12 * 1024}  # no VmPin
    assert parse_proc_status("garbage\nVmLck: x kB\n") == {}


@pytest.mark.parametrize("stats", [OLD_STATS, NEW_STATS], ids=["older-torch", "newer-torch"])
def test_allocator_figures_read_both_namings(stats):
    got = allocator_figures(stats)
    assert (got["in_use_bytes"], got["in_use_peak_bytes"], got["held_bytes"], got["held_peak_bytes"]) == (10, 30, 40, 64)


def test_allocator_figures_without_statistics():
    assert allocator_figures({})["held_peak_bytes"] is None
    assert allocator_figures({"x.current": 1})["schema"].startswith("unknown keys")


def test_reading_from_names_its_sources():
    r = reading_from(NEW_STATS, "torch.cuda.host_memory_stats", parse_proc_status(PROC_STATUS))
    assert r.allocator_held_peak_bytes == 64 and r.allocator_in_use_bytes == 10
    assert r.proc_locked_bytes == 4096 and r.proc_pinned_bytes == 0 and r.proc_rss_peak_bytes == 2_000_000 * 1024
    assert "active_bytes" in r.allocator_source and "VmLck, VmPin" in r.proc_source
    empty = reading_from({}, "no CUDA", {})
    assert empty.allocator_held_bytes is None and empty.allocator_source == "no CUDA" and "unreadable" in empty.proc_source


def test_max_reading_and_sampler():
    a = PinnedHostReading(allocator_held_bytes=5, proc_rss_bytes=None, allocator_source="s")
    b = PinnedHostReading(allocator_held_bytes=3, proc_rss_bytes=7)
    m = max_reading(a, b)
    assert (m.allocator_held_bytes, m.proc_rss_bytes, m.allocator_source) == (5, 7, "s")
    values = iter([1, 9, 4] + [2] * 1000)
    sampler = PinnedSampler(reader=lambda: PinnedHostReading(allocator_held_bytes=next(values)), interval_s=0.001)
    with sampler:
        pass
    assert sampler.samples >= 2 and sampler.peak.allocator_held_bytes == 9  # entry 1, then 9 (loop or exit)


def test_read_pinned_host_on_this_machine():
    from ringplan_runtime.host_pinned import read_pinned_host

    r = read_pinned_host()
    if sys.platform.startswith("linux"):
        assert r.proc_rss_bytes and r.proc_rss_bytes > 0
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert r.allocator_held_bytes is None and r.allocator_source in ("no CUDA", "CUDA not initialised")


@pytest.mark.gpu
def test_pinned_allocator_sees_pin_memory():
    torch = pytest.importorskip("torch")
    from ringplan_runtime.host_pinned import read_pinned_host

    torch.cuda.init()
    before = read_pinned_host().allocator_in_use_bytes or 0
    t = torch.empty(3 * 2**20, dtype=torch.uint8).pin_memory()
    after = read_pinned_host()
    assert after.allocator_in_use_bytes - before >= t.nbytes
    assert after.allocator_held_bytes >= after.allocator_in_use_bytes


def test_census_counts_storages_once_and_by_state():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(8, 4)
    model.extra = torch.nn.Parameter(model.weight.detach()[:2])  # a view: same storage, counted once
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    census = host_tensor_census(model, optimizer)
    assert census["params"] == {"bytes": (32 + 4) * 4, "pinned_bytes": 0, "pinned_rounded_bytes": 0, "tensors": 2}
    assert census["grads"]["bytes"] == 32 * 4 + 4 * 4  # ``extra`` is unused: no gradient, no AdamW state
    assert census["exp_avg"]["bytes"] == census["exp_avg_sq"]["bytes"] == census["grads"]["bytes"]
    assert census["step"]["tensors"] == 2
    zero = {"bytes": 0, "pinned_bytes": 0, "pinned_rounded_bytes": 0, "tensors": 0}
    assert census_of({"a": [None], "b": []}) == {"a": zero, "b": zero}
    assert [power_of_two_at_least(n) for n in (0, 1, 3, 4, 5, 12 * 2**20)] == [0, 1, 4, 4, 8, 16 * 2**20]


# ----------------------------------------------------------------------------- the benchmark's records


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import pinned_host_check

    return pinned_host_check


def _fake_measurement(pred: dict, case_name: str, *, ckpt_tracker: float | None = None) -> dict:
    t = pred["host_terms"]
    held = int(pred["host_memory_bytes_per_gpu"] * 0.5)
    census = {"params": {"bytes": int(t["offloaded_params_bytes"]), "pinned_bytes": int(t["offloaded_params_bytes"]),
                         "pinned_rounded_bytes": 2 * GIB, "tensors": 10},
              "grads": {"bytes": int(t["offloaded_gradients_bytes"]),
                        "pinned_bytes": int(t["offloaded_gradients_bytes"]), "tensors": 10},
              "exp_avg": {"bytes": int(t["offloaded_optimizer_states_bytes"] / 2), "pinned_bytes": 0, "tensors": 10},
              "exp_avg_sq": {"bytes": int(t["offloaded_optimizer_states_bytes"] / 2), "pinned_bytes": 0, "tensors": 10},
              "step": {"bytes": 40, "pinned_bytes": 0, "tensors": 10}}
    after = reading_from(NEW_STATS | {"allocated_bytes.peak": held, "active_bytes.peak": held - 100},
                         "torch.cuda.host_memory_stats", parse_proc_status(PROC_STATUS)).as_dict()
    return {"case": case_name, "ok": True, "failure": None, "phase": "done", "samples": 12,
            "readings": {"after_step": after, "at_optimizer_step": {"allocator_in_use_bytes": 2 * GIB}},
            "sampled_peak": after, "census_at_optimizer_step": census,
            "runtime_host_tracker_peak_bytes": ckpt_tracker,
            "provenance": {"gpu_name": "NVIDIA H100 80GB HBM3", "driver_version": "580.1", "torch_version": "2.11.0",
                           "git_sha": "stale", "command": "x"}}


def test_rows_and_records_on_a_fake_measurement(tmp_path):
    bench = _bench()
    case = next(c for c in bench.CASES if c.model == "qwen3-0.6b" and c.offload_params and not c.offload_checkpoints)
    pred = bench.predicted(bench.case_workload(case))
    t = pred["host_terms"]
    assert t["offloaded_checkpoints_bytes"] == 0 and t["offloaded_params_bytes"] > 2 * GIB  # ~0.6 B fp32 params
    assert pred["host_memory_bytes_per_gpu"] == pytest.approx(sum(t.values()))
    assert pred["pinned_per_torch_source_bytes"] == pytest.approx(t["offloaded_params_bytes"]
                                                                  + t["offloaded_gradients_bytes"])
    record = bench.build_record(case, _fake_measurement(pred, case.name), command="OUT=x bash s.sh", git_sha="abc")
    rows = {r["figure"]: r for r in record["rows"]}
    total = rows["host total (Σ host_terms) vs allocator held peak"]
    assert total["measured_bytes"] == int(pred["host_memory_bytes_per_gpu"] * 0.5)
    assert total["error_pct"] == pytest.approx(100.0 * (pred["host_memory_bytes_per_gpu"] / total["measured_bytes"] - 1))
    assert rows["offloaded_params_bytes vs census params (pinned)"]["error_pct"] == pytest.approx(0, abs=1e-6)
    by_source = rows["pinned per torch source (params + grads + ckpt) vs census pinned at the optimizer step"]
    assert by_source["error_pct"] == pytest.approx(0, abs=1e-6)
    assert "0 bytes of them pinned" in rows["offloaded_optimizer_states_bytes vs census exp_avg + exp_avg_sq (any)"]["source"]
    assert rows["offloaded_optimizer_step_bytes (sqrt(v) in the CPU step)"]["measured_bytes"] is None
    assert "offloaded_checkpoints_bytes vs runtime host tracker peak" not in rows  # no such term here
    assert rows["/proc VmLck (sampled max)"]["measured_bytes"] == 4096
    cross = next(r for f, r in rows.items() if f.startswith("cross-check: census pinned"))
    assert cross["predicted_bytes"] == 2 * GIB and cross["error_pct"] == pytest.approx(0)
    assert record["provenance"]["git_sha"] == "abc" and record["provenance"]["git_sha_runtime"] == "stale"
    assert record["provenance"]["command"] == "OUT=x bash s.sh"

    ckpt_case = next(c for c in bench.CASES if c.offload_checkpoints and not c.offload_params)
    ckpt_pred = bench.predicted(bench.case_workload(ckpt_case))
    assert ckpt_pred["host_terms"]["offloaded_params_bytes"] == 0 and ckpt_pred["host_terms"]["offloaded_checkpoints_bytes"] > 0
    ckpt = bench.build_record(ckpt_case, _fake_measurement(ckpt_pred, ckpt_case.name, ckpt_tracker=1.0 * GIB),
                              command="c", git_sha=None)
    ckpt_rows = {r["figure"]: r for r in ckpt["rows"]}
    assert ckpt_rows["offloaded_checkpoints_bytes vs runtime host tracker peak"]["measured_bytes"] == GIB
    assert "offloaded_params_bytes vs census params (pinned)" not in ckpt_rows

    failed = bench.build_record(case, {"case": case.name, "ok": False, "failure": "timeout after 120 s"},
                                command="c", git_sha="abc")
    assert not failed["ok"] and all(r["measured_bytes"] is None for r in failed["rows"])
    json_path, md_path = bench.write_outputs([record, ckpt, failed], tmp_path, command="OUT=x bash s.sh", git_sha="abc")
    data = json.loads(json_path.read_text())
    assert data["schema"] == bench.SCHEMA and data["gpu_name"] == "NVIDIA H100 80GB HBM3" and data["git_sha"] == "abc"
    text = md_path.read_text()
    assert "| host total (Σ host_terms) vs allocator held peak |" in text and "timeout after 120 s" in text
    assert "OUT=x bash s.sh" in text and "torch 2.11.0" in text


def test_error_pct_convention():
    bench = _bench()
    assert bench.error_pct(110.0, 100.0) == pytest.approx(10.0)
    assert bench.error_pct(None, 1.0) is None and bench.error_pct(1.0, 0) is None and bench.error_pct(1.0, None) is None
