"""``ringplan plan``: every setting that fits a model, S tokens and W GPUs, ranked by step time.

Memory comes from ``ringplan.memory.stack_model``, step time from ``ringplan.time.stack_time`` (numpy,
and scipy while the time model fits its timing profiles: imported only when a step time is asked for).
"""

from __future__ import annotations

from typing import Any

import click

from ringplan.cli.common import (MAX_BATCH, MAX_WORLD_SIZE, TOKENS, BoundedInt, MarginType, OneLineErrorCommand,
                                 QuietAliasOption, bad_input_exits_2, format_option)
from ringplan.cli.options import (cp_scheme_options, explicit_setting_fields, hardware_options, host_memory_option,
                                  model_options, stack_dtype_options, stack_parallel_options, stack_query,
                                  stack_settings_options)
from ringplan.cli.stack_output import (emit_stack, readable_record, settings_label, stack_answer_lines,
                                       what_would_fit_notes)
from ringplan.units import GIB
from ringplan.workload import BACKENDS, LAYOUTS


# ----------------------------------------------------------------------------- the command


@click.command("plan", cls=OneLineErrorCommand)
@click.option("--gpu", "gpu_name", default=None,
              help="GPU type from the catalog (`ringplan gpus`), e.g. h100; optional with --gpu-spec.")
@hardware_options
@click.option("--tokens", type=TOKENS, required=True,
              help="Global sequence length S (1M = 1e6 = 1_000_000, 1Mi, 200K, 128Ki).")
@click.option("--gpus", "--world-size", "world_size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              cls=QuietAliasOption, quiet_aliases=("--world-size",),
              help="GPUs W (alias --world-size); searched when not given: the fewest that hold S.")
@click.option("--ring-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              help="Context-parallel ring size P (W = P x data-parallel); when not given: every GPU in one ring.")
@click.option("--max-world-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=1024, show_default=True,
              help="Largest W the search for the fewest GPUs considers.")
@click.option("--safety-margin", type=MarginType(), default=0.05,
              show_default=True, help="Fraction of usable memory kept free (0.05 or 5%).")
@click.option("--train/--forward", "--training/--forward-only", "training", default=True, show_default=True,
              cls=QuietAliasOption, quiet_aliases=("--training", "--forward-only"),
              help="A training step (forward, backward, optimizer) or a forward pass (prefill); default "
                   "--train (`capacity --model` defaults to --forward).")
@click.option("--batch", type=BoundedInt(min=1, max=MAX_BATCH), default=1, show_default=True,
              help="Sequences per data-parallel replica.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="contiguous", show_default=True,
              help="How the sequence is split over the ring.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Local attention kernel.")
@model_options
@cp_scheme_options
@stack_settings_options
@stack_parallel_options
@host_memory_option
@stack_dtype_options
@click.option("--all", "show_all", is_flag=True, help="Also list the settings that do not fit, and why.")
@click.option("--step-time/--no-step-time", default=True, show_default=True,
              help="Rank by the time model's step time (costs ~0.5 s at start); off: by the documented order.")
@format_option
@click.option("--breakdown", is_flag=True, help="Table format: also the per-GPU memory by term (terms as rows).")
@click.pass_context
@bad_input_exits_2
def plan(ctx: click.Context, tokens: int, world_size: int | None, show_all: bool, output_format: str,
         breakdown: bool, **kw: Any) -> None:
    """Every setting (sharding x checkpointing x offload x loss) that fits --model on --gpus GPUs
    of --gpu at --tokens, ranked by predicted step time, with memory and headroom.

    Settings options given on the command line are pinned; the others are searched. The answer
    comes first (the fastest setting, each setting marked (chosen) or (given), memory, headroom,
    step time, tokens/s), then the ranked table. Exit code 0 when some setting fits, 1 when none
    does, 2 on bad input.
    """
    from ringplan.capacity.answers import plan_answer

    query = stack_query(gpus_given=world_size is not None, **kw)
    found = plan_answer(query, tokens, world_size, every_row=show_all)
    result = found.plan
    rows = list(result.feasible) + (list(result.infeasible) if show_all else [])
    text = _plan_text(query, result)
    rejected = [{"settings": settings_label(r.settings), "why": r.reason} for r in result.rejected] if show_all else []
    answer = {"kind": "plan", "text": text, "world_size": result.world_size, "feasible": len(result.feasible)}
    best = result.feasible[0] if result.feasible else (result.infeasible[0] if result.infeasible else None)
    given, ring_given = explicit_setting_fields(**kw), kw.get("ring_size") is not None
    answer.update(readable_record(query, best, given=given, ring_given=ring_given,
                                  offload_alternative=found.without_offload))
    if found.fewest_that_fit is not None or found.longest_that_fits is not None:
        answer["would_fit"] = {"world_size": getattr(found.fewest_that_fit, "world_size", None),
                               "seq_len_tokens": getattr(found.longest_that_fits, "seq_len_tokens", None)}
    answer["lines"] = stack_answer_lines(query, _headline(query, result, world_size), best, given=given,
                                         ring_given=ring_given, offload_alternative=found.without_offload,
                                         notes=tuple(what_would_fit_notes(found, query.gpu.name)))
    answer["best_row"] = best
    emit_stack(query, answer, rows, output_format, extra=rejected, breakdown=breakdown)
    ctx.exit(0 if result.feasible else 1)


def _headline(query, result, world_size: int | None) -> str:
    where = f"{result.seq_len_tokens:,} tokens on {result.world_size} x {query.gpu.name}"
    how = " (given)" if world_size is not None else " (the fewest that hold them)"
    if not result.feasible:
        return f"no setting fits {where}{how}; below: the one needing least memory (--all lists all)"
    order = "fastest first" if result.feasible[0].step_time_s is not None else "documented order, no step time"
    return f"{len(result.feasible)} setting(s) fit {where}{how}; {order}; {result.infeasible_count} do not"


def _plan_text(query, result) -> str:
    where = f"{result.seq_len_tokens:,} tokens on {result.world_size} x {query.gpu.name}"
    if not result.feasible:
        lowest = result.infeasible[0] if result.infeasible else None
        need = f"; the least memory needs {lowest.prediction.upper_bytes / GIB:,.2f} GiB" if lowest else ""
        return f"no setting fits {where}{need} (budget {query.budget_bytes / GIB:,.2f} GiB; --all lists them)"
    best = result.feasible[0]
    order = "predicted step time" if best.step_time_s is not None else "the documented order (no step time)"
    return f"{len(result.feasible)} setting(s) fit {where}, ranked by {order}; {result.infeasible_count} do not"
