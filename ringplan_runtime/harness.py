"""The multi-rank point harness: rings of local processes measure a list of points, each rank
writing what it measured to its own file, and the parent reads the files back.

Both kinds of point use it: attention points (``ringplan_runtime.points``) and whole-model points
(``ringplan_runtime.stack_sweep``); each keeps its own point, worker body and way of combining ranks.

- Inside a rank: ``rank_results_path`` names this rank's JSON-lines file; ``record_provenance``
  (rank 0), ``record_cap`` and ``record_result`` append one line each and flush it, so nothing
  measured is lost when a rank dies (a partial last line is skipped when read).
- In the parent: ``run_rings`` starts a ring (``ringplan_runtime.spawn``) on a fresh temporary
  directory for the points not done yet, reads the files (``read_rank_results``), lets the kind turn
  them into results (at least the point the ring failed on, unless it stopped on its own), and
  starts a fresh ring for the rest: a failed ring costs only the point it was running.
- Under torchrun there is no parent: ``torchrun_results_dir`` gives every run its own directory
  (a run id broadcast from rank 0), so a re-run into the same output never reads an older run's lines.

Failures: an out-of-memory point on a ring of several raises ``RingOutOfMemory`` in the rank (a peer
may be blocked sending to it: the spawner tears the ring down); a lost rank or a timeout reaches the
parent as ``RankFailure`` / ``TimeoutError`` and becomes the text ``failure_text`` gives.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ringplan_runtime.measure import RankMeasurement
from ringplan_runtime.provenance import Provenance, current_provenance

#: Memory and traffic figures of a ``RankMeasurement`` that combine as the largest over ranks.
MEMORY_FIELDS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "non_allocator_bytes",
                 "tracked_peak_bytes", "sent_bytes")
DEVICES = ("auto", "cuda", "cpu")


class RingOutOfMemory(RuntimeError):
    """Raised by a rank of a ring of several after its point ran out of memory (tears the ring down)."""


def current_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def current_world_size() -> int:
    """The job's world size (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_device() -> torch.device:
    """This rank's CUDA device under NCCL, else the CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ring_backend(device: str) -> str:
    """The process-group backend for ``device`` (``auto``: NCCL when CUDA is present, else gloo)."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {list(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available")
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


# ----------------------------------------------------------------------------- inside a rank


def rank_results_path(results_dir: str | Path, rank: int | None = None) -> Path:
    """The JSON-lines file of ``rank`` (default: this rank) in ``results_dir``."""
    return Path(results_dir) / f"rank{current_rank() if rank is None else rank}.jsonl"


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line and flush it (what a rank wrote survives the rank)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def record_provenance(path: Path, *, method: str, command: str | None, device: torch.device) -> None:
    """Rank 0's line: where and how the ring measured (``ringplan_runtime.provenance``)."""
    provenance = current_provenance(method=method, gpu_count=current_world_size(), command=command,
                                    device_index=device.index if device.type == "cuda" else None)
    append_record(path, {"provenance": asdict(provenance)})


def record_cap(path: Path, cap: Any) -> None:
    """The allocator cap an emulated smaller GPU put on this rank (``ringplan_runtime.emulate``)."""
    append_record(path, {"cap": asdict(cap)})


def record_result(path: Path, index: int, result: Any) -> None:
    """The result (a dataclass) of point ``index`` on this rank."""
    append_record(path, {"index": index, "result": asdict(result)})


class NoProgressBar:
    """The calls made on a progress bar, doing nothing: what ``progress_bar`` gives when it is off."""

    def set_postfix_str(self, text: str) -> None:
        """Ignored."""

    def update(self, n: int = 1) -> None:
        """Ignored."""

    def close(self) -> None:
        """Ignored."""


def progress_bar(total: int, *, enabled: bool, desc: str):
    """A tqdm bar (stderr) over ``total`` points when ``enabled``; else a ``NoProgressBar``, and tqdm
    is not even imported (``--no-progress`` must work where tqdm is missing or broken)."""
    if not enabled:
        return NoProgressBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="point", desc=desc)


# ----------------------------------------------------------------------------- in the parent


@dataclass(frozen=True, slots=True, kw_only=True)
class RankResults:
    """What one ring's ranks wrote: per point index the ranks' decoded results, the largest allocator
    cap, and rank 0's provenance."""

    by_index: dict[int, list]
    cap_bytes: int | None
    provenance: Provenance | None


