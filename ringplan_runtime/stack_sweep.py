"""Sweeps of whole-model points on rings of local processes: each rank measures the points with
``ringplan_runtime.stack_measure.measure_stack_rank`` and appends its results to a file;
``run_stack_points`` starts the rings (``ringplan_runtime.harness.run_rings``: a fresh ring after
an out-of-memory point or a lost rank, a per-point timeout, a time budget), reads the files back and
combines the ranks of each point; ``write_stack_results`` merges the rows into a ``ringplan.stack/1``
profile with provenance. Under torchrun each run writes its ranks' files into a directory of its own
(``harness.torchrun_results_dir``), removed once the rows are written.

Sweep of the points in ``points.json`` (a list of ``workload_to_json`` objects) on 2 local GPUs::

    python -m ringplan_runtime.stack_sweep --points points.json --out stack.json --budget-s 420

or under torchrun (every rank measures; an out-of-memory point ends the run)::

    torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.stack_sweep --points points.json --out stack.json

(``python -m ringplan_runtime.stack_measure`` with the same options runs this entry point too.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ringplan.stack import StackWorkload
from ringplan_runtime.harness import (
    RankResults,
    RingOutOfMemory,
    current_rank,
    current_world_size,
    largest_figures,
    max_or_none,
    progress_bar,
    rank_device,
    rank_measurement_from_json,
    rank_results_path,
    read_rank_results,
    record_provenance,
    record_result,
    remove_results_dir,
    ring_backend,
    run_rings,
    torchrun_results_dir,
)
from ringplan_runtime.measure import MeasureSettings, RankMeasurement
from ringplan_runtime.stack_measure import STACK_METHOD, StackRankResult, measure_stack_rank

__all__ = ["RingOutOfMemory", "StackPointResult", "main", "point_result", "result_summary", "run_stack_points",
           "stack_points_worker", "stack_row", "workload_from_json", "workload_to_json", "write_stack_results"]

@dataclass(frozen=True, slots=True, kw_only=True)
class StackPointResult:
    """A point's outcome over its ranks: memory figures the largest over ranks, step time the slowest."""

    workload: StackWorkload
    feasible: bool
    failure: str | None = None
    figures: dict = field(default_factory=dict)
    provenance: object | None = field(default=None, repr=False)


def workload_to_json(w: StackWorkload) -> dict:
    """A point as JSON: the ``ringplan.stack/1`` row fields of its workload (model shape included)."""
    from ringplan.profiles.stack import MODEL_FIELDS

    point = {"model": {name: getattr(w.model, name) for name in MODEL_FIELDS if not name.startswith("_")},
             "seq_len_tokens": w.seq_len_tokens, "batch": w.batch, "training": w.training,
             "world_size": w.world_size, "ring_size": w.layout.ring_size, "layout": w.layout.layout,
             "backend": w.layout.backend, "settings": asdict(w.settings)}
    if w.tp_degree > 1 or w.layout.cp_scheme != "ring":  # only then: ring-only T = 1 points read as before
        point |= {"tp_degree": w.tp_degree, "cp_scheme": w.layout.cp_scheme, "ulysses_degree": w.layout.ulysses_degree}
    return point


def workload_from_json(raw: dict) -> StackWorkload:
    """Inverse of ``workload_to_json``; ``model`` may also be a catalog name (with ``layers``)."""
    from ringplan.models import ModelSpec, load_model_catalog
    from ringplan.stack import StackSettings
    from ringplan.workload import RingLayout

    model = raw["model"]
    spec = load_model_catalog().model(model) if isinstance(model, str) else ModelSpec(**model)
    if raw.get("layers"):
        spec = spec.with_layers(int(raw["layers"]))
    layout = RingLayout(ring_size=raw["ring_size"], layout=raw.get("layout", "contiguous"),
                        backend=raw.get("backend", "auto"), cp_scheme=raw.get("cp_scheme", "ring"),
                        ulysses_degree=raw.get("ulysses_degree"))
    return StackWorkload(model=spec, seq_len_tokens=raw["seq_len_tokens"], batch=raw.get("batch", 1),
                         training=raw.get("training", True), world_size=raw["world_size"], layout=layout,
                         settings=StackSettings(**raw.get("settings", {})), tp_degree=raw.get("tp_degree", 1))


