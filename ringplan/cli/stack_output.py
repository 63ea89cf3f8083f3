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
    """``zero3 / full+offload / chunked``: sharding (and group; ``+host`` with the parameters and
    optimizer states offloaded), checkpointing, loss, and ``/ mlp 4K`` with an MLP tile (ASCII: a
    terminal counts it as it prints it)."""
    sharding = settings.sharding + (f"/G={settings.shard_group_size}" if settings.shard_group_size else "") \
        + ("+host" if settings.offload_params else "")
    ckpt = settings.checkpointing + ("+offload" if settings.offload_checkpoints else "")
    tile = settings.mlp_tile_tokens
    tile_text = "" if tile is None else f" / mlp {tile // 1024}K" if tile % 1024 == 0 else f" / mlp {tile}"
    return f"{sharding} / {ckpt} / {settings.loss}{tile_text}"


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
        "tp_degree": row.tp_degree, "cp_scheme": row.workload.layout.cp_scheme,
        "ulysses_degree": row.workload.layout.ulysses_degree,
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
        return (f"needs {row.host_memory_bytes_per_node / GIB:,.1f} GiB of host memory per node > "
                f"{host / GIB:,.1f} GiB host memory")
    return (f"needs {p.total_bytes / GIB:,.2f} + {p.residual_bound_bytes / GIB:,.2f} GiB bound > "
            f"{row.budget_bytes / GIB:,.2f} GiB budget")


_NOT_TERMS = ("total_bytes", "residual_bound_bytes", "uncertainty_bytes", "usable_memory_bytes", "budget_bytes",
              "headroom_bytes")


def stack_query_record(query) -> dict[str, Any]:
    from ringplan.profiles.stack import MODEL_FIELDS

    return {"model": {name: getattr(query.model, name) for name in MODEL_FIELDS}, "gpu": query.gpu.name,
            "usable_memory_bytes": query.gpu.usable_memory_bytes, "safety_margin": query.safety_margin,
            "budget_bytes": round(query.budget_bytes), "training": query.training, "batch": query.batch,
            "layout": query.layout, "backend": query.backend, "ring_size": query.ring_size,
            "data_parallel": query.data_parallel, "max_world_size": query.max_world_size,
            "candidates": [settings_label(s) for s in query.candidates]}


def emit_stack(query, answer: dict[str, Any], rows, output_format: str, *, extra: list[dict[str, Any]] | None = None,
               breakdown: bool = False) -> None:
    """Print a whole-model answer: the answer lines and a compact table (or JSON / CSV of the rows;
    ``answer["lines"]`` stays out of JSON)."""
    if output_format == "json":
        answer = {k: v for k, v in answer.items() if k not in ("lines", "best_row")}
        click.echo(json.dumps({"query": stack_query_record(query), "answer": answer,
                               "rows": [stack_row_record(r) for r in rows], **({"rejected": extra} if extra else {})},
                              indent=2))
        return
    if output_format == "csv":
        click.echo(render_rows([stack_row_record(r) for r in rows], "csv"))
        from ringplan.cli.readable import warn

        warn(answer.get("warnings", []))
        return
    readable_stack(query, answer, rows, extra=extra, breakdown=breakdown)


