"""``ringplan fit``: memory-model coefficients, R² and residuals of profile files."""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import OneLineErrorCommand, bad_input_exits_2, format_option, render_rows

MB = 10**6


def seed_record(fit, profile: str) -> dict[str, Any]:
    """One seed-form fit: MB per token, overhead MB, R², worst residual, range."""
    lo, hi = fit.stats.tokens_per_rank_range
    return {"profile": profile, "form": "seed", "gpu": fit.gpu, "target": fit.target, "points": fit.stats.n_points,
            "mb_per_token": fit.mb_per_token, "overhead_mb": fit.overhead_mb, "r_squared": fit.stats.r_squared,
            "max_abs_relative_residual": max(abs(r) for r in fit.stats.relative_residuals),
            "relative_uncertainty": fit.stats.relative_uncertainty, "tokens_per_rank_min": lo, "tokens_per_rank_max": hi}


def analytic_record(fit, profile: str, active_terms: list[str]) -> dict[str, Any]:
    """One analytic fit: constant, θ of the terms the data exercise, R², worst residual."""
    lo, hi = fit.stats.tokens_per_rank_range
    record = {"profile": profile, "form": "analytic", "gpu": fit.gpu, "family": fit.family, "target": fit.target,
              "points": fit.stats.n_points, "constant_mb": fit.constant_bytes / MB, "r_squared": fit.stats.r_squared,
              "max_abs_relative_residual": max(abs(r) for r in fit.stats.relative_residuals),
              "relative_uncertainty": fit.stats.relative_uncertainty, "tokens_per_rank_min": lo,
              "tokens_per_rank_max": hi}
    record.update({f"theta_{name.removesuffix('_bytes')}": fit.coefficients[name] for name in active_terms})
    return record


def _groups(rows, by_family: bool) -> dict[tuple, list]:
    from ringplan.memory_model import row_family, seed_shape_key

    groups: dict[tuple, list] = {}
    for row in rows:
        key = (row.gpu, row_family(row)) if by_family else (row.gpu, seed_shape_key(row))
        groups.setdefault(key, []).append(row)
    return groups


def _fit_profile(profile, form: str, target: str | None, kinds: tuple[str, ...], prior_weight: float,
                 series: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fits and per-point residuals for one profile (one fit per GPU and shape group)."""
    from ringplan.memory_model import fit_memory_model, fit_rows, fit_seed_form, row_inputs
    from ringplan.memory_terms import TERM_NAMES, terms_at

    rows = [r for r in profile.rows if series is None or r.series == series]
    if not rows:
        raise ValueError(f"{profile.path}: no rows" + (f" in series {series!r}" if series else ""))
    fits, points = [], []
    name = profile.path or "<profile>"
    if form in ("seed", "both"):
        for group in _groups(rows, by_family=False).values():
            fit = fit_seed_form(group, target=target, source=name)
            fits.append(seed_record(fit, name))
            _, used = fit_rows(group, fit.target)
            points += [_point(name, "seed", r, getattr(r, fit.target), fit.predict_bytes(r.tokens_per_rank)) for r in used]
    if form in ("analytic", "both"):
        for group in _groups(rows, by_family=True).values():
            fit = fit_memory_model(group, target=target, kinds=kinds, prior_weight=prior_weight, source=name)
            _, used = fit_rows(group, fit.target, kinds)
            phis = [terms_at(row_inputs(r)) for r in used]
            active = [t for t in TERM_NAMES if any(phi[t] for phi in phis)]
            fits.append(analytic_record(fit, name, active))
            points += [_point(name, "analytic", r, getattr(r, fit.target), fit.predict_bytes(phi))
                       for r, phi in zip(used, phis)]
    return fits, points


def _point(profile: str, form: str, row, observed: float, predicted: float) -> dict[str, Any]:
    return {"profile": profile, "form": form, "gpu": row.gpu, "seq_len_tokens": row.seq_len_tokens,
            "ring_size": row.ring_size, "tokens_per_rank": row.tokens_per_rank, "kind": row.kind,
            "observed_mb": observed / MB, "predicted_mb": predicted / MB, "residual_mb": (observed - predicted) / MB,
            "relative_residual": (observed - predicted) / observed}


@click.command("fit", cls=OneLineErrorCommand)
@click.argument("profile_paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--form", type=click.Choice(["seed", "analytic", "both"]), default="both", show_default=True,
              help="seed: MB-per-token + overhead per profile; analytic: named terms x fitted coefficients.")
@click.option("--target", type=click.Choice(["auto", "device_used_bytes", "peak_reserved_bytes",
                                             "peak_allocated_bytes", "tracked_peak_bytes"]),
              default="auto", show_default=True, help="Memory figure to fit (auto: the first one the rows have).")
@click.option("--series", default=None, help="Fit only the rows of this series (e.g. memory-scaling).")
@click.option("--include-estimated", is_flag=True, help="Also fit rows of kind 'estimated' (formula outputs).")
@click.option("--prior-weight", type=click.FloatRange(min=0.0), default=1e-3, show_default=True,
              help="Analytic form: weight of the prior pulling each coefficient to 1.")
@click.option("--residuals", "show_residuals", is_flag=True, help="Table format: also list every point's residual.")
@format_option
@bad_input_exits_2
def fit(profile_paths: tuple[str, ...], form: str, target: str, series: str | None, include_estimated: bool,
        prior_weight: float, show_residuals: bool, output_format: str) -> None:
    """Fit the memory model on PROFILE files and report coefficients, R² and residuals."""
    from ringplan.memory_model import FIT_KINDS
    from ringplan.profiles import load_profile

    kinds = FIT_KINDS + (("estimated",) if include_estimated else ())
    fits, points = [], []
    for path in profile_paths:
        more_fits, more_points = _fit_profile(load_profile(path), form, None if target == "auto" else target,
                                              kinds, prior_weight, series)
        fits += more_fits
        points += more_points
    if output_format == "json":
        click.echo(json.dumps({"fits": fits, "points": points}, indent=2))
    elif output_format == "csv":
        click.echo(render_rows(_uniform(fits), "csv"))
    else:
        for chosen in ("seed", "analytic"):
            records = [r for r in fits if r["form"] == chosen]
            if records:
                click.echo(f"{chosen} form:")
                click.echo(render_rows([_pretty(r) for r in _uniform(records)], "table"))
        if show_residuals:
            click.echo("residuals (observed - predicted):")
            click.echo(render_rows([_pretty(p) for p in points], "table"))


def _uniform(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same keys in every record (missing → None), in first-seen order."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    return [{k: record.get(k) for k in keys} for record in records]


def _pretty(record: dict[str, Any]) -> dict[str, str]:
    def show(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    return {k: show(v) for k, v in record.items()}
