"""ringplan's published prediction error: fit on part of the measured rows, predict the rest.

Run (after committing the GPU run's profiles, see ``benchmarks/gpu_sweep.py``)::

    python benchmarks/accuracy_report.py                      # profiles/measured + profiles/emulated
    python benchmarks/accuracy_report.py --profiles A.json B.json --out /tmp/accuracy

Three checks, each a table of median and max |error| (error = (predicted − measured) / measured):

1. **Held-out points** — per GPU and shape family (``ringplan.memory.attention_model.row_family``), the
   non-OOM rows of each series (same shape, mode and ring, rising tokens) are split: every other
   row (the 2nd, 4th, …) is held out, the analytic model is fitted on the rest for each figure
   (peak allocated, peak reserved, device used) and predicts the held-out rows. Rows of the
   bisection files (OOM-boundary probes) are never fitted on.
2. **Across GPUs** — fit on every h100 row of a family, predict the h200 rows of that family (only
   when h200 rows exist).
3. **Capacity vs the bisected boundary** — for each bisection series (feasible and OOM probes of one
   shape and ring), the measured boundary is the largest feasible length below the smallest OOM;
   ``ringplan.capacity.attention.max_tokens`` predicts it from a model fitted on the non-bisection measured
   rows (not the seed's reported ones; an emulated GPU's prediction is transferred), at safety
   margin 0 and at the CLI default 0.05. "never above" must hold: a plan called feasible must run
   ("unresolved" when the prediction falls between the last length that ran and the first OOM).

Writes ``OUT/accuracy.md`` and ``OUT/accuracy.json`` (default OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ringplan.memory.attention_fits import row_family  # noqa: E402
from ringplan.memory.attention_model import MemoryModel  # noqa: E402
from ringplan.profiles.attention import Measurement, load_profile  # noqa: E402

FIGURES = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes")
MARGINS = (0.0, 0.05)


def series_key(row: Measurement) -> tuple:
    """A row's series: everything but the sequence length (the series name keeps apart one GPU
    emulated on different host GPUs)."""
    return (row.gpu, row.series, row.ring_size, row.layout, row.backend, row.batch, row.n_heads, row.n_kv_heads,
            row.head_dim, row.embed_dim, row.dtype, row.causal, row.segment_lengths_tokens, row.dilation_rates,
            row.training, row.projections)


def split_held_out(rows: Sequence, key=None) -> tuple[list, list]:
    """(fit rows, held-out rows): within each series (``key``, default ``series_key``) sorted by
    tokens, the 2nd, 4th, … are held out."""
    key = key or series_key
    series: dict[tuple, list] = defaultdict(list)
    for row in rows:
        series[key(row)].append(row)
    fit, held = [], []
    for members in series.values():
        members.sort(key=lambda r: r.seq_len_tokens)
        fit += members[0::2]
        held += members[1::2]
    return fit, held


def error_stats(errors: Sequence[float]) -> dict[str, float | int | None]:
    """Median and max of |error| over the points (None without points)."""
    magnitudes = [abs(e) for e in errors]
    return {"points": len(magnitudes), "median_abs_error": statistics.median(magnitudes) if magnitudes else None,
            "max_abs_error": max(magnitudes) if magnitudes else None}


#: Where each measured figure is in a ``MemoryPrediction``.
PREDICTED = {"peak_allocated_bytes": "peak_allocated_bytes", "peak_reserved_bytes": "peak_reserved_bytes",
             "device_used_bytes": "total_bytes"}


def prediction_errors(fit_rows: Sequence[Measurement], test_rows: Sequence[Measurement], figure: str) -> list[float]:
    """Relative errors for ``figure`` of the planner's (calibrated analytic) model fitted on ``fit_rows``."""
    from ringplan.hardware import load_catalog

    tests = [r for r in test_rows if getattr(r, figure) is not None]
    if not fit_rows or not tests:
        return []
    model, catalog = MemoryModel(rows=tuple((r, "fit") for r in fit_rows)), load_catalog()
    predicted = [getattr(model.predict_row(r, catalog.gpu(r.gpu)), PREDICTED[figure]) for r in tests]
    return [(p - getattr(r, figure)) / getattr(r, figure) for p, r in zip(predicted, tests) if p is not None]


def grouped(rows: Sequence[Measurement]) -> dict[tuple[str, str], list[Measurement]]:
    groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for row in rows:
        if not row.oom and row.kind == "measured":
            groups[(row.gpu, row_family(row))].append(row)
    return groups


def held_out_table(rows: Sequence[Measurement]) -> list[dict]:
    """Check 1: one line per (GPU, family, figure), then one per (GPU, figure) over every family."""
    lines, pooled = [], defaultdict(list)
    for (gpu, family), members in sorted(grouped(rows).items()):
        fit, held = split_held_out(members)
        for figure in FIGURES:
            errors = prediction_errors(fit, held, figure)
            pooled[(gpu, figure)] += errors
            stats = error_stats(errors)
            if stats["points"]:
                lines.append({"check": "held-out points", "gpu": gpu, "family": family, "figure": figure,
                              "fit_points": len(fit), **stats})
    for (gpu, figure), errors in sorted(pooled.items()):
        if errors:
            lines.append({"check": "held-out points, all families", "gpu": gpu, "family": "all", "figure": figure,
                          "fit_points": None, **error_stats(errors)})
    return lines


