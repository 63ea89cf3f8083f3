"""Attention points: one (workload, layout) each, measured on a ring of local processes.

A *point* is one (workload, layout); its ring size is the number of processes. ``run_points``
measures a list of points on rings of the multi-rank harness (``ringplan_runtime.harness``:
built-in spawner, NCCL on GPUs, gloo on CPU): each rank appends its result per point to its own
JSON-lines file as soon as the point is done, so nothing measured is lost when a rank dies.
Failure handling:

- out of memory on one rank: on a ring of one the point is infeasible and the sweep goes on in
  the same process; on a larger ring the rank exits (a peer may be blocked sending to it), the
  spawner tears the ring down, the point is recorded infeasible and a fresh ring takes the rest;
- a lost rank or a timeout: the point is recorded as failed with the error, a fresh ring goes on.

Every process exits either way: the spawner terminates the ranks of a failed ring.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ringplan.workload import RingLayout, Workload, check_layout_fits
from ringplan_runtime.harness import (
    RankResults,
    RingOutOfMemory,
    current_rank,
    current_world_size,
    largest_figures,
    rank_device,
    rank_measurement_from_json,
    rank_results_path,
    read_rank_results,
    record_cap,
    record_provenance,
    record_result,
    ring_backend,
    run_rings,
)
from ringplan_runtime.measure import MeasureSettings, RankMeasurement, measure_step
from ringplan_runtime.provenance import Provenance

__all__ = ["CALIBRATION_TOKENS_PER_RANK", "PointResult", "RingOutOfMemory", "SweepPoint", "calibrated_cap",
           "point_result", "points_worker", "ring_timeout_s", "run_points", "smallest_valid_tokens", "valid_token_counts"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepPoint:
    """One workload on one ring layout: what a profile row describes."""

    workload: Workload
    layout: RingLayout

    def __post_init__(self) -> None:
        check_layout_fits(self.workload, self.layout)


@dataclass(frozen=True, slots=True, kw_only=True)
class PointResult:
    """A point's outcome over all ranks: memory figures are the max over ranks, step time the slowest rank."""

    point: SweepPoint
    feasible: bool
    failure: str | None = None
    backend: str = ""
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    non_allocator_bytes: int | None = None
    tracked_peak_bytes: int | None = None
    sent_bytes: int | None = None
    step_time_s: float | None = None
    allocator_cap_bytes: int | None = None
    provenance: Provenance | None = field(default=None, repr=False)
    ranks: tuple[RankMeasurement, ...] = field(default=(), repr=False)


def point_result(point: SweepPoint, ranks: Sequence[RankMeasurement], *, ring_size: int,
                 failure: str | None = None, allocator_cap_bytes: int | None = None) -> PointResult:
    """Combine the ranks' measurements of one point (max memory, slowest step); missing ranks → failed."""
    infeasible = [m for m in ranks if not m.feasible]
    if infeasible:
        return PointResult(point=point, feasible=False, failure=infeasible[0].failure or "oom",
                           backend=infeasible[0].backend, allocator_cap_bytes=allocator_cap_bytes, ranks=tuple(ranks))
    if len(ranks) < ring_size or failure is not None:
        return PointResult(point=point, feasible=False, failure=failure or "rank lost", ranks=tuple(ranks),
                           allocator_cap_bytes=allocator_cap_bytes)
    return PointResult(point=point, feasible=True, backend=ranks[0].backend, ranks=tuple(ranks),
                       step_time_s=max(m.step_time_s for m in ranks), allocator_cap_bytes=allocator_cap_bytes,
                       **largest_figures(ranks))


def points_worker(points: Sequence[SweepPoint], results_dir: str, settings: MeasureSettings,
                  usable_memory_bytes: int | None = None, fault: dict | None = None, command: str | None = None) -> None:
    """Body of every rank: measure ``points`` in order, one JSON line per point in ``rank{r}.jsonl``.

    ``usable_memory_bytes`` emulates a smaller GPU (see ``ringplan_runtime.emulate``) after a
    calibration step. ``fault`` injects a failure for tests: ``{"rank": r, "index": i, "kind":
    "raise"|"exit"|"hang"|"oom"}`` makes rank r fail before measuring point i (see ``_inject_fault``).
    """
    rank, world_size, device = current_rank(), current_world_size(), rank_device()
    path = rank_results_path(results_dir)
    if rank == 0:
        record_provenance(path, method=settings.method, command=command, device=device)
    cap = calibrated_cap(points[0], device, settings, usable_memory_bytes) if usable_memory_bytes else None
    if cap is not None:
        record_cap(path, cap)
    for index, point in enumerate(points):
        measurement = _inject_fault(fault, rank, index) or measure_step(
            point.workload, point.layout, device=device, rank=rank, group=None, settings=settings)
        record_result(path, index, measurement)
        if not measurement.feasible and world_size > 1:
            raise RingOutOfMemory(f"rank {rank} ran out of memory at {point.workload.seq_len_tokens:,} tokens")


def calibrated_cap(point: SweepPoint, device: torch.device, settings: MeasureSettings, usable_memory_bytes: int):
    """Load kernels and communicators with a small step of the same workload, then cap the allocator."""
    from ringplan_runtime.emulate import apply_memory_cap

    if device.type != "cuda":
        raise ValueError("--emulate-gpu needs CUDA devices")
    small = point.workload.with_seq_len(smallest_valid_tokens(
        point.workload, point.layout, at_least=CALIBRATION_TOKENS_PER_RANK * point.layout.ring_size))
    calibration = MeasureSettings(warmup_steps=1, timed_steps=1, track_live_tensors=False, count_sent_bytes=False,
                                  seed=settings.seed)
    measure_step(small, point.layout, device=device, rank=current_rank(), settings=calibration)
    return apply_memory_cap(device, usable_memory_bytes)


