"""Measure one step of a ``Workload`` on a ``RingLayout``, on this rank: memory, time, bytes sent.

Method (recorded in every profile row's provenance, see ``METHOD``):

1. Build random local inputs for this rank (q ``[B, n, H, D]``, k/v ``[B, n, H_kv, D]``, or the
   local slice ``[B, n, E]`` of ``RingDilatedAttention`` when projections are on). In training the
   layer output is dropped before backward and its gradient is created when backward needs it
   (``_UpstreamGradient``), as in a network whose next layer consumed the output.
2. ``warmup_steps`` steps (kernel selection, NCCL communicator set-up, allocator warm-up).
3. ``torch.cuda.reset_peak_memory_stats``; one *memory step* under the live-tensor tracker and the
   sent-bytes counter; then read the allocator's peak allocated / reserved bytes, and the device
   used at the peak: NVML used − torch reserved (memory outside the allocator) + peak reserved.
4. ``timed_steps`` steps timed with CUDA events (``perf_counter`` on CPU); the median is the step time.

An out-of-memory error is not a crash: it is returned as an infeasible ``RankMeasurement``.
Callers running several ranks must then tear the ring down (a peer may be blocked on a
send to this rank); see ``ringplan_runtime.sweep``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from ringplan.workload import RingLayout, Workload, check_layout_fits, tokens_per_rank
from ringplan_runtime import nvml
from ringplan_runtime.dtypes import torch_dtype
from ringplan_runtime.tracker import LiveTensorTracker, SentBytesCounter

METHOD = ("random inputs; {warmup} warm-up steps; torch.cuda.reset_peak_memory_stats; one step read for "
          "peak allocated/reserved (torch allocator), device used (NVML, after the step) and live tensors "
          "(TorchDispatchMode tracker); step time = median of {timed} CUDA-event timings (perf_counter on CPU); "
          "training: the layer output is dropped before backward, its gradient made when backward needs it")


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasureSettings:
    """How a step is measured: warm-up and timed step counts, and the optional instruments."""

    warmup_steps: int = 2
    timed_steps: int = 5
    track_live_tensors: bool = True
    count_sent_bytes: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.timed_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and timed_steps >= 1, got {self.warmup_steps} and "
                             f"{self.timed_steps}")

    @property
    def method(self) -> str:
        return METHOD.format(warmup=self.warmup_steps, timed=self.timed_steps)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankMeasurement:
    """What one rank measured for one step (None where the instrument does not apply, e.g. CPU)."""

    rank: int
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
    step_times_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInputs:
    """Everything one step needs on this rank; ``tensors`` is what the caller owns (for the tracker)."""

    workload: Workload
    layout: RingLayout
    device: torch.device
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    x: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    group: object | None = None

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        owned = [t for t in (self.q, self.k, self.v, self.x) if t is not None]
        if self.module is not None:
            owned.extend(self.module.parameters())
        return tuple(owned)


def step_inputs(workload: Workload, layout: RingLayout, *, device: torch.device, group: object | None = None,
                seed: int = 0, rank: int = 0) -> StepInputs:
    """Random local inputs of this rank for ``workload`` split over ``layout`` (S/P tokens each)."""
    from ringplan_runtime import RingDilatedAttention

    check_layout_fits(workload, layout)
    shape, n = workload.shape, tokens_per_rank(workload, layout)
    dtype = torch_dtype(shape.dtype)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, generator=generator,
                           requires_grad=workload.training)

    if workload.projections:
        module = RingDilatedAttention(
            shape.embed_dim, shape.n_heads, num_kv_heads=shape.n_kv_heads,
            segment_lengths=workload.pattern.segment_lengths_tokens, dilation_rates=workload.pattern.dilation_rates,
            causal=workload.pattern.causal, layout=layout.layout, group=group, backend=layout.backend,
            check_consistency=False,
        ).to(device=device, dtype=dtype)
        module.requires_grad_(workload.training)
        x = random(shape.batch, n, shape.embed_dim)
        return StepInputs(workload=workload, layout=layout, device=device, x=x, module=module, group=group)
    q = random(shape.batch, n, shape.n_heads, shape.head_dim)
    k = random(shape.batch, n, shape.n_kv_heads, shape.head_dim)
    v = random(shape.batch, n, shape.n_kv_heads, shape.head_dim)
    return StepInputs(workload=workload, layout=layout, device=device, q=q, k=k, v=v, group=group)


def step_output(inputs: StepInputs) -> torch.Tensor:
    """The forward pass of one step: the module, the dilated ring, the dense ring, or (``layout.cp_scheme``)
    all-gather or Ulysses attention over the whole group (hybrid needs a U × R grid of groups: not here).

    The ranks' inputs are built alike by construction, so the cross-rank comparison of inputs
    (``check_consistency``) is off: the step measures the attention alone.
    """
    from ringplan_runtime import allgather_attention, ring_attention, ring_dilated_attention, ulysses_attention

    workload, layout = inputs.workload, inputs.layout
    if layout.cp_scheme != "ring":
        schemes = {"allgather": allgather_attention, "ulysses": ulysses_attention}
        if layout.cp_scheme not in schemes:
            raise ValueError(f"measure runs the ring, allgather and ulysses schemes, not {layout.cp_scheme}")
        return schemes[layout.cp_scheme](inputs.q, inputs.k, inputs.v, group=inputs.group,
                                         causal=workload.pattern.causal, layout=layout.layout,
                                         backend=layout.backend, check_consistency=False)
    if inputs.module is not None:
        return inputs.module(inputs.x, already_split=True)
    if workload.pattern.dilated:
        return ring_dilated_attention(
            inputs.q, inputs.k, inputs.v, segment_lengths=workload.pattern.segment_lengths_tokens,
            dilation_rates=workload.pattern.dilation_rates, group=inputs.group, causal=workload.pattern.causal,
            backend=layout.backend, check_consistency=False)
    return ring_attention(inputs.q, inputs.k, inputs.v, group=inputs.group, causal=workload.pattern.causal,
                          layout=layout.layout, backend=layout.backend, check_consistency=False)


class _UpstreamGradient(torch.autograd.Function):
    """Scalar root of the backward pass whose gradient w.r.t. the layer output is a fresh tensor.

    Stands for the next layer: it hands back dL/d(out) (ones here: values do not change memory or
    kernel time) and holds neither the output nor that gradient, so the step can drop the layer
    output before backward, as a network whose next layer consumed it would.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        ctx.out_shape, ctx.out_dtype, ctx.out_device = out.shape, out.dtype, out.device
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.ones(ctx.out_shape, dtype=ctx.out_dtype, device=ctx.out_device)


