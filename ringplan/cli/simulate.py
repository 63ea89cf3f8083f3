"""``ringplan simulate``: play the ring step by step, print the time breakdown and a timeline.

Example: ``ringplan simulate --gpu h100 --tokens 1Mi --ring-size 8 --causal --layout zigzag --training``
"""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import (MAX_SIMULATED_RING_SIZE, MAX_WIDTH, TOKENS, BoundedInt, IntListType,
                                 OneLineErrorCommand, OutputFile, QuietAliasOption, bad_input_exits_2, format_option,
                                 render_rows)
from ringplan.cli.options import (build_shape, gpu_from_options, hardware_options, link_options, link_override,
                                  shape_options)

#: Segment lengths and dilation rates (positive), ranks to draw (from 0).
POSITIVE_INTS = IntListType(min_value=1)
RANKS = IntListType(min_value=0, max_value=MAX_SIMULATED_RING_SIZE - 1)


def _breakdown_rows(prediction: Any, ring_size: int, seq_len: int) -> list[dict[str, str]]:
    ms = lambda s: f"{s * 1e3:,.3f} ms"  # noqa: E731
    return [
        {"quantity": "step time", "value": ms(prediction.step_time_s)},
        {"quantity": "compute (busiest rank)", "value": ms(prediction.compute_s)},
        {"quantity": "exposed communication", "value": ms(prediction.exposed_comm_s)},
        {"quantity": "host call overhead", "value": ms(prediction.call_overhead_s)},
        {"quantity": "ideal (mean compute)", "value": ms(prediction.ideal_s)},
        {"quantity": "imbalance", "value": ms(prediction.imbalance_s)},
        {"quantity": "efficiency vs ideal", "value": f"{prediction.efficiency * 100:.1f} %"},
        {"quantity": "tokens per rank", "value": f"{seq_len // ring_size:,}"},
        {"quantity": "K/V message", "value": f"{prediction.kv_message_bytes / 2**20:,.2f} MiB"},
        {"quantity": "nodes", "value": str(prediction.nodes)},
        {"quantity": "backend", "value": prediction.backend},
        {"quantity": "provenance", "value": prediction.provenance},
    ]


def _pass_rows(prediction: Any, time_text=None) -> list[dict[str, str]]:
    """One row per pass; times in ms with three decimals (JSON), or through ``time_text`` (table)."""
    shown = time_text or (lambda s: f"{s * 1e3:,.3f} ms")
    rows = []
    for timeline in prediction.simulation.timelines:
        rows.append({"pass": timeline.name, "steps": str(timeline.step_start_s.shape[1]),
                     "first rank done": shown(float(timeline.finish_s.min())),
                     "last rank done": shown(float(timeline.finish_s.max()))})
    return rows


def _readable_rows(prediction: Any) -> list[dict[str, str]]:
    """The time breakdown for the table output, in ms / s / min / h."""
    from ringplan.cli.readable import time_text

    return [{"quantity": "compute (busiest rank)", "value": time_text(prediction.compute_s)},
            {"quantity": "exposed communication", "value": time_text(prediction.exposed_comm_s)},
            {"quantity": "host call overhead", "value": time_text(prediction.call_overhead_s)},
            {"quantity": "ideal (mean compute)", "value": time_text(prediction.ideal_s)},
            {"quantity": "imbalance", "value": time_text(prediction.imbalance_s)},
            {"quantity": "efficiency vs ideal", "value": f"{prediction.efficiency * 100:.1f} %"},
            {"quantity": "K/V message", "value": f"{prediction.kv_message_bytes / 2**20:,.1f} MiB"},
            {"quantity": "backend", "value": prediction.backend}]


