"""``ringplan overlap``: the minimum tokens per rank for which a link hides the ring's transfers.

Example: ``ringplan overlap --gpu h100 --gpu a100-80gb --causal --layout zigzag --training``;
Ring Attention's own rule at a stated F: ``ringplan overlap --gpu a100-80gb --rule paper --flops-per-s 312e12``
"""

from __future__ import annotations

import click

from ringplan.cli.common import OneLineErrorCommand, QuietAliasOption, bad_input_exits_2, format_option, render_rows
from ringplan.cli.options import (build_shape, catalog_from_options, gpu_from_options, hardware_options, link_options,
                                  link_override, shape_options)


def _row(gpu_name: str, threshold) -> dict[str, str]:
    return {
        "gpu": gpu_name, "link": threshold.scope, "pass": threshold.pass_name, "backend": threshold.backend,
        "block": threshold.block, "F TFLOP/s": f"{threshold.effective_flops_per_s / 1e12:,.0f}",
        "B GB/s": f"{threshold.bandwidth_bytes_per_s / 1e9:,.1f}", "alpha us": f"{threshold.latency_s * 1e6:,.1f}",
        "F/B tokens": f"{threshold.paper_tokens:,.0f}", "min tokens/rank": f"{threshold.min_tokens_per_rank:,}",
        "provenance": threshold.provenance, "rule": threshold.rule,
        "6 x F/B tokens": f"{threshold.paper_seq_tokens:,.0f}", "F source": threshold.flops_source,
    }


@click.command("overlap", cls=OneLineErrorCommand)
@click.option("--gpu", "gpus", multiple=True, help="GPU type (repeatable); default: every catalog GPU with data.")
@hardware_options
@shape_options
@click.option("--train/--forward", "--training/--forward-only", "training", default=False, show_default=True,
              cls=QuietAliasOption, quiet_aliases=("--training", "--forward-only"),
              help="Also give the backward pass (K/V plus fp32 dK/dV travel).")
@click.option("--scope", type=click.Choice(["intra", "inter", "both"]), default="both", show_default=True,
              help="Which link: inside a node, between nodes, or both.")
@click.option("--rule", type=click.Choice(["runtime", "paper"]), default="runtime", show_default=True,
              help="runtime: this runtime's exact per-step condition (kernel, merge, step overhead, link latency); "
                   "paper: Ring Attention's (Liu et al. 2023) block c >= F/B tokens and each GPU holding >= 6c.")
@click.option("--flops-per-s", type=float, default=None,
              help="State F, the block kernel's FLOP/s (e.g. 312e12), instead of the fitted rate "
                   "(the paper rule's default: the catalog peak).")
