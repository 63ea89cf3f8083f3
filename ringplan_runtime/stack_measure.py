"""Measure one step of a whole model (``StackWorkload``) on this rank: memory, time, what is resident.

Method (recorded in every stack profile's provenance, see ``STACK_METHOD``):

1. ``build_stack`` (``ringplan_runtime.stack_parallel``): FSDP2 + the CP scheme (ring, all-gather,
   Ulysses, hybrid) + tensor parallelism (T = ``w.tp_degree``) for training, replicated (TP-sharded)
   weights under ``inference_mode`` (``no_grad`` when T > 1) for forward-only; this rank's seeded batch.
   DTensors (FSDP2 shards, TP shards, TP activations) count by their local tensors.
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
several ranks must then tear the ring down. Sweeps of points on spawned rings (a fresh ring after an
out-of-memory point or a lost rank, a per-point timeout, a time budget), the ``ringplan.stack/1``
profile they write and their command line are ``ringplan_runtime.stack_sweep``
(``python -m ringplan_runtime.stack_measure`` still runs that command line). ``tracked_stack_peak`` is
the tracker's step alone, with every storage live at the peak (for checking byte terms).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ringplan.stack import StackWorkload
from ringplan_runtime.measure import (
    MeasureSettings,
    RankMeasurement,
    allocator_and_device_peaks,
    is_out_of_memory,
    release_cached_memory,
    synchronize,
)
from ringplan_runtime.tracker import LiveTensorTracker, live_storage, storage_or_none

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
            storage = storage_or_none(tensor)
            if storage is None:
                continue
            key = id(storage)
            if key not in self._live:
                ref = weakref.ref(storage, lambda _ref, key=key: self._forget(key))
                self._live[key] = (ref, live_storage(tensor, 0, "watch"))
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


def _memory_step(run, batch, settings: MeasureSettings, keep_peak_tensors: bool = False) -> dict:
    """The memory step under the instruments (module docstring, step 3). The cyclic garbage
    collector is run before and paused during the step, so storages die when their last reference
    does (FSDP2 holds reference cycles)."""
    from ringplan_runtime.tracker import SentBytesCounter

    device = run.device
    synchronize(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the build and warm-up are not this step's
        torch.cuda.reset_peak_memory_stats(device)
    tracker = StackTracker(device=device.type, keep_peak_tensors=keep_peak_tensors) \
        if settings.track_live_tensors else None
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
    synchronize(device)
    figures = {"tracked_peak_bytes": tracker.peak_bytes if tracker else None,
               "sent_bytes": counter.sent_bytes if counter else None, "peak_allocated_bytes": None,
               "peak_reserved_bytes": None, "device_used_bytes": None, "non_allocator_bytes": None,
               "resident_bytes": resident, "host_bytes": host.peak_bytes if host else None}
    if keep_peak_tensors and tracker is not None:
        figures["peak_op"], figures["peak_tensors"] = tracker.peak_op, tracker.peak_tensors
    if device.type == "cuda":
        figures.update(allocator_and_device_peaks(device))
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
    release_cached_memory(device)
    if out_of_memory:
        return StackRankResult(measurement=RankMeasurement(rank=rank, feasible=False, failure="oom"))
    extra = {"resident_bytes": figures.pop("resident_bytes"), "host_bytes": figures.pop("host_bytes")}
    measurement = RankMeasurement(rank=rank, feasible=True, backend=_backend(w, device),
                                  step_time_s=statistics.median(times), step_times_s=times, **figures)
    return StackRankResult(measurement=measurement, **extra)


def measure_stack(w: StackWorkload, *, settings: MeasureSettings) -> RankMeasurement:
    """``measure_stack_rank(w, settings=settings).measurement`` (the contract of docs/STACK.md)."""
    return measure_stack_rank(w, settings=settings).measurement


@dataclass(frozen=True, slots=True, kw_only=True)
class StackPeak:
    """The live-tensor peak of one step on this rank: its bytes, the bytes alive before the step, the
    op at which it was reached and every storage live then (largest first, local shapes)."""

    peak_bytes: int
    resident_bytes: int
    peak_op: str
    peak_tensors: tuple


def tracked_stack_peak(w: StackWorkload, *, seed: int = 0, device: torch.device | None = None) -> StackPeak:
    """The tracker's peak of one step of ``w`` on this rank, after one warm-up step, with what is live
    at it: the same build, batch and tracker as ``measure_stack_rank`` (``tracked_peak_bytes``), for
    any T, CP scheme and settings the runtime runs. Call it on every rank of a ``w.world_size`` group."""
    from ringplan_runtime.stack_parallel import build_stack

    device = device or rank_device()
    run = build_stack(w, device=device, seed=seed)
    run.positions = run.positions.clone(memory_format=torch.contiguous_format)
    batch = rank_batch(w, run, seed)
    run_one_step(run, batch)
    figures = _memory_step(run, batch, MeasureSettings(warmup_steps=1, timed_steps=1, count_sent_bytes=False,
                                                       seed=seed), keep_peak_tensors=True)
    return StackPeak(peak_bytes=figures["tracked_peak_bytes"], resident_bytes=figures["resident_bytes"],
                     peak_op=figures["peak_op"], peak_tensors=figures["peak_tensors"])


def _backend(w: StackWorkload, device: torch.device) -> str:
    from ringplan_runtime import select_backend
    from ringplan_runtime.dtypes import torch_dtype

    return select_backend(device, torch_dtype(w.settings.param_dtype), w.model.head_dim, w.layout.backend)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


if __name__ == "__main__":  # the sweep entry point, under its former name (run, not imported: no module cycle)
    import runpy

    runpy.run_module("ringplan_runtime.stack_sweep", run_name="__main__", alter_sys=True)