def run_step(inputs: StepInputs) -> None:
    """One forward step, or forward + backward in training (output dropped before backward).

    Gradients of the previous step are dropped first (``grad = None``, as ``zero_grad`` does).
    """
    if not inputs.workload.training:
        with torch.no_grad():
            step_output(inputs)
        return
    for tensor in inputs.tensors:
        tensor.grad = None
    root = _UpstreamGradient.apply(step_output(inputs))
    root.backward()


#: Messages of allocation failures that do not come as ``torch.cuda.OutOfMemoryError``: a CPU
#: allocation, and a library handle or workspace made outside the caching allocator (seen on 2×H200:
#: ``CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)`` in the loss backward at the edge).
OUT_OF_MEMORY_MESSAGES: tuple[str, ...] = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed",
                                           "cudnn_status_alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA OOM (``torch.cuda.OutOfMemoryError``), a library's allocation failure or a CPU
    allocation failure (``OUT_OF_MEMORY_MESSAGES``)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(message in text for message in OUT_OF_MEMORY_MESSAGES)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(inputs: StepInputs) -> float:
    """Wall time of one step: CUDA events on GPU, ``perf_counter`` on CPU."""
    if inputs.device.type != "cuda":
        start = time.perf_counter()
        run_step(inputs)
        return time.perf_counter() - start
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    run_step(inputs)
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1e3