def across_gpus_table(rows: Sequence[Measurement], source: str = "h100-80gb-sxm", target: str = "h200") -> list[dict]:
    """Check 2: fitted on ``source`` rows, predicting ``target`` rows of the same family."""
    groups, lines = grouped(rows), []
    for (gpu, family), members in sorted(groups.items()):
        if gpu != target or (source, family) not in groups:
            continue
        for figure in FIGURES:
            stats = error_stats(prediction_errors(groups[(source, family)], members, figure))
            if stats["points"]:
                lines.append({"check": f"fit {source} → predict {target}", "gpu": target, "family": family,
                              "figure": figure, "fit_points": len(groups[(source, family)]), **stats})
    return lines




def measured_boundary(probes: Sequence[Measurement]) -> tuple[int | None, int | None]:
    """(largest feasible length below the smallest OOM, that smallest OOM length)."""
    first_oom = min((r.seq_len_tokens for r in probes if r.oom), default=None)
    runs = [r.seq_len_tokens for r in probes if not r.oom and (first_oom is None or r.seq_len_tokens < first_oom)]
    return (max(runs) if runs else None), first_oom


def never_above(predicted: int | None, boundary: int, first_oom: int) -> bool | str | None:
    """True when the predicted maximum is a length that ran (≤ the measured boundary), False when it
    is a length that ran out of memory (≥ the first OOM), "unresolved" in between (no probe there)."""
    if predicted is None:
        return None
    if predicted <= boundary:
        return True
    return False if predicted >= first_oom else "unresolved"


def capacity_table(fit_rows: Sequence[Measurement], bisect_rows: Sequence[Measurement],
                   emulated_on: str = "h100-80gb-sxm") -> list[dict]:
    """Check 3: one line per bisection series and safety margin."""
    from ringplan.capacity.attention import CapacityQuery, max_tokens
    from ringplan.hardware import load_catalog

    catalog = load_catalog()
    model = MemoryModel(rows=tuple((r, "fit") for r in fit_rows if not r.oom and r.kind == "measured"))
    series: dict[tuple, list[Measurement]] = defaultdict(list)
    for row in bisect_rows:
        series[series_key(row)].append(row)
    lines = []
    for key, probes in sorted(series.items(), key=lambda item: str(item[0])):
        boundary, first_oom = measured_boundary(probes)
        if boundary is None or first_oom is None:
            continue
        workload, layout = probes[0].workload_and_layout()
        gpu = catalog.gpu(probes[0].gpu)
        for margin in MARGINS:
            query = CapacityQuery(workload=workload, layout=layout.layout, backend=layout.backend, gpu=gpu,
                                  safety_margin=margin, model=model)
            best = max_tokens(query, layout.ring_size).best
            predicted = best.seq_len_tokens if best else None
            lines.append({"check": "capacity vs bisected boundary", "gpu": gpu.name, "ring_size": layout.ring_size,
                          "family": row_family(probes[0]), "shape": f"{workload.shape.n_heads}/{workload.shape.n_kv_heads}"
                          f"x{workload.shape.head_dim}", "safety_margin": margin, "predicted_max_tokens": predicted,
                          "measured_max_tokens": boundary, "first_oom_tokens": first_oom,
                          "error": None if predicted is None else (predicted - boundary) / boundary,
                          "never_above": never_above(predicted, boundary, first_oom),
                          "provenance": best.prediction.provenance if best else None})
    return lines


def load_rows(paths: Sequence[Path]) -> tuple[list[Measurement], list[Measurement]]:
    """(profile rows, bisection rows): files with ``bisect`` in their name hold OOM-boundary probes."""
    profile_rows, bisect_rows = [], []
    for path in paths:
        rows = list(load_profile(path).rows)
        (bisect_rows if "bisect" in path.name else profile_rows).extend(rows)
    return profile_rows, bisect_rows


def markdown(memory: Sequence[dict], capacity: Sequence[dict]) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    def tokens(value):
        return "-" if value is None else f"{value:,}"

    lines = ["| check | GPU | family | figure | fit points | held-out points | median abs error | max abs error |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['check']} | {m['gpu']} | {m['family']} | {m['figure']} | {m['fit_points'] or '-'} | {m['points']} | "
              f"{pct(m['median_abs_error'])} | {pct(m['max_abs_error'])} |" for m in memory]
    lines += ["", "| GPU | ring | family | shape | margin | predicted max tokens | measured max tokens | first OOM | "
              "error | never above | prediction |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['gpu']} | {c['ring_size']} | {c['family']} | {c['shape']} | {c['safety_margin']:.2f} | "
              f"{tokens(c['predicted_max_tokens'])} | {tokens(c['measured_max_tokens'])} | {tokens(c['first_oom_tokens'])} | "
              f"{pct(c['error'])} | {c['never_above']} | {c['provenance']} |" for c in capacity]
    return "\n".join(lines) + "\n"


def report(paths: Sequence[Path], out: Path) -> dict:
    profile_rows, bisect_rows = load_rows(paths)
    memory = held_out_table(profile_rows) + across_gpus_table(profile_rows)
    capacity = capacity_table(profile_rows, bisect_rows)
    payload = {"profiles": [str(p) for p in paths], "memory": memory, "capacity": capacity}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(memory, capacity))
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="*", type=Path, default=None,
                        help="Profile files (default: profiles/measured/*.json and profiles/emulated/*.json).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    paths = args.profiles if args.profiles else sorted((REPO / "profiles" / "measured").glob("*.json")) + \
        sorted((REPO / "profiles" / "emulated").glob("*.json"))
    payload = report(paths, args.out)
    print((args.out / "accuracy.md").read_text())
    return 0 if payload["memory"] or payload["capacity"] else 1


if __name__ == "__main__":
    sys.exit(main())
