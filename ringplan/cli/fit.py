"""``ringplan fit``: memory-model fits of profile files — coefficients, residuals — and the fit cache."""

from __future__ import annotations

import json
from typing import Any

import click

from ringplan.cli.common import (FiniteFloat, InputFile, OneLineErrorCommand, bad_input_exits_2, format_option,
                                 render_rows)

MB = 10**6
#: Where each measured figure is in a ``MemoryPrediction``.
PREDICTED = {"peak_allocated_bytes": "peak_allocated_bytes", "peak_reserved_bytes": "peak_reserved_bytes",
             "device_used_bytes": "total_bytes"}


def seed_record(fit, profile: str) -> dict[str, Any]:
    """One seed-form fit: MB per token, overhead MB, R², worst residual, range."""
    lo, hi = fit.stats.tokens_per_rank_range
    return {"profile": profile, "form": "seed", "gpu": fit.gpu, "target": fit.target, "points": fit.stats.n_points,
            "mb_per_token": fit.mb_per_token, "overhead_mb": fit.overhead_mb, "r_squared": fit.stats.r_squared,
            "max_abs_relative_residual": max(abs(r) for r in fit.stats.relative_residuals),
            "relative_uncertainty": fit.stats.relative_uncertainty, "tokens_per_rank_min": lo,
            "tokens_per_rank_max": hi}


def theta_record(fit, profile: str, active_terms: list[str]) -> dict[str, Any]:
    """One free-θ fit (diagnostic): constant, θ of the terms the data exercise, R², worst residual."""
    lo, hi = fit.stats.tokens_per_rank_range
    record = {"profile": profile, "form": "theta", "gpu": fit.gpu, "family": fit.family, "target": fit.target,
              "points": fit.stats.n_points, "constant_mb": fit.constant_bytes / MB, "r_squared": fit.stats.r_squared,
              "max_abs_relative_residual": max(abs(r) for r in fit.stats.relative_residuals),
              "relative_uncertainty": fit.stats.relative_uncertainty, "tokens_per_rank_min": lo,
              "tokens_per_rank_max": hi}
    record.update({f"theta_{name.removesuffix('_bytes')}": fit.coefficients[name] for name in active_terms})
    return record


def part_record(fit, profile: str) -> dict[str, Any]:
    """One calibrated part (workspace / slack / overhead): coefficients (bytes, or bytes per byte of
    feature), points, residuals relative to the part's figure, range, rows of an older runtime."""
    from ringplan.memory.part_fit import relative_residual_summary

    median, worst = relative_residual_summary(fit)
    lo, hi = fit.tokens_per_rank_range
    record = {"profile": profile, "form": "analytic", "gpu": fit.gpu, "part": fit.part, "family": fit.family,
              "points": fit.n_points, "median_abs_relative_residual": median, "max_abs_relative_residual": worst,
              "max_abs_residual_mb": fit.max_abs_residual_bytes / MB, "tokens_per_rank_min": lo,
              "tokens_per_rank_max": hi, "ring_sizes": ",".join(map(str, fit.ring_sizes)),
              "stale_rows": fit.stale_rows}
    record.update({f"c_{name}": value for name, value in fit.coefficients.items()})
    return record


def calibrated_records(calibrations: dict, profile: str) -> list[dict[str, Any]]:
    records = []
    for calibration in calibrations.values():
        parts = [*calibration.workspace.values(), *calibration.slack.values(),
                 *([calibration.overhead] if calibration.overhead else [])]
        records += [part_record(fit, profile) for fit in parts]
    return records


def _groups(rows, key) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.gpu, key(row)), []).append(row)
    return groups


