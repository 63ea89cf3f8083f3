"""``ringplan models``: the model catalog (profiles/models.json), or a local config.json, with sources."""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import InputFile, OneLineErrorCommand, bad_input_exits_2, format_option, render_rows

_SHAPE_FIELDS = ("n_layers", "embed_dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "ffn_type", "vocab_size",
                 "norm", "position", "max_positions", "tied_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm")


def model_record(spec) -> dict[str, Any]:
    """Machine-readable entry: every ``ModelSpec`` field, parameter counts, and sources."""
    from ringplan.models import embedding_parameter_count, parameter_count

    total = parameter_count(spec)
    return {"name": spec.name, "aliases": list(spec.aliases), **{f: getattr(spec, f) for f in _SHAPE_FIELDS},
            "parameter_count": total, "non_embedding_parameter_count": total - embedding_parameter_count(spec),
            "sources": dict(spec.sources)}


def model_table_row(spec) -> dict[str, str]:
    """Human row: shape in one line per model, parameters in billions."""
    from ringplan.models import parameter_count

    extras = [x for x, on in (("tied", spec.tied_embeddings), ("qk-norm", spec.qk_norm),
                              ("biases", spec.qkv_bias or spec.mlp_bias)) if on]
    positions = f" {spec.max_positions // 1024}K" if spec.max_positions >= 1024 else ""
    return {"name": spec.name, "params B": f"{parameter_count(spec) / 1e9:,.2f}", "L": str(spec.n_layers),
            "E": f"{spec.embed_dim:,}", "H/H_kv x D": f"{spec.n_heads}/{spec.n_kv_heads} x {spec.head_dim}",
            "FFN": f"{spec.ffn_dim:,} {spec.ffn_type}", "vocab": f"{spec.vocab_size:,}",
            "positions": f"{spec.position}{positions}", "other": ", ".join(extras + [spec.norm])}


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """CSV row: sources dropped, aliases joined."""
    return {k: (" ".join(v) if k == "aliases" else v) for k, v in record.items() if k != "sources"}


@click.command("models", cls=OneLineErrorCommand)
@click.argument("names", nargs=-1)
@click.option("--config", "config_path", type=InputFile(), default=None, metavar="PATH",
              help="Show the model a local Hugging Face config.json describes instead of the catalog.")
@click.option("--sources", "show_sources", is_flag=True,
              help="Table format: also print aliases and every field's source (always on with NAMES).")
@format_option
@bad_input_exits_2
def models(names: tuple[str, ...], config_path: str | None, show_sources: bool, output_format: str) -> None:
    """List the model catalog (or only NAMES; aliases and any case accepted): layers, hidden size,
    heads / KV heads, head dim, FFN width and type, vocabulary, norm, and the parameter count."""
    from ringplan.models import load_model_catalog, model_from_hf_config

    if config_path is not None and names:
        raise ValueError("give model NAMES or --config PATH, not both")
    if config_path is not None:
        chosen = [model_from_hf_config(config_path)]
    else:
        catalog = load_model_catalog()
        chosen = [catalog.model(name) for name in names] if names else list(catalog.models)
    records = [model_record(spec) for spec in chosen]
    if output_format == "json":
        click.echo(json.dumps(records, indent=2))
    elif output_format == "csv":
        click.echo(render_rows([_flat(r) for r in records], "csv"))
    else:
        from ringplan.cli.readable import fitted_table, output_width, wrapped

        width = output_width()
        click.echo(fitted_table([model_table_row(spec) for spec in chosen], width, droppable=["positions", "other"]))
        if show_sources or names or config_path:
            for record in records:
                click.echo(f"\n{record['name']}:")
                if record["aliases"]:
                    for line in wrapped("  aliases", ", ".join(record["aliases"]), width):
                        click.echo(line)
                click.echo(f"  non-embedding parameters: {record['non_embedding_parameter_count'] / 1e9:,.3f} B")
                for field_name, source in record["sources"].items():
                    for line in wrapped(f"  {field_name}", source, width):
                        click.echo(line)
