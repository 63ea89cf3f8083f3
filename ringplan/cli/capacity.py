"""``ringplan capacity``: how many GPUs for N tokens, or how many tokens on K GPUs."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ringplan.cli.common import (MAX_WORLD_SIZE, TOKENS, BoundedInt, InputFile, MarginType, OneLineErrorCommand,
                                 OutputFile, QuietAliasOption, bad_input_exits_2, format_option, render_rows)
from ringplan.cli.options import (build_workload, cp_scheme_options, explicit_options, explicit_setting_fields,
                                  gpu_from_options, hardware_options, host_memory_option, model_requested,
                                  model_selection_options, stack_parallel_options, stack_query, stack_settings_options,
                                  workload_options)
from ringplan.units import GIB


def describe_workload(workload, layout: str, backend: str) -> str:
    """One line: shape, pattern, mode, projections, layout, backend."""
    s, p = workload.shape, workload.pattern
    pattern = (f"dilated (segments {list(p.segment_lengths_tokens)}, rates {list(p.dilation_rates)})"
               if p.dilated else "dense")
    return (f"batch {s.batch}, {s.n_heads} heads x {s.head_dim} (kv heads {s.n_kv_heads}), E {s.embed_dim}, "
            f"{s.dtype}, {pattern}, {'causal' if p.causal else 'non-causal'}, "
            f"{'training' if workload.training else 'forward'}, "
            f"{'with' if workload.projections else 'no'} projections; {layout} layout, backend {backend}")


def step_time_hook():
    """The time model's step-time function for capacity rows (``fn(workload, layout, gpu) ->
    (step_time_s, exposed_comm_s) | None``), importing ``ringplan.time.attention_time`` (numpy) only when
    the first row shown asks for it: the searches evaluate memory alone."""
    def step_time(workload, layout, gpu):
        from ringplan.time.cp_time import capacity_cp_step_time  # the ring: attention_time.capacity_step_time

        return capacity_cp_step_time(workload, layout, gpu)

    return step_time


@click.command("capacity", cls=OneLineErrorCommand)
@click.option("--gpu", "gpu_name", default=None,
              help="GPU type from the catalog (`ringplan gpus`), e.g. a100-40gb, h100; optional with --gpu-spec.")
@hardware_options
@click.option("--tokens", type=TOKENS, default=None,
              help="Global sequence length S: 1M = 1e6 = 1_000_000, 1Mi = 1,048,576, 200K, 128Ki. "
                   "Alone: find the fewest GPUs.")
@click.option("--gpus", "--world-size", "world_size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              cls=QuietAliasOption, quiet_aliases=("--world-size",),
              help="GPUs W (alias --world-size). Alone: find the most tokens they hold; with --tokens: check "
                   "that one plan. Searched when not given.")
@click.option("--ring-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
              help="With --model: context-parallel ring size P, the rest data-parallel (W = P x DP); "
                   "when not given: every GPU in one ring.")
@click.option("--max-world-size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=1024, show_default=True,
              help="Largest ring the --tokens search considers (every size 1..max where S splits).")
@click.option("--safety-margin", type=MarginType(), default=0.05, show_default=True,
              help="Fraction of usable memory kept free (0.05 or 5%): feasible when predicted <= usable x "
                   "(1 - margin).")
@click.option("--model-form", type=click.Choice(["analytic", "seed"]), default="analytic", show_default=True,
              help="analytic: named byte terms x fitted coefficients; seed: the seed report's MB-per-token + overhead.")
@click.option("--profile", "profile_paths", multiple=True, type=InputFile(),
              help="Fit on these profile files instead of every file in profiles/measured (repeatable).")
@click.option("--step-time/--no-step-time", default=None,
              help="Add each shown row's predicted step time (and, for one layer, the exposed communication), and "
                   "pick the fastest plan among those with the fewest GPUs. Default: on with --model (a whole "
                   "model's answer states step time, tokens/s and MFU), off for one layer (its cold start stays "
                   "fast; the time model costs ~0.3 s: numpy).")
@workload_options
@cp_scheme_options
@model_selection_options
@stack_settings_options
@stack_parallel_options
@host_memory_option
@format_option
@click.option("--plot", "plot_path", type=OutputFile(), default=None,
              help="Also draw per-GPU memory against tokens per world size into FILE (needs the plot extra).")
@click.option("--breakdown", is_flag=True, help="Table format: also the per-GPU memory by term (terms as rows).")
@click.pass_context
@bad_input_exits_2
def capacity(ctx: click.Context, gpu_name: str | None, gpu_spec: str | None, catalog_path: str | None,
             tokens: int | None, world_size: int | None, max_world_size: int,
             safety_margin: float, model_form: str, profile_paths: tuple[str, ...], step_time: bool,
             output_format: str, plot_path: str | None, breakdown: bool, **workload_args: Any) -> None:
    """Fewest GPUs of one type for --tokens N, or most tokens for --gpus K.

    --model NAME (or --config PATH) plans a whole model instead of one attention layer: the fewest
    GPUs and the settings (sharding, checkpointing, offload, loss) that hold N tokens, or the most
    tokens on --gpus K; settings options given are pinned, the others searched; --step-time ranks
    the settings that fit by predicted step time (default: less recomputation, then less
    communication, first). With --model the mode defaults to forward (prefill): give --train for a
    training step (`ringplan plan` defaults to --train).

    The answer comes first: GPUs and layout, tokens per GPU, each setting marked (chosen) or
    (given), memory of the budget with its headroom and uncertainty; then a compact table within the
    terminal's width; --breakdown adds the memory by term.

    Default workload (when no shape option is given): one attention layer of 32 heads x 128 head dim
    (E = 4096, a Llama-2-7B-like layer), bf16, batch 1, dense, non-causal, forward only, no
    projections, contiguous layout, backend auto. Exit code 0 when a feasible plan exists, 1 when
    none does (within --max-world-size), 2 on bad input.
    """
    if tokens is None and world_size is None:
        raise ValueError("give --tokens N (fewest GPUs), --world-size K (most tokens), or both")
    scheme = {key: workload_args.pop(key) for key in ("cp_scheme", "ulysses_degree")}
    if model_requested(**workload_args):
        refused = {"plot_path": plot_path, "profile_paths": profile_paths, "model_form": model_form}
        ctx.exit(_whole_model(gpu_name=gpu_name, tokens=tokens, world_size=world_size, max_world_size=max_world_size,
                              safety_margin=safety_margin, step_time=step_time is not False, output_format=output_format,
                              workload_args={**workload_args, **scheme, "gpu_spec": gpu_spec,
                                             "catalog_path": catalog_path},
                              refused=refused, breakdown=breakdown))
    _refuse_whole_model_options(workload_args)
    from ringplan.capacity.answers import attention_capacity
    from ringplan.capacity.attention import CapacityQuery

    gpu = gpu_from_options(gpu_name, gpu_spec, catalog_path)
    workload = build_workload(seq_len_tokens=tokens, **workload_args)
    query = CapacityQuery(workload=workload, layout=workload_args["layout"], backend=workload_args["backend"],
                          gpu=gpu, safety_margin=safety_margin, max_world_size=max_world_size,
                          model=_model(model_form, profile_paths), step_time=step_time_hook() if step_time else None,
                          **scheme)
    answer = attention_capacity(query, tokens, world_size)
    rows = list(answer.rows)
    _emit(query, _answer_record(query, answer, tokens, world_size), rows, output_format, answer=answer,
          given=explicit_options({k: workload_args.get(k) for k in ("layout", "backend")}), breakdown=breakdown)
    if plot_path:
        from ringplan.plot import plot_capacity

        plot_capacity(plot_path, query, world_sizes=sorted({row.world_size for row in rows}))
        click.echo(f"plot written to {plot_path}", err=True)
    ctx.exit(0 if answer.feasible else 1)


#: Whole-model options (key → flag): an error without --model / --config.
_WHOLE_MODEL_ONLY = {"n_layers": "--layers", "ffn_dim": "--ffn", "vocab_size": "--vocab", "sharding": "--sharding",
                     "shard_group_size": "--shard-group", "checkpointing": "--checkpointing",
                     "offload_checkpoints": "--offload", "loss": "--loss", "loss_chunk_tokens": "--loss-chunk",
                     "offload_params": "--offload-params", "host_memory_bytes_per_node": "--host-memory",
                     "ring_size": "--ring-size", "tp_degrees": "--tp", "allow_cross_node": "--allow-cross-node"}
#: Attention-layer options (key → flag): an error with --model / --config (a model's attention is causal,
#: dense, with its projections counted in the stack terms).
_ATTENTION_ONLY = {"segment_lengths": "--segment-lengths", "dilation_rates": "--dilation-rates",
                   "projections": "--projections", "causal": "--causal/--no-causal", "plot_path": "--plot",
                   "profile_paths": "--profile", "model_form": "--model-form"}


def _refuse_whole_model_options(workload_args: dict[str, Any]) -> None:
    given = [flag for key, flag in _WHOLE_MODEL_ONLY.items() if key in explicit_options({key: workload_args.get(key)})]
    if given:
        raise ValueError(f"{', '.join(given)} plan a whole model: give --model NAME or --config PATH")


def _whole_model(*, gpu_name: str | None, tokens: int | None, world_size: int | None, max_world_size: int,
                 safety_margin: float, step_time: bool, output_format: str, workload_args: dict[str, Any],
                 refused: dict[str, Any], breakdown: bool) -> int:
    """``capacity --model``: answer with ``ringplan.capacity.answers.stack_capacity``; exit code 0 fits, 1 not."""
    from ringplan.capacity.answers import stack_capacity
    from ringplan.cli.stack_output import capacity_answer_record, emit_stack

    given = [_ATTENTION_ONLY[key] for key in explicit_options({**refused, **{k: workload_args.get(k) for k in
                                                                           _ATTENTION_ONLY if k in workload_args}})]
    if given:
        raise ValueError(f"{', '.join(given)} apply to one attention layer, not to --model / --config")
    query = stack_query(gpu_name=gpu_name, safety_margin=safety_margin, max_world_size=max_world_size,
                        step_time=step_time, gpus_given=world_size is not None, **workload_args)
    answer = stack_capacity(query, tokens, world_size)
    record = capacity_answer_record(query, answer, tokens, world_size, given=explicit_setting_fields(**workload_args),
                                    ring_given=workload_args.get("ring_size") is not None)
    emit_stack(query, record, list(answer.rows), output_format, breakdown=breakdown)
    return 0 if answer.feasible else 1


def _model(model_form: str, profile_paths: tuple[str, ...]):
    from ringplan.memory.attention_model import default_memory_model, memory_model_from_profiles
    from ringplan.profiles.attention import load_profile

    if not profile_paths:
        return default_memory_model(model_form)
    return memory_model_from_profiles([load_profile(path) for path in profile_paths], model_form)


def _answer_record(query, answer, tokens: int | None, world_size: int | None) -> dict[str, Any]:
    """The ``answer`` object (kind, text, the figure that answers) of a ``CapacityAnswer``."""
    best, gpu = answer.best, query.gpu.name
    if answer.kind == "check":
        verdict = "fits" if best.feasible else "does NOT fit"
        text = f"{tokens:,} tokens on {world_size} x {gpu}: {verdict} ({_gib_pm(best)} per GPU)"
        return {"kind": "check", "text": text, "feasible": best.feasible}
    if answer.kind == "min_world_size":
        if best is None:
            text = (f"no ring of up to {query.max_world_size} x {gpu} holds {tokens:,} tokens "
                    f"(raise --max-world-size, or shrink the workload)")
        else:
            text = (f"minimum world size for {tokens:,} tokens: {best.world_size} x {gpu} "
                    f"({best.tokens_per_rank:,} tokens/GPU, {_gib_pm(best)} per GPU)")
        return {"kind": "min_world_size", "text": text, "minimum_world_size": best.world_size if best else None}
    if best is None:
        text = f"not even the shortest valid sequence fits on {world_size} x {gpu}"
    else:
        text = (f"maximum tokens on {world_size} x {gpu}: {best.seq_len_tokens:,} "
                f"({best.tokens_per_rank:,} tokens/GPU, {_gib_pm(best)} per GPU; "
                f"{answer.next_infeasible.seq_len_tokens:,} would not fit)")
    return {"kind": "max_tokens", "text": text, "max_tokens": best.seq_len_tokens if best else None,
            "world_size": world_size}


def _gib_pm(row) -> str:
    p = row.prediction
    return f"{p.total_bytes / GIB:,.2f} ± {p.uncertainty_bytes / GIB:,.2f} GiB of {row.budget_bytes / GIB:,.2f} GiB budget"


def row_record(row) -> dict[str, Any]:
    """Machine-readable row: bytes, tokens and seconds-derived milliseconds."""
    p = row.prediction
    record: dict[str, Any] = {"world_size": row.world_size, "seq_len_tokens": row.seq_len_tokens,
                              "tokens_per_rank": row.tokens_per_rank}
    record.update({name: round(value) for name, value in p.terms_bytes.items()})
    record.update({"total_bytes": round(p.total_bytes), "uncertainty_bytes": round(p.uncertainty_bytes),
                   "usable_memory_bytes": row.usable_memory_bytes, "budget_bytes": round(row.budget_bytes),
                   "headroom_bytes": round(row.headroom_bytes), "feasible": row.feasible,
                   "provenance": p.provenance, "model_form": p.model_form})
    if row.step_time_s is not None or row.exposed_comm_s is not None:
        record["step_time_ms"] = None if row.step_time_s is None else row.step_time_s * 1e3
        record["exposed_comm_ms"] = None if row.exposed_comm_s is None else row.exposed_comm_s * 1e3
    return record


def _emit(query, record: dict[str, Any], rows, output_format: str, *, answer, given: dict[str, Any],
          breakdown: bool) -> None:
    """JSON (the query, the answer with what issue 16 adds, the rows), CSV of the rows, or the answer
    lines and a compact table within the terminal's width."""
    best = answer.best
    record.update(_readable_record(query, answer, given))
    if output_format == "json":
        click.echo(json.dumps({"query": _query_record(query), "answer": record,
                               "rows": [row_record(r) for r in rows]}, indent=2))
        return
    from ringplan.cli.readable import breakdown_table, echo_lines, fitted_table, output_width, warn

    if output_format == "csv":
        click.echo(render_rows([row_record(r) for r in rows], "csv"))
        warn(record["warnings"])
        return
    width = output_width()
    echo_lines(_answer_lines(query, record, answer, given), width)
    if rows:
        click.echo("")
        click.echo(fitted_table(compact_rows(query, rows, best), width, droppable=["nodes", "±", "tokens"][::-1]))
        if breakdown:
            click.echo("")
            columns = [(f"{r.world_size} GPU{'s' * (r.world_size > 1)}", dict(r.prediction.terms_bytes))
                       for r in rows]
            click.echo(breakdown_table(columns, width, keep=next((i for i, r in enumerate(rows) if r is best), 0)))
    warn(record["warnings"])
    sys.stdout.flush()


