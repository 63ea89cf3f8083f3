"""``ringplan validate``: run a plan on the local GPUs (or CPU) and compare it with the prediction.

Built-in spawner (one machine)::

    ringplan validate --gpu h100 --world-size 2 --tokens 128Ki --heads 32 --head-dim 128 --causal --layout zigzag

under torchrun (one or several nodes; rank 0 prints, every rank exits with the verdict)::

    torchrun --standalone --nproc-per-node 2 --no-python ringplan validate --world-size 2 --tokens 128Ki

A whole model (``--model NAME``, ``--config PATH`` or a custom shape with ``--layers``): one training
step (or prefill) of the stack under FSDP2 + ring attention, its memory and step time against the
whole-model planner; ``--write PATH`` keeps the measured row in a stack profile::

    ringplan validate --model llama-3-8b --layers 8 --gpu h100 --world-size 2 --tokens 64Ki --train \
        --checkpointing full --write profiles/measured/stack/h100x2.json

with tensor parallelism and a context-parallel scheme (W = DP x CP x T; TP ranks innermost)::

    ringplan validate --model qwen3-0.6b --layers 2 --world-size 8 --tp 2 --cp hybrid --ulysses-degree 2 \
        --tokens 64Ki --train

torch is imported inside the command (through ``ringplan_runtime``), never at module import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ringplan.cli.common import (MAX_WORLD_SIZE, TOKENS, BoundedInt, FiniteFloat, InputFile, OneLineErrorCommand,
                                 OutputFile, bad_input_exits_2, bytes_text, format_option, render_rows, result_record)
from ringplan.cli.options import (build_workload, catalog_from_options, cp_scheme_options, explicit_options,
                                  gpu_from_options, hardware_options, measure_settings, model_from_options,
                                  model_requested, model_selection_options, runtime_options, settings_from_options,
                                  stack_settings_options, workload_options)

PERCENT = FiniteFloat(min=0.0, max=100.0)


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


def _plan(gpu_name, emulate_gpu, world_size, tokens, device, workload_args, *, check_devices: bool = True,
          hardware: dict[str, Any] | None = None):
    """The plan, its prediction GPU (the emulated one when emulating) and the device type. ``hardware``:
    --gpu-spec and --catalog (``options.gpu_from_options``)."""
    import torch

    from ringplan.workload import RingLayout
    from ringplan_runtime.validate import Plan, check_launch

    hardware = hardware or {}
    catalog = catalog_from_options(hardware.get("catalog_path"))
    emulate = catalog.gpu(emulate_gpu) if emulate_gpu else None
    device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    gpu = emulate or (gpu_from_options(gpu_name, **hardware) if gpu_name or hardware.get("gpu_spec")
                      else _local_gpu(catalog, device_type))
    workload = build_workload(seq_len_tokens=tokens, **workload_args)
    layout = RingLayout(ring_size=world_size, layout=workload_args["layout"], backend=workload_args["backend"])
    check_launch(world_size=world_size if check_devices else 1, device_type=device_type, emulate=emulate)
    runs_on = _emulating_gpu(catalog, device_type) if emulate is not None else None
    return Plan(workload=workload, layout=layout, gpu=gpu, emulate=emulate, device_type=device_type,
                runs_on=runs_on)


def _emulating_gpu(catalog, device_type: str):
    """The local GPU that runs an emulation, for its step time; None when the catalog lacks it."""
    try:
        return _local_gpu(catalog, device_type)
    except ValueError:
        return None


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
    from ringplan.memory.attention_model import MemoryModel, default_memory_model
    from ringplan.profiles.attention import load_profile

    if not profile_paths:
        return default_memory_model("analytic")
    profiles = [load_profile(path) for path in profile_paths]
    return MemoryModel(rows=tuple((row, p.path or "") for p in profiles for row in p.rows))


@click.command("validate", cls=OneLineErrorCommand)
@click.option("--gpu", "gpu_name", default=None,
              help="Catalog GPU the prediction is for (default: the local GPU by its driver name).")
@hardware_options
@click.option("--world-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), required=True,
              help="Ranks in the ring (one GPU each).")
@click.option("--tokens", type=TOKENS, required=True, help="Global sequence length S (1M, 1Mi, 200K, 131072).")
@click.option("--tolerance", type=PERCENT, default=5.0, show_default=True,
              help="Largest |error| in percent for the memory figures and bytes sent.")
@click.option("--time-tolerance", type=PERCENT, default=25.0, show_default=True,
              help="Largest |error| in percent for the step time.")
@click.option("--bisect", is_flag=True, help="Also search the real OOM boundary in tokens and compare it with the "
                                             "predicted capacity (one ring launch per probe).")
@click.option("--capacity-tolerance", type=PERCENT, default=3.0, show_default=True,
              help="With --bisect: largest |error| in percent of predicted max tokens vs the measured boundary.")
@click.option("--resolution", type=FiniteFloat(min=0.001, max=0.5), default=0.01, show_default=True,
              help="With --bisect: stop when the feasible and OOM probes are this fraction apart.")
@click.option("--safety-margin", type=FiniteFloat(min=0.0, max=1.0, max_open=True), default=0.05,
              show_default=True, help="With --bisect: the capacity prediction's margin (as `ringplan capacity`).")
@click.option("--emulate-gpu", default=None,
              help="Cap each rank's memory to this catalog GPU's usable memory, minus what the allocator does "
                   "not see (CUDA context, NCCL buffers), so a smaller GPU is validated on a bigger one.")
@click.option("--profile", "profile_paths", multiple=True, type=InputFile(),
              help="Fit the memory model on these profiles instead of profiles/measured (repeatable).")
@click.option("--record", "record_path", default=None, type=OutputFile(),
              help="Also merge every measured point (and bisect probe) into this profile file.")
@click.option("--ring-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              help="With a whole model: context-parallel ring size P, the rest data-parallel (W = DP x P x T); "
                   "default: every rank of a TP coordinate in one ring (W / T).")
@click.option("--tp", "tp_degree", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              help="With a whole model: tensor-parallel degree T (Megatron TP with sequence parallelism, TP ranks "
                   "innermost; T must divide the heads, KV heads, FFN width and the tokens per rank).")
@click.option("--write", "write_path", default=None, type=OutputFile(),
              help="With a whole model: merge the measured row (or its OOM) into this stack profile "
                   "(ringplan.stack/1, e.g. profiles/measured/stack/NAME.json).")
@cp_scheme_options
@runtime_options
@workload_options
@model_selection_options
@stack_settings_options
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

    --model NAME, --config PATH or a custom shape (--layers, --heads, --ffn, --vocab, --embed-dim or
    --head-dim) validates a whole model instead: --world-size W ranks in CP groups of --ring-size P
    (scheme --cp, --ulysses-degree) and TP groups of --tp T, the stack settings options, one training
    step (--train) or prefill (--forward); an out-of-memory run passes only when it was predicted not
    to fit.
    """
    from ringplan_runtime.provenance import command_line
    from ringplan_runtime.validate import bisect_boundary, under_torchrun, validate_in_process, validate_plan

    hardware = {key: workload_args.pop(key) for key in ("gpu_spec", "catalog_path")}
    if whole_model_requested(workload_args):
        ctx.exit(_validate_model(
            ctx, gpu_name=gpu_name, world_size=world_size, tokens=tokens, tolerance=tolerance,
            time_tolerance=time_tolerance, device=device, warmup_steps=warmup_steps, timed_steps=timed_steps,
            timeout_s=timeout_s, output_format=output_format, workload_args={**workload_args, **hardware},
            attention_only={"bisect": bisect, "emulate_gpu": emulate_gpu, "profile_paths": profile_paths,
                            "record_path": record_path}))
    _refuse_model_options(workload_args)
    torchrun = under_torchrun()
    plan = _plan(gpu_name, emulate_gpu, world_size, tokens, device, workload_args, check_devices=not torchrun,
                 hardware=hardware)
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