def _inject_fault(fault: dict | None, rank: int, index: int) -> RankMeasurement | None:
    """Test hook: make ``fault["rank"]`` fail before point ``fault["index"]``.

    Kinds: ``raise`` (an exception), ``exit`` (the process dies), ``hang`` (sleeps past any timeout),
    ``oom`` (reports an out-of-memory result, as ``measure_step`` does, without allocating).
    """
    if not fault or fault.get("rank") != rank or fault.get("index") != index:
        return None
    kind = fault["kind"]
    if kind == "oom":
        return RankMeasurement(rank=rank, feasible=False, failure="oom")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected fault on rank {rank} at point {index}")


#: Tokens per rank of the emulation's calibration step: small, but a size every kernel accepts.
CALIBRATION_TOKENS_PER_RANK = 256


def smallest_valid_tokens(workload: Workload, layout: RingLayout, *, at_least: int = 1, limit: int = 1 << 16) -> int:
    """The smallest sequence length ≥ ``at_least`` the layout accepts for this workload's pattern."""
    counts = valid_token_counts(workload, layout, upper_tokens=None, count=None, limit=limit, at_least=at_least)
    return counts[0]


def valid_token_counts(workload: Workload, layout: RingLayout, *, upper_tokens: int | None,
                       count: int | None = None, limit: int = 1 << 22, at_least: int = 1) -> list[int]:
    """Sequence lengths in [``at_least``, ``upper_tokens``] (ascending) that split over ``layout``.

    Candidates are multiples of P·chunks_per_rank and of the longest segment, each checked with
    ``check_layout_fits``. ``count`` stops after that many (default: 1 when there is no upper
    bound); ``limit`` bounds the multiples tried.
    """
    step = layout.ring_size * layout.chunks_per_rank
    longest = max(workload.pattern.segment_lengths_tokens, default=1)
    step = step * longest // math.gcd(step, longest)
    count = 1 if count is None and upper_tokens is None else count
    found: list[int] = []
    for multiple in range(max(1, -(-at_least // step)), limit + 1):
        tokens = multiple * step
        if upper_tokens is not None and tokens > upper_tokens or count is not None and len(found) >= count:
            break
        try:
            check_layout_fits(workload.with_seq_len(tokens), layout)
        except ValueError:
            continue
        found.append(tokens)
    if not found:
        raise ValueError(f"no sequence length up to {upper_tokens or limit * step:,} tokens splits over "
                         f"{layout.ring_size} ranks ({layout.layout}) for this pattern")
    return found


def run_points(points: Sequence[SweepPoint], *, settings: MeasureSettings | None = None,
               usable_memory_bytes: int | None = None, timeout_s: float = 600.0, fault: dict | None = None,
               on_result: Callable[[PointResult], None] | None = None, command: str | None = None,
               device: str = "auto", deadline_s: float | None = None) -> list[PointResult]:
    """Measure points that share one ring size on local processes; every point gets a result.

    Launches rings (``ringplan_runtime.harness.run_rings``) until every point has a result; a failed
    ring costs only the point it was running. ``device``: ``cuda`` (NCCL, one GPU per rank), ``cpu``
    (gloo) or ``auto`` (CUDA when present). ``deadline_s`` (``time.monotonic()``): no ring starts
    after it and a running ring is ended at it (its finished points kept); the rest get no result.
    """
    if not points:
        return []
    ring_size = points[0].layout.ring_size
    if any(p.layout.ring_size != ring_size for p in points):
        raise ValueError(f"points of one run must share a ring size, got {sorted({p.layout.ring_size for p in points})}")
    settings = settings or MeasureSettings()
    backend = ring_backend(device)

    def worker_args(remaining: list, results_dir: str, first: bool) -> tuple:
        return (remaining, results_dir, settings, usable_memory_bytes, fault if first else None, command)

    def finish(remaining: list, results_dir: Path, failure: str | None) -> list[PointResult]:
        return _collect(remaining, read_rank_results(results_dir, ring_size, rank_measurement_from_json),
                        ring_size, failure)

    return run_rings(points, world_size=ring_size, backend=backend, worker=points_worker, worker_args=worker_args,
                     finish=finish, timeout_s=lambda remaining: ring_timeout_s(timeout_s, deadline_s),
                     on_result=on_result)


def ring_timeout_s(timeout_s: float, deadline_s: float | None) -> float | None:
    """A ring's timeout: ``timeout_s``, cut to what is left before ``deadline_s`` (None: start no ring)."""
    if deadline_s is None:
        return timeout_s
    left_s = deadline_s - time.monotonic()
    return None if left_s <= 0 else min(timeout_s, left_s)


def _collect(points: Sequence[SweepPoint], records: RankResults, ring_size: int,
             failure: str | None) -> list[PointResult]:
    """Results of the points a ring finished, plus the point it failed on (at least one result)."""
    done = []
    for index, point in enumerate(points):
        ranks = sorted(records.by_index.get(index, []), key=lambda m: m.rank)
        complete = len(ranks) == ring_size or any(not m.feasible for m in ranks)
        result = point_result(point, ranks, ring_size=ring_size, allocator_cap_bytes=records.cap_bytes,
                              failure=None if complete else failure or "rank lost")
        done.append(replace(result, provenance=records.provenance))
        if not complete or (not result.feasible and ring_size > 1):
            break  # the ring failed on, or was torn down after, this point
    return done