def _scheme_text(query) -> str:
    if query.cp_scheme == "hybrid":
        return f"hybrid: Ulysses of {query.ulysses_degree} inside x a ring of W/{query.ulysses_degree} across"
    return {"allgather": "all-gather K/V over all W GPUs", "ulysses": "Ulysses all-to-all over all W GPUs (U = W)"}[
        query.cp_scheme]


def _readable_record(query, answer, given: dict[str, Any]) -> dict[str, Any]:
    """What issue 16 adds to the JSON answer: settings chosen vs given, causal, layout, tokens/s,
    warnings, and when the check fails, what would fit."""
    from ringplan.cli.readable import nodes, tokens_per_s

    best, gpu = answer.best, query.gpu
    ring_source = "given" if answer.kind != "min_world_size" else "chosen"
    record: dict[str, Any] = {
        "settings_source": {"world_size": ring_source, "layout": "given" if "layout" in given else "default",
                            "backend": "given" if "backend" in given else "default"},
        "causal": query.workload.pattern.causal, "warnings": _warnings(query, best)}
    if best is not None:
        record["layout"] = {"world_size": best.world_size, "ring_size": best.world_size, "data_parallel": 1,
                            "nodes": nodes(best.world_size, gpu.gpus_per_node), "gpus_per_node": gpu.gpus_per_node,
                            "sequence_layout": query.layout}
        record["tokens_per_s"] = tokens_per_s(best.seq_len_tokens, 1, 1, best.step_time_s)
    if answer.fewest_that_fit is not None or answer.longest_that_fits is not None:
        record["would_fit"] = {"world_size": getattr(answer.fewest_that_fit, "world_size", None),
                               "seq_len_tokens": getattr(answer.longest_that_fits, "seq_len_tokens", None)}
    return record