# ----------------------------------------------------------------------------- whole models (--model)

#: Whole-model options (key → flag): an error for one attention layer.
_MODEL_ONLY = {"ffn_dim": "--ffn", "vocab_size": "--vocab", "sharding": "--sharding", "shard_group_size": "--shard-group",
               "checkpointing": "--checkpointing", "offload_checkpoints": "--offload", "loss": "--loss",
               "loss_chunk_tokens": "--loss-chunk", "ring_size": "--ring-size", "write_path": "--write",
               "offload_params": "--offload-params", "tp_degree": "--tp", "cp_scheme": "--cp",
               "ulysses_degree": "--ulysses-degree"}
#: Attention-layer options (key → flag): an error for a whole model (its attention is dense and causal,
#: its projections are in the stack terms; bisection, emulation and attention profiles are layer tools).
_ATTENTION_ONLY = {"segment_lengths": "--segment-lengths", "dilation_rates": "--dilation-rates",
                   "projections": "--projections", "causal": "--causal/--no-causal", "bisect": "--bisect",
                   "emulate_gpu": "--emulate-gpu", "profile_paths": "--profile", "record_path": "--record"}


def whole_model_requested(workload_args: dict[str, Any]) -> bool:
    """--model, --config, or a custom shape (--layers given): validate a whole model."""
    return model_requested(**workload_args) or "n_layers" in explicit_options({"n_layers": workload_args.get("n_layers")})


