"""Run a plan for real and compare it with the planner: memory figures, step time, OOM boundary.

``validate_plan`` measures one (workload, ring) on the local devices (``points.run_points``:
NCCL on GPUs, gloo on CPU) and sets each measured figure beside the planner's prediction:

| figure               | predicted by                                                     |
|----------------------|------------------------------------------------------------------|
| tracked_peak_bytes   | Σ ``memory_terms`` (θ = 1): the live-tensor bytes the plan holds |
| peak_allocated_bytes | the memory model when it fits that figure, else Σ ``memory_terms`` |
| peak_reserved_bytes  | the memory model, when it fits that figure                       |
| device_used_bytes    | the memory model's total (what must fit in usable memory)        |
| step_time_s          | ``ringplan.time.attention_time`` (if present and it has data)             |
| bytes_sent_per_rank  | the ring's K/V (and dK/dV) traffic, dense patterns               |

``bisect_boundary`` searches the real OOM boundary in tokens (valid lengths only: S = m·unit·P,
``ringplan.capacity.attention.token_unit``) and compares it with ``ringplan.capacity.attention.max_tokens``.
``--emulate-gpu`` runs cap each rank's allocator (``ringplan_runtime.emulate``); the checks that
must fail before anything is launched are in ``check_launch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ringplan.hardware import GpuSpec
from ringplan.memory.attention_terms import memory_terms
from ringplan.stack import StackWorkload
from ringplan.workload import RingLayout, Workload
from ringplan_runtime.measure import MeasureSettings
from ringplan_runtime.points import PointResult, SweepPoint, run_points

MEMORY_FIGURES = ("tracked_peak_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes")
#: Largest tokens per rank a CPU validation accepts (it checks byte terms, not speed).
CPU_MAX_TOKENS_PER_RANK = 16_384


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What to run: the workload on a ring, the GPU the prediction is for, and the emulated GPU.
    ``runs_on``: the GPU that actually runs an emulated plan (its step time is that GPU's: an
    emulated card caps memory, not speed); None when not emulating or not in the catalog."""

    workload: Workload
    layout: RingLayout
    gpu: GpuSpec | None
    emulate: GpuSpec | None = None
    device_type: str = "cuda"
    runs_on: GpuSpec | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    """One figure predicted vs measured; ``error`` = (predicted − measured) / measured."""

    name: str
    predicted: float | None
    measured: float | None
    source: str
    tolerance: float

    @property
    def error(self) -> float | None:
        if self.predicted is None or not self.measured:
            return None
        return (self.predicted - self.measured) / self.measured

    @property
    def within(self) -> bool | None:
        return None if self.error is None else abs(self.error) <= self.tolerance


@dataclass(frozen=True, slots=True, kw_only=True)
class Validation:
    """A plan's run: the measured point, the figures, and whether the prediction held."""

    plan: Plan
    result: PointResult
    figures: tuple[Figure, ...]
    predicted_feasible: bool | None
    provenance: str

    @property
    def passed(self) -> bool:
        return verdict(self.result, self.figures, self.predicted_feasible)


def verdict(result, figures: tuple[Figure, ...], predicted_feasible: bool | None) -> bool:
    """A run passes when it ran with every figure within tolerance and was not predicted infeasible,
    or when it ran out of memory and was predicted infeasible."""
    if not result.feasible:
        return result.failure == "oom" and predicted_feasible is False
    return all(f.within is not False for f in figures) and predicted_feasible is not False


@dataclass(frozen=True, slots=True, kw_only=True)
class Boundary:
    """The measured OOM boundary against the predicted capacity, in tokens."""

    predicted_max_tokens: int | None
    measured_max_tokens: int | None
    first_oom_tokens: int | None
    tolerance: float
    probes: tuple[PointResult, ...] = field(default=(), repr=False)

    @property
    def error(self) -> float | None:
        if self.predicted_max_tokens is None or not self.measured_max_tokens:
            return None
        return (self.predicted_max_tokens - self.measured_max_tokens) / self.measured_max_tokens

    @property
    def never_above(self) -> bool | None:
        if self.predicted_max_tokens is None or self.measured_max_tokens is None:
            return None
        return self.predicted_max_tokens <= self.measured_max_tokens

    @property
    def passed(self) -> bool:
        return self.error is not None and self.never_above is True and abs(self.error) <= self.tolerance