def device_used_bytes(device: torch.device) -> int | None:
    """NVML's used bytes of the whole CUDA device (what must fit in its usable memory), else None.

    Device-wide on purpose: the catalog's usable memory is the driver's total, and what fills it
    is everything on the device (this rank's context, NCCL buffers, allocator cache, and the
    driver's own reservation). Assumes one rank per device and no other process on it.
    """
    if device.type != "cuda":
        return None
    for name in nvml_names(device):
        reading = nvml.device_memory(name)
        if reading is not None:
            return reading.used_bytes
    return None


def nvml_names(device: torch.device) -> list[str | int]:
    """Ways to find this CUDA device in NVML, most robust first: UUID, PCI bus id, and the index
    (only when ``CUDA_VISIBLE_DEVICES`` does not renumber the devices)."""
    import os

    props = torch.cuda.get_device_properties(device)
    names: list[str | int] = []
    if getattr(props, "uuid", None) is not None:
        names.append(str(props.uuid))
    if all(hasattr(props, key) for key in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        names.append(f"pci:{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        names.append(device.index or 0)
    return names


def _memory_step(inputs: StepInputs, settings: MeasureSettings) -> dict[str, int | None]:
    """Run the memory step under the instruments; return the memory figures and bytes sent."""
    device = inputs.device
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracker = LiveTensorTracker(device=device.type) if settings.track_live_tensors else None
    counter = SentBytesCounter() if settings.count_sent_bytes else None
    if tracker is not None:
        tracker.track(*inputs.tensors)
    with tracker or contextlib.nullcontext(), counter or contextlib.nullcontext():
        run_step(inputs)
    synchronize(device)
    figures: dict[str, int | None] = {
        "tracked_peak_bytes": tracker.peak_bytes if tracker else None,
        "sent_bytes": counter.sent_bytes if counter else None,
        "peak_allocated_bytes": None, "peak_reserved_bytes": None, "device_used_bytes": None,
        "non_allocator_bytes": None}
    if device.type == "cuda":
        figures.update(allocator_and_device_peaks(device))
    return figures


def allocator_and_device_peaks(device: torch.device) -> dict[str, int | None]:
    """Peak allocated/reserved bytes since the reset, and the device used at the peak.

    NVML reports the use now, not at the peak; near an OOM the allocator may have released cached
    segments since. So: device used at the peak = (NVML used now − torch reserved now), the memory
    outside the allocator, + the peak reservation.
    """
    used_now = device_used_bytes(device)
    peak_reserved = torch.cuda.max_memory_reserved(device)
    outside = None if used_now is None else used_now - torch.cuda.memory_reserved(device)
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device), "peak_reserved_bytes": peak_reserved,
            "device_used_bytes": None if outside is None else outside + peak_reserved, "non_allocator_bytes": outside}


def measure_step(workload: Workload, layout: RingLayout, *, device: torch.device, rank: int = 0,
                 group: object | None = None, settings: MeasureSettings | None = None) -> RankMeasurement:
    """Measure one step on this rank (see the module docstring); OOM → infeasible, not an exception."""
    from ringplan_runtime import select_backend

    settings = settings or MeasureSettings()
    backend = select_backend(device, torch_dtype(workload.shape.dtype), workload.shape.head_dim, layout.backend)
    inputs, out_of_memory = None, False
    try:
        inputs = step_inputs(workload, layout, device=device, group=group, seed=settings.seed, rank=rank)
        for _ in range(settings.warmup_steps):
            run_step(inputs)
        figures = _memory_step(inputs, settings)
        times = tuple(_step_seconds(inputs) for _ in range(settings.timed_steps))
    except Exception as error:  # noqa: BLE001 - only OOM is turned into a result
        if not is_out_of_memory(error):
            raise
        out_of_memory = True  # leave the except block first: its traceback still holds the tensors
    inputs = None
    release_cached_memory(device)
    if out_of_memory:
        return RankMeasurement(rank=rank, feasible=False, failure="oom", backend=backend)
    return RankMeasurement(rank=rank, feasible=True, backend=backend, step_time_s=statistics.median(times),
                           step_times_s=times, **figures)


def release_cached_memory(device: torch.device) -> None:
    """Return cached blocks so the next point starts from an empty allocator."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