def _fit_profile(name: str, all_rows, form: str, target: str | None, kinds: tuple[str, ...], prior_weight: float,
                 series: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fits and per-point residuals of one profile's rows (seed and free-θ: one per GPU and shape group)."""
    from ringplan.memory.attention_fits import fit_rows, fit_seed_form, row_family, seed_shape_key

    rows = [r for r in all_rows if series is None or r.series == series]
    if not rows:
        raise ValueError(f"{name}: no rows" + (f" in series {series!r}" if series else ""))
    fits, points = [], []
    if form in ("seed", "both"):
        for group in _groups(rows, seed_shape_key).values():
            fit = fit_seed_form(group, target=target, source=name)
            fits.append(seed_record(fit, name))
            _, used = fit_rows(group, fit.target)
            points += [_point(name, "seed", r, fit.target, getattr(r, fit.target), fit.predict_bytes(r.tokens_per_rank))
                       for r in used]
    if form in ("analytic", "both"):
        more_fits, more_points = _calibrated(rows, name)
        fits += more_fits
        points += more_points
    if form == "theta":
        for group in _groups(rows, row_family).values():
            more_fits, more_points = _theta(group, target, kinds, prior_weight, name)
            fits += more_fits
            points += more_points
    return fits, points


def _calibrated(rows, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Calibrated parts of the rows (this runtime's measurements only, as the planner fits them),
    and each such row's device used (else the best figure it has) predicted as it ran."""
    from ringplan.hardware import load_catalog
    from ringplan.memory.calibration import fit_calibrations
    from ringplan.memory.part_fit import CALIBRATION_KINDS
    from ringplan.memory.attention_model import MemoryModel

    calibrations = fit_calibrations(rows, source=name)
    model = MemoryModel(calibrations=calibrations)
    catalog, points = load_catalog(), []
    for row in rows:
        figure = next((f for f in PREDICTED if getattr(row, f) is not None), None)
        if row.oom or row.kind not in CALIBRATION_KINDS or figure is None or row.gpu not in calibrations:
            continue
        predicted = getattr(model.predict_row(row, catalog.gpu(row.gpu)), PREDICTED[figure])
        if predicted is not None:
            points.append(_point(name, "analytic", row, figure, getattr(row, figure), predicted))
    return calibrated_records(calibrations, name), points


def _theta(group, target: str | None, kinds: tuple[str, ...], prior_weight: float,
           name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from ringplan.memory.attention_fits import fit_memory_model, fit_rows, row_inputs
    from ringplan.memory.attention_terms import TERM_NAMES, terms_at

    fit = fit_memory_model(group, target=target, kinds=kinds, prior_weight=prior_weight, source=name)
    _, used = fit_rows(group, fit.target, kinds)
    phis = [terms_at(row_inputs(r)) for r in used]
    active = [t for t in TERM_NAMES if any(phi[t] for phi in phis)]
    points = [_point(name, "theta", r, fit.target, getattr(r, fit.target), fit.predict_bytes(phi))
              for r, phi in zip(used, phis)]
    return [theta_record(fit, name, active)], points


def _point(profile: str, form: str, row, figure: str, observed: float, predicted: float) -> dict[str, Any]:
    return {"profile": profile, "form": form, "gpu": row.gpu, "seq_len_tokens": row.seq_len_tokens,
            "ring_size": row.ring_size, "tokens_per_rank": row.tokens_per_rank, "kind": row.kind, "figure": figure,
            "observed_mb": observed / MB, "predicted_mb": predicted / MB, "residual_mb": (observed - predicted) / MB,
            "relative_residual": (observed - predicted) / observed}


@click.command("fit", cls=OneLineErrorCommand)
@click.argument("profile_paths", nargs=-1, type=InputFile())
@click.option("--form", type=click.Choice(["seed", "analytic", "both", "theta"]), default="both", show_default=True,
              help="seed: MB-per-token + overhead; analytic: the calibrated parts (workspace, allocator slack, "
                   "memory outside the allocator) over the byte terms; both; theta: free coefficients per term "
                   "(a diagnostic: near 1 when a term's formula is right).")
@click.option("--target", type=click.Choice(["auto", "device_used_bytes", "peak_reserved_bytes",
                                             "peak_allocated_bytes", "tracked_peak_bytes"]),
              default="auto", show_default=True,
              help="Seed and theta forms: memory figure to fit (auto: the first one the rows have).")
@click.option("--series", default=None, help="Fit only the rows of this series (e.g. memory-scaling).")
@click.option("--include-estimated", is_flag=True, help="Also fit rows of kind 'estimated' (formula outputs).")
@click.option("--prior-weight", type=FiniteFloat(min=0.0), default=1e-3, show_default=True,
              help="Theta form: weight of the prior pulling each coefficient to 1.")
@click.option("--residuals", "show_residuals", is_flag=True, help="Table format: also list every point's residual.")
@click.option("--write", "write_cache", is_flag=True,
              help="Fit every profile in profiles/measured and write profiles/fitted/memory-fit.json, the fit "
                   "the planner loads at start (takes no PROFILE).")
@format_option
@bad_input_exits_2
def fit(profile_paths: tuple[str, ...], form: str, target: str, series: str | None, include_estimated: bool,
        prior_weight: float, show_residuals: bool, write_cache: bool, output_format: str) -> None:
    """Fit the memory model on each PROFILE file (default: every file in profiles/measured together,
    as the planner does) and report coefficients and residuals; --write stores the planner's fit."""
    from ringplan.memory.attention_fits import FIT_KINDS

    if write_cache:
        _write(profile_paths, output_format)
        return
    kinds = FIT_KINDS + (("estimated",) if include_estimated else ())
    fits, points = [], []
    for name, rows in _inputs(profile_paths):
        more_fits, more_points = _fit_profile(name, rows, form, None if target == "auto" else target, kinds,
                                              prior_weight, series)
        fits += more_fits
        points += more_points
    _emit(fits, points, form, show_residuals, output_format)


def _inputs(paths: tuple[str, ...]) -> list[tuple[str, tuple]]:
    """(name, rows) per PROFILE file, or one pooled entry for every file in profiles/measured."""
    from ringplan.paths import measured_dir
    from ringplan.profiles.attention import load_profile, load_profiles

    if paths:
        return [(path, load_profile(path).rows) for path in paths]
    rows = tuple(row for profile in load_profiles() for row in profile.rows)
    if not rows:
        raise ValueError(f"no profile files given and none in {measured_dir()}")
    return [("profiles/measured", rows)]


def _write(paths: tuple[str, ...], output_format: str) -> None:
    from ringplan.memory.attention_model import MEMORY_FIT
    from ringplan.memory.fit_cache import write_fit
    from ringplan.memory.part_fit import calibration_from_json
    from ringplan.memory.stack_model import STACK_FIT

    if paths:
        raise ValueError(f"--write fits every profile in profiles/measured; it takes no PROFILE (got {list(paths)})")
    payload = write_fit(MEMORY_FIT)
    stack = write_fit(STACK_FIT)
    click.echo(f"wrote {STACK_FIT.path()} ({len(stack['inputs']['profiles'])} stack profiles, "
               f"{len(stack['calibrations'])} GPU(s))", err=True)
    calibrations = {gpu: calibration_from_json(raw) for gpu, raw in payload["calibrations"].items()}
    if output_format == "json":
        click.echo(json.dumps({"path": str(MEMORY_FIT.path()), **payload}, indent=2))
        return
    records = calibrated_records(calibrations, "profiles/measured")
    if output_format == "csv":
        click.echo(render_rows(_uniform(records), "csv"))
        return
    click.echo(f"wrote {MEMORY_FIT.path()} ({len(payload['inputs']['profiles'])} profiles, "
               f"{len(calibrations)} GPU(s))")
    _echo_compact(records)


def _emit(fits: list[dict[str, Any]], points: list[dict[str, Any]], form: str, show_residuals: bool,
          output_format: str) -> None:
    if output_format == "json":
        click.echo(json.dumps({"fits": fits, "points": points}, indent=2))
    elif output_format == "csv":
        click.echo(render_rows(_uniform(fits), "csv"))
    else:
        from ringplan.cli.readable import echo_lines, output_width

        for chosen in ("seed", "analytic", "theta"):
            records = [r for r in fits if r["form"] == chosen]
            if records:
                profiles = ", ".join(dict.fromkeys(r["profile"] for r in records))
                worst = max(r["max_abs_relative_residual"] for r in records)
                echo_lines([(f"{chosen} form", f"{len(records)} fit(s), worst point {worst:.1%} off; "
                                               f"profile(s): {profiles}")], output_width())
                _echo_compact(records)
            elif chosen == "analytic" and form in ("analytic", "both"):
                echo_lines([("analytic form", "no rows of kind 'measured' to calibrate (reported and estimated "
                                              "rows are another implementation's figures)")], output_width())
        if show_residuals:
            from ringplan.cli.readable import fitted_table, output_width

            click.echo("residuals (observed - predicted):")
            first = ("gpu", "tokens_per_rank", "ring_size", "observed_mb", "predicted_mb", "residual_mb",
                     "relative_residual")
            rows = [{k: _pretty(p)[k] for k in first + tuple(k for k in p if k not in first + ("profile",))}
                    for p in points]
            click.echo(fitted_table(rows, output_width(), droppable=list(rows[0])[5:] if rows else []))


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


#: Short column names of the compact fit tables (the JSON keeps the long ones).
_SHORT = {"points": "n", "mb_per_token": "MB/token", "overhead_mb": "overhead MB", "r_squared": "R²",
          "max_abs_relative_residual": "worst", "median_abs_relative_residual": "median",
          "relative_uncertainty": "±", "constant_mb": "const MB", "max_abs_residual_mb": "worst MB",
          "ring_sizes": "rings", "stale_rows": "stale"}


def _echo_compact(records: list[dict[str, Any]]) -> None:
    """One fit table within the terminal's width: no profile or form column, the token range in one
    column, short names; the rightmost columns (θ, coefficients) are left out when too wide."""
    from ringplan.cli.readable import fitted_table, output_width

    rows = []
    for record in _uniform(records):
        row = {}
        for key, value in record.items():
            if key in ("profile", "form", "tokens_per_rank_max"):
                continue
            if key == "tokens_per_rank_min":
                row["tokens/GPU"] = f"{value:,.0f}-{record['tokens_per_rank_max']:,.0f}"
            elif key in ("max_abs_relative_residual", "median_abs_relative_residual", "relative_uncertainty"):
                row[_SHORT[key]] = "-" if value is None else f"{value:.2%}"
            else:
                row[_SHORT.get(key, key.removeprefix("theta_").removeprefix("c_"))] = _pretty({key: value})[key]
        rows.append(row)
    click.echo(fitted_table(rows, output_width(), droppable=list(rows[0])[6:] if rows else []))