def stack_points_worker(points: list[StackWorkload], results_dir: str, settings: MeasureSettings,
                        deadline: float | None = None, command: str | None = None, progress: bool = False,
                        fault: dict | None = None) -> None:
    """Body of every rank (spawned or under torchrun): measure ``points`` in order, one JSON line per
    point in ``rank{r}.jsonl``; stop starting points once ``deadline`` (``time.time()``) is within the
    longest point so far. An out-of-memory point on several ranks raises (the ring is torn down).
    ``fault`` (tests): ``{"rank": r, "index": i}`` makes rank r report point i out of memory."""
    rank, world, device = current_rank(), current_world_size(), rank_device()
    path = rank_results_path(results_dir)
    if rank == 0:
        record_provenance(path, method=STACK_METHOD.format(warmup=settings.warmup_steps, timed=settings.timed_steps),
                          command=command, device=device)
    longest = 0.0
    bar = progress_bar(len(points), enabled=rank == 0 and progress, desc=f"stack W={world}")
    for index, w in enumerate(points):
        if _out_of_time(deadline, longest, world, device):
            return
        started = time.time()
        if fault and fault.get("rank") == rank and fault.get("index") == index:
            result = StackRankResult(measurement=RankMeasurement(rank=rank, feasible=False, failure="oom"))
        else:
            result = measure_stack_rank(w, settings=settings, device=device)
        longest = max(longest, time.time() - started)
        record_result(path, index, result)
        bar.set_postfix_str(f"L={w.model.n_layers} S={w.seq_len_tokens:,} "
                            f"{'ok' if result.measurement.feasible else 'oom'} {time.time() - started:.0f}s")
        bar.update(1)
        if not result.measurement.feasible and world > 1:
            raise RingOutOfMemory(f"rank {rank} ran out of memory at point {index}")
    bar.close()


def _out_of_time(deadline: float | None, longest_s: float, world: int, device: torch.device) -> bool:
    """True once ``deadline`` is within the longest point so far; every rank decides alike."""
    import torch.distributed as dist

    stop = deadline is not None and time.time() + longest_s > deadline
    if dist.is_initialized() and world > 1:
        flag = torch.tensor([float(stop)], device=device)
        dist.all_reduce(flag)
        stop = bool(flag.item())
    return stop


def stack_rank_result_from_json(raw: dict) -> StackRankResult:
    """A ``StackRankResult`` from its ``asdict`` form (what ``record_result`` wrote)."""
    return StackRankResult(measurement=rank_measurement_from_json(raw["measurement"]),
                           resident_bytes=raw["resident_bytes"], host_bytes=raw["host_bytes"])


def point_result(w: StackWorkload, ranks: list[StackRankResult], failure: str | None,
                 provenance=None) -> StackPointResult:
    """Combine the ranks' results of one point (max memory, slowest step); a missing rank → failed."""
    if any(not r.measurement.feasible for r in ranks):
        return StackPointResult(workload=w, feasible=False, failure="oom", provenance=provenance)
    if len(ranks) < w.world_size:
        return StackPointResult(workload=w, feasible=False, failure=failure or "rank lost", provenance=provenance)

    figures = largest_figures([r.measurement for r in ranks])
    figures.update(resident_bytes=max_or_none(r.resident_bytes for r in ranks),
                   host_bytes=max_or_none(r.host_bytes for r in ranks),
                   step_time_s=max(r.measurement.step_time_s for r in ranks),
                   backend=ranks[0].measurement.backend)
    return StackPointResult(workload=w, feasible=True, figures=figures, provenance=provenance)


