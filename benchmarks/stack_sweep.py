"""Whole-model validation sweep (issue 9) on the local GPUs: real FSDP2 + ring-attention stacks,
measured peak memory against the analytic stack terms. One command, within ~7 minutes (``--budget-s``)::

    RINGPLAN_GIT_SHA=$(git rev-parse HEAD) python benchmarks/stack_sweep.py $OUT

Default grid, W = P = 2 (zero3 over both GPUs, contiguous ring), bf16 compute / fp32 master, in
priority order (the budget drops the tail): a Llama-3-8B-shaped block (E 4096, 32/8 heads × 128,
F 14336, the real vocabulary 128,256) with 4, 8 and 16 layers, training with checkpointing
none / selective / full and a chunked loss (4,096 tokens), one full-loss point, forward only
(prefill), one point with offloaded checkpoints; and one full small model, Qwen3-0.6B (all 28 layers, tied embeddings, qk norm).
Each point's tokens per GPU are the largest multiple of 4,096 whose predicted memory (Σ stack terms
× ``ALLOCATOR_MARGIN`` + ``OUTSIDE_ALLOCATOR_BYTES``) fits a fraction of the local GPU's memory
(NVML total: ~75 GiB H100s and ~135 GiB H200s get different counts) and whose predicted step time
(``ringplan.time.stack_time``) keeps the point under ``--point-cap-s``. Points run in one ring of two
spawned ranks (a fresh ring after an OOM, which is recorded as an ``oom`` row).

Writes ``OUT/stack-<gpu>.json`` (``ringplan.stack/1``, with provenance) and
``OUT/stack-summary.json``; prints a table: predicted Σφ, tracked peak, allocator peak, device used
and the error of Σφ against the tracked and allocated peaks. Commit the profile to
``profiles/measured/stack/`` and rerun ``ringplan fit --write``.

``--dry-run`` prints the grid for a 75 GiB and a 135 GiB GPU without running anything;
``--cpu-smoke`` runs two tiny points on CPU (gloo) end to end (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ringplan.models import ModelSpec, load_model_catalog
from ringplan.stack import StackSettings, StackWorkload
from ringplan.memory.stack_terms import peak_instant, stack_terms
from ringplan.workload import RingLayout

GIB = 2**30
TOKEN_STEP = 4096
#: Finer steps for capacity-boundary points (a 4,096-token step is ~6 GiB of full-loss logits).
BOUNDARY_TOKEN_STEP = 1024
#: Allocated bytes above Σφ the grid leaves room for (workspaces, FSDP copy buffers, allocator slack).
ALLOCATOR_MARGIN = 1.12
#: CUDA context, NCCL communicators and P2P buffers (2×H200 attention runs: ~2.7 GB).
OUTSIDE_ALLOCATOR_BYTES = 3 * GIB
#: Steps a point runs: warm-up, the memory step, one timed step.
STEPS_PER_POINT = 3
#: Building and initialising a model and its first NCCL collectives (a guess; the summary shows real times).
BUILD_S = 6.0
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True, slots=True, kw_only=True)
class GridEntry:
    """One kind of point: model, layers, mode, and the fraction of the GPU its tokens should fill."""

    model: str
    layers: int | None
    training: bool
    checkpointing: str = "full"
    loss: str = "chunked"
    offload: bool = False
    fill: float = 0.7
    #: Tokens as a fraction of what ``fill`` and the time cap allow (rounded down to ``TOKEN_STEP``).
    scale: float = 1.0
    #: A capacity-boundary point: tokens from Σφ + ``OUTSIDE_ALLOCATOR_BYTES`` alone (no allocator
    #: margin, no time cap), so fills just under and just over 1 probe where the GPU runs out.
    boundary: bool = False


PRIMARY_GRID: tuple[GridEntry, ...] = (
    GridEntry(model="llama-3-8b", layers=4, training=True, checkpointing="full", fill=0.5),
    GridEntry(model="llama-3-8b", layers=4, training=True, checkpointing="none", fill=0.7),
    GridEntry(model="llama-3-8b", layers=4, training=True, checkpointing="selective", fill=0.7),
    GridEntry(model="llama-3-8b", layers=4, training=False, fill=0.6),
    GridEntry(model="llama-3-8b", layers=8, training=True, checkpointing="full", fill=0.85),
    GridEntry(model="qwen3-0.6b", layers=None, training=True, checkpointing="full", fill=0.6),
    GridEntry(model="llama-3-8b", layers=4, training=True, checkpointing="full", loss="full", fill=0.7),
    GridEntry(model="llama-3-8b", layers=8, training=True, checkpointing="none", fill=0.85),
    GridEntry(model="llama-3-8b", layers=16, training=True, checkpointing="full", fill=0.85),
    GridEntry(model="qwen3-0.6b", layers=None, training=True, checkpointing="none", fill=0.5),
    GridEntry(model="llama-3-8b", layers=16, training=True, checkpointing="selective", fill=0.7),
    GridEntry(model="qwen3-0.6b", layers=None, training=False, fill=0.5),
    GridEntry(model="llama-3-8b", layers=8, training=False, fill=0.85),
    GridEntry(model="llama-3-8b", layers=8, training=True, checkpointing="full", offload=True, fill=0.85),
)
#: Every point again at a smaller token count (lowest priority: the budget drops these first), so
#: each configuration is measured at two lengths and a fit on one can be checked on the other.
#: Points at the edge of the GPU: they must run (fill < 1) or run out of memory (fill > 1), and the
#: planner must call every one that ran out infeasible.
BOUNDARY_GRID: tuple[GridEntry, ...] = (
    GridEntry(model="llama-3-8b", layers=4, training=True, checkpointing="full", loss="full", fill=0.97, boundary=True),
    GridEntry(model="llama-3-8b", layers=4, training=True, checkpointing="full", loss="full", fill=1.03, boundary=True),
    GridEntry(model="llama-3-8b", layers=8, training=True, checkpointing="full", loss="full", fill=0.97, boundary=True),
    GridEntry(model="llama-3-8b", layers=8, training=True, checkpointing="full", loss="full", fill=1.03, boundary=True),
)
SECOND_LENGTHS: tuple[GridEntry, ...] = tuple(replace(e, scale=0.5) for e in PRIMARY_GRID)
DEFAULT_GRID: tuple[GridEntry, ...] = PRIMARY_GRID + BOUNDARY_GRID + SECOND_LENGTHS


def entry_workload(entry: GridEntry, tokens_per_gpu: int, world_size: int, model: ModelSpec | None = None) -> StackWorkload:
    spec = model or load_model_catalog().model(entry.model)
    if entry.layers is not None:
        spec = spec.with_layers(entry.layers)
    return StackWorkload(model=spec, seq_len_tokens=tokens_per_gpu * world_size, world_size=world_size,
                         layout=RingLayout(ring_size=world_size), training=entry.training,
                         settings=StackSettings(checkpointing=entry.checkpointing, loss=entry.loss,
                                                offload_checkpoints=entry.offload))


def predicted_bytes(w: StackWorkload) -> float:
    """What the grid budgets for a point: Σφ × margin + memory outside the allocator."""
    return sum(stack_terms(w).values()) * ALLOCATOR_MARGIN + OUTSIDE_ALLOCATOR_BYTES


def predicted_point_s(w: StackWorkload, gpu) -> float:
    """Seconds a point takes: ``BUILD_S`` + ``STEPS_PER_POINT`` predicted steps (``ringplan.time.stack_time``)."""
    from ringplan.time.stack_time import step_time

    return BUILD_S + STEPS_PER_POINT * step_time(w, gpu).step_time_s


def choose_tokens(entry: GridEntry, *, total_bytes: float, world_size: int, gpu, point_cap_s: float,
                  model: ModelSpec | None = None, max_tokens: int = 1 << 20) -> int | None:
    """The largest multiple of ``TOKEN_STEP`` tokens per GPU within ``entry.fill`` of the GPU and
    ``point_cap_s``; None when not even one step fits."""
    budget = entry.fill * total_bytes
    best = None
    tokens = TOKEN_STEP
    while tokens <= max_tokens:
        w = entry_workload(entry, tokens, world_size, model)
        if entry.boundary:
            if sum(stack_terms(w).values()) + OUTSIDE_ALLOCATOR_BYTES > budget:
                break
        elif predicted_bytes(w) > budget or (gpu is not None and predicted_point_s(w, gpu) > point_cap_s):
            break
        step = BOUNDARY_TOKEN_STEP if entry.boundary else TOKEN_STEP if tokens < 32768 else 2 * TOKEN_STEP
        best, tokens = tokens, tokens + step
    return best


def build_grid(*, total_bytes: float, world_size: int, gpu, point_cap_s: float,
               grid: tuple[GridEntry, ...] = DEFAULT_GRID) -> list[StackWorkload]:
    points = []
    for entry in grid:
        tokens = choose_tokens(entry, total_bytes=total_bytes, world_size=world_size, gpu=gpu, point_cap_s=point_cap_s)
        if tokens is not None:
            tokens = max(TOKEN_STEP, int(tokens * entry.scale) // TOKEN_STEP * TOKEN_STEP)
            points.append(entry_workload(entry, tokens, world_size))
    return points


def local_gpu() -> tuple[float | None, object]:
    """NVML total bytes of local GPU 0 and its catalog entry (no CUDA context in this process)."""
    from ringplan.hardware import load_catalog
    from ringplan_runtime import nvml

    device = nvml.first_visible_device()
    memory, name = nvml.device_memory(device), nvml.gpu_name(device)
    catalog = load_catalog()
    spec = catalog.gpu_by_driver_name(name) if name else None
    return (memory.total_bytes if memory else None), spec


def describe(w: StackWorkload, gpu=None) -> dict:
    s = w.settings
    mode = (f"train {s.checkpointing}" + (" offload" if s.offload_checkpoints else "")
            + (" full-loss" if s.loss == "full" else "")) if w.training else "forward"
    row = {"model": w.model.name, "L": w.model.n_layers, "mode": mode, "tokens/GPU": w.seq_len_tokens // w.world_size,
           "Σφ GiB": round(sum(stack_terms(w).values()) / GIB, 2), "instant": peak_instant(w)}
    if gpu is not None:
        row["predicted s"] = round(predicted_point_s(w, gpu), 1)
    return row


def summary_rows(results) -> list[dict]:
    """One printed row per point: predicted Σφ against the tracked / allocated / device peaks."""
    rows = []
    for r in results:
        phi = sum(stack_terms(r.workload).values())
        f = r.figures

        def err(value, phi=phi):
            return f"{(phi - value) / value:+.1%}" if value else ""

        def gib(value):
            return round(value / GIB, 2) if value else None

        rows.append({**describe(r.workload), "status": "ok" if r.feasible else r.failure,
                     "tracked GiB": gib(f.get("tracked_peak_bytes")), "Σφ−tracked": err(f.get("tracked_peak_bytes")),
                     "allocated GiB": gib(f.get("peak_allocated_bytes")),
                     "Σφ−allocated": err(f.get("peak_allocated_bytes")),
                     "reserved GiB": gib(f.get("peak_reserved_bytes")), "device GiB": gib(f.get("device_used_bytes")),
                     "step s": round(f["step_time_s"], 3) if f.get("step_time_s") else None})
    return rows


def smoke_points() -> list[StackWorkload]:
    """Two tiny points for the CPU smoke run (the runtime, the ring and the profile writer, in seconds)."""
    tiny = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                     ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
    return [entry_workload(GridEntry(model="tiny", layers=None, training=True, checkpointing="full"), 256, 2, tiny),
            entry_workload(GridEntry(model="tiny", layers=None, training=False), 256, 2, tiny)]


def run(points: list[StackWorkload], out: Path, *, budget_s: float, point_timeout_s: float, device: str,
        record_as: str | None) -> list:
    from ringplan_runtime.measure import MeasureSettings
    from ringplan_runtime.provenance import command_line
    from ringplan_runtime.stack_sweep import (
        result_summary,
        run_stack_points,
        write_stack_results,
    )

    label = record_as or "gpu"
    if record_as is None and device != "cpu":
        _, spec = local_gpu()
        label = spec.name if spec else "gpu"
    path = out / f"stack-{label}.json"
    settings = MeasureSettings(warmup_steps=1, timed_steps=STEPS_PER_POINT - 2, count_sent_bytes=False)
    results = run_stack_points(points, settings=settings, point_timeout_s=point_timeout_s, budget_s=budget_s,
                               command=command_line(), device=device, progress=True,
                               on_result=lambda r: write_stack_results(path, [r], record_as=record_as,
                                                                       series="benchmarks/stack_sweep.py"))
    (out / "stack-summary.json").write_text(json.dumps([result_summary(r) for r in results], indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="Directory for the stack profile and the summary.")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Start no point after this many seconds.")
    parser.add_argument("--point-timeout-s", type=float, default=150.0, help="Seconds one point may take.")
    parser.add_argument("--point-cap-s", type=float, default=30.0, help="Predicted seconds a grid point may take.")
    parser.add_argument("--world-size", type=int, default=2, help="GPUs per point (W = P).")
    parser.add_argument("--record-as", default=None, help="Catalog GPU name for the rows (default: the driver's).")
    parser.add_argument("--dry-run", action="store_true", help="Print the grid for 75 and 135 GiB GPUs; run nothing.")
    parser.add_argument("--cpu-smoke", action="store_true", help="Two tiny points on CPU (gloo), end to end.")
    args = parser.parse_args(argv)
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    if args.dry_run:
        from ringplan.hardware import load_catalog

        catalog = load_catalog()
        for gib, name in ((75, "h100"), (135, "h200")):
            grid = build_grid(total_bytes=gib * GIB, world_size=args.world_size, gpu=catalog.gpu(name),
                              point_cap_s=args.point_cap_s)
            rows = [describe(w, catalog.gpu(name)) for w in grid]
            print(f"\n{gib} GiB GPU ({name} timings), W = P = {args.world_size}, predicted "
                  f"{sum(r['predicted s'] for r in rows):.0f} s:")
            print(tabulate(rows, headers="keys"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if args.cpu_smoke:
        points = smoke_points()
        results = run(points, args.out, budget_s=args.budget_s, point_timeout_s=args.point_timeout_s, device="cpu",
                      record_as=args.record_as or "h100")
    else:
        total, spec = local_gpu()
        if total is None:
            print("no GPU visible to NVML: use --dry-run or --cpu-smoke", file=sys.stderr)
            return 2
        points = build_grid(total_bytes=total, world_size=args.world_size, gpu=spec, point_cap_s=args.point_cap_s)
        print(tabulate([describe(w, spec) for w in points], headers="keys"), flush=True)
        results = run(points, args.out, budget_s=args.budget_s, point_timeout_s=args.point_timeout_s, device="cuda",
                      record_as=args.record_as)
    print(tabulate(summary_rows(results), headers="keys"))
    print(f"{sum(r.feasible for r in results)}/{len(results)} points measured in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