@link_options
@format_option
@bad_input_exits_2
def overlap(gpus: tuple[str, ...], gpu_spec: str | None, catalog_path: str | None, n_heads: int,
            n_kv_heads: int | None, head_dim: int, batch: int, dtype: str,
            backend: str, causal: bool, layout: str, timing_dir: str | None, step_overhead_us: float | None,
            training: bool, scope: str, rule: str, flops_per_s: float | None, intra_link: str | None,
            intra_bandwidth: int | None,
            intra_latency_us: float | None, inter_link: str | None, inter_bandwidth: int | None,
            inter_latency_us: float | None, output_format: str) -> None:
    """Minimum tokens per rank n for which one ring step's compute hides its K/V transfer.

    Exact condition for this runtime: kernel(n x n, or n x n/2 for causal zigzag) + merge +
    step overhead >= alpha + 2*B*n*H_kv*D*e / beta, with fitted or default F, alpha, beta.
    'F/B tokens' is Ring Attention's minimal block (Liu et al. 2023; scaled by e/2 and H_kv/H
    off its bf16 MHA case) for comparison; --rule paper answers with its 6 x F/B per GPU.
    """
    from ringplan.time.overlap import overlap_threshold

    shape = build_shape(n_heads, n_kv_heads, head_dim, batch, dtype)
    overrides = {"intra_node": link_override(intra_link, intra_bandwidth, intra_latency_us, "intra"),
                 "inter_node": link_override(inter_link, inter_bandwidth, inter_latency_us, "inter")}
    scopes = {"intra": ["intra_node"], "inter": ["inter_node"], "both": ["intra_node", "inter_node"]}[scope]
    passes = ["forward", "backward"] if training else ["forward"]
    if gpu_spec is not None:  # the spec on each --gpu, or alone
        specs = [gpu_from_options(name, gpu_spec, catalog_path) for name in gpus or (None,)]
    elif gpus:
        specs = [gpu_from_options(name, None, catalog_path) for name in gpus]
    else:
        specs = list(catalog_from_options(catalog_path).gpus)
    rows, skipped = [], []
    for spec in specs:
        for link_scope in scopes:
            for pass_name in passes:
                try:
                    threshold = overlap_threshold(
                        shape, spec, causal=causal, layout=layout, backend=backend, scope=link_scope,
                        pass_name=pass_name, link=overrides[link_scope], timing_dir=timing_dir,
                        step_overhead_s=None if step_overhead_us is None else step_overhead_us * 1e-6,
                        flops_per_s=flops_per_s, rule=rule)
                except ValueError as exc:
                    if gpus or gpu_spec is not None:
                        raise
                    skipped.append(f"{spec.name}: {exc}")
                    break
                rows.append(_row(spec.name, threshold))
    if not rows:
        raise ValueError("no GPU has the data for this shape: " + "; ".join(sorted(set(skipped))[:3]))
    if output_format != "table":
        click.echo(render_rows(rows, output_format))
    else:
        _echo_readable(rows, causal=causal, layout=layout, training=training, rule=rule)
    if skipped and output_format == "table":
        click.echo(f"\nskipped {len(set(s.split(':')[0] for s in skipped))} GPU(s) without data: "
                   + ", ".join(sorted(set(s.split(":")[0] for s in skipped))), err=True)


def _echo_readable(rows: list[dict[str, str]], *, causal: bool, layout: str, training: bool, rule: str) -> None:
    """The answer in words, a compact table, and each provenance once below it."""
    from ringplan.cli.readable import echo_lines, fitted_table, output_width

    width = output_width()
    mode = "forward and backward passes" if training else "forward pass"
    if rule == "paper":
        answer = ("Ring Attention's rule (Liu et al. 2023): a block of at least 'F/B tokens' hides its K/V "
                  "transfer, and each GPU needs at least 6 blocks: 'min tokens/GPU' (below)")
    else:
        answer = ("a ring step's compute hides its K/V transfer once each GPU holds at least "
                  "'min tokens/GPU' tokens (below; fewer tokens per GPU leave the link exposed)")
    sources = list(dict.fromkeys(r["provenance"] for r in rows))
    echo_lines([("answer", answer),
                ("workload", f"{'causal' if causal else 'non-causal'}, {layout} layout, {mode}; 'F/B tokens': "
                             f"Ring Attention's minimal block (Liu et al. 2023; x e/2 x H_kv/H off bf16 MHA); "
                             f"F: {rows[0]['F source']}")],
               width)
    table = [{"gpu": r["gpu"], "link": r["link"].replace("_node", ""), "pass": r["pass"], "backend": r["backend"],
              "min tokens/GPU": r["min tokens/rank"], "F/B tokens": r["F/B tokens"], "TFLOP/s": r["F TFLOP/s"],
              "GB/s": r["B GB/s"], "alpha us": r["alpha us"], "source": str(sources.index(r["provenance"]) + 1)}
             for r in rows]
    click.echo("")
    click.echo(fitted_table(table, width, droppable=["F/B tokens", "source", "backend", "alpha us"]))
    click.echo("")
    echo_lines([(f"source {i + 1}", text) for i, text in enumerate(sources)], width)
