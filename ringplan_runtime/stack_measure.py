"""Measure one step of a whole model (``StackWorkload``) on this rank: memory, time, what is resident.

Method (recorded in every stack profile's provenance, see ``STACK_METHOD``):

1. ``build_stack`` (``ringplan_runtime.stack_parallel``): FSDP2 + ring attention for training,
   replicated weights under ``inference_mode`` for forward-only; this rank's seeded batch.
2. ``warmup_steps`` steps (at least one in training, so AdamW's states exist and FSDP2 has made
   its all-gather buffers, as in every later step of a real run).
3. ``gc.collect``, ``torch.cuda.empty_cache`` (blocks the build and warm-up left cached are not the
   step's: the allocator would give them back before failing), ``torch.cuda.reset_peak_memory_stats``;
   one *memory step* under the live-tensor tracker. The
   tensors that exist before it starts are registered first (``resident_tensors``: the sharded
   master parameters, AdamW's states, buffers, the RoPE positions, the batch): their bytes are
   ``resident_bytes``. FSDP2 frees and re-allocates its gathered parameters by resizing their
   storages (``storage.resize_``), which no dispatch mode sees; ``StackTracker`` re-reads those
   storages' sizes at every op boundary. Then the allocator's peak allocated / reserved bytes and
   the device used at the peak (as ``ringplan_runtime.measure``). Pinned host memory of offloaded
   checkpoints is tracked apart (``host_bytes``).
4. ``timed_steps`` steps timed with CUDA events (``perf_counter`` on CPU); the median is the step time.

Out of memory is a result (``feasible=False``, ``failure="oom"``), never a crash; a caller running
several ranks must then tear the ring down: ``run_stack_points`` measures points on spawned rings
(a fresh ring after an out-of-memory point or a lost rank, a per-point timeout, a time budget) and
``write_stack_results`` merges the rows into a ``ringplan.stack/1`` profile with provenance.

Sweep of the points in ``points.json`` (a list of ``workload_to_json`` objects) on 2 local GPUs::

    python -m ringplan_runtime.stack_measure --points points.json --out stack.json --budget-s 420

or under torchrun (every rank measures; an out-of-memory point ends the run)::

    torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.stack_measure --points points.json --out stack.json
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ringplan.stack import StackWorkload
from ringplan_runtime.measure import (
    MeasureSettings,
    RankMeasurement,
    _allocator_and_device_peaks,
    _release,
    _synchronize,
    is_out_of_memory,
)
from ringplan_runtime.tracker import LiveTensorTracker, _describe, _storage_or_none

STACK_METHOD = (
    "seeded batch; {warmup} warm-up steps (training: forward, backward, AdamW step, zero_grad(set_to_none)); "
    "caching allocator with expandable_segments:True (ringplan_runtime.stack_parallel.ALLOCATOR_SETTING); "
    "gc.collect + torch.cuda.empty_cache + torch.cuda.reset_peak_memory_stats; one step read for peak allocated/reserved (torch allocator), device used "
    "(NVML, after the step) and live tensors (TorchDispatchMode tracker, counting the sharded parameters, AdamW "
    "states, buffers and batch alive before the step, and FSDP2's resized all-gather storages); step time = "
    "median of {timed} CUDA-event timings (perf_counter on CPU)")


class StackTracker(LiveTensorTracker):
    """``LiveTensorTracker`` that also follows storages resized outside the dispatcher.

    FSDP2 frees a gathered parameter with ``untyped_storage().resize_(0)`` and re-allocates it with
    ``resize_(numel · itemsize)`` before the all-gather copies into it; storage resizes do not pass
    through ``__torch_dispatch__``. Storages given to ``watch`` are re-read at every op boundary
    (O(watched) per op: a few per block).
    """

    def __init__(self, *, device: str | None = None, keep_peak_tensors: bool = False) -> None:
        super().__init__(device=device, keep_peak_tensors=keep_peak_tensors)
        self._watched: dict[int, weakref.ref] = {}

    def _register(self, tensor: torch.Tensor, op: str) -> None:
        # A DTensor is a wrapper whose storage reports the GLOBAL size without holding it; what the
        # rank holds is its local tensor (a dispatch mode sees the DTensor op, not the local one).
        super()._register(local_tensor(tensor), op)

    def watch(self, *tensors: torch.Tensor) -> None:
        """Count these tensors' storages at their current size and follow their resizes."""
        for tensor in tensors:
            if self._device is not None and tensor.device.type != self._device:
                continue
            storage = _storage_or_none(tensor)
            if storage is None:
                continue
            key = id(storage)
            if key not in self._live:
                ref = weakref.ref(storage, lambda _ref, key=key: self._forget(key))
                self._live[key] = (ref, _describe(tensor, 0, "watch"))
            self._watched[key] = self._live[key][0]
        self._refresh()
        self._update_peak("watch")

    def _refresh(self) -> None:
        for key, ref in list(self._watched.items()):
            storage = ref()
            entry = self._live.get(key)
            if storage is None or entry is None:
                self._watched.pop(key, None)
                continue
            n_bytes = storage.nbytes()
            if n_bytes != entry[1].n_bytes:
                self.live_bytes += n_bytes - entry[1].n_bytes
                old = entry[1]
                self._live[key] = (entry[0], type(old)(n_bytes=n_bytes, shape=old.shape, dtype=old.dtype, op=old.op))

    def _update_peak(self, op: str) -> None:
        if self._watched:
            self._refresh()
        super()._update_peak(op)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local tensor of a DTensor (its storage is what the rank holds), else the tensor."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def resident_tensors(run, batch: Iterable[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Tensors alive on this rank before a step: parameters (local shards), their gradients if any,
    AdamW's states, module buffers, the RoPE positions and the step's batch."""
    tensors = [local_tensor(p) for p in run.model.parameters()]
    tensors += [local_tensor(p.grad) for p in run.model.parameters() if p.grad is not None]
    tensors += [local_tensor(b) for b in run.model.buffers()]
    if run.optimizer is not None:
        for state in run.optimizer.state.values():
            tensors += [local_tensor(v) for v in state.values() if isinstance(v, torch.Tensor)]
    tensors.append(run.positions)
    tensors += list(batch)
    return tensors


def gathered_storages(model: torch.nn.Module) -> list[torch.Tensor]:
    """FSDP2's all-gather output tensors (the storages of the unsharded parameters), found through
    each FSDP module's parameter group (a private layout: empty when it differs in another torch
    version, and the tracker then misses FSDP2's frees and re-allocations of gathered units)."""
    found = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        group = getattr(get_state(), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", ()) if group is not None else ():
            found += [t for t in getattr(fsdp_param, "all_gather_outputs", ()) if isinstance(t, torch.Tensor)]
    return found


# ----------------------------------------------------------------------------- one step on this rank


@dataclass(frozen=True, slots=True, kw_only=True)
class StackRankResult:
    """One rank's measurement of one whole-model point, plus what only a stack run has: the bytes
    live before the step (``resident_bytes``) and the pinned host memory of offloaded checkpoints."""

    measurement: RankMeasurement
    resident_bytes: int | None = None
    host_bytes: int | None = None


def rank_device() -> torch.device:
    """This rank's CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_batch(w: StackWorkload, run, seed: int) -> tuple[torch.Tensor, ...]:
    """This rank's tokens (and labels in training) as compact tensors on the run's device (the
    global batch is drawn on the CPU; slicing it would keep whole-sequence storages alive)."""
    from ringplan_runtime.stack_parallel import global_batch, local_batch

    tokens, labels = local_batch(*global_batch(w, seed), run.rank, w)
    batch = (tokens, labels) if w.training else (tokens,)
    return tuple(t.to(run.device).clone(memory_format=torch.contiguous_format) for t in batch)


def run_one_step(run, batch: tuple[torch.Tensor, ...]) -> None:
    """A training step (forward, backward, AdamW, zero_grad) or a forward-only prefill."""
    if run.workload.training:
        run.step(*batch)
    else:
        run.forward(batch[0])


def _timed(run, batch) -> float:
    if run.device.type != "cuda":
        start = time.perf_counter()
        run_one_step(run, batch)
        return time.perf_counter() - start
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    run_one_step(run, batch)
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1e3


def _memory_step(run, batch, settings: MeasureSettings) -> dict[str, int | None]:
    """The memory step under the instruments (module docstring, step 3). The cyclic garbage
    collector is run before and paused during the step, so storages die when their last reference
    does (FSDP2 holds reference cycles)."""
    from ringplan_runtime.tracker import SentBytesCounter

    device = run.device
    _synchronize(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the build and warm-up are not this step's
        torch.cuda.reset_peak_memory_stats(device)
    tracker = StackTracker(device=device.type) if settings.track_live_tensors else None
    host = StackTracker(device="cpu") if device.type == "cuda" and run.workload.settings.offload_checkpoints else None
    counter = SentBytesCounter() if settings.count_sent_bytes else None
    resident = None
    if tracker is not None:
        tracker.track(*resident_tensors(run, batch))
        resident = tracker.live_bytes
        tracker.watch(*gathered_storages(run.model))
    gc.disable()
    try:
        with tracker or contextlib.nullcontext(), host or contextlib.nullcontext(), \
                counter or contextlib.nullcontext():
            run_one_step(run, batch)
    finally:
        gc.enable()
    _synchronize(device)
    figures = {"tracked_peak_bytes": tracker.peak_bytes if tracker else None,
               "sent_bytes": counter.sent_bytes if counter else None, "peak_allocated_bytes": None,
               "peak_reserved_bytes": None, "device_used_bytes": None, "non_allocator_bytes": None,
               "resident_bytes": resident, "host_bytes": host.peak_bytes if host else None}
    if device.type == "cuda":
        figures.update(_allocator_and_device_peaks(device))
    return figures


def measure_stack_rank(w: StackWorkload, *, settings: MeasureSettings | None = None,
                       device: torch.device | None = None) -> StackRankResult:
    """Measure one step of ``w`` on this rank (see the module docstring); OOM → infeasible, not an
    exception. Needs the process group of ``w.world_size`` ranks (``spawn`` or torchrun)."""
    from ringplan_runtime.stack_parallel import build_stack

    settings = settings or MeasureSettings()
    device = device or rank_device()
    run, out_of_memory, rank = None, False, _rank()
    try:
        run = build_stack(w, device=device, seed=settings.seed)
        run.positions = run.positions.clone(memory_format=torch.contiguous_format)
        batch = rank_batch(w, run, settings.seed)
        for _ in range(max(settings.warmup_steps, 1 if w.training else 0)):
            run_one_step(run, batch)
        figures = _memory_step(run, batch, settings)
        times = tuple(_timed(run, batch) for _ in range(settings.timed_steps))
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        out_of_memory = True  # leave the except block first: its traceback still holds the tensors
    run = batch = None
    gc.collect()
    _release(device)
    if out_of_memory:
        return StackRankResult(measurement=RankMeasurement(rank=rank, feasible=False, failure="oom"))
    extra = {"resident_bytes": figures.pop("resident_bytes"), "host_bytes": figures.pop("host_bytes")}
    measurement = RankMeasurement(rank=rank, feasible=True, backend=_backend(w, device),
                                  step_time_s=statistics.median(times), step_times_s=times, **figures)
    return StackRankResult(measurement=measurement, **extra)


def measure_stack(w: StackWorkload, *, settings: MeasureSettings) -> RankMeasurement:
    """``measure_stack_rank(w, settings=settings).measurement`` (the contract of docs/STACK.md)."""
    return measure_stack_rank(w, settings=settings).measurement


def _backend(w: StackWorkload, device: torch.device) -> str:
    from ringplan_runtime import select_backend
    from ringplan_runtime.stack_parallel import torch_dtype

    return select_backend(device, torch_dtype(w.settings.param_dtype), w.model.head_dim, w.layout.backend)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----------------------------------------------------------------------------- sweeps of points


class RingOutOfMemory(RuntimeError):
    """Raised by a rank after its point ran out of memory on several ranks (tears the ring down)."""


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
    from ringplan.stack_profiles import MODEL_FIELDS

    return {"model": {name: getattr(w.model, name) for name in MODEL_FIELDS}, "seq_len_tokens": w.seq_len_tokens,
            "batch": w.batch, "training": w.training, "world_size": w.world_size, "ring_size": w.layout.ring_size,
            "layout": w.layout.layout, "backend": w.layout.backend, "settings": asdict(w.settings)}


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
                        backend=raw.get("backend", "auto"))
    return StackWorkload(model=spec, seq_len_tokens=raw["seq_len_tokens"], batch=raw.get("batch", 1),
                         training=raw.get("training", True), world_size=raw["world_size"], layout=layout,
                         settings=StackSettings(**raw.get("settings", {})))


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def stack_points_worker(points: list[StackWorkload], results_dir: str, settings: MeasureSettings,
                        deadline: float | None = None, command: str | None = None, progress: bool = False,
                        fault: dict | None = None) -> None:
    """Body of every rank (spawned or under torchrun): measure ``points`` in order, one JSON line per
    point in ``rank{r}.jsonl``; stop starting points once ``deadline`` (``time.time()``) is within the
    longest point so far. An out-of-memory point on several ranks raises (the ring is torn down).
    ``fault`` (tests): ``{"rank": r, "index": i}`` makes rank r report point i out of memory."""
    import torch.distributed as dist

    from ringplan_runtime.provenance import current_provenance

    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    device = rank_device()
    path = Path(results_dir) / f"rank{rank}.jsonl"
    if rank == 0:
        provenance = current_provenance(method=STACK_METHOD.format(warmup=settings.warmup_steps,
                                                                   timed=settings.timed_steps),
                                        gpu_count=world, command=command,
                                        device_index=device.index if device.type == "cuda" else None)
        _append(path, {"provenance": asdict(provenance)})
    from tqdm import tqdm

    longest = 0.0
    bar = tqdm(total=len(points), disable=rank != 0 or not progress, unit="point", desc=f"stack W={world}")
    for index, w in enumerate(points):
        stop = deadline is not None and time.time() + longest > deadline
        if dist.is_initialized() and world > 1:  # every rank decides alike
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
        if stop:
            return
        started = time.time()
        if fault and fault.get("rank") == rank and fault.get("index") == index:
            result = StackRankResult(measurement=RankMeasurement(rank=rank, feasible=False, failure="oom"))
        else:
            result = measure_stack_rank(w, settings=settings, device=device)
        longest = max(longest, time.time() - started)
        _append(path, {"index": index, "result": asdict(result)})
        bar.set_postfix_str(f"L={w.model.n_layers} S={w.seq_len_tokens:,} "
                            f"{'ok' if result.measurement.feasible else 'oom'} {time.time() - started:.0f}s")
        bar.update(1)
        if not result.measurement.feasible and world > 1:
            raise RingOutOfMemory(f"rank {rank} ran out of memory at point {index}")


def _read_results(results_dir: Path, world_size: int) -> tuple[dict[int, list[StackRankResult]], object]:
    from ringplan_runtime.provenance import Provenance

    by_index: dict[int, list[StackRankResult]] = {}
    provenance = None
    for rank in range(world_size):
        path = results_dir / f"rank{rank}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else ():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a rank killed mid-write
                continue
            if "provenance" in record:
                provenance = Provenance(**record["provenance"])
                continue
            raw = record["result"]
            m = dict(raw["measurement"], step_times_s=tuple(raw["measurement"]["step_times_s"]))
            by_index.setdefault(record["index"], []).append(StackRankResult(
                measurement=RankMeasurement(**m), resident_bytes=raw["resident_bytes"], host_bytes=raw["host_bytes"]))
    return by_index, provenance


_FIGURES = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "non_allocator_bytes",
            "tracked_peak_bytes", "sent_bytes")


def point_result(w: StackWorkload, ranks: list[StackRankResult], failure: str | None,
                 provenance=None) -> StackPointResult:
    """Combine the ranks' results of one point (max memory, slowest step); a missing rank → failed."""
    if any(not r.measurement.feasible for r in ranks):
        return StackPointResult(workload=w, feasible=False, failure="oom", provenance=provenance)
    if len(ranks) < w.world_size:
        return StackPointResult(workload=w, feasible=False, failure=failure or "rank lost", provenance=provenance)

    def largest(values):
        present = [v for v in values if v is not None]
        return max(present) if present else None

    figures = {name: largest(getattr(r.measurement, name) for r in ranks) for name in _FIGURES}
    figures.update(resident_bytes=largest(r.resident_bytes for r in ranks),
                   host_bytes=largest(r.host_bytes for r in ranks),
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
    from ringplan_runtime import RankFailure, spawn

    settings = settings or MeasureSettings()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    deadline = None if budget_s is None else time.time() + budget_s
    results: list[StackPointResult] = []
    for world_size in sorted({w.world_size for w in points}):
        remaining = [w for w in points if w.world_size == world_size]
        while remaining:
            left = None if deadline is None else deadline - time.time()
            if left is not None and left <= 0:
                break
            timeout = point_timeout_s * len(remaining) if left is None else min(point_timeout_s * len(remaining),
                                                                               left + point_timeout_s)
            failure = None
            with tempfile.TemporaryDirectory(prefix="ringplan-stack-") as tmp:
                try:
                    spawn(stack_points_worker, world_size=world_size, backend="nccl" if use_cuda else "gloo",
                          timeout_s=timeout, args=(remaining, tmp, settings, deadline, command, progress, fault))
                except (RankFailure, TimeoutError) as error:
                    text = _head_and_tail(" ".join(str(error).split()))
                    failure = f"timeout: {text}" if isinstance(error, TimeoutError) else f"rank failure: {text}"
                by_index, provenance = _read_results(Path(tmp), world_size)
            done = _finished(remaining, by_index, failure, provenance)
            fault = None  # an injected fault fires once
            for result in done:
                if on_result is not None:
                    on_result(result)
            results.extend(done)
            if not done:
                break  # the ring stopped before any point (budget): the rest are skipped
            remaining = remaining[len(done):]
    measured = {id(r.workload) for r in results}
    skipped = [StackPointResult(workload=w, feasible=False, failure="skipped (budget)")
               for w in points if id(w) not in measured]
    return results + skipped


def _head_and_tail(text: str, *, head: int = 100, tail: int = 240) -> str:
    """A failure message short enough for a table that still ends with the exception's own words
    (a traceback's head names only the launcher)."""
    return text if len(text) <= head + tail else f"{text[:head]} … {text[-tail:]}"


def _finished(points: list[StackWorkload], by_index: dict, failure: str | None, provenance) -> list[StackPointResult]:
    """Results of the points a ring finished, plus the one it failed on (if it failed)."""
    done = []
    for index, w in enumerate(points):
        ranks = by_index.get(index, [])
        complete = len(ranks) == w.world_size or any(not r.measurement.feasible for r in ranks)
        if not complete and failure is None:
            break  # not started: the budget ran short
        result = point_result(w, ranks, None if complete else failure, provenance)
        done.append(result)
        if not complete or not result.feasible:
            break
    return done


def stack_row(result: StackPointResult, *, gpu: str, series: str | None = None):
    """One ``ringplan.stack/1`` row from a point's result (OOM → ``oom=True``)."""
    from ringplan.stack_profiles import measurement_from_workload

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
    from ringplan.stack_profiles import StackProfile, write_stack_profile
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

    parser = argparse.ArgumentParser(prog="python -m ringplan_runtime.stack_measure",
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

    ``torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.stack_measure --points p.json --out o.json``
    """
    import os

    from ringplan_runtime.provenance import command_line

    args = _parser().parse_args(argv)
    points = [workload_from_json(raw) for raw in json.loads(args.points.read_text())]
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
    results_dir = args.out.parent / f".{args.out.name}.ranks"
    results_dir.mkdir(parents=True, exist_ok=True)
    stack_points_worker(points, str(results_dir), settings, deadline, command, progress=not args.no_progress)
    dist.barrier()
    if dist.get_rank() == 0:
        by_index, provenance = _read_results(results_dir, dist.get_world_size())
        results = [point_result(w, by_index.get(i, []), "not run", provenance) for i, w in enumerate(points)]
        write_stack_results(args.out, results, record_as=args.record_as, series=args.series)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