def run_stack_points(points: list[StackWorkload], *, settings: MeasureSettings | None = None,
                     point_timeout_s: float = 300.0, budget_s: float | None = None,
                     on_result: Callable[[StackPointResult], None] | None = None, command: str | None = None,
                     device: str = "auto", progress: bool = False, fault: dict | None = None) -> list[StackPointResult]:
    """Measure ``points`` on rings of local processes (``ringplan_runtime.spawn``: NCCL, one GPU per
    rank, or gloo on CPU), one ring per world size, a fresh ring after a failure: an out-of-memory
    point is a result (``failure="oom"``), a lost rank or a point past ``point_timeout_s`` costs that
    point. Once ``budget_s`` is short, no new point starts (the rest read ``skipped (budget)``)."""
    settings = settings or MeasureSettings()
    backend = ring_backend(device)
    deadline = None if budget_s is None else time.time() + budget_s

    def timeout_s(remaining: list) -> float | None:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            return None
        return point_timeout_s * len(remaining) if left is None else min(point_timeout_s * len(remaining),
                                                                        left + point_timeout_s)

    results: list[StackPointResult] = []
    for world_size in sorted({w.world_size for w in points}):
        def worker_args(remaining: list, results_dir: str, first: bool) -> tuple:
            return (remaining, results_dir, settings, deadline, command, progress, fault if first else None)

        def finish(remaining: list, results_dir: Path, failure: str | None, world_size=world_size) -> list:
            return _finished(remaining, read_rank_results(results_dir, world_size, stack_rank_result_from_json),
                             failure)

        results += run_rings([w for w in points if w.world_size == world_size], world_size=world_size,
                             backend=backend, worker=stack_points_worker, worker_args=worker_args, finish=finish,
                             timeout_s=timeout_s, on_result=on_result)
        fault = None  # an injected fault fires once
    measured = {id(r.workload) for r in results}
    skipped = [StackPointResult(workload=w, feasible=False, failure="skipped (budget)")
               for w in points if id(w) not in measured]
    return results + skipped


def _finished(points: list[StackWorkload], records: RankResults, failure: str | None) -> list[StackPointResult]:
    """Results of the points a ring finished, plus the one it failed on (if it failed)."""
    done = []
    for index, w in enumerate(points):
        ranks = records.by_index.get(index, [])
        complete = len(ranks) == w.world_size or any(not r.measurement.feasible for r in ranks)
        if not complete and failure is None:
            break  # not started: the budget ran short
        result = point_result(w, ranks, None if complete else failure, records.provenance)
        done.append(result)
        if not complete or not result.feasible:
            break
    return done


def stack_row(result: StackPointResult, *, gpu: str, series: str | None = None):
    """One ``ringplan.stack/1`` row from a point's result (OOM → ``oom=True``)."""
    from ringplan.profiles.stack import measurement_from_workload

    w = result.workload
    if w.tp_degree > 1 or w.layout.cp_scheme != "ring":
        raise ValueError(f"a ringplan.stack/1 row has no tensor-parallel or CP-scheme fields: not written for "
                         f"TP {w.tp_degree}, scheme {w.layout.cp_scheme}")
    f = result.figures
    names = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "non_allocator_bytes",
             "tracked_peak_bytes", "resident_bytes", "host_bytes", "step_time_s")
    notes = [f"{key}={f[key]}" for key in ("backend", "sent_bytes") if f.get(key) not in (None, "")]
    return measurement_from_workload(result.workload, gpu=gpu, **{name: f.get(name) for name in names},
                                     oom=not result.feasible, kind="measured", series=series,
                                     notes="; ".join(notes) or None)


def write_stack_results(path: str | Path, results: list[StackPointResult], *, record_as: str | None = None,
                        series: str | None = None, interconnect: str | None = None) -> int:
    """Merge the feasible and out-of-memory results into the stack profile at ``path`` (atomic, by
    key, never dropping rows); other failures measured nothing and are not written. Returns rows written."""
    from ringplan.profiles.stack import StackProfile, write_stack_profile
    from ringplan_runtime.sweep import catalog_gpu_name, profile_provenance

    kept = [r for r in results if r.feasible or r.failure == "oom"]
    provenance = next((r.provenance for r in kept if r.provenance is not None), None)
    if not kept or provenance is None:
        return 0
    gpu = catalog_gpu_name(provenance.gpu_name, record_as)
    block = replace(profile_provenance(provenance, interconnect=interconnect),
                    source="ringplan_runtime.stack_measure (whole-model sweep)")
    write_stack_profile(path, StackProfile(provenance=block, rows=tuple(stack_row(r, gpu=gpu, series=series)
                                                                         for r in kept)))
    return len(kept)


