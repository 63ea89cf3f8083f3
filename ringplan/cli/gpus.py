"""``ringplan gpus``: the GPU and link catalog (profiles/gpus.json) with its sources."""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import OneLineErrorCommand, bad_input_exits_2, format_option, render_rows
from ringplan.cli.options import catalog_from_options, gpu_from_options, hardware_options

GIB = 2**30


def gpu_record(gpu, catalog) -> dict[str, Any]:
    """Machine-readable catalog entry (bytes, FLOP/s, bytes/s) with its sources."""
    from ringplan.hardware import gpu_link

    return {"name": gpu.name, "aliases": list(gpu.aliases), "driver_name": gpu.driver_name,
            "usable_memory_bytes": gpu.usable_memory_bytes, "usable_memory_measured": gpu.usable_memory_measured,
            "peak_flops_per_s": dict(gpu.peak_flops_per_s), "hbm_bandwidth_bytes_per_s": gpu.hbm_bandwidth_bytes_per_s,
            "intra_node_link": gpu.intra_node_link,
            "intra_node_bandwidth_bytes_per_s": gpu_link(gpu, gpu.intra_node_link, catalog).bandwidth_bytes_per_s,
            "inter_node_link": gpu.inter_node_link,
            "inter_node_bandwidth_bytes_per_s": gpu_link(gpu, gpu.inter_node_link, catalog).bandwidth_bytes_per_s,
            "gpus_per_node": gpu.gpus_per_node, "runtime_overhead_bytes": gpu.runtime_overhead_bytes,
            "sources": dict(gpu.sources)}


def gpu_table_row(gpu, catalog) -> dict[str, str]:
    """Human row: GiB, TFLOP/s, TB/s, GB/s."""
    def tflops(dtype: str) -> str:
        value = gpu.peak_flops_per_s.get(dtype)
        return "-" if value is None else f"{value / 1e12:,.1f}"

    from ringplan.hardware import gpu_link

    intra, inter = gpu_link(gpu, gpu.intra_node_link, catalog), gpu_link(gpu, gpu.inter_node_link, catalog)
    return {"name": gpu.name,
            "GiB": f"{gpu.usable_memory_bytes / GIB:,.1f}" + ("" if gpu.usable_memory_measured else " (nom.)"),
            "bf16 TFLOP/s": tflops("bf16"), "fp32 TFLOP/s": tflops("fp32"),
            "HBM TB/s": f"{gpu.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
            "node": f"{gpu.gpus_per_node} x {intra.name} {intra.bandwidth_bytes_per_s / 1e9:,.0f} GB/s",
            "between nodes": f"{inter.name} {inter.bandwidth_bytes_per_s / 1e9:,.1f} GB/s",
            "aliases": ", ".join(gpu.aliases)}


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """CSV row: sources dropped, aliases joined, one column per dtype (all dtypes, empty if unknown)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key == "peak_flops_per_s":
            flat.update({f"peak_flops_per_s_{d}": value.get(d, "") for d in ("fp32", "tf32", "fp16", "bf16", "fp8")})
        elif key == "aliases":
            flat[key] = " ".join(value)
        elif key != "sources":
            flat[key] = value
    return flat


@click.command("gpus", cls=OneLineErrorCommand)
@click.option("--links", "show_links", is_flag=True, help="List the interconnects instead of the GPUs.")
@click.option("--sources", "show_sources", is_flag=True, help="Table format: also print every number's source.")
@click.argument("names", nargs=-1)
@hardware_options
@format_option
@bad_input_exits_2
def gpus(show_links: bool, show_sources: bool, names: tuple[str, ...], gpu_spec: str | None,
         catalog_path: str | None, output_format: str) -> None:
    """List the GPU catalog (or only NAMES; aliases and any case accepted). Memory is what the
    driver reports where measured, else the datasheet capacity (nominal); FLOP/s are dense.
    --catalog FILE lists the merged catalog; --gpu-spec lists the GPU it describes (on the one
    NAME when given)."""
    catalog = catalog_from_options(catalog_path)
    if show_links:
        links = list(catalog.links) + (list(gpu_from_options(None, gpu_spec, catalog_path).own_links)
                                       if gpu_spec is not None else [])
        records = [{"name": link.name, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                    "latency_s": link.latency_s, "sources": dict(link.sources)} for link in links]
        table = [{"name": r["name"], "GB/s (one direction)": f"{r['bandwidth_bytes_per_s'] / 1e9:,.2f}",
                  "latency us": f"{r['latency_s'] * 1e6:,.1f}"} for r in records]
    else:
        if gpu_spec is not None:
            if len(names) > 1:
                raise ValueError("--gpu-spec describes one GPU: give at most one NAME to start from")
            chosen = [gpu_from_options(names[0] if names else None, gpu_spec, catalog_path)]
        else:
            chosen = [catalog.gpu(name) for name in names] if names else list(catalog.gpus)
        records = [gpu_record(gpu, catalog) for gpu in chosen]
        table = [gpu_table_row(gpu, catalog) for gpu in chosen]
    if output_format == "json":
        click.echo(json.dumps(records, indent=2))
    elif output_format == "csv":
        click.echo(render_rows([_flat(r) for r in records], "csv"))
    else:
        from ringplan.cli.readable import fitted_table, output_width, wrapped

        width = output_width()
        if not show_links:
            click.echo("GiB: usable, as the driver reports it (nom.: datasheet); TFLOP/s dense; node: GPUs x link")
        click.echo(fitted_table(table, width, droppable=["between nodes", "fp32 TFLOP/s", "aliases"]))
        if show_sources:
            for record in records:
                click.echo(f"\n{record['name']}:")
                for field_name, source in record["sources"].items():
                    for line in wrapped(f"  {field_name}", source, width):
                        click.echo(line)
