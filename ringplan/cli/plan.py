"""``ringplan plan``: every setting that fits a model, S tokens and W GPUs, ranked by step time.

Also the whole-model pieces ``ringplan capacity --model`` uses: the query built from the options,
the row records and the tables. Memory comes from ``ringplan.memory.stack_model``, step time from
``ringplan.time.stack_time`` (numpy, and scipy while the time model fits its timing profiles: imported
only when a step time is asked for).
"""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import (MAX_BATCH, MAX_WORLD_SIZE, TOKENS, BoundedInt, FiniteFloat, OneLineErrorCommand,
                                 bad_input_exits_2, format_option, render_rows)
from ringplan.cli.model_options import model_options, stack_dtype_options, stack_settings_options
from ringplan.workload import BACKENDS, LAYOUTS

GIB = 2**30
#: Settings options whose value, when given, is pinned instead of searched.
_SETTING_KEYS = ("sharding", "shard_group_size", "checkpointing", "offload_checkpoints", "loss", "loss_chunk_tokens",
                 "master_dtype", "dtype")


# ----------------------------------------------------------------------------- the query


def stack_step_time_hook():
    """``fn(workload, gpu) -> step_time_s | None`` from ``ringplan.time.stack_time`` (imported on the
    first call; None when the time model cannot time the workload)."""
    def step_time(w, gpu):
        from ringplan.time.stack_time import step_time as predict_step_time

        try:
            return predict_step_time(w, gpu).step_time_s
        except ValueError:
            return None

    return step_time


def base_settings(kw: dict[str, Any]):
    """(``StackSettings`` of the options the user gave, the searched fields they fixed). A given
    --offload without --checkpointing implies full checkpointing; the rest keep the defaults."""
    from ringplan.cli.model_options import explicit_options, explicit_setting_fields, settings_from_options

    given = explicit_options({k: kw.get(k) for k in _SETTING_KEYS})
    if given.get("offload_checkpoints") and "checkpointing" not in given:
        given["checkpointing"] = "full"
    fixed = explicit_setting_fields(**{k: kw.get(k) for k in _SETTING_KEYS})
    return settings_from_options(**given), fixed


def stack_query(*, gpu_name: str, training: bool, batch: int, layout: str, backend: str, ring_size: int | None,
                safety_margin: float, max_world_size: int, step_time: bool, **kw: Any):
    """The ``StackQuery`` the options describe (model, GPU, pinned and searched settings)."""
    from ringplan.cli.model_options import model_from_options
    from ringplan.hardware import load_catalog
    from ringplan.capacity.stack import StackQuery, settings_space

    gpu = load_catalog().gpu(gpu_name)
    model = model_from_options(**kw)
    base, fixed = base_settings(kw)
    candidates = settings_space(training=training, base=base, fixed=fixed)
    return StackQuery(model=model, gpu=gpu, training=training, batch=batch, layout=layout, backend=backend,
                      candidates=candidates, ring_size=ring_size, data_parallel=None if ring_size else 1,
                      safety_margin=safety_margin, max_world_size=max_world_size,
                      step_time=stack_step_time_hook() if step_time else None)


# ----------------------------------------------------------------------------- records and tables


def settings_label(settings) -> str:
    """``zero3 · full+offload · chunked``: sharding (and group), checkpointing, loss."""
    sharding = settings.sharding + (f"/G={settings.shard_group_size}" if settings.shard_group_size else "")
    ckpt = settings.checkpointing + ("+offload" if settings.offload_checkpoints else "")
    return f"{sharding} · {ckpt} · {settings.loss}"


def describe_model(model) -> str:
    from ringplan.models import parameter_count

    return (f"{model.name} (L={model.n_layers}, E={model.embed_dim}, H={model.n_heads}, H_kv={model.n_kv_heads}, "
            f"D={model.head_dim}, F={model.ffn_dim} {model.ffn_type}, V={model.vocab_size:,}; "
            f"{parameter_count(model) / 1e9:,.2f}B parameters)")


def stack_row_record(row) -> dict[str, Any]:
    """Machine-readable row: GPUs, tokens, settings, bytes by term, verdict, step time, provenance."""
    s, p = row.settings, row.prediction
    record: dict[str, Any] = {
        "world_size": row.world_size, "ring_size": row.ring_size, "data_parallel": row.data_parallel,
        "seq_len_tokens": row.seq_len_tokens, "tokens_per_rank": row.tokens_per_rank, "sharding": s.sharding,
        "shard_group_size": s.shard_group_size, "checkpointing": s.checkpointing,
        "offload_checkpoints": s.offload_checkpoints, "loss": s.loss, "loss_chunk_tokens": s.loss_chunk_tokens}
    record.update({name: round(value) for name, value in p.terms_bytes.items()})
    record.update({"total_bytes": round(p.total_bytes), "residual_bound_bytes": round(p.residual_bound_bytes),
                   "uncertainty_bytes": round(p.uncertainty_bytes), "usable_memory_bytes": row.usable_memory_bytes,
                   "budget_bytes": round(row.budget_bytes), "headroom_bytes": round(row.headroom_bytes),
                   "feasible": row.feasible, "why": None if row.feasible else _why(row),
                   "step_time_s": row.step_time_s, "provenance": p.provenance})
    return record