# ----------------------------------------------------------------------------- entry point


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ringplan_runtime.stack_sweep",
                                     description="Measure whole-model points and write a ringplan.stack/1 profile.")
    parser.add_argument("--points", required=True, type=Path, help="JSON list of points (workload_to_json).")
    parser.add_argument("--out", required=True, type=Path, help="Stack profile to merge the rows into.")
    parser.add_argument("--budget-s", type=float, default=None, help="Start no point after this many seconds.")
    parser.add_argument("--point-timeout-s", type=float, default=300.0, help="Seconds one point may take.")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up steps (training: at least 1).")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps.")
    parser.add_argument("--record-as", default=None, help="Catalog GPU name for the rows (default: the driver's).")
    parser.add_argument("--series", default=None, help="Series label of the rows.")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="Where the ranks run.")
    parser.add_argument("--results-json", type=Path, default=None, help="Also write every point's outcome here.")
    parser.add_argument("--no-progress", action="store_true", help="No tqdm progress bar.")
    return parser


def result_summary(result: StackPointResult) -> dict:
    """One point's outcome as plain JSON (what the benchmark prints and keeps)."""
    w, s = result.workload, result.workload.settings
    return {"model": w.model.name, "layers": w.model.n_layers, "seq_len_tokens": w.seq_len_tokens,
            "world_size": w.world_size, "ring_size": w.layout.ring_size, "training": w.training,
            "checkpointing": s.checkpointing, "loss": s.loss, "sharding": s.sharding, "feasible": result.feasible,
            "failure": result.failure, **result.figures}


def main(argv: list[str] | None = None) -> int:
    """Spawned rings by default; under torchrun (``RANK`` set) every rank measures the points itself
    and rank 0 writes the profile (an out-of-memory point then ends the run: torchrun tears it down).

    ``torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.stack_sweep --points p.json --out o.json``
    """
    import os

    from ringplan.jsonfile import read_json_file
    from ringplan_runtime.provenance import command_line

    args = _parser().parse_args(argv)
    points = [workload_from_json(raw) for raw in read_json_file(args.points, "points file")]
    settings = MeasureSettings(warmup_steps=args.warmup, timed_steps=args.steps)
    command = command_line()
    deadline = None if args.budget_s is None else time.time() + args.budget_s
    if "RANK" in os.environ:
        return _torchrun_main(points, args, settings, deadline, command)
    results = run_stack_points(points, settings=settings, point_timeout_s=args.point_timeout_s, budget_s=args.budget_s,
                               on_result=lambda r: write_stack_results(args.out, [r], record_as=args.record_as,
                                                                       series=args.series),
                               command=command, device=args.device, progress=not args.no_progress)
    if args.results_json is not None:
        args.results_json.write_text(json.dumps([result_summary(r) for r in results], indent=1))
    return 0


def _torchrun_main(points, args, settings, deadline, command) -> int:
    import torch.distributed as dist

    from ringplan_runtime.launch import init_from_env

    init_from_env()
    results_dir = torchrun_results_dir(args.out)
    stack_points_worker(points, str(results_dir), settings, deadline, command, progress=not args.no_progress)
    dist.barrier()
    if dist.get_rank() == 0:
        records = read_rank_results(results_dir, dist.get_world_size(), stack_rank_result_from_json)
        results = [point_result(w, records.by_index.get(i, []), "not run", records.provenance)
                   for i, w in enumerate(points)]
        write_stack_results(args.out, results, record_as=args.record_as, series=args.series)
        remove_results_dir(results_dir)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