def check_launch(*, world_size: int, device_type: str, emulate: GpuSpec | None) -> None:
    """Errors before anything is launched: too few devices, emulating on CPU or a larger GPU."""
    import torch

    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if world_size > visible:
            raise ValueError(f"world size {world_size} needs {world_size} GPUs, {visible} visible "
                             f"(CUDA_VISIBLE_DEVICES={_visible_env()})")
    elif emulate is not None:
        raise ValueError("--emulate-gpu caps a GPU's memory: it needs CUDA devices")
    if emulate is not None:
        real = real_memory_bytes()
        if emulate.usable_memory_bytes > real:
            raise ValueError(f"cannot emulate {emulate.name} ({emulate.usable_memory_bytes:,} B usable) on a GPU "
                             f"with {real:,} B: the emulated GPU must be smaller than the real one")


def _visible_env() -> str:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset")


def real_memory_bytes() -> int:
    """Total memory of local GPU 0 as the driver reports it (NVML), else as CUDA reports it."""
    from ringplan_runtime import nvml

    reading = nvml.device_memory(nvml.first_visible_device())
    if reading is not None:
        return reading.total_bytes
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def ring_sent_bytes(workload: Workload, layout: RingLayout) -> int | None:
    """Bytes one rank sends per step, dense patterns: (P−1) K/V blocks forward; training adds
    (P−1) K/V blocks and P dK/dV blocks (P−1 fp32 accumulators, the last hop home in the dtype).
    None for dilated patterns (only some branches ring, over subgroups)."""
    if workload.pattern.dilated:
        return None
    shape, p = workload.shape, layout.ring_size
    pair_elements = 2 * shape.batch * (workload.seq_len_tokens // p) * shape.n_kv_heads * shape.head_dim
    sent = (p - 1) * pair_elements * shape.dtype_bytes
    if workload.training and p > 1:
        sent += (p - 1) * pair_elements * shape.dtype_bytes + pair_elements * ((p - 1) * 4 + shape.dtype_bytes)
    return sent


def predicted_step_time_s(plan: Plan) -> tuple[float | None, str]:
    """The time model's step time for the plan, or None (no time model, no data, or CPU)."""
    gpu = plan.runs_on if plan.emulate is not None and plan.runs_on is not None else plan.gpu
    if plan.device_type != "cuda" or gpu is None:
        return None, "no time model on CPU"
    try:
        from ringplan.time.attention_time import step_time_prediction
    except ImportError:
        return None, "ringplan.time.attention_time absent"
    try:
        prediction = step_time_prediction(plan.workload, plan.layout, gpu)
    except ValueError as error:
        return None, f"time model: {error}"
    ran_on = f"; timed as {gpu.name}, the GPU that ran the emulation" if gpu is not plan.gpu else ""
    return prediction.step_time_s, f"time model ({prediction.provenance}{ran_on})"


def predicted_figures(plan: Plan, model, *, tolerance: float, time_tolerance: float,
                      measured: PointResult) -> tuple[tuple[Figure, ...], bool | None, str]:
    """The figures to compare, whether the model calls the plan feasible, and its provenance."""
    analytic = float(sum(memory_terms(plan.workload, plan.layout).values()))
    figures = [Figure(name="tracked_peak_bytes", predicted=analytic, measured=measured.tracked_peak_bytes,
                      source="Σ memory_terms", tolerance=tolerance)]
    feasible, provenance = None, "analytic byte terms (CPU)"
    if plan.device_type == "cuda" and plan.gpu is not None:
        prediction = model.predict(plan.workload, plan.layout, plan.gpu)
        feasible, provenance = prediction.total_bytes <= plan.gpu.usable_memory_bytes, prediction.provenance
        allocated = prediction.peak_allocated_bytes
        figures += [
            Figure(name="peak_allocated_bytes", predicted=allocated if allocated is not None else analytic,
                   measured=measured.peak_allocated_bytes, tolerance=tolerance,
                   source="memory model" if allocated is not None else "Σ memory_terms"),
            Figure(name="peak_reserved_bytes", predicted=prediction.peak_reserved_bytes,
                   measured=measured.peak_reserved_bytes, source="memory model", tolerance=tolerance),
            Figure(name="device_used_bytes", predicted=prediction.total_bytes, measured=measured.device_used_bytes,
                   source=f"memory model ({prediction.fitted_figure})", tolerance=tolerance)]
        step_s, step_source = predicted_step_time_s(plan)
        figures.append(Figure(name="step_time_s", predicted=step_s, measured=measured.step_time_s,
                              source=step_source, tolerance=time_tolerance))
    sent = ring_sent_bytes(plan.workload, plan.layout)
    figures.append(Figure(name="bytes_sent_per_rank", predicted=None if sent is None else float(sent),
                          measured=measured.sent_bytes, source="ring traffic", tolerance=tolerance))
    return tuple(figures), feasible, provenance


def usable_bytes(plan: Plan) -> int | None:
    return plan.emulate.usable_memory_bytes if plan.emulate is not None else None


def validate_plan(plan: Plan, *, model, settings: MeasureSettings, tolerance: float = 0.05,
                  time_tolerance: float = 0.25, timeout_s: float = 600.0, command: str | None = None) -> Validation:
    """Run the plan once and compare every figure (see the module docstring)."""
    _check_cpu_size(plan)
    point = SweepPoint(workload=plan.workload, layout=plan.layout)
    result = run_points([point], settings=settings, timeout_s=timeout_s, usable_memory_bytes=usable_bytes(plan),
                        command=command, device=plan.device_type)[0]
    figures, feasible, provenance = predicted_figures(plan, model, tolerance=tolerance,
                                                      time_tolerance=time_tolerance, measured=result)
    return Validation(plan=plan, result=result, figures=figures, predicted_feasible=feasible, provenance=provenance)


def _check_cpu_size(plan: Plan) -> None:
    n = plan.workload.seq_len_tokens // plan.layout.ring_size
    if plan.device_type == "cpu" and n > CPU_MAX_TOKENS_PER_RANK:
        raise ValueError(f"{n:,} tokens per rank on CPU: CPU validation checks byte terms at small sizes "
                         f"(≤ {CPU_MAX_TOKENS_PER_RANK:,} tokens per rank); use GPUs for real sizes")


def bisect_boundary(plan: Plan, *, model, settings: MeasureSettings, safety_margin: float = 0.05,
                    resolution: float = 0.01, tolerance: float = 0.03, max_probes: int = 16, timeout_s: float = 600.0,
                    command: str | None = None, on_probe: Callable[[PointResult], None] | None = None) -> Boundary:
    """Largest S that runs (between a feasible and an OOM probe, ``resolution`` apart) vs prediction."""
    from ringplan.capacity.attention import CapacityQuery, max_tokens, token_unit

    gpu = plan.emulate or plan.gpu
    if gpu is None:
        raise ValueError("--bisect needs a GPU to predict capacity for (--gpu or --emulate-gpu)")
    query = CapacityQuery(workload=plan.workload, layout=plan.layout.layout, backend=plan.layout.backend, gpu=gpu,
                          safety_margin=safety_margin, model=model)
    p = plan.layout.ring_size
    predicted = max_tokens(query, p).best
    step_tokens = token_unit(query, p) * p
    probes: list[PointResult] = []

    def runs(multiple: int) -> bool:
        if len(probes) >= max_probes:
            raise ValueError(f"no OOM boundary found within {max_probes} probes")
        point = SweepPoint(workload=plan.workload.with_seq_len(multiple * step_tokens), layout=plan.layout)
        result = run_points([point], settings=settings, timeout_s=timeout_s, usable_memory_bytes=usable_bytes(plan),
                            command=command, device=plan.device_type)[0]
        probes.append(result)
        if on_probe is not None:
            on_probe(result)
        if not result.feasible and result.failure != "oom":
            raise RuntimeError(f"probe at {point.workload.seq_len_tokens:,} tokens failed: {result.failure}")
        return result.feasible

    start = max(1, (predicted.seq_len_tokens if predicted else step_tokens) // step_tokens)
    lo, hi = _bracket(runs, start, resolution)
    while hi - lo > max(1, math.floor(resolution * lo)) and lo > 0:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(mid) else (lo, mid)
    if predicted is not None and lo < predicted.seq_len_tokens // step_tokens < hi:
        claimed = predicted.seq_len_tokens // step_tokens  # settle "never above": run the predicted maximum itself
        lo, hi = (claimed, hi) if runs(claimed) else (lo, claimed)
    return Boundary(predicted_max_tokens=predicted.seq_len_tokens if predicted else None,
                    measured_max_tokens=lo * step_tokens if lo else None, first_oom_tokens=hi * step_tokens,
                    tolerance=tolerance, probes=tuple(probes))


def _bracket(runs: Callable[[int], bool], start: int, resolution: float) -> tuple[int, int]:
    """(largest multiple known to run or 0, smallest known to OOM), starting at the prediction and
    stepping by max(1, 4·resolution·m) — the boundary is expected within a few percent of it."""
    if runs(start):
        lo, step = start, max(1, math.ceil(4 * resolution * start))
        while runs(lo + step):
            lo, step = lo + step, step * 2
        return lo, lo + step
    hi, step = start, max(1, math.ceil(4 * resolution * start))
    while hi - step >= 1:
        if runs(hi - step):
            return hi - step, hi
        hi, step = hi - step, step * 2
    return (1, hi) if hi > 1 and runs(1) else (0, 1)


def under_torchrun() -> bool:
    """True inside a process started by torchrun (its rendezvous variables are set)."""
    import os

    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def validate_in_process(plan: Plan, *, model, settings: MeasureSettings, tolerance: float = 0.05,
                        time_tolerance: float = 0.25, command: str | None = None) -> Validation:
    """``validate_plan`` for a process started by torchrun: this rank measures its share, every rank
    gets every rank's measurement (``all_gather_object``) and so the same verdict.

    An OOM on a ring of several raises (torchrun then stops every rank): a peer may be blocked
    sending to this rank. ``--bisect`` needs fresh rings per probe, so it is spawner-only.
    """
    from dataclasses import replace

    import torch.distributed as dist

    from ringplan_runtime import init_from_env
    from ringplan_runtime.measure import measure_step
    from ringplan_runtime.harness import RingOutOfMemory
    from ringplan_runtime.points import calibrated_cap, point_result
    from ringplan_runtime.provenance import current_provenance

    _check_cpu_size(plan)
    context = init_from_env(backend="gloo" if plan.device_type == "cpu" else None)
    if context.world_size != plan.layout.ring_size:
        raise ValueError(f"torchrun started {context.world_size} ranks but --world-size is {plan.layout.ring_size}")
    point = SweepPoint(workload=plan.workload, layout=plan.layout)
    cap = calibrated_cap(point, context.device, settings, usable_bytes(plan)) if plan.emulate is not None else None
    mine = measure_step(plan.workload, plan.layout, device=context.device, rank=context.rank, settings=settings)
    if not mine.feasible and context.world_size > 1:
        raise RingOutOfMemory(f"rank {context.rank} ran out of memory at {plan.workload.seq_len_tokens:,} tokens")
    ranks: list = [None] * context.world_size
    dist.all_gather_object(ranks, mine)
    dist.destroy_process_group()
    provenance = current_provenance(method=settings.method, gpu_count=context.world_size, command=command,
                                    device_index=context.device.index if context.device.type == "cuda" else None)
    result = replace(point_result(point, ranks, ring_size=context.world_size,
                                  allocator_cap_bytes=cap.allocator_cap_bytes if cap else None), provenance=provenance)
    figures, feasible, label = predicted_figures(plan, model, tolerance=tolerance, time_tolerance=time_tolerance,
                                                 measured=result)
    return Validation(plan=plan, result=result, figures=figures, predicted_feasible=feasible, provenance=label)


# ----------------------------------------------------------------------------- whole models (validate --model)
# A whole model's run is one StackWorkload on W ranks (``stack_sweep.run_stack_points``: spawned
# ranks, NCCL on GPUs, gloo on CPU; or torchrun). Figures as above, predicted by the whole-model planner:
#   tracked_peak_bytes   Σ ringplan.memory.stack_terms (θ = 1), on CPU and GPU
#   peak_allocated_bytes, peak_reserved_bytes, device_used_bytes   StackMemoryModel.predict (GPU)
#   step_time_s          ringplan.time.stack_time.step_time (GPU)


@dataclass(frozen=True, slots=True, kw_only=True)
class StackPlan:
    """A whole-model step to run: the workload, the GPU the prediction is for (None on CPU without
    --gpu) and the device type."""

    workload: StackWorkload
    gpu: GpuSpec | None
    device_type: str = "cuda"


@dataclass(frozen=True, slots=True, kw_only=True)
class StackValidation:
    """A whole model's run (``stack_sweep.StackPointResult``: figures the largest rank's, step time
    the slowest's), its figures against the planner, and whether the prediction held."""

    plan: StackPlan
    result: object
    figures: tuple[Figure, ...]
    predicted_feasible: bool | None
    provenance: str

    @property
    def passed(self) -> bool:
        return verdict(self.result, self.figures, self.predicted_feasible)


def check_stack_cpu_size(plan: StackPlan) -> None:
    """CPU runs check byte terms at small sizes: at most ``CPU_MAX_TOKENS_PER_RANK`` tokens per rank."""
    n = plan.workload.seq_len_tokens // plan.workload.layout.ring_size
    if plan.device_type == "cpu" and n > CPU_MAX_TOKENS_PER_RANK:
        raise ValueError(f"{n:,} tokens per rank on CPU: CPU validation checks byte terms at small sizes "
                         f"(≤ {CPU_MAX_TOKENS_PER_RANK:,} tokens per rank); use GPUs for real sizes")


def run_stack(plan: StackPlan, *, settings: MeasureSettings, timeout_s: float = 600.0, command: str | None = None):
    """One whole-model step on W fresh local processes (every process exits; OOM, a lost rank or a
    timeout is a result): ``stack_sweep.run_stack_points`` of the one point."""
    from ringplan_runtime.stack_sweep import run_stack_points

    return run_stack_points([plan.workload], settings=settings, point_timeout_s=timeout_s, command=command,
                            device=plan.device_type)[0]


def predicted_stack_step_time_s(plan: StackPlan) -> tuple[float | None, str]:
    """``stack_time.step_time`` of the plan, or None (CPU, no GPU, or no data)."""
    if plan.device_type != "cuda" or plan.gpu is None:
        return None, "no time model on CPU"
    from ringplan.time.stack_time import step_time

    try:
        prediction = step_time(plan.workload, plan.gpu)
    except ValueError as error:
        return None, f"stack time model: {error}"
    return prediction.step_time_s, f"stack time model ({prediction.provenance})"


def predicted_stack_figures(plan: StackPlan, model, *, tolerance: float, time_tolerance: float,
                            measured) -> tuple[tuple[Figure, ...], bool | None, str]:
    """The whole-model figures (see the section comment), the predicted feasibility and its provenance.
    ``measured``: a ``StackPointResult`` (its ``figures`` dict is empty when the run did not complete)."""
    from ringplan.memory.stack_terms import stack_terms

    seen = measured.figures
    try:
        analytic, source = float(sum(stack_terms(plan.workload).values())), "Σ stack_terms"
    except ValueError as error:  # a setting the runtime runs and the terms do not model yet (e.g. T > 1)
        analytic, source = None, f"stack terms: {error}"
    figures = [Figure(name="tracked_peak_bytes", predicted=analytic, measured=seen.get("tracked_peak_bytes"),
                      source=source, tolerance=tolerance)]
    if plan.device_type != "cuda" or plan.gpu is None:
        return tuple(figures), None, "analytic stack terms (CPU)"
    prediction = model.predict(plan.workload, plan.gpu)
    # With room to spare the caching allocator keeps blocks (device used at rest); near the GPU's end it
    # gives them back and the run uses what it needs (allocated + fragmentation reserve + outside).
    at_rest = prediction.device_used_at_rest_bytes
    pressure = at_rest is None or at_rest > plan.gpu.usable_memory_bytes
    device_used = (prediction.total_bytes, "stack memory model (need: near the end of the GPU)") if pressure \
        else (at_rest, "stack memory model (at rest)")
    figures += [Figure(name=name, predicted=predicted, measured=seen.get(name), source=source, tolerance=tolerance)
                for name, predicted, source in (
                    ("peak_allocated_bytes", prediction.peak_allocated_bytes, "stack memory model"),
                    ("peak_reserved_bytes", None if pressure else prediction.peak_reserved_bytes,
                     "stack memory model (at rest; not checked near the end of the GPU)"),
                    ("device_used_bytes", *device_used))]
    step_s, step_source = predicted_stack_step_time_s(plan)
    figures.append(Figure(name="step_time_s", predicted=step_s, measured=seen.get("step_time_s"), source=step_source,
                          tolerance=time_tolerance))
    return tuple(figures), prediction.total_bytes <= plan.gpu.usable_memory_bytes, prediction.provenance


def _stack_validation(plan: StackPlan, model, result, *, tolerance: float, time_tolerance: float) -> StackValidation:
    figures, feasible, label = predicted_stack_figures(plan, model, tolerance=tolerance, time_tolerance=time_tolerance,
                                                       measured=result)
    return StackValidation(plan=plan, result=result, figures=figures, predicted_feasible=feasible, provenance=label)


def validate_stack(plan: StackPlan, *, model, settings: MeasureSettings, tolerance: float = 0.05,
                   time_tolerance: float = 0.25, timeout_s: float = 600.0,
                   command: str | None = None) -> StackValidation:
    """Run the whole model's step once (spawned ranks) and compare every figure with the planner."""
    check_stack_cpu_size(plan)
    result = run_stack(plan, settings=settings, timeout_s=timeout_s, command=command)
    return _stack_validation(plan, model, result, tolerance=tolerance, time_tolerance=time_tolerance)


def validate_stack_in_process(plan: StackPlan, *, model, settings: MeasureSettings, tolerance: float = 0.05,
                              time_tolerance: float = 0.25, command: str | None = None) -> StackValidation:
    """``validate_stack`` for a process started by torchrun: every rank measures its share and gets
    every rank's result (``all_gather_object``), so all reach the same verdict. An OOM on a ring of
    several raises (torchrun then stops every rank)."""
    import torch.distributed as dist

    from ringplan_runtime import init_from_env
    from ringplan_runtime.provenance import current_provenance
    from ringplan_runtime.stack_measure import STACK_METHOD, measure_stack_rank
    from ringplan_runtime.stack_sweep import RingOutOfMemory, point_result

    check_stack_cpu_size(plan)
    context = init_from_env(backend="gloo" if plan.device_type == "cpu" else None)
    if context.world_size != plan.workload.world_size:
        raise ValueError(f"torchrun started {context.world_size} ranks but --world-size is {plan.workload.world_size}")
    mine = measure_stack_rank(plan.workload, settings=settings, device=context.device)
    if not mine.measurement.feasible and context.world_size > 1:
        raise RingOutOfMemory(f"rank {context.rank} ran out of memory at {plan.workload.seq_len_tokens:,} tokens")
    ranks: list = [None] * context.world_size
    dist.all_gather_object(ranks, mine)
    dist.destroy_process_group()
    provenance = current_provenance(method=STACK_METHOD.format(warmup=settings.warmup_steps,
                                                               timed=settings.timed_steps),
                                    gpu_count=context.world_size, command=command,
                                    device_index=context.device.index if context.device.type == "cuda" else None)
    result = point_result(plan.workload, ranks, None, provenance)
    return _stack_validation(plan, model, result, tolerance=tolerance, time_tolerance=time_tolerance)