def _answer_lines(prediction: Any, workload: Any, ring: Any, gpu: str, seq_len: int) -> list[tuple[str, str]]:
    """(label, text): the step time first, then the workload, the ring and its nodes, and the provenance."""
    from ringplan.cli.readable import rate_text, time_text

    s, p = workload.shape, workload.pattern
    rate = seq_len * s.batch / prediction.step_time_s if prediction.step_time_s else None
    mode = "training step (forward + backward)" if workload.training else "forward pass"
    return [("answer", f"{time_text(prediction.step_time_s)} per {mode} of one attention layer, "
                       f"{rate_text(rate)}"),
            ("workload", f"{seq_len:,} tokens, {s.n_heads} heads x {s.head_dim} (kv heads {s.n_kv_heads}), "
                         f"{s.dtype}, batch {s.batch}, {'dilated' if p.dilated else 'dense'}, "
                         f"{'causal' if p.causal else 'non-causal'}"),
            ("layout", f"ring of {ring.ring_size} x {gpu} on {prediction.nodes} node{'s' * (prediction.nodes > 1)}; "
                       f"{ring.layout} layout; {seq_len // ring.ring_size:,} tokens per GPU"),
            ("provenance", prediction.provenance)]


def plot_timeline(result: Any, path: str, ranks: list[int]) -> None:
    """Draw compute intervals per rank (and waiting as a light bar) to an image file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'ringplan[plot]'") from None
    from ringplan.time.simulate import rank_intervals

    fig, ax = plt.subplots(figsize=(10, 0.35 * len(ranks) + 1.5))
    finish = result.timelines[-1].finish_s
    for row, rank in enumerate(ranks):
        ax.broken_barh([(0, finish[rank] * 1e3)], (row - 0.4, 0.8), color="#dddddd")
        starts, ends = rank_intervals(result, rank)
        ax.broken_barh(list(zip(starts * 1e3, (ends - starts) * 1e3)), (row - 0.4, 0.8), color="#1f77b4")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_xlabel("time (ms): blue = compute, grey = waiting on transfers/neighbours")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.command("simulate", cls=OneLineErrorCommand)
@click.option("--gpu", default=None, help="GPU type (catalog name or alias, e.g. h100); optional with --gpu-spec.")
@hardware_options
@click.option("--tokens", "seq_len", type=TOKENS, required=True, help="Global sequence length S (1M, 128Ki, ...).")
@click.option("--ring-size", "--world-size", "ring_size", type=BoundedInt(min=1, max=MAX_SIMULATED_RING_SIZE),
              default=2, show_default=True,
              help="Ranks in the context-parallel ring P.")
@shape_options
@click.option("--embed-dim", type=BoundedInt(min=1, max=MAX_WIDTH), default=None,
              help="Model width E for the projections (default H*D).")
@click.option("--train/--forward", "--training/--forward-only", "training", default=False, show_default=True,
              cls=QuietAliasOption, quiet_aliases=("--training", "--forward-only"),
              help="Forward+backward or forward only.")
@click.option("--projections/--no-projections", default=False, show_default=True,
              help="Include the QKV and output projections.")
@click.option("--segment-lengths", type=POSITIVE_INTS, default=None,
              help="Dilated attention segment lengths, e.g. 2048,8192.")
@click.option("--dilation-rates", type=POSITIVE_INTS, default=None,
              help="Dilation rates, one per segment length, e.g. 1,2.")
@click.option("--nodes", type=BoundedInt(min=1, max=MAX_SIMULATED_RING_SIZE), default=None,
              help="Nodes the ring spans (default: as few as fit).")
@click.option("--gpus-per-node", type=BoundedInt(min=1, max=MAX_SIMULATED_RING_SIZE), default=None,
              help="GPUs per node (default: the catalog's).")
@link_options
@click.option("--timeline-width", type=BoundedInt(min=10, max=1000), default=72, show_default=True,
              help="Characters of the text timeline.")
@click.option("--timeline-ranks", type=RANKS, default=None,
              help="Ranks to draw, e.g. 0,1,7 (default: a representative few).")
@click.option("--plot", "plot_path", type=OutputFile(), default=None,
              help="Also draw the timeline to this image file (needs matplotlib).")
@format_option
@bad_input_exits_2
def simulate(gpu: str | None, gpu_spec: str | None, catalog_path: str | None, seq_len: int, ring_size: int,
             n_heads: int, n_kv_heads: int | None, head_dim: int,
             batch: int, dtype: str, backend: str, causal: bool, layout: str, timing_dir: str | None,
             step_overhead_us: float | None, embed_dim: int | None, training: bool, projections: bool,
             segment_lengths: tuple[int, ...] | None, dilation_rates: tuple[int, ...] | None, nodes: int | None,
             gpus_per_node: int | None,
             intra_link: str | None, intra_bandwidth: int | None, intra_latency_us: float | None,
             inter_link: str | None, inter_bandwidth: int | None, inter_latency_us: float | None,
             timeline_width: int, timeline_ranks: tuple[int, ...] | None, plot_path: str | None,
             output_format: str) -> None:
    """Simulate one layer step on the ring: time breakdown, efficiency and a per-rank timeline."""
    from ringplan.time.simulate import text_timeline, timeline_ranks as default_ranks
    from ringplan.time.attention_time import step_time_prediction
    from ringplan.workload import AttentionPattern, RingLayout, Workload

    spec = gpu_from_options(gpu, gpu_spec, catalog_path)
    shape = build_shape(n_heads, n_kv_heads, head_dim, batch, dtype, embed_dim)
    workload = Workload(seq_len_tokens=seq_len, shape=shape,
                        pattern=AttentionPattern(causal=causal, segment_lengths_tokens=segment_lengths or (),
                                                 dilation_rates=dilation_rates or ()),
                        training=training, projections=projections)
    ring = RingLayout(ring_size=ring_size, layout=layout, backend=backend)
    prediction = step_time_prediction(
        workload, ring, spec, nodes=nodes, gpus_per_node=gpus_per_node, timing_dir=timing_dir,
        intra_link=link_override(intra_link, intra_bandwidth, intra_latency_us, "intra"),
        inter_link=link_override(inter_link, inter_bandwidth, inter_latency_us, "inter"),
        step_overhead_s=None if step_overhead_us is None else step_overhead_us * 1e-6, keep_simulation=True)
    result = prediction.simulation
    ranks = list(timeline_ranks or ()) or default_ranks(result)
    lines = text_timeline(result, ranks, width=timeline_width)
    if plot_path:
        plot_timeline(result, plot_path, ranks)
    rows = _breakdown_rows(prediction, ring_size, seq_len)
    details = [{"component": k, "source": v} for k, v in prediction.provenance_details]
    if output_format == "json":
        click.echo(json.dumps({"breakdown": {r["quantity"]: r["value"] for r in rows},
                               "step_time_s": prediction.step_time_s, "compute_s": prediction.compute_s,
                               "exposed_comm_s": prediction.exposed_comm_s, "ideal_s": prediction.ideal_s,
                               "call_overhead_s": prediction.call_overhead_s,
                               "efficiency": prediction.efficiency, "passes": _pass_rows(prediction),
                               "provenance_details": details, "timeline": lines}, indent=2))
        return
    if output_format == "csv":
        click.echo(render_rows(rows, "csv"))
        return
    from ringplan.cli.readable import echo_lines, fitted_table, output_width, time_text

    width = output_width()
    echo_lines(_answer_lines(prediction, workload, ring, spec.name if gpu_spec else gpu, seq_len), width)
    click.echo("")
    click.echo(fitted_table([{"quantity": r["quantity"], "value": r["value"]} for r in _readable_rows(prediction)],
                            width))
    click.echo("\n" + fitted_table(_pass_rows(prediction, time_text), width))
    click.echo("\n" + fitted_table(details, width))
    click.echo(f"\ntimeline (0 .. {time_text(prediction.step_time_s)}; # compute, - waiting):")
    click.echo("\n".join(lines))
    if plot_path:
        click.echo(f"\nplot written to {plot_path}")