def _warnings(query, row) -> list[str]:
    if row is None:
        return []
    warnings = list(row.prediction.warnings)
    per_node = query.gpu.gpus_per_node
    if row.world_size > per_node:
        warnings.append(f"the ring of {row.world_size} GPUs spans {-(-row.world_size // per_node)} nodes of "
                        f"{per_node}: some hops cross the inter-node link")
    return warnings


def _answer_lines(query, record: dict[str, Any], answer, given: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text): the answer, the workload, the layout with what was chosen or given, tokens,
    memory of the budget, uncertainty, step time."""
    from ringplan.cli.readable import gib, nodes, rate_text, time_text, uncertainty_text

    best, gpu, w = answer.best, query.gpu, query.workload
    lines = [("answer", _headline(query, answer))]
    s, p = w.shape, w.pattern
    pattern = (f"dilated (segments {', '.join(map(str, p.segment_lengths_tokens))}; rates "
               f"{', '.join(map(str, p.dilation_rates))})" if p.dilated else "dense")
    lines.append(("workload", f"one attention layer, {s.n_heads} heads x {s.head_dim} (kv heads {s.n_kv_heads}), "
                              f"E {s.embed_dim}, {s.dtype}, batch {s.batch}, {pattern}, "
                              f"{'causal' if p.causal else 'non-causal'}, {'training' if w.training else 'forward'}, "
                              f"{'with' if w.projections else 'no'} projections"))
    if best is None:
        lines.append(("memory", f"budget {gib(query.budget_bytes)} per GPU ({gib(gpu.usable_memory_bytes)} usable, "
                                f"{query.safety_margin:.0%} margin)"))
        return lines + _would_fit_lines(answer, gpu.name)
    if query.cp_scheme != "ring":
        lines.append(("context parallel", _scheme_text(query)))
    n_nodes = nodes(best.world_size, gpu.gpus_per_node)
    how = {"given": "(given)", "default": "(default)", "chosen": "(chosen)"}
    src = record["settings_source"]
    group = "ring" if query.cp_scheme == "ring" else "group"
    lines.append(("layout", f"{group} of {best.world_size} {how[src['world_size']]} x {gpu.name} on {n_nodes} "
                            f"node{'s' * (n_nodes > 1)}; {query.layout} layout {how[src['layout']]}, backend "
                            f"{query.backend} {how[src['backend']]}"))
    lines.append(("tokens", f"{best.seq_len_tokens:,} per sequence, {best.tokens_per_rank:,} per GPU"))
    pred = best.prediction
    verdict = "headroom" if best.feasible else "short by"
    lines.append(("memory", f"{gib(pred.total_bytes)} per GPU of a {gib(best.budget_bytes)} budget "
                            f"({gib(gpu.usable_memory_bytes)} usable, {query.safety_margin:.0%} margin); "
                            f"{verdict} {gib(abs(best.headroom_bytes))}"))
    lines.append(("uncertainty", uncertainty_text(pred, pred.uncertainty_bytes)))
    if best.step_time_s is not None:
        lines.append(("step", f"{time_text(best.step_time_s)} per step, {rate_text(record['tokens_per_s'])}"))
    return lines + _would_fit_lines(answer, gpu.name)


def _headline(query, answer) -> str:
    best, gpu = answer.best, query.gpu.name
    if answer.kind == "check":
        verdict = "fit on" if best.feasible else "do NOT fit on"
        return f"{best.seq_len_tokens:,} tokens {verdict} {best.world_size} x {gpu}"
    if answer.kind == "min_world_size":
        if best is None:
            return (f"no ring of up to {query.max_world_size:,} x {gpu} holds these tokens (raise --max-world-size, "
                    f"or shrink the workload)")
        return f"{best.seq_len_tokens:,} tokens need {best.world_size} x {gpu} (the fewest)"
    if best is None:
        return f"not even the shortest valid sequence fits on {answer.next_infeasible.world_size} x {gpu}" \
            if answer.next_infeasible is not None else f"not even the shortest valid sequence fits on {gpu}"
    return (f"{best.world_size} x {gpu} hold at most {best.seq_len_tokens:,} tokens "
            f"({answer.next_infeasible.seq_len_tokens:,} would not fit)")


def _would_fit_lines(answer, gpu: str) -> list[tuple[str, str]]:
    lines = []
    if answer.fewest_that_fit is not None:
        lines.append(("would fit", f"{answer.fewest_that_fit.world_size} x {gpu} hold these "
                                   f"{answer.fewest_that_fit.seq_len_tokens:,} tokens"))
    if answer.longest_that_fits is not None:
        lines.append(("would fit", f"the given {answer.longest_that_fits.world_size} x {gpu} hold "
                                   f"{answer.longest_that_fits.seq_len_tokens:,} tokens"))
    return lines


def compact_rows(query, rows, best) -> list[dict[str, str]]:
    """At most eight columns: GPUs, nodes, tokens, tokens/GPU, GiB used, ±, headroom, fits (and the
    step time with --step-time)."""
    from ringplan.cli.readable import gib_number, nodes, time_text

    table = []
    for row in rows:
        p = row.prediction
        line = {"GPUs": str(row.world_size) + (" *" if row is best else ""),
                "nodes": str(nodes(row.world_size, query.gpu.gpus_per_node)), "tokens": f"{row.seq_len_tokens:,}",
                "tokens/GPU": f"{row.tokens_per_rank:,}", "GiB used": gib_number(p.total_bytes),
                "±": gib_number(p.uncertainty_bytes), "headroom GiB": gib_number(row.headroom_bytes),
                "fits": "yes" if row.feasible else "no"}
        if any(r.step_time_s is not None for r in rows):
            line["step"] = time_text(row.step_time_s)
        table.append(line)
    return table


def _query_record(query) -> dict[str, Any]:
    w = query.workload
    scheme = {} if query.cp_scheme == "ring" else {"cp_scheme": query.cp_scheme, "ulysses_degree": query.ulysses_degree}
    return {**scheme, "gpu": query.gpu.name, "usable_memory_bytes": query.gpu.usable_memory_bytes,
            "usable_memory_measured": query.gpu.usable_memory_measured, "safety_margin": query.safety_margin,
            "max_world_size": query.max_world_size, "layout": query.layout, "backend": query.backend,
            "batch": w.shape.batch, "n_heads": w.shape.n_heads, "n_kv_heads": w.shape.n_kv_heads,
            "head_dim": w.shape.head_dim, "embed_dim": w.shape.embed_dim, "dtype": w.shape.dtype,
            "causal": w.pattern.causal, "segment_lengths_tokens": list(w.pattern.segment_lengths_tokens),
            "dilation_rates": list(w.pattern.dilation_rates), "training": w.training, "projections": w.projections,
            "model_form": query.model.form}
