"""``ringplan validate``: run a plan on the local GPUs (or CPU) and compare it with the prediction.

Built-in spawner (one machine)::

    ringplan validate --gpu h100 --world-size 2 --tokens 128Ki --heads 32 --head-dim 128 --causal --layout zigzag

under torchrun (one or several nodes; rank 0 prints, every rank exits with the verdict)::

    torchrun --standalone --nproc-per-node 2 --no-python ringplan validate --world-size 2 --tokens 128Ki

torch is imported inside the command (through ``ringplan_runtime``), never at module import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ringplan.cli.capacity import build_workload, workload_options
from ringplan.cli.common import TOKENS, OneLineErrorCommand, bad_input_exits_2, format_option, render_rows
from ringplan.cli.profile import bytes_text, measure_settings, result_record, runtime_options

PERCENT = click.FloatRange(min=0.0, max=100.0)


def _value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if "bytes" in name:
        return bytes_text(value)
    return f"{value * 1e3:.3f} ms" if name.endswith("_s") else f"{value:g}"


def figure_record(figure) -> dict[str, Any]:
    return {"figure": figure.name, "predicted": figure.predicted, "measured": figure.measured,
            "error": figure.error, "tolerance": figure.tolerance, "within": figure.within, "source": figure.source}


def figure_row(figure) -> dict[str, str]:
    error = "-" if figure.error is None else f"{figure.error:+.2%}"
    within = {None: "-", True: "ok", False: "OFF"}[figure.within]
    return {"figure": figure.name, "predicted": _value(figure.name, figure.predicted),
            "measured": _value(figure.name, figure.measured), "error": error,
            "tolerance": f"±{figure.tolerance:.0%}", "check": within, "predicted by": figure.source}


def boundary_record(boundary) -> dict[str, Any]:
    return {"predicted_max_tokens": boundary.predicted_max_tokens, "measured_max_tokens": boundary.measured_max_tokens,
            "first_oom_tokens": boundary.first_oom_tokens, "error": boundary.error,
            "never_above": boundary.never_above, "tolerance": boundary.tolerance, "passed": boundary.passed,
            "probes": [result_record(p) for p in boundary.probes]}


def _plan(gpu_name, emulate_gpu, world_size, tokens, device, workload_args, *, check_devices: bool = True):
    """The plan, its prediction GPU (the emulated one when emulating) and the device type."""
    import torch

    from ringplan.hardware import load_catalog
    from ringplan.workload import RingLayout
    from ringplan_runtime.validate import Plan, check_launch

    catalog = load_catalog()
    emulate = catalog.gpu(emulate_gpu) if emulate_gpu else None
    device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    gpu = emulate or (catalog.gpu(gpu_name) if gpu_name else _local_gpu(catalog, device_type))
    workload = build_workload(seq_len_tokens=tokens, **workload_args)
    layout = RingLayout(ring_size=world_size, layout=workload_args["layout"], backend=workload_args["backend"])
    check_launch(world_size=world_size if check_devices else 1, device_type=device_type, emulate=emulate)
    return Plan(workload=workload, layout=layout, gpu=gpu, emulate=emulate, device_type=device_type)


def _local_gpu(catalog, device_type: str):
    """The catalog entry of local GPU 0 by its driver name (NVML: no CUDA context in this process)."""
    if device_type != "cuda":
        return None
    from ringplan_runtime import nvml

    name = nvml.gpu_name(nvml.first_visible_device())
    spec = catalog.gpu_by_driver_name(name) if name else None
    if spec is None:
        raise ValueError(f"the local GPU ({name or 'unknown: NVML unavailable'}) is not in the catalog; pass --gpu NAME")
    return spec


def _model(profile_paths: tuple[str, ...]):
    from ringplan.memory_model import MemoryModel, default_memory_model
    from ringplan.profiles import load_profile

    if not profile_paths:
        return default_memory_model("analytic")
    profiles = [load_profile(path) for path in profile_paths]
    return MemoryModel(rows=tuple((row, p.path or "") for p in profiles for row in p.rows))


@click.command("validate", cls=OneLineErrorCommand)
@click.option("--gpu", "gpu_name", default=None,
              help="Catalog GPU the prediction is for (default: the local GPU by its driver name).")
@click.option("--world-size", type=click.IntRange(min=1), required=True, help="Ranks in the ring (one GPU each).")
@click.option("--tokens", type=TOKENS, required=True, help="Global sequence length S (1M, 1Mi, 200K, 131072).")
@click.option("--tolerance", type=PERCENT, default=5.0, show_default=True,
              help="Largest |error| in percent for the memory figures and bytes sent.")
@click.option("--time-tolerance", type=PERCENT, default=25.0, show_default=True,
              help="Largest |error| in percent for the step time.")
@click.option("--bisect", is_flag=True, help="Also search the real OOM boundary in tokens and compare it with the "
                                             "predicted capacity (one ring launch per probe).")
@click.option("--capacity-tolerance", type=PERCENT, default=3.0, show_default=True,
              help="With --bisect: largest |error| in percent of predicted max tokens vs the measured boundary.")
@click.option("--resolution", type=click.FloatRange(min=0.001, max=0.5), default=0.01, show_default=True,
              help="With --bisect: stop when the feasible and OOM probes are this fraction apart.")
@click.option("--safety-margin", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=0.05,
              show_default=True, help="With --bisect: the capacity prediction's margin (as `ringplan capacity`).")
@click.option("--emulate-gpu", default=None,
              help="Cap each rank's memory to this catalog GPU's usable memory, minus what the allocator does "
                   "not see (CUDA context, NCCL buffers), so a smaller GPU is validated on a bigger one.")
@click.option("--profile", "profile_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Fit the memory model on these profiles instead of profiles/measured (repeatable).")
@click.option("--record", "record_path", default=None, type=click.Path(dir_okay=False),
              help="Also merge every measured point (and bisect probe) into this profile file.")
@runtime_options
@workload_options
@format_option
@click.pass_context
@bad_input_exits_2
def validate(ctx: click.Context, gpu_name: str | None, world_size: int, tokens: int, tolerance: float,
             time_tolerance: float, bisect: bool, capacity_tolerance: float, resolution: float, safety_margin: float,
             emulate_gpu: str | None, profile_paths: tuple[str, ...], record_path: str | None, device: str,
             warmup_steps: int, timed_steps: int, timeout_s: float, output_format: str, **workload_args: Any) -> None:
    """Run --tokens on --world-size local GPUs and compare predicted vs measured memory and step time.

    Without GPUs it runs on CPU (gloo processes) at small sizes and checks the analytic byte terms
    against the live-tensor tracker. Exit code 0 when every figure is within tolerance (and, with
    --bisect, the predicted capacity is within --capacity-tolerance of the measured boundary and
    never above it), 1 otherwise, 2 on bad input (unknown GPU, emulated GPU larger than the real
    one, more ranks than visible GPUs) — checked before anything is launched.
    """
    from ringplan_runtime.provenance import command_line
    from ringplan_runtime.validate import bisect_boundary, under_torchrun, validate_in_process, validate_plan

    torchrun = under_torchrun()
    plan = _plan(gpu_name, emulate_gpu, world_size, tokens, device, workload_args, check_devices=not torchrun)
    if bisect and plan.device_type != "cuda":
        raise ValueError("--bisect searches a GPU's out-of-memory boundary: it needs CUDA devices")
    if bisect and torchrun:
        raise ValueError("--bisect launches a fresh ring per probe: run it without torchrun (built-in spawner)")
    model, settings, command = _model(profile_paths), measure_settings(warmup_steps, timed_steps), command_line()
    if torchrun:
        result = validate_in_process(plan, model=model, settings=settings, tolerance=tolerance / 100,
                                     time_tolerance=time_tolerance / 100, command=command)
        if int(os.environ["RANK"]) == 0:
            _record(record_path, plan, [result.result])
            _emit(plan, result, None, output_format)
        ctx.exit(0 if result.passed else 1)
    result = validate_plan(plan, model=model, settings=settings, tolerance=tolerance / 100,
                           time_tolerance=time_tolerance / 100, timeout_s=timeout_s, command=command)
    _record(record_path, plan, [result.result])
    boundary = None
    if bisect:
        probe_settings = measure_settings(min(warmup_steps, 1), 1)
        boundary = bisect_boundary(plan, model=model, settings=probe_settings, safety_margin=safety_margin,
                                   resolution=resolution, tolerance=capacity_tolerance / 100, timeout_s=timeout_s,
                                   command=command, on_probe=lambda probe: _record(record_path, plan, [probe]))
    _emit(plan, result, boundary, output_format)
    passed = result.passed and (boundary is None or boundary.passed)
    ctx.exit(0 if passed else 1)


def _record(path: str | None, plan, results) -> None:
    if not path:
        return
    from ringplan_runtime.sweep import write_results

    series = None
    if plan.emulate is not None:
        driver = next((r.provenance.gpu_name for r in results if r.provenance is not None), "another GPU")
        series = f"emulated {plan.emulate.name} on {driver}"
    write_results(path, results, record_as=plan.emulate.name if plan.emulate else None, series=series)


def _emit(plan, result, boundary, output_format: str) -> None:
    w, ring = plan.workload, plan.layout
    header = (f"{w.seq_len_tokens:,} tokens on {ring.ring_size} x {plan.gpu.name if plan.gpu else 'CPU'}"
              f"{' (emulated)' if plan.emulate else ''}: "
              f"{'ran' if result.result.feasible else 'FAILED: ' + str(result.result.failure)}; "
              f"prediction {result.provenance}; {'PASS' if result.passed else 'FAIL'}")
    if output_format == "json":
        payload = {"plan": header, "passed": result.passed, "measured": result_record(result.result),
                   "figures": [figure_record(f) for f in result.figures],
                   "bisect": boundary_record(boundary) if boundary else None}
        click.echo(json.dumps(payload, indent=2, default=str))
        return
    if output_format == "csv":
        click.echo(render_rows([figure_record(f) for f in result.figures], "csv"))
        return
    click.echo(header)
    click.echo(render_rows([figure_row(f) for f in result.figures], "table"))
    if boundary is not None:
        click.echo(_boundary_text(boundary))


def _boundary_text(boundary) -> str:
    def tokens(value):
        return "-" if value is None else f"{value:,}"

    error = "-" if boundary.error is None else f"{boundary.error:+.2%}"
    return (f"OOM boundary: predicted max {tokens(boundary.predicted_max_tokens)} tokens, measured max "
            f"{tokens(boundary.measured_max_tokens)} (first OOM at {tokens(boundary.first_oom_tokens)}), "
            f"error {error}, never above: {boundary.never_above}; {len(boundary.probes)} probes; "
            f"{'PASS' if boundary.passed else 'FAIL'}")
