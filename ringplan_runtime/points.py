"""Run measurement points on a ring of local processes and survive their failures.

A *point* is one (workload, layout); its ring size is the number of processes. ``run_points``
launches one ring (built-in spawner: NCCL on GPUs, gloo on CPU) for a list of points and measures
them in order. Each rank appends its result per point to its own JSON-lines file as soon as the
point is done, so nothing measured is lost when a rank dies. Failure handling:

- out of memory on one rank: on a ring of one the point is infeasible and the sweep goes on in
  the same process; on a larger ring the rank exits (a peer may be blocked sending to it), the
  spawner tears the ring down, the point is recorded infeasible and a fresh ring takes the rest;
- a lost rank or a timeout: the point is recorded as failed with the error, a fresh ring goes on.

Every process exits either way: the spawner terminates the ranks of a failed ring.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ringplan.workload import RingLayout, Workload, check_layout_fits
from ringplan_runtime.measure import MeasureSettings, RankMeasurement, measure_step
from ringplan_runtime.provenance import Provenance, current_provenance

_MEMORY_FIELDS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "non_allocator_bytes",
                  "tracked_peak_bytes", "sent_bytes")


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


class RingOutOfMemory(RuntimeError):
    """Raised by a rank of a ring of several after its point ran out of memory (tears the ring down)."""


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
    figures = {name: _max_or_none(getattr(m, name) for m in ranks) for name in _MEMORY_FIELDS}
    return PointResult(point=point, feasible=True, backend=ranks[0].backend, ranks=tuple(ranks),
                       step_time_s=max(m.step_time_s for m in ranks), allocator_cap_bytes=allocator_cap_bytes,
                       **figures)


def _max_or_none(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _rank_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _append_line(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def points_worker(points: Sequence[SweepPoint], results_dir: str, settings: MeasureSettings,
                  usable_memory_bytes: int | None = None, fault: dict | None = None, command: str | None = None) -> None:
    """Body of every rank: measure ``points`` in order, one JSON line per point in ``rank{r}.jsonl``.

    ``usable_memory_bytes`` emulates a smaller GPU (see ``ringplan_runtime.emulate``) after a
    calibration step. ``fault`` injects a failure for tests: ``{"rank": r, "index": i, "kind":
    "raise"|"exit"|"hang"|"oom"}`` makes rank r fail before measuring point i (see ``_inject_fault``).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = _rank_device()
    path = Path(results_dir) / f"rank{rank}.jsonl"
    if rank == 0:
        provenance = current_provenance(method=settings.method, gpu_count=world_size, command=command,
                                        device_index=device.index if device.type == "cuda" else None)
        _append_line(path, {"provenance": asdict(provenance)})
    cap = calibrated_cap(points[0], device, settings, usable_memory_bytes) if usable_memory_bytes else None
    if cap is not None:
        _append_line(path, {"cap": asdict(cap)})
    for index, point in enumerate(points):
        measurement = _inject_fault(fault, rank, index) or measure_step(
            point.workload, point.layout, device=device, rank=rank, group=None, settings=settings)
        _append_line(path, {"index": index, "measurement": asdict(measurement)})
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
    measure_step(small, point.layout, device=device, rank=dist.get_rank() if dist.is_initialized() else 0,
                 settings=calibration)
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
    step = step * longest // _gcd(step, longest)
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


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@dataclass(frozen=True, slots=True, kw_only=True)
class _RingRecords:
    """What one ring's ranks wrote: measurements per point index, the allocator cap, rank 0's provenance."""

    by_index: dict[int, list[RankMeasurement]]
    cap_bytes: int | None
    provenance: Provenance | None


def _read_rank_files(results_dir: Path, ring_size: int) -> _RingRecords:
    """Per point index, the ranks' measurements written so far; the allocator cap; the provenance."""
    by_index: dict[int, list[RankMeasurement]] = {}
    cap_bytes, provenance = None, None
    for rank in range(ring_size):
        path = results_dir / f"rank{rank}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a rank killed mid-write leaves a partial last line
                continue
            if "provenance" in record:
                provenance = Provenance(**record["provenance"])
                continue
            if "cap" in record:
                cap_bytes = max(cap_bytes or 0, record["cap"]["allocator_cap_bytes"])
                continue
            fields = dict(record["measurement"], step_times_s=tuple(record["measurement"]["step_times_s"]))
            by_index.setdefault(record["index"], []).append(RankMeasurement(**fields))
    return _RingRecords(by_index=by_index, cap_bytes=cap_bytes, provenance=provenance)


def run_points(points: Sequence[SweepPoint], *, settings: MeasureSettings | None = None,
               usable_memory_bytes: int | None = None, timeout_s: float = 600.0, fault: dict | None = None,
               on_result: Callable[[PointResult], None] | None = None, command: str | None = None,
               device: str = "auto") -> list[PointResult]:
    """Measure points that share one ring size on local processes; every point gets a result.

    Launches rings with ``ringplan_runtime.spawn`` until every point has a result; a failed ring
    costs only the point it was running. ``device``: ``cuda`` (NCCL, one GPU per rank), ``cpu``
    (gloo) or ``auto`` (CUDA when present).
    """
    from ringplan_runtime import RankFailure, spawn

    if not points:
        return []
    ring_size = points[0].layout.ring_size
    if any(p.layout.ring_size != ring_size for p in points):
        raise ValueError(f"points of one run must share a ring size, got {sorted({p.layout.ring_size for p in points})}")
    settings = settings or MeasureSettings()
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r} is not one of ['auto', 'cuda', 'cpu']")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available")
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    results: list[PointResult] = []
    remaining = list(points)
    while remaining:
        with tempfile.TemporaryDirectory(prefix="ringplan-points-") as tmp:
            failure = None
            try:
                spawn(points_worker, world_size=ring_size, backend=backend, timeout_s=timeout_s,
                      args=(remaining, tmp, settings, usable_memory_bytes, fault, command))
            except (RankFailure, TimeoutError) as error:
                failure = _failure_text(error)
            records = _read_rank_files(Path(tmp), ring_size)
        done = _collect(remaining, records, ring_size, failure)
        for result in done:
            if on_result is not None:
                on_result(result)
        results.extend(done)
        remaining = remaining[len(done):]
        fault = None  # an injected fault fires once
    return results


def _collect(points: Sequence[SweepPoint], records: _RingRecords, ring_size: int,
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


def _failure_text(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower():
        return f"timeout: {text[:300]}"
    return f"rank failure: {text[:300]}"