def setting_labels(query, settings, given: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``sharding zero3 (chosen)``, …: each searched setting of ``settings``, labelled ``(given)`` when
    pinned on the command line, ``(chosen)`` when the search picked it among others, ``(forward)``
    when a forward pass has only that value."""
    values = {"sharding": settings.sharding, "checkpointing": settings.checkpointing,
              "offload_checkpoints": settings.offload_checkpoints, "loss": settings.loss,
              "offload_params": settings.offload_params, "mlp_tile_tokens": settings.mlp_tile_tokens}
    names = {"offload_checkpoints": "offload", "offload_params": "params+optimizer on host",
             "mlp_tile_tokens": "MLP tile"}
    labels = []
    for field, value in values.items():
        options = {getattr(c, field) for c in query.candidates}
        how = "(given)" if field in given else "(chosen)" if len(options) > 1 else \
            "(forward)" if not query.training else "(only option)"
        if field in ("offload_params", "mlp_tile_tokens") and not value and how != "(given)":
            continue  # stated when used or pinned; "not used" is the default reading
        shown_value = ("yes" if value else "no") if isinstance(value, bool) else value
        if field == "mlp_tile_tokens":
            shown_value = f"{value:,} tokens" if value else "none"
        if field == "sharding" and settings.shard_group_size:
            shown_value += f" over {settings.shard_group_size} GPUs"
        if field == "loss" and value == "chunked":
            shown_value += f" ({settings.loss_chunk_tokens:,} tokens)"
        labels.append(f"{names.get(field, field)} {shown_value} {how}")
    return labels


def host_ram_per_node_bytes(query, row) -> float:
    """Pinned host memory one node needs for the offloaded checkpoints of its GPUs (0 without offload)."""
    return row.host_memory_bytes_per_node


def stack_warnings(query, row) -> list[str]:
    """What a reader must know about the answer: the prediction's own warnings, a ring spanning nodes,
    a length beyond the model's positions."""
    if row is None:
        return []
    warnings = list(row.prediction.warnings)
    per_node = query.gpu.gpus_per_node
    spanned = row.ring_size * row.tp_degree  # TP ranks innermost: a ring's hops stride T GPUs
    if spanned > per_node and row.ring_size > 1:
        warnings.append(f"the ring of {row.ring_size} GPUs spans {-(-spanned // per_node)} nodes of "
                        f"{per_node}: some hops cross the inter-node link")
    model = query.model
    if model.max_positions and row.seq_len_tokens > model.max_positions:
        kind = "learned positions: cannot run as is" if model.position == "learned" else \
            "RoPE: needs context extension"
        warnings.append(f"{row.seq_len_tokens:,} tokens > {model.name}'s {model.max_positions:,} positions ({kind})")
    return warnings


def row_mfu(query, row) -> float | None:
    """Model FLOPs utilisation of the row's predicted step (``ringplan.time.mfu``), None without a step
    time or a catalog peak for the compute dtype."""
    peak = query.gpu.peak_flops_per_s.get(row.settings.param_dtype)
    if row.step_time_s is None or not peak:
        return None
    from ringplan.time.mfu import mfu

    return mfu(row.workload, row.step_time_s, peak)


def readable_record(query, row, *, given: frozenset[str] | set[str] = frozenset(), ring_given: bool = False,
                    offload_alternative=None) -> dict:
    """The fields issue 16 adds to a whole-model JSON answer: settings chosen vs given, causal, layout,
    host RAM, tokens per second, warnings."""
    from ringplan.cli.readable import nodes, tokens_per_s

    if row is None:
        return {"causal": True, "warnings": []}
    settings = {label.split(" ")[0]: label.rsplit(" ", 1)[-1].strip("()") for label in
                setting_labels(query, row.settings, given)}
    record = {"settings_source": {**settings, "ring_size": "given" if ring_given else "default"}, "causal": True,
              "layout": {"world_size": row.world_size, "ring_size": row.ring_size,
                         "data_parallel": row.data_parallel, "nodes": nodes(row.world_size, query.gpu.gpus_per_node),
                         "gpus_per_node": query.gpu.gpus_per_node, "sequence_layout": query.layout},
              "host_ram_per_node_bytes": round(host_ram_per_node_bytes(query, row)),
              "tokens_per_s": tokens_per_s(row.seq_len_tokens, query.batch, row.data_parallel, row.step_time_s),
              "mfu": row_mfu(query, row), "warnings": stack_warnings(query, row)}
    if offload_alternative is not None:
        record["without_offload_bytes"] = round(offload_alternative.prediction.upper_bytes)
    return record


def readable_stack(query, answer: dict[str, Any], rows, *, extra: list[dict[str, Any]] | None = None,
                   breakdown: bool = False) -> None:
    """The default table output: the answer lines (``answer["lines"]``), then a compact table, within
    the terminal's width; ``breakdown``: the per-term table (terms as rows) too."""
    from ringplan.cli.readable import breakdown_table, echo_lines, fitted_table, output_width, warn

    width = output_width()
    echo_lines(answer["lines"], width)
    if rows:
        click.echo("")
        best = answer.get("best_row")
        click.echo(fitted_table(compact_stack_rows(rows, best), width,
                                droppable=["settings", "step", "TP x CP x DP", "headroom GiB", "tokens/GPU"]))
        if breakdown:
            click.echo("")
            columns = [(f"{r.world_size} GPUs #{i + 1}" if len(rows) > 1 else f"{r.world_size} GPUs",
                        dict(r.prediction.terms_bytes)) for i, r in enumerate(rows)]
            click.echo(breakdown_table(columns, width, keep=next((i for i, r in enumerate(rows) if r is best), 0)))
    if extra:
        click.echo("not valid runs here:")
        click.echo(fitted_table(extra, width))
    warn(answer.get("warnings", []))


def split_cell(row) -> str:
    """``8 x ring 8 x 1``, ``1 x ulysses 4 x 2``: T, the context-parallel scheme and size, DP."""
    layout = row.workload.layout
    scheme = {"allgather": "allgather", "ulysses": "ulysses", "hybrid": f"hybrid {layout.ulysses_size}x"}.get(
        layout.cp_scheme, "ring")
    return f"{row.tp_degree} x {scheme} {row.ring_size} x {row.data_parallel}"


def compact_stack_rows(rows, best=None) -> list[dict[str, str]]:
    """At most eight columns: GPUs, TP x CP x DP, tokens/GPU, settings, GiB used (need + bound), headroom,
    fits, step time."""
    from ringplan.cli.readable import gib_number, time_text

    table = []
    for row in rows:
        p = row.prediction
        line = {"GPUs": str(row.world_size) + (" *" if row is best else ""),
                "TP x CP x DP": split_cell(row),
                "tokens/GPU": f"{row.tokens_per_rank:,}", "settings": settings_label(row.settings),
                "GiB used": gib_number(p.upper_bytes), "headroom GiB": gib_number(row.headroom_bytes),
                "fits": "yes" if row.feasible else "no"}
        if any(r.step_time_s is not None for r in rows):
            line["step"] = time_text(row.step_time_s)
        table.append(line)
    return table


def stack_answer_lines(query, headline: str, row, *, given: frozenset[str] | set[str] = frozenset(),
                       ring_given: bool = False, offload_alternative=None,
                       notes: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    """(label, text) lines that answer first: GPUs and layout, model and mode, tokens, settings,
    memory, uncertainty, step time and tokens/s, host RAM, the alternative offload beat."""
    from ringplan.cli.readable import gib, nodes, rate_text, time_text, tokens_per_s, uncertainty_text

    gpu, model = query.gpu, query.model
    mode = "training step" if query.training else "forward (prefill)"
    lines = [("answer", headline)]
    lines.append(("model", f"{model.name}, {_params(model)} parameters; causal, {mode}, batch {query.batch}"))
    if row is None:
        lines.append(("memory", f"budget {gib(query.budget_bytes)} per GPU ({gib(gpu.usable_memory_bytes)} usable, "
                                f"{query.safety_margin:.0%} margin)"))
        return lines + list(notes)
    n_nodes = nodes(row.world_size, gpu.gpus_per_node)
    lines.append(("layout", f"{row.world_size} x {gpu.name} on {n_nodes} node{'s' * (n_nodes > 1)}: "
                            f"{split_text(query, row, ring_given)}; {query.layout} sequence layout"))
    lines.append(("tokens", f"{row.seq_len_tokens:,} per sequence, {row.tokens_per_rank:,} per GPU"))
    lines.append(("settings", ", ".join(setting_labels(query, row.settings, given))))
    p = row.prediction
    verdict = "headroom" if row.headroom_bytes >= 0 else "short by"  # a row can fail on host RAM alone
    lines.append(("memory", f"{gib(p.total_bytes)} + {gib(p.residual_bound_bytes)} bound = {gib(p.upper_bytes)} "
                            f"per GPU of a {gib(row.budget_bytes)} budget ({gib(gpu.usable_memory_bytes)} usable, "
                            f"{query.safety_margin:.0%} margin); {verdict} {gib(abs(row.headroom_bytes))}"))
    lines.append(("uncertainty", uncertainty_text(p, p.residual_bound_bytes)))
    if row.step_time_s is not None:
        rate = tokens_per_s(row.seq_len_tokens, query.batch, row.data_parallel, row.step_time_s)
        utilisation = row_mfu(query, row)
        lines.append(("step", f"{time_text(row.step_time_s)} per step, {rate_text(rate)}"
                              + (f", MFU {utilisation:.0%}" if utilisation is not None else "")))
    host = host_ram_per_node_bytes(query, row)
    if host:
        budget = row.host_budget_bytes_per_node
        from ringplan.memory.host_memory import pinned_host_bytes_per_gpu

        pinned = pinned_host_bytes_per_gpu(row.workload)
        lines.append(("host RAM", f"{gib(host)} per node for what is offloaded ({gib(row.host_memory_bytes_per_gpu)} "
                                  f"per GPU, {gib(pinned)} of it pinned)" + (f" of the node's {gib(budget)}" if budget else "")
                                  + (" - over the node's host RAM (--host-memory)" if budget and host > budget else "")))
    if offload_alternative is not None:
        lines.append(("offload chosen", f"without it the same plan needs "
                                        f"{gib(offload_alternative.prediction.upper_bytes)} per GPU"))
    return lines + list(notes)


def split_text(query, row, ring_given: bool) -> str:
    """``tensor parallel 2 x Ulysses CP 4 x data-parallel 1 (chosen)``: how the GPUs are split, and whether
    the split was given, chosen among several, or the default (every GPU in one ring)."""
    how = "(given)" if ring_given else "(chosen)" if len(query.parallelisms) > 1 else \
        "(every GPU in one ring unless --ring-size)"
    return f"{split_words(row)} {how}"


def split_words(row) -> str:
    """``tensor parallel 2 x Ulysses CP 4 x data-parallel 1``: T (when > 1), the CP scheme and size, DP."""
    layout, p = row.workload.layout, row.ring_size
    cp = {"ring": f"ring {p}", "allgather": f"all-gather CP {p}", "ulysses": f"Ulysses CP {p}",
          "hybrid": f"hybrid CP {p} (Ulysses {layout.ulysses_size} x ring {layout.ring_degree})"}[layout.cp_scheme]
    tp = f"tensor parallel {row.tp_degree} x " if row.tp_degree > 1 else ""
    return f"{tp}{cp} x data-parallel {row.data_parallel}"


def _params(model) -> str:
    from ringplan.models import parameter_count

    return f"{parameter_count(model) / 1e9:,.2f}B"


# ----------------------------------------------------------------------------- capacity --model


def _memory_text(row, query) -> str:
    p = row.prediction
    text = (f"{p.total_bytes / GIB:,.2f} GiB + {p.residual_bound_bytes / GIB:,.2f} GiB bound per GPU of "
            f"{query.budget_bytes / GIB:,.2f} GiB budget")
    return text + (f"; step {row.step_time_s:.3g} s" if row.step_time_s is not None else "")


def _gpus_text(row) -> str:
    return f"{row.world_size} x ({split_words(row)})"


def capacity_answer_record(query, answer, seq_len_tokens: int | None, world_size: int | None, *,
                           given: frozenset[str] = frozenset(), ring_given: bool = False) -> dict[str, Any]:
    """The ``answer`` object of ``capacity --model`` (kind, text, the figures that answer, and what
    issue 16 adds: settings chosen vs given, layout, host RAM, tokens/s, warnings, what would fit)
    from a ``ringplan.capacity.answers.CapacityAnswer``, with ``lines`` for the table output."""
    record = _capacity_answer_core(query, answer, seq_len_tokens, world_size)
    best, gpu = answer.best, query.gpu.name
    notes = []
    if answer.kind == "check":
        verb = "fit on" if answer.feasible else "do NOT fit on"
        headline = f"{seq_len_tokens:,} tokens {verb} {world_size} x {gpu}" + (
            "" if answer.feasible else " with any setting (below: the setting needing least memory)")
    elif answer.kind == "min_world_size":
        headline = (f"{seq_len_tokens:,} tokens need {best.world_size} x {gpu} (the fewest)" if best else
                    f"no setting on up to {query.max_world_size:,} x {gpu} holds {seq_len_tokens:,} tokens")
        if answer.rounded_minimum is not None:
            notes.append(("note", f"{seq_len_tokens:,} splits evenly over few GPU counts; "
                                  f"{answer.rounded_seq_len_tokens:,} tokens fit on "
                                  f"{answer.rounded_minimum.world_size} x {gpu}"))
    else:
        headline = (f"{world_size} x {gpu} hold at most {best.seq_len_tokens:,} tokens "
                    f"({answer.next_infeasible.seq_len_tokens:,} would not fit)" if best else
                    f"not even the shortest valid sequence fits on {world_size} x {gpu}")
    notes += what_would_fit_notes(answer, gpu) + why_notes(answer)
    alternative = getattr(answer, "without_offload", None)
    record["lines"] = stack_answer_lines(query, headline, best, given=given, ring_given=ring_given,
                                         offload_alternative=alternative, notes=tuple(notes))
    record.update(readable_record(query, best, given=given, ring_given=ring_given, offload_alternative=alternative))
    record["best_row"] = best
    fewest, longest = getattr(answer, "fewest_that_fit", None), getattr(answer, "longest_that_fits", None)
    if fewest is not None or longest is not None:
        record["would_fit"] = {"world_size": fewest.world_size if fewest else None,
                               "seq_len_tokens": longest.seq_len_tokens if longest else None}
    return record


def why_notes(answer) -> list[tuple[str, str]]:
    """(``why``, ``the fewest GPUs; fastest of 6 plans that fit there; next split: 1 x ring 20 x 1, zero3 / full
    / full, 26.3 s``) for a fewest-GPUs or most-tokens answer chosen among several plans: the runner-up is
    the fastest plan of another TP x CP split (else the next setting of the same split)."""
    choices = getattr(answer, "choices", ())
    if answer.kind == "check" or not choices:
        return []
    first = "the fewest GPUs that hold it" if answer.kind == "min_world_size" else "the longest length that fits"
    timed = choices[0].step_time_s is not None
    if len(choices) == 1:
        return [("why", f"{first}; the only plan that fits there")]
    rank = "fastest" if timed else "first in the documented order"
    text = f"{first}; {rank} of {len(choices)} plans that fit there"
    other_split = [c for c in choices[1:] if c.parallelism != choices[0].parallelism]
    runner_up = (other_split or choices[1:])[0]  # the fastest other split says more than a setting's variant
    if timed and runner_up.step_time_s is not None:
        from ringplan.cli.readable import time_text

        label = "next split" if other_split else "next"
        text += (f"; {label}: {split_cell(runner_up)}, {settings_label(runner_up.settings)}, "
                 f"{time_text(runner_up.step_time_s)}")
    return [("why", text)]


def what_would_fit_notes(answer, gpu: str) -> list[tuple[str, str]]:
    """(``would fit``, ``16 x h100 hold these tokens``), (…, ``the given 8 x h100 hold 524,288 tokens``)
    when nothing fits."""
    fewest, longest = getattr(answer, "fewest_that_fit", None), getattr(answer, "longest_that_fits", None)
    notes = []
    if fewest is not None:
        notes.append(("would fit", f"{fewest.world_size} x {gpu} hold these {fewest.seq_len_tokens:,} tokens"))
    if longest is not None:
        notes.append(("would fit", f"the given {longest.world_size} x {gpu} hold {longest.seq_len_tokens:,} tokens"))
    return notes


def _capacity_answer_core(query, answer, seq_len_tokens: int | None, world_size: int | None) -> dict[str, Any]:
    from ringplan.capacity.candidates import describe_settings

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