def _why(row) -> str:
    p = row.prediction
    return (f"needs {p.total_bytes / GIB:,.2f} + {p.residual_bound_bytes / GIB:,.2f} GiB bound > "
            f"{row.budget_bytes / GIB:,.2f} GiB budget")


_NOT_TERMS = ("total_bytes", "residual_bound_bytes", "uncertainty_bytes", "usable_memory_bytes", "budget_bytes",
              "headroom_bytes")


def stack_table_rows(rows, *, terms: bool = True) -> list[dict[str, str]]:
    """Human table: memory in GiB (with ``terms``, every term that is non-zero in some row)."""
    records = [stack_row_record(r) for r in rows]
    keys = [k for k in records[0] if k.endswith("_bytes") and k not in _NOT_TERMS] if terms else []
    shown = [k for k in keys if any(rec[k] for rec in records)]
    table = []
    for row, rec in zip(rows, records):
        line = {"GPUs": str(rec["world_size"]), "ring x DP": f"{rec['ring_size']} x {rec['data_parallel']}",
                "tokens/GPU": f"{rec['tokens_per_rank']:,}", "settings": settings_label(row.settings)}
        line.update({k.removesuffix("_bytes"): f"{rec[k] / GIB:.2f}" for k in shown})
        line.update({"total": f"{rec['total_bytes'] / GIB:.2f}", "bound": f"{rec['residual_bound_bytes'] / GIB:.2f}",
                     "headroom": f"{rec['headroom_bytes'] / GIB:.2f}", "fits": "yes" if rec["feasible"] else "no",
                     "step_s": "-" if rec["step_time_s"] is None else f"{rec['step_time_s']:.4g}"})
        if any(not r["feasible"] for r in records):
            line["why not"] = rec["why"] or ""
        line["memory from"] = row.prediction.provenance_kind
        table.append(line)
    return table


def stack_query_record(query) -> dict[str, Any]:
    from ringplan.profiles.stack import MODEL_FIELDS

    return {"model": {name: getattr(query.model, name) for name in MODEL_FIELDS}, "gpu": query.gpu.name,
            "usable_memory_bytes": query.gpu.usable_memory_bytes, "safety_margin": query.safety_margin,
            "budget_bytes": round(query.budget_bytes), "training": query.training, "batch": query.batch,
            "layout": query.layout, "backend": query.backend, "ring_size": query.ring_size,
            "data_parallel": query.data_parallel, "max_world_size": query.max_world_size,
            "candidates": [settings_label(s) for s in query.candidates]}


def emit_stack(query, answer: dict[str, Any], rows, output_format: str, *, terms: bool = True,
               extra: list[dict[str, Any]] | None = None) -> None:
    """Print a whole-model answer: header, answer text, table (or JSON / CSV of the rows)."""
    if output_format == "json":
        click.echo(json.dumps({"query": stack_query_record(query), "answer": answer,
                               "rows": [stack_row_record(r) for r in rows], **({"rejected": extra} if extra else {})},
                              indent=2))
        return
    if output_format == "csv":
        click.echo(render_rows([stack_row_record(r) for r in rows], "csv"))
        return
    gpu = query.gpu
    memory_kind = "measured by the driver" if gpu.usable_memory_measured else "nominal, datasheet"
    click.echo(f"{gpu.name} ({gpu.driver_name}): usable {gpu.usable_memory_bytes / GIB:,.2f} GiB ({memory_kind}); "
               f"budget {query.budget_bytes / GIB:,.2f} GiB with a {query.safety_margin:.0%} safety margin")
    click.echo(f"model: {describe_model(query.model)}; {'training' if query.training else 'forward (prefill)'}, "
               f"batch {query.batch}, {query.layout} layout")
    click.echo(answer["text"])
    if rows:
        click.echo("per-GPU memory in GiB (2^30 bytes)" + (", by term:" if terms else ":"))
        click.echo(render_rows(stack_table_rows(rows, terms=terms), "table"))
        chosen = next((r for r in rows if r.feasible), rows[0])
        click.echo(f"memory model ({chosen.world_size} GPUs, {settings_label(chosen.settings)}): "
                   f"{chosen.prediction.provenance}")
    if extra:
        click.echo("not valid runs here:")
        click.echo(render_rows(extra, "table"))


