"""benchmarks/stack_accuracy.py: held-out memory of runs synthesised from known parts, the need of
pressure rows, and capacity against OOM (an OOM row is never judged feasible)."""

from __future__ import annotations

import sys
from pathlib import Path

from ringplan.hardware import load_catalog
from ringplan.models import load_model_catalog
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout

REPO = Path(__file__).resolve().parents[2]
H100_DRIVER = "NVIDIA H100 80GB HBM3"
MIB = 2**20
#: Held-out error of runs made exactly from the model's own feature forms (least-squares rounding only).
SYNTHETIC_REL_TOL = 1e-3


def workload(tokens: int, model, **settings) -> StackWorkload:
    return StackWorkload(model=model, seq_len_tokens=tokens, world_size=2,
                         layout=RingLayout(ring_size=2, layout="zigzag"), settings=StackSettings(**settings))


def synthetic_rows(usable: float):
    """llama-3-8b@4L on 2 ranks at rising lengths: workspace = 300 MiB + ½ hidden, slack at rest =
    200 MiB + 1.3 stashed q + the gathered unit, 700 MiB outside; a run whose need (slack capped
    at 1 GiB under pressure) exceeds the GPU is recorded as OOM, without figures."""
    from ringplan.memory.stack_model import analytic_terms, gathered_block_feature_bytes, stashed_q_bytes, under_pressure
    from ringplan.profiles.stack import measurement_from_workload

    model, rows = load_model_catalog().model("llama-3-8b").with_layers(4), []
    for tokens in (8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152):
        w = workload(tokens, model, checkpointing="full")
        allocated = sum(analytic_terms(w).values()) + 300 * MIB + 0.5 * tokens // 2 * model.embed_dim * 2
        slack = 200 * MIB + 1.3 * stashed_q_bytes(w) + gathered_block_feature_bytes(w)
        if under_pressure(allocated, usable):
            slack = min(slack, 1024 * MIB)
        used = allocated + slack + 700 * MIB
        figures = dict(peak_allocated_bytes=allocated, peak_reserved_bytes=allocated + slack, device_used_bytes=used)
        rows.append(measurement_from_workload(w, gpu="h100-80gb-sxm", oom=used > usable,
                                              **({} if used > usable else figures)))
    return rows


def test_stack_accuracy_recovers_synthetic_runs(tmp_path):
    """Held-out allocated and at-rest errors vanish on synthetic runs, the rows that exceed the GPU
    are judged infeasible, and the markdown has one held-out line per row and a summary per figure."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import stack_accuracy

    from ringplan.profiles.envelope import Provenance
    from ringplan.profiles.stack import StackProfile, write_stack_profile

    rows = synthetic_rows(load_catalog().gpu("h100").usable_memory_bytes)
    assert any(r.oom for r in rows) and sum(not r.oom for r in rows) >= 4
    path = tmp_path / "synthetic.json"
    write_stack_profile(path, StackProfile(provenance=Provenance(gpu_driver_name=H100_DRIVER, method="synthetic"),
                                           rows=tuple(rows)))
    payload = stack_accuracy.report([path], tmp_path / "out", "test")
    memory = [x for x in payload["lines"] if x["figure"] in stack_accuracy.MEMORY_FIGURES]
    assert {x["figure"] for x in memory} == set(stack_accuracy.MEMORY_FIGURES)
    assert max(abs(x["error"]) for x in memory) < SYNTHETIC_REL_TOL
    assert all(s["oom_judged_feasible"] == 0 for s in payload["capacity_summary"])
    text = (tmp_path / "out" / "stack_accuracy.md").read_text()
    assert text.count("| h100-80gb-sxm | llama-3-8b@4L") >= len(memory) // len(stack_accuracy.MEMORY_FIGURES)
    assert "| memory (held out) | h100-80gb-sxm | peak allocated |" in text


def test_committed_h200_runs_never_over_predict_capacity(tmp_path):
    """The committed H200 sweep: both OOM rows judged infeasible at every margin, and the need of
    each pressure row (fit without it) within NEED_REL_TOL of the device memory it used."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import stack_accuracy

    need_rel_tol = 0.03
    path = REPO / "profiles" / "measured" / "stack" / "stack-h200-2026-11-26.json"
    payload = stack_accuracy.report([path], tmp_path, "test")
    assert all(s["oom_rows"] >= 2 and s["oom_judged_feasible"] == 0 for s in payload["capacity_summary"])
    need = [x for x in payload["lines"] if x["figure"] == stack_accuracy.NEED_FIGURE]
    assert len(need) == 2 and all(abs(x["error"]) < need_rel_tol for x in need)
