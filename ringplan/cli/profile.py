"""``ringplan profile``: measure a sweep on the local GPUs (or CPU) and merge it into a profile file.

torch is imported inside the command (through ``ringplan_runtime``), never when this module is
imported: ``ringplan --help`` and ``ringplan capacity`` stay torch-free.
"""

from __future__ import annotations

import re
from typing import Any

import click

from ringplan.cli.common import (MAX_WORLD_SIZE, TOKEN_LIST, IntListType, OneLineErrorCommand, OutputFile,
                                 bad_input_exits_2, bytes_text, format_option, render_rows, result_record)
from ringplan.cli.options import build_workload, measure_settings, runtime_options, workload_options

_SHAPE_RE = re.compile(r"^\s*(\d+)(?:/(\d+))?\s*[x×]\s*(\d+)(?:\s*@\s*(\d+))?\s*$", re.ASCII)


class ShapeType(click.ParamType):
    """``HxD``, ``H/H_kvxD`` (GQA) or either with ``@E`` (model width): ``12x64@768``, ``32/8x128``."""

    name = "shape"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, int | None]:
        if isinstance(value, dict):
            return value
        match = _SHAPE_RE.match(str(value))
        if match is None:
            self.fail(f"cannot read {value!r} as a shape (examples: 12x64, 32/8x128, 12x64@768)", param, ctx)
        heads, kv_heads, head_dim, embed_dim = (int(g) if g else None for g in match.groups())
        return {"n_heads": heads, "n_kv_heads": kv_heads, "head_dim": head_dim, "embed_dim": embed_dim}


SHAPE = ShapeType()
INT_LIST = IntListType(min_value=1, max_value=MAX_WORLD_SIZE)


def result_table_row(result) -> dict[str, str]:
    record = result_record(result)
    state = "ok" if result.feasible else (result.failure or "failed")
    return {"GPUs": str(record["world_size"]), "tokens": f"{record['seq_len_tokens']:,}", "mode": record["mode"],
            "heads": f"{record['n_heads']}/{record['n_kv_heads']}x{record['head_dim']}", "backend": record["backend"],
            "result": state[:60], "allocated": bytes_text(record["peak_allocated_bytes"]),
            "reserved": bytes_text(record["peak_reserved_bytes"]), "device used": bytes_text(record["device_used_bytes"]),
            "tracked": bytes_text(record["tracked_peak_bytes"]),
            "step ms": "-" if record["step_time_s"] is None else f"{record['step_time_s'] * 1e3:.2f}"}


@click.command("profile", cls=OneLineErrorCommand)
@click.option("--out", "out_path", required=True, type=OutputFile(),
              help="Profile file to merge the rows into (created if absent; existing rows are kept).")
@click.option("--tokens", "token_counts", required=True, type=TOKEN_LIST,
              help="Global sequence lengths, comma-separated (e.g. 16Ki,32Ki,64Ki). Lengths that do not split "
                   "over a world size are skipped for it.")
@click.option("--world-sizes", type=INT_LIST, default="1", show_default=True,
              help="Ring sizes to measure, comma-separated (each needs that many GPUs).")
@click.option("--shape", "shapes", type=SHAPE, multiple=True,
              help="Head shape HxD, H/H_kvxD or with @E (repeatable), e.g. 12x64@768, 32/8x128. "
                   "Default: --heads/--kv-heads/--head-dim/--embed-dim.")
@click.option("--mode", "modes", type=click.Choice(["forward", "training"]), multiple=True,
              help="Measure forward and/or training steps (repeatable). Default: --forward/--train.")
@click.option("--record-as", default=None,
              help="Catalog GPU name for the rows (default: the local GPU by its driver name; required on CPU).")
@click.option("--series", default=None, help="Free label stored in every row (e.g. 'sweep-2026-11').")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
@runtime_options
@workload_options
@format_option
@click.pass_context
@bad_input_exits_2
def profile(ctx: click.Context, out_path: str, token_counts: tuple[int, ...], world_sizes: tuple[int, ...],
            shapes: tuple[dict, ...], modes: tuple[str, ...], record_as: str | None, series: str | None,
            progress: bool, device: str, warmup_steps: int, timed_steps: int, timeout_s: float, output_format: str,
            **workload_args: Any) -> None:
    """Measure tokens x world sizes x shapes x modes on the local devices and merge the rows into --out.

    Every point records peak allocated / reserved bytes (torch allocator), device used bytes (NVML),
    live-tensor peak bytes, step time (median of --steps) and bytes sent per rank, with provenance.
    An out-of-memory point is a row (oom), not a crash; a lost rank or a timeout costs only its
    point. Exit code 0 when every point has a result, 1 when some failed, 2 on bad input.
    """
    from ringplan_runtime.provenance import command_line
    from ringplan_runtime.sweep import run_sweep, sweep_points

    if not token_counts:
        raise ValueError("--tokens needs at least one length")
    shape_list = [build_workload(seq_len_tokens=None, **{**workload_args, **_given(s)}).shape for s in shapes] \
        or [build_workload(seq_len_tokens=None, **workload_args).shape]
    base = build_workload(seq_len_tokens=None, **workload_args)
    points = sweep_points(tokens=token_counts, world_sizes=world_sizes, shapes=shape_list,
                          modes=modes or (("training",) if workload_args["training"] else ("forward",)),
                          pattern=base.pattern, layout=workload_args["layout"], backend=workload_args["backend"],
                          projections=workload_args["projections"])
    _check_devices(device, max(world_sizes), record_as)
    results = run_sweep(points, profile_path=out_path, settings=measure_settings(warmup_steps, timed_steps),
                        command=command_line(), timeout_s=timeout_s, progress=progress, record_as=record_as,
                        series=series, device=device)
    _emit(results, output_format)
    written = sum(1 for r in results if r.feasible or r.failure == "oom")
    click.echo(f"{written} of {len(results)} points merged into {out_path}", err=True)
    ctx.exit(0 if written == len(results) else 1)


def _given(shape: dict[str, int | None]) -> dict[str, int | None]:
    return {key: value for key, value in shape.items() if value is not None or key in ("n_kv_heads", "embed_dim")}


def _check_devices(device: str, world_size: int, record_as: str | None) -> None:
    """Errors before launching: too few GPUs, no CUDA for --device cuda, no catalog name for CPU rows."""
    import torch

    from ringplan.hardware import load_catalog

    if record_as is not None:
        load_catalog().gpu(record_as)
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    if on_gpu and world_size > torch.cuda.device_count():
        raise ValueError(f"world size {world_size} needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    if not on_gpu and record_as is None:
        raise ValueError("rows need a catalog GPU name and a CPU has none: pass --record-as NAME for a CPU sweep")


def _emit(results, output_format: str) -> None:
    if output_format == "table":
        click.echo(render_rows([result_table_row(r) for r in results], "table"))
    else:
        click.echo(render_rows([result_record(r) for r in results], output_format))
