"""How a whole-model answer is printed (``ringplan capacity --model`` and ``ringplan plan``): the
answer text, machine-readable records, the tables, and the header lines. Formatting only; the
rows come from ``ringplan.capacity.stack`` and ``ringplan.capacity.answers``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import render_rows
from ringplan.units import GIB


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
    if s.offload_params:  # only here so far: every other row's answer is a recorded golden answer
        record.update({"offload_params": True, "offload_optimizer": s.offload_optimizer,
                       "host_memory_bytes_per_gpu": round(row.host_memory_bytes_per_gpu),
                       "host_memory_bytes_per_node": round(row.host_memory_bytes_per_node),
                       "host_memory_budget_bytes_per_node": row.host_budget_bytes_per_node})
    return record


def _why(row) -> str:
    p = row.prediction
    host = row.host_budget_bytes_per_node
    if p.upper_bytes <= row.budget_bytes and host is not None and row.host_memory_bytes_per_node > host:
        return (f"needs {row.host_memory_bytes_per_node / GIB:,.1f} GiB of pinned host memory per node > "
                f"{host / GIB:,.1f} GiB host memory")
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


def capacity_answer_record(query, answer, seq_len_tokens: int | None, world_size: int | None) -> dict[str, Any]:
    """The ``answer`` object of ``capacity --model`` (kind, text, and the figures that answer) from
    a ``ringplan.capacity.answers.CapacityAnswer``."""
    from ringplan.capacity.stack import describe_settings

    gpu, best = query.gpu.name, answer.best
    if answer.kind == "check":
        if answer.feasible:
            text = (f"{seq_len_tokens:,} tokens on {world_size} x {gpu}: fits with {describe_settings(best.settings)} "
                    f"({best.tokens_per_rank:,} tokens/GPU, {_memory_text(best, query)})")
        else:
            text = (f"{seq_len_tokens:,} tokens on {world_size} x {gpu}: does NOT fit; the most frugal setting "
                    f"({describe_settings(best.settings)}) needs {_memory_text(best, query)}")
        return {"kind": "check", "text": text, "feasible": answer.feasible}
    if answer.kind == "min_world_size":
        if best is None:
            text = (f"no setting on up to {query.max_world_size} x {gpu} holds {seq_len_tokens:,} tokens "
                    f"(raise --max-world-size, shorten the sequence or pick a larger GPU)")
        else:
            text = (f"minimum GPUs for {seq_len_tokens:,} tokens: {_gpus_text(best)} {gpu}, {best.tokens_per_rank:,} "
                    f"tokens/GPU, with {describe_settings(best.settings)}: {_memory_text(best, query)}")
        if answer.rounded_minimum is not None:
            text += (f"; note: {seq_len_tokens:,} splits evenly over few world sizes — "
                     f"{answer.rounded_seq_len_tokens:,} tokens fit on {answer.rounded_minimum.world_size} x {gpu}")
        return {"kind": "min_world_size", "text": text, "minimum_world_size": best.world_size if best else None,
                "settings": stack_row_record(best) if best else None}
    if best is None:
        text = f"not even the shortest valid sequence fits on {world_size} x {gpu} with any setting"
    else:
        text = (f"maximum tokens on {_gpus_text(best)} {gpu}: {best.seq_len_tokens:,} ({best.tokens_per_rank:,} "
                f"tokens/GPU) with {describe_settings(best.settings)}: {_memory_text(best, query)}; "
                f"{answer.next_infeasible.seq_len_tokens:,} would not fit")
    return {"kind": "max_tokens", "text": text, "max_tokens": best.seq_len_tokens if best else None,
            "world_size": world_size}