def _given(values: dict[str, Any], flags: dict[str, str]) -> list[str]:
    return [flags[key] for key in explicit_options({key: values.get(key) for key in flags})]


def _refuse_model_options(workload_args: dict[str, Any]) -> None:
    given = _given(workload_args, _MODEL_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of a whole "
                         f"model: give --model NAME, --config PATH or a custom shape with --layers")


def _stack_plan(gpu_name: str | None, world_size: int, tokens: int, device: str, workload_args: dict[str, Any], *,
                check_devices: bool = True):
    """The whole-model plan the options describe; every bad input raises ValueError before a launch."""
    import torch

    from ringplan.stack import StackWorkload
    from ringplan.workload import RingLayout
    from ringplan_runtime.stack_parallel import RUN_SHARDINGS
    from ringplan_runtime.tensor_parallel import check_tensor_parallel
    from ringplan_runtime.transformer import check_runnable
    from ringplan_runtime.validate import StackPlan, check_launch

    device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    hardware = {key: workload_args.get(key) for key in ("gpu_spec", "catalog_path")}
    catalog = catalog_from_options(hardware["catalog_path"])
    gpu = gpu_from_options(gpu_name, **hardware) if gpu_name or hardware["gpu_spec"] else \
        _local_gpu(catalog, device_type)
    if workload_args.get("write_path") and hardware["gpu_spec"]:
        raise ValueError("--write records a row for a catalog GPU, not one from --gpu-spec")
    tp = workload_args.get("tp_degree") or 1
    if world_size % tp:
        raise ValueError(f"world size {world_size} is not a multiple of tensor parallel {tp} (W = DP x CP x TP)")
    layout = RingLayout(ring_size=workload_args.get("ring_size") or world_size // tp, layout=workload_args["layout"],
                        backend=workload_args["backend"], cp_scheme=workload_args.get("cp_scheme") or "ring",
                        ulysses_degree=workload_args.get("ulysses_degree"))
    w = StackWorkload(model=model_from_options(**workload_args), seq_len_tokens=tokens, batch=workload_args["batch"],
                      training=workload_args["training"], world_size=world_size, layout=layout,
                      settings=settings_from_options(**workload_args), tp_degree=tp)
    check_runnable(w.model)
    check_tensor_parallel(w)
    if workload_args.get("write_path") and (tp > 1 or layout.cp_scheme != "ring"):
        raise ValueError("--write records a ringplan.stack/1 row, which has no tensor-parallel or CP-scheme "
                         "fields: validate --tp / --cp without --write")
    if w.training and w.settings.sharding not in RUN_SHARDINGS:
        raise ValueError(f"sharding {w.settings.sharding!r} is planned, not run: the runtime runs "
                         f"{list(RUN_SHARDINGS)} (zero3 = FSDP2 fully_shard; none = every rank holds everything)")
    check_launch(world_size=world_size if check_devices else 1, device_type=device_type, emulate=None)
    if workload_args.get("write_path") and gpu is None:
        raise ValueError("--write records a row for a catalog GPU and a CPU has none: pass --gpu NAME")
    return StackPlan(workload=w, gpu=gpu, device_type=device_type)


