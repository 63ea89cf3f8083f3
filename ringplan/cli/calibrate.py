"""``ringplan calibrate``: measure the local GPU in about 90 s, write the rows with provenance, refit.

torch is imported inside the command (through ``ringplan_runtime.calibrate``), never when this module is
imported. ``--device cpu`` (hidden) runs the plumbing on the CPU for the tests: gloo ranks, the live-tensor
tracker in place of the allocator, tiny shapes; its rows need ``--record-as`` and a throwaway --profiles-dir.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ringplan.cli.common import FiniteFloat, OneLineErrorCommand, bad_input_exits_2
from ringplan.paths import PROFILES_DIR_ENV, profiles_dir
from ringplan.units import GIB

#: The query whose ± is shown before and after: the default layer (32x128, bf16, forward) on one GPU,
#: at a length inside the attention phase's measured range.
DEFAULT_QUERY_TOKENS = 16384
CATALOG_FILES = ("gpus.json", "models.json")


@contextmanager
def profiles_at(directory: str | None):
    """``$RINGPLAN_PROFILES_DIR`` set to ``directory`` (the catalogs copied in when it has none) while the
    command runs, then restored."""
    if directory is None:
        yield
        return
    target, source = Path(directory), profiles_dir()
    for name in CATALOG_FILES:
        if not (target / name).exists() and (source / name).exists():
            shutil.copyfile(source / name, target / name)
    before = os.environ.get(PROFILES_DIR_ENV)
    os.environ[PROFILES_DIR_ENV] = str(target.resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROFILES_DIR_ENV, None)
        else:
            os.environ[PROFILES_DIR_ENV] = before


def recorded_gpu(device: str, record_as: str | None) -> tuple[str, str]:
    """(catalog name, driver name) of the GPU to record: errors before measuring anything."""
    import torch

    from ringplan_runtime import nvml
    from ringplan_runtime.sweep import catalog_gpu_name

    if device == "cpu":
        if record_as is None:
            raise ValueError("--device cpu (tests only) needs --record-as NAME: a CPU has no catalog name")
        return catalog_gpu_name("cpu", record_as), "cpu"
    if not torch.cuda.is_available():
        raise ValueError("calibrate needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)")
    driver_name = nvml.gpu_name(nvml.first_visible_device()) or torch.cuda.get_device_name(0)
    return catalog_gpu_name(driver_name, record_as), driver_name


def default_query(gpu: str) -> dict[str, Any]:
    """The default layer's prediction on ``gpu`` with the fit of the profiles as they are now."""
    from ringplan.hardware import load_catalog
    from ringplan.memory.attention_model import MEMORY_FIT, MemoryModel
    from ringplan.memory.fit_cache import fresh_calibrations
    from ringplan.workload import AttentionShape, RingLayout, Workload

    calibrations = fresh_calibrations(MEMORY_FIT) or MEMORY_FIT.fit(None)[0]
    workload = Workload(seq_len_tokens=DEFAULT_QUERY_TOKENS, shape=AttentionShape(n_heads=32, head_dim=128))
    prediction = MemoryModel(calibrations=calibrations).predict(workload, RingLayout(ring_size=1),
                                                               load_catalog().gpu(gpu))
    return {"total_bytes": prediction.total_bytes, "uncertainty_bytes": prediction.uncertainty_bytes,
            "provenance": prediction.provenance}


def invocation(params: dict[str, Any]) -> str:
    """The command as given, from click's parsed options (``sys.argv`` is another program's under a test
    runner): ``ringplan calibrate --budget-s 90.0 ...``."""
    parts = ["ringplan", "calibrate"]
    for name, value in params.items():
        flag = "--format" if name == "output_format" else "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def phase_line(phase) -> str:
    """One phase in words: what it measured, in how long, where it wrote, what it skipped."""
    text = f"{phase.name}: {phase.done} of {phase.planned} in {phase.seconds:.1f} s"
    if phase.figures:
        text += "; " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" if isinstance(v, int) else f"{k} {v or '-'}"
                                 for k, v in phase.figures.items())
    if phase.written:
        text += f" -> {', '.join(phase.written)}"
    if phase.skipped:
        text += f"; skipped: {'; '.join(phase.skipped)}"
    return text


def uncertainty_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    return (f"default layer (32x128 bf16, forward, {DEFAULT_QUERY_TOKENS:,} tokens, 1 GPU): "
            f"± {before['uncertainty_bytes'] / GIB:.3f} GiB ({before['provenance']}) -> "
            f"± {after['uncertainty_bytes'] / GIB:.3f} GiB ({after['provenance']})")


@click.command("calibrate", cls=OneLineErrorCommand)
@click.option("--record-as", default=None,
              help="Catalog GPU name for the rows (default: the local GPU by its driver name).")
@click.option("--budget-s", type=FiniteFloat(min=0.0, min_open=True), default=90.0, show_default=True,
              help="Seconds the measurements may take; what does not fit is skipped and listed.")
@click.option("--profiles-dir", type=click.Path(file_okay=False, dir_okay=True, exists=True), default=None,
              help="Profiles tree to write into and refit (default: $RINGPLAN_PROFILES_DIR, else profiles/).")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", hidden=True,
              help="cpu: run the plumbing on the CPU (tests only).")
@click.pass_context
@bad_input_exits_2
def calibrate(ctx: click.Context, record_as: str | None, budget_s: float, profiles_dir: str | None,
              output_format: str, progress: bool, device: str) -> None:
    """Measure this GPU (attention memory and rates, kernel and bf16 GEMM rates, context and library
    memory; NCCL and the link with two GPUs) within --budget-s, merge the rows into the profiles, and
    refit. Exit code 0 when every planned measurement ran, 1 when the budget cut some, 2 on bad input."""
    import time

    with profiles_at(profiles_dir):
        gpu, driver_name = recorded_gpu(device, record_as)
        from ringplan_runtime.calibrate import calibrate as run_calibration

        before = default_query(gpu)
        began = time.monotonic()
        echo = (lambda phase: click.echo(phase_line(phase), err=True)) if output_format == "table" else None
        phases = run_calibration(gpu, device=device, budget_s=budget_s, command=invocation(ctx.params), progress=progress,
                                 on_phase=echo)
        seconds = time.monotonic() - began
        after = default_query(gpu)
    complete = all(p.done == p.planned and not p.skipped for p in phases)
    if output_format == "json":
        click.echo(json.dumps({"gpu": gpu, "driver_name": driver_name, "seconds": seconds, "budget_s": budget_s,
                               "complete": complete, "phases": [phase_record(p) for p in phases],
                               "default_query": {"tokens": DEFAULT_QUERY_TOKENS, "before": before, "after": after}},
                              indent=2))
    else:
        click.echo(f"calibrated {gpu} ({driver_name}) in {seconds:.1f} s of a {budget_s:g} s budget"
                   + ("" if complete else " (budget or failures cut some measurements: see skipped)"))
        click.echo(uncertainty_line(before, after))
    ctx.exit(0 if complete else 1)


def phase_record(phase) -> dict[str, Any]:
    return {"name": phase.name, "done": phase.done, "planned": phase.planned, "seconds": phase.seconds,
            "written": list(phase.written), "skipped": list(phase.skipped), "figures": phase.figures}