# ----------------------------------------------------------------------------- capacity --model


def _memory_text(row, query) -> str:
    p = row.prediction
    text = (f"{p.total_bytes / GIB:,.2f} GiB + {p.residual_bound_bytes / GIB:,.2f} GiB bound per GPU of "
            f"{query.budget_bytes / GIB:,.2f} GiB budget")
    return text + (f"; step {row.step_time_s:.3g} s" if row.step_time_s is not None else "")


def _gpus_text(row) -> str:
    return f"{row.world_size} x (ring {row.ring_size} x data-parallel {row.data_parallel})"


def _check_answer(query, tokens: int, world_size: int):
    """(answer, rows, feasible) of one check: S tokens on W GPUs with the chosen setting, or the
    most frugal one when none fits."""
    from ringplan.capacity.stack import chosen_rows, describe_settings, frugal_row, scan

    gpu = query.gpu.name
    found = scan(query, tokens, world_size, first_only=query.step_time is None)
    chosen = chosen_rows(query, found)
    if not chosen and not found.evaluated and not found.pruned:
        raise ValueError(found.rejected[0].reason if found.rejected else "no candidate settings")
    if chosen:
        row = chosen[0]
        text = (f"{tokens:,} tokens on {world_size} x {gpu}: fits with {describe_settings(row.settings)} "
                f"({row.tokens_per_rank:,} tokens/GPU, {_memory_text(row, query)})")
    else:
        row = frugal_row(query, found)
        text = (f"{tokens:,} tokens on {world_size} x {gpu}: does NOT fit; the most frugal setting "
                f"({describe_settings(row.settings)}) needs {_memory_text(row, query)}")
    return {"kind": "check", "text": text, "feasible": bool(chosen)}, [row], bool(chosen)


#: A sequence rounded down to a multiple of this splits over every power-of-two ring up to 512.
ROUND_TOKENS = 1024


def _rounder_length_hint(query, tokens: int, best) -> str:
    """When S splits only over odd world sizes (the answer is not a power of two, or nothing fits),
    the fewest GPUs for S rounded down to a multiple of ``ROUND_TOKENS``, if that is fewer."""
    from ringplan.capacity.stack import min_world_size

    rounded = tokens - tokens % ROUND_TOKENS
    if rounded <= 0 or rounded == tokens or (best is not None and best.world_size & (best.world_size - 1) == 0):
        return ""
    other = min_world_size(query, rounded).minimum
    if other is None or (best is not None and other.world_size >= best.world_size):
        return ""
    return (f"; note: {tokens:,} splits evenly over few world sizes — {rounded:,} tokens fit on "
            f"{other.world_size} x {query.gpu.name}")


def whole_model_capacity(query, tokens: int | None, world_size: int | None):
    """(answer dict, rows, feasible) of ``ringplan capacity --model``: the fewest GPUs for S tokens,
    the most tokens on K GPUs, or one check of S on K."""
    from ringplan.capacity.stack import describe_settings, max_tokens, min_world_size

    gpu = query.gpu.name
    if tokens is not None and world_size is not None:
        return _check_answer(query, tokens, world_size)
    if tokens is not None:
        result = min_world_size(query, tokens)
        best = result.minimum
        if best is None:
            text = (f"no setting on up to {query.max_world_size} x {gpu} holds {tokens:,} tokens "
                    f"(raise --max-world-size, shorten the sequence or pick a larger GPU)")
        else:
            text = (f"minimum GPUs for {tokens:,} tokens: {_gpus_text(best)} {gpu}, {best.tokens_per_rank:,} "
                    f"tokens/GPU, with {describe_settings(best.settings)}: {_memory_text(best, query)}")
        text += _rounder_length_hint(query, tokens, best)
        answer = {"kind": "min_world_size", "text": text, "minimum_world_size": best.world_size if best else None,
                  "settings": stack_row_record(best) if best else None}
        return answer, list(result.rows), best is not None
    result = max_tokens(query, world_size)
    best = result.best
    if best is None:
        text = f"not even the shortest valid sequence fits on {world_size} x {gpu} with any setting"
    else:
        text = (f"maximum tokens on {_gpus_text(best)} {gpu}: {best.seq_len_tokens:,} ({best.tokens_per_rank:,} "
                f"tokens/GPU) with {describe_settings(best.settings)}: {_memory_text(best, query)}; "
                f"{result.next_infeasible.seq_len_tokens:,} would not fit")
    answer = {"kind": "max_tokens", "text": text, "max_tokens": best.seq_len_tokens if best else None,
              "world_size": world_size}
    return answer, [best] if best else [result.next_infeasible], best is not None


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