def _validate_model(ctx: click.Context, *, gpu_name: str | None, world_size: int, tokens: int, tolerance: float,
                    time_tolerance: float, device: str, warmup_steps: int, timed_steps: int, timeout_s: float,
                    output_format: str, workload_args: dict[str, Any], attention_only: dict[str, Any]) -> int:
    """``validate --model``: run one whole-model step, compare, record; exit code 0 passed, 1 not."""
    from ringplan.memory.stack_model import default_stack_memory_model
    from ringplan_runtime.provenance import command_line
    from ringplan_runtime.validate import under_torchrun, validate_stack, validate_stack_in_process

    given = _given({**workload_args, **attention_only}, _ATTENTION_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of one "
                         f"attention layer, not of a whole model")
    torchrun = under_torchrun()
    plan = _stack_plan(gpu_name, world_size, tokens, device, workload_args, check_devices=not torchrun)
    kwargs = dict(model=default_stack_memory_model(), settings=measure_settings(warmup_steps, timed_steps),
                  tolerance=tolerance / 100, time_tolerance=time_tolerance / 100, command=command_line())
    if torchrun:
        result = validate_stack_in_process(plan, **kwargs)
        if int(os.environ["RANK"]) != 0:
            return 0 if result.passed else 1
    else:
        result = validate_stack(plan, timeout_s=timeout_s, **kwargs)
    _write_stack(workload_args.get("write_path"), result)
    _emit_stack(result, output_format)
    return 0 if result.passed else 1


def stack_result_record(result) -> dict[str, Any]:
    """One whole-model run (``StackPointResult``) as a flat record (bytes, seconds) for json/csv output."""
    w = result.workload
    return {"model": w.model.name, "seq_len_tokens": w.seq_len_tokens, "batch": w.batch, "world_size": w.world_size,
            "ring_size": w.layout.ring_size, "cp_scheme": w.layout.cp_scheme, "ulysses_degree": w.layout.ulysses_degree,
            "tp_degree": w.tp_degree, "mode": "training" if w.training else "prefill",
            "settings": {name: getattr(w.settings, name) for name in w.settings.__dataclass_fields__},
            "feasible": result.feasible, "failure": result.failure, **result.figures}


def _emit_stack(validation, output_format: str) -> None:
    from ringplan.cli.stack_output import settings_label

    w, r = validation.plan.workload, validation.result
    gpu = validation.plan.gpu.name if validation.plan.gpu and validation.plan.device_type == "cuda" else "CPU"
    scheme = w.layout.cp_scheme
    parallel = "ring" if scheme == "ring" else scheme + (f" U {w.layout.ulysses_degree}" if scheme == "hybrid" else "")
    parallel += f" {w.layout.ring_size}" + (f", TP {w.tp_degree}" if w.tp_degree > 1 else "")
    header = (f"{w.model.name}: {w.seq_len_tokens:,} tokens on {w.world_size} x {gpu} ({parallel}, "
              f"{'training' if w.training else 'prefill'}, {settings_label(w.settings)}): "
              f"{'ran' if r.feasible else 'FAILED: ' + str(r.failure)}; prediction {validation.provenance}; "
              f"{'PASS' if validation.passed else 'FAIL'}")
    if output_format == "json":
        click.echo(json.dumps({"plan": header, "passed": validation.passed, "measured": stack_result_record(r),
                               "figures": [figure_record(f) for f in validation.figures]}, indent=2, default=str))
        return
    if output_format == "csv":
        click.echo(render_rows([figure_record(f) for f in validation.figures], "csv"))
        return
    click.echo(header)
    click.echo(render_rows([figure_row(f) for f in validation.figures], "table"))


def _write_stack(path: str | None, validation) -> None:
    """Merge the run's row (measured figures, or its OOM) into the stack profile at ``path``."""
    if not path:
        return
    from ringplan_runtime.stack_sweep import write_stack_results

    r = validation.result
    if write_stack_results(path, [r], record_as=validation.plan.gpu.name):
        click.echo(f"row merged into {path}", err=True)
    else:
        click.echo(f"not written to {path}: the run failed ({r.failure})", err=True)
