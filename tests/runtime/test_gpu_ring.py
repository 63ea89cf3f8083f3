"""GPU check (issue 3): the ring on NCCL in bf16 against the float64 dense reference, every backend.

Run on two GPUs (the lead's command)::

    python -m pytest -m gpu tests/runtime/test_gpu_ring.py -s -q

Prints one table row per (case, backend): relative errors of out / dq / dk / dv (norm-wise, worst
rank), the backend ``auto`` picks, backends skipped (with the reason) and whether each kernel
takes GQA natively; then asserts every error <= REL_TOL_BF16 and no case raised.
"""

from __future__ import annotations

import pytest
import torch
from tabulate import tabulate

from ringplan_runtime import spawn
from runtime.helpers import REL_TOL_BF16, Case, run_gpu_cases, with_seed

pytestmark = pytest.mark.gpu

BACKENDS = ("cudnn", "flash", "efficient", "math")
BIG = dict(seq_len_tokens=2048, heads=8, kv_heads=8, head_dim=128)
GPU_CASES = with_seed([
    Case(name="dense", **BIG),
    Case(name="causal_contiguous", causal=True, **BIG),
    Case(name="causal_zigzag", causal=True, layout="zigzag", **BIG),
    Case(name="gqa_causal_zigzag_b2", causal=True, layout="zigzag", batch=2, **{**BIG, "kv_heads": 2}),
    Case(name="dilated_short_long", kind="dilated", segment_lengths=(256, 2048), dilation_rates=(1, 4), **BIG),
    Case(name="dilated_causal_gqa", kind="dilated", causal=True, segment_lengths=(512, 2048), dilation_rates=(2, 2),
         **{**BIG, "kv_heads": 4}),
])
QUANTITIES = ("out", "dq", "dk", "dv")


def _merge(reports: list[dict]) -> dict:
    worst: dict = {}
    for report in reports:
        for key, errors in report["errors"].items():
            slot = worst.setdefault(key, {})
            if "error" in errors:
                slot["error"] = f"rank {report['rank']}: {errors['error']}"
            for name in QUANTITIES:
                if name in errors:
                    slot[name] = max(slot.get(name, 0.0), errors[name])
    return worst


def test_gpu_ring_bf16_matches_reference():
    """bf16 ring on NCCL (2 GPUs when present) within REL_TOL_BF16 of the dense reference, per backend."""
    world_size = min(2, torch.cuda.device_count())
    reports = spawn(run_gpu_cases, world_size=world_size, backend="nccl", args=(GPU_CASES, BACKENDS),
                    timeout_s=600)
    worst = _merge(reports)
    rows = [(case, backend, *(f"{errors[q]:.2e}" if q in errors else "-" for q in QUANTITIES),
             errors.get("error", "")) for (case, backend), errors in worst.items()]
    print(f"\nring on {world_size} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"auto backend: {reports[0]['auto']}, native GQA: {reports[0]['gqa']}")
    for backend, reason in reports[0]["skipped"].items():
        print(f"skipped {backend}: {reason}")
    print(tabulate(rows, headers=("case", "backend", *QUANTITIES, "error"), tablefmt="github"))
    failures = [row for row, errors in zip(rows, worst.values())
                if "error" in errors or any(not errors.get(q, float("inf")) <= REL_TOL_BF16 for q in QUANTITIES)]
    assert not failures, f"{len(failures)} (case, backend) pairs above {REL_TOL_BF16} or failing: {failures}"
    assert worst, "no backend could run"