def rank_measurement_from_json(raw: dict) -> RankMeasurement:
    """A ``RankMeasurement`` from its ``asdict`` form (JSON has lists where it has tuples)."""
    return RankMeasurement(**dict(raw, step_times_s=tuple(raw["step_times_s"])))


def read_rank_results(results_dir: Path, world_size: int, decode: Callable[[dict], Any]) -> RankResults:
    """Every rank's lines in ``results_dir``; ``decode`` turns one result's JSON into the kind's type.
    A missing file (a rank that never started) and a partial last line (a rank killed mid-write) are skipped."""
    by_index: dict[int, list] = {}
    cap_bytes, provenance = None, None
    for rank in range(world_size):
        path = rank_results_path(results_dir, rank)
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else ():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "provenance" in record:
                provenance = Provenance(**record["provenance"])
            elif "cap" in record:
                cap_bytes = max(cap_bytes or 0, record["cap"]["allocator_cap_bytes"])
            else:
                by_index.setdefault(record["index"], []).append(decode(record["result"]))
    return RankResults(by_index=by_index, cap_bytes=cap_bytes, provenance=provenance)


def max_or_none(values: Iterable[int | float | None]) -> int | float | None:
    """The largest value present, or None when every value is None."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def largest_figures(measurements: Sequence[RankMeasurement]) -> dict[str, int | None]:
    """``MEMORY_FIELDS`` of a point: each the largest over its ranks."""
    return {name: max_or_none(getattr(m, name) for m in measurements) for name in MEMORY_FIELDS}


def head_and_tail(text: str, *, head: int = 100, tail: int = 240) -> str:
    """A message short enough for a table that still ends with the exception's own words (a
    traceback's head names only the launcher)."""
    return text if len(text) <= head + tail else f"{text[:head]} … {text[-tail:]}"


def failure_text(error: BaseException) -> str:
    """``timeout: …`` or ``rank failure: …``: the result text of a point lost with its ring."""
    text = " ".join(str(error).split())
    if isinstance(error, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower():
        return f"timeout: {head_and_tail(text)}"
    return f"rank failure: {head_and_tail(text)}"


def run_rings(points: Sequence, *, world_size: int, backend: str, worker: Callable,
              worker_args: Callable[[list, str, bool], tuple], finish: Callable[[list, Path, str | None], list],
              timeout_s: Callable[[list], float | None], on_result: Callable[[Any], None] | None = None) -> list:
    """Measure ``points`` on rings of ``world_size`` local processes until every point has a result.

    Each ring runs ``worker(*worker_args(remaining, results_dir, first_ring))`` on every rank, for
    at most ``timeout_s(remaining)`` seconds (``None``: start no ring, the rest get no result);
    ``finish(remaining, results_dir, failure)`` turns what its ranks wrote into the results of
    the first points done (empty: the ring stopped on its own, e.g. a time budget). Each result
    goes to ``on_result`` as it comes; a fresh ring takes the points left.
    """
    from ringplan_runtime.launch import RankFailure, spawn

    results: list = []
    remaining, first = list(points), True
    while remaining:
        timeout = timeout_s(remaining)
        if timeout is None:
            break
        with tempfile.TemporaryDirectory(prefix="ringplan-ranks-") as tmp:
            failure = None
            try:
                spawn(worker, world_size=world_size, backend=backend, timeout_s=timeout,
                      args=worker_args(remaining, tmp, first))
            except (RankFailure, TimeoutError) as error:
                failure = failure_text(error)
            done = finish(remaining, Path(tmp), failure)
        first = False
        for result in done:
            if on_result is not None:
                on_result(result)
        results.extend(done)
        if not done:
            break
        remaining = remaining[len(done):]
    return results


# ----------------------------------------------------------------------------- under torchrun


def torchrun_results_dir(out: Path) -> Path:
    """A fresh rank-results directory beside ``out`` for this torchrun job, the same on every rank:
    ``.<out name>.ranks-<run id>``, the run id drawn by rank 0 and broadcast (collective)."""
    run_id = [uuid.uuid4().hex[:12] if current_rank() == 0 else None]
    if dist.is_initialized() and current_world_size() > 1:
        dist.broadcast_object_list(run_id, src=0)
    results_dir = out.parent / f".{out.name}.ranks-{run_id[0]}"
    results_dir.mkdir(parents=True, exist_ok=True)
    return results_dir


def remove_results_dir(results_dir: Path) -> None:
    """Remove a run's rank-results directory once its rows are written."""
    shutil.rmtree(results_dir, ignore_errors=True)
