"""``ringplan plan``: every setting that fits a model, S tokens and W GPUs, ranked by step time.

Memory comes from ``ringplan.memory.stack_model``, step time from ``ringplan.time.stack_time`` (numpy,
and scipy while the time model fits its timing profiles: imported only when a step time is asked for).
"""

from __future__ import annotations

from typing import Any

import click

from ringplan.cli.common import (MAX_BATCH, MAX_WORLD_SIZE, TOKENS, BoundedInt, FiniteFloat, OneLineErrorCommand,
                                 bad_input_exits_2, format_option)
from ringplan.cli.options import model_options, stack_dtype_options, stack_query, stack_settings_options
from ringplan.cli.stack_output import emit_stack, settings_label
from ringplan.units import GIB
from ringplan.workload import BACKENDS, LAYOUTS


# ----------------------------------------------------------------------------- the command


@click.command("plan", cls=OneLineErrorCommand)
@click.option("--gpu", "gpu_name", required=True, help="GPU type from the catalog (`ringplan gpus`), e.g. h100.")
@click.option("--tokens", type=TOKENS, required=True, help="Global sequence length S (1M, 1Mi, 200K, 128Ki).")
@click.option("--gpus", "world_size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              help="GPUs W; default: the fewest that hold S.")
@click.option("--ring-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              help="Context-parallel ring size P (W = P x data-parallel); default: every GPU in one ring.")
@click.option("--max-world-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=1024, show_default=True,
              help="Largest W the search for the fewest GPUs considers.")
@click.option("--safety-margin", type=FiniteFloat(min=0.0, max=1.0, max_open=True), default=0.05,
              show_default=True, help="Fraction of usable memory kept free.")
@click.option("--train/--forward", "training", default=True, show_default=True,
              help="A training step (forward, backward, optimizer) or a forward pass (prefill).")
@click.option("--batch", type=BoundedInt(min=1, max=MAX_BATCH), default=1, show_default=True,
              help="Sequences per data-parallel replica.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="contiguous", show_default=True,
              help="How the sequence is split over the ring.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Local attention kernel.")
@model_options
@stack_settings_options
@stack_dtype_options
@click.option("--all", "show_all", is_flag=True, help="Also list the settings that do not fit, and why.")
@click.option("--step-time/--no-step-time", default=True, show_default=True,
              help="Rank by the time model's step time (costs ~0.5 s at start); off: by the documented order.")
@format_option
@click.pass_context
@bad_input_exits_2
def plan(ctx: click.Context, tokens: int, world_size: int | None, show_all: bool, output_format: str,
         **kw: Any) -> None:
    """Every setting (sharding x checkpointing x offload x loss) that fits --model on --gpus GPUs
    of --gpu at --tokens, ranked by predicted step time, with memory and headroom.

    Settings options given on the command line are pinned; the others are searched. Exit code 0
    when some setting fits, 1 when none does, 2 on bad input.
    """
    from ringplan.capacity.stack import plan as plan_settings

    query = stack_query(**kw)
    result = plan_settings(query, tokens, world_size)
    rows = list(result.feasible) + (list(result.infeasible) if show_all else [])
    text = _plan_text(query, result)
    rejected = [{"settings": settings_label(r.settings), "why": r.reason} for r in result.rejected] if show_all else []
    answer = {"kind": "plan", "text": text, "world_size": result.world_size, "feasible": len(result.feasible)}
    emit_stack(query, answer, rows, output_format, terms=output_format != "table", extra=rejected)
    ctx.exit(0 if result.feasible else 1)


def _plan_text(query, result) -> str:
    where = f"{result.seq_len_tokens:,} tokens on {result.world_size} x {query.gpu.name}"
    if not result.feasible:
        lowest = result.infeasible[0] if result.infeasible else None
        need = f"; the least memory needs {lowest.prediction.upper_bytes / GIB:,.2f} GiB" if lowest else ""
        return f"no setting fits {where}{need} (budget {query.budget_bytes / GIB:,.2f} GiB; --all lists them)"
    best = result.feasible[0]
    order = "predicted step time" if best.step_time_s is not None else "the documented order (no step time)"
    return f"{len(result.feasible)} setting(s) fit {where}, ranked by {order}; {len(result.infeasible)} do not"
