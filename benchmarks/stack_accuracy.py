"""ringplan's whole-model prediction error: memory held out, step time, and capacity against OOM.

Run (CPU is enough; reads only committed files)::

    python benchmarks/stack_accuracy.py                         # profiles/measured/stack/*.json
    python benchmarks/stack_accuracy.py --profiles A.json B.json --out /tmp/stack_accuracy

Three checks over the measured rows of ``ringplan.stack/1`` profiles (error = (predicted − measured)
/ measured):

1. **Memory, held out** — per GPU, the feasible rows of each series (one model shape, GPUs, ring,
   layout, settings and mode; rising tokens; ``series_key``) are split as
   ``benchmarks/accuracy_report.py`` splits attention rows: the 2nd, 4th, … row of each series is
   held out (deterministic; every configuration measured at two lengths gives one row to each
   half), the whole-model memory model (``ringplan.memory.stack_model``: stack terms + workspace, slack at
   rest, fragmentation reserve and outside-allocator parts fitted per GPU) is fitted on the rest and
   predicts the held-out rows' peak allocated bytes and device used at rest
   (``device_used_at_rest_bytes``). Series of one row are fitted on only.
   **Pressure rows** (peak allocated > ``PRESSURE_FRACTION`` of usable memory: runs at the capacity
   boundary, where the allocator gave cached blocks back) are what the need is about: for each, the
   need (``total_bytes`` = allocated + reserve + outside) against its measured device used, from a
   model fitted on every other feasible row (the reserve then comes from the other pressure rows).
2. **Step time** — ``ringplan.time.stack_time.step_time`` for every feasible row with a step time. Its
   inputs are the timing profiles (GEMMs, attention kernels, links), never these rows; the host
   launch cost per kernel is a stated public figure (``ringplan.time.host_launches``). Only the
   allocator-retry fraction of pressure rows (predicted peak allocated > ``PRESSURE_FRACTION``, judged
   by the memory model fitted on the fit half) is fitted, on the fit half's pressure rows: the
   summary gives the held-out half apart (``step_time_s (held-out half)``).
3. **Capacity vs OOM** — a memory model fitted on every feasible row judges every row as
   ``ringplan capacity --model`` does (feasible when the prediction + its residual bound fits the
   usable memory × (1 − margin)), at margins 0 and 0.05: a row that ran out of memory must be
   judged infeasible (else capacity is over-predicted); a row that ran should be judged feasible
   (else capacity is under-predicted). Both directions are counted.

Writes ``OUT/stack_accuracy.md`` and ``OUT/stack_accuracy.json`` (default OUT: benchmarks/results).
Exit code 0, or 1 when there are no rows, or when an OOM row is judged feasible at margin 0.05.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy_report import MARGINS, error_stats  # noqa: E402
from accuracy_report import split_held_out as split_series  # noqa: E402

from ringplan.hardware import load_catalog  # noqa: E402
from ringplan.memory.stack_model import PRESSURE_FRACTION  # noqa: E402
from ringplan.paths import stack_profiles_dir  # noqa: E402
from ringplan.profiles.stack import StackMeasurement, load_stack_profile  # noqa: E402

#: figure name → (measured attribute of the row, predicted attribute of the MemoryPrediction)
MEMORY_FIGURES = {"peak allocated": ("peak_allocated_bytes", "peak_allocated_bytes"),
                  "device used at rest": ("device_used_bytes", "device_used_at_rest_bytes")}
NEED_FIGURE = "need vs device used (pressure rows, row left out)"
GIB = 2**30


def series_key(row: StackMeasurement) -> tuple:
    """Everything but the sequence length (the series name keeps emulations on different hosts apart)."""
    return (row.gpu, row.series, row.model, row.batch, row.world_size, row.ring_size, row.layout, row.backend,
            row.training, row.settings)


def split_held_out(rows: Sequence[StackMeasurement]) -> tuple[list[StackMeasurement], list[StackMeasurement]]:
    """(fit rows, held-out rows): in each series sorted by tokens, the 2nd, 4th, … are held out
    (``accuracy_report``'s split over this file's ``series_key``)."""
    return split_series(rows, key=series_key)


def config_label(row: StackMeasurement) -> str:
    """``llama-3-8b@8L S=65,536 W=2 P=2 train zero3/full chunked``."""
    s = row.settings
    ckpt = s.checkpointing + ("+offload" if s.offload_checkpoints else "")
    batch = f" B={row.batch}" if row.batch != 1 else ""
    return (f"{row.model.name} S={row.seq_len_tokens:,}{batch} W={row.world_size} P={row.ring_size} "
            f"{'train' if row.training else 'prefill'} {s.sharding}/{ckpt} {s.loss}")


def fitted_model(rows: Sequence[StackMeasurement]):
    """The whole-model memory model fitted on ``rows`` (feasible, measured ones)."""
    from ringplan.memory.stack_model import StackMemoryModel, fit_stack_calibrations, stack_point

    points = [stack_point(r) for r in rows if not r.oom and r.kind == "measured"]
    return StackMemoryModel(calibrations=fit_stack_calibrations(points, source="held-out fit") if points else {})


def memory_lines(rows: Sequence[StackMeasurement]) -> list[dict]:
    """Check 1: one line per held-out row and memory figure (a pressure row's device used is checked
    as a need by ``need_lines``, not at rest)."""
    from ringplan.memory.stack_model import stack_point

    catalog, lines = load_catalog(), []
    feasible = [r for r in rows if not r.oom and r.kind == "measured"]
    for gpu in sorted({r.gpu for r in feasible}):
        fit, held = split_held_out([r for r in feasible if r.gpu == gpu])
        model = fitted_model(fit)
        for row in held:
            prediction = model.predict(row.workload(), catalog.gpu(row.gpu))
            pressure = stack_point(row).pressure  # near the end of the GPU the cache is given back:
            for figure, (measured_name, predicted_name) in MEMORY_FIGURES.items():  # checked as a need
                if pressure and predicted_name == "device_used_at_rest_bytes":
                    continue
                measured, predicted = getattr(row, measured_name), getattr(prediction, predicted_name)
                if measured and predicted is not None:
                    lines.append(memory_line(row, figure, predicted, measured, len(fit), prediction.provenance))
    return lines + need_lines(feasible)


def memory_line(row: StackMeasurement, figure: str, predicted: float, measured: float, fit_rows: int,
                provenance: str) -> dict:
    return {"check": "memory (held out)", "gpu": row.gpu, "config": config_label(row), "figure": figure,
            "predicted": predicted, "measured": measured, "error": (predicted - measured) / measured,
            "fit_rows": fit_rows, "provenance": provenance}


def need_lines(feasible: Sequence[StackMeasurement]) -> list[dict]:
    """The need of each pressure row against its device used, from a fit of every other feasible row."""
    from ringplan.memory.stack_model import stack_point

    catalog, lines = load_catalog(), []
    for row in feasible:
        if not (row.device_used_bytes and stack_point(row).pressure):
            continue
        others = [r for r in feasible if r is not row and r.gpu == row.gpu]
        prediction = fitted_model(others).predict(row.workload(), catalog.gpu(row.gpu))
        lines.append(memory_line(row, NEED_FIGURE, prediction.total_bytes, row.device_used_bytes, len(others),
                                 prediction.provenance))
    return lines


def pressure_judge(rows: Sequence[StackMeasurement]):
    """row → whether the memory model fitted on the fit half of its GPU's rows predicts a peak allocation
    above ``PRESSURE_FRACTION`` of usable memory (the step time then adds the allocator's retries)."""
    catalog, feasible = load_catalog(), [r for r in rows if not r.oom and r.kind == "measured"]
    models = {gpu: fitted_model(split_held_out([r for r in feasible if r.gpu == gpu])[0])
              for gpu in {r.gpu for r in feasible}}

    def judge(row: StackMeasurement) -> bool:
        gpu = catalog.gpu(row.gpu)
        return models[row.gpu].predict(row.workload(), gpu).peak_allocated_bytes > \
            PRESSURE_FRACTION * gpu.usable_memory_bytes

    return judge


def step_time_lines(rows: Sequence[StackMeasurement]) -> list[dict]:
    """Check 2: one line per feasible row with a step time (GPU rows only: the time model is for GPUs).
    ``held_out``: the row is in the held-out half (the allocator-retry fraction is fitted on the other
    half's pressure rows; nothing else in the time model sees these rows)."""
    from ringplan.time.stack_time import step_time

    catalog, lines = load_catalog(), []
    pressure = pressure_judge(rows)
    held = {id(r) for r in split_held_out([r for r in rows if not r.oom and r.kind == "measured"])[1]}
    for row in rows:
        if row.oom or row.kind != "measured" or not row.step_time_s:
            continue
        try:
            predicted = step_time(row.workload(), catalog.gpu(row.gpu), allocator_pressure=pressure(row))
        except ValueError as error:  # no time model for this GPU/dtype
            print(f"step time of {config_label(row)} not predicted: {error}", file=sys.stderr)
            continue
        lines.append({"check": "step time", "gpu": row.gpu, "config": config_label(row), "figure": "step_time_s",
                      "predicted": predicted.step_time_s, "measured": row.step_time_s,
                      "error": (predicted.step_time_s - row.step_time_s) / row.step_time_s, "fit_rows": 0,
                      "provenance": predicted.provenance, "held_out": id(row) in held,
                      "host_s": predicted.host_overhead_s})
    return lines


def capacity_lines(rows: Sequence[StackMeasurement]) -> list[dict]:
    """Check 3: every measured row (OOM or not) judged by a model fitted on all feasible rows."""
    catalog = load_catalog()
    model = fitted_model(rows)
    lines = []
    for row in rows:
        if row.kind != "measured":
            continue
        gpu = catalog.gpu(row.gpu)
        prediction = model.predict(row.workload(), gpu)
        for margin in MARGINS:
            budget = gpu.usable_memory_bytes * (1 - margin)
            judged = prediction.upper_bytes <= budget
            lines.append({"gpu": row.gpu, "config": config_label(row), "margin": margin, "ran": not row.oom,
                          "predicted_upper_bytes": prediction.upper_bytes, "budget_bytes": budget,
                          "judged_feasible": judged, "agrees": judged == (not row.oom),
                          "over_predicts": judged and row.oom})
    return lines


def summary(lines: Sequence[dict]) -> list[dict]:
    """Median and max |error| per (check, GPU, figure)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for line in lines:
        groups[(line["check"], line["gpu"], line["figure"])].append(line["error"])
        if line.get("held_out"):  # step time: the held-out half again, apart
            groups[(line["check"], line["gpu"], line["figure"] + " (held-out half)")].append(line["error"])
    return [{"check": c, "gpu": g, "figure": f, **error_stats(errors)} for (c, g, f), errors in sorted(groups.items())]


def capacity_summary(lines: Sequence[dict]) -> list[dict]:
    """Per margin: OOM rows judged feasible (over-predicted capacity) and ran rows judged infeasible."""
    out = []
    for margin in MARGINS:
        at = [line for line in lines if line["margin"] == margin]
        oom, ran = [x for x in at if not x["ran"]], [x for x in at if x["ran"]]
        out.append({"margin": margin, "oom_rows": len(oom), "oom_judged_feasible": sum(x["judged_feasible"] for x in oom),
                    "ran_rows": len(ran), "ran_judged_infeasible": sum(not x["judged_feasible"] for x in ran)})
    return out


def _value(figure: str, value: float) -> str:
    return f"{value * 1e3:,.1f} ms" if figure.endswith("_s") else f"{value / GIB:,.3f} GiB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def memory_table(lines: Sequence[dict]) -> list[str]:
    """Held-out rows, one line each: allocated and device used at rest, predicted / measured / error."""
    by_row: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for x in lines:
        if x["check"] == "memory (held out)" and x["figure"] in MEMORY_FIGURES:
            by_row[(x["gpu"], x["config"])][x["figure"]] = x
    out = ["| GPU | config (held out) | allocated pred | allocated meas | error | at rest pred | at rest meas | "
           "error |", "|---|---|---|---|---|---|---|---|"]
    for (gpu, config), figures in by_row.items():
        cells = []
        for figure in MEMORY_FIGURES:
            x = figures.get(figure)
            cells += [_value("", x["predicted"]), _value("", x["measured"]), _pct(x["error"])] if x else ["-"] * 3
        out.append(f"| {gpu} | {config} | " + " | ".join(cells) + " |")
    return out


def markdown(lines: Sequence[dict], stats: Sequence[dict], capacity: Sequence[dict],
             capacity_stats: Sequence[dict], command: str) -> str:
    out = [f"Generated by `{command}`.", "", "Memory, held out (fit on the other half of the rows):", ""]
    out += memory_table(lines)
    out += ["", f"Pressure rows (peak allocated > {PRESSURE_FRACTION:.0%} of usable memory): the need (allocated + "
            "fragmentation reserve + outside, what capacity checks) against the measured device used, each from a "
            "fit of every other feasible row:", "",
            "| GPU | config | need pred | device used meas | error |", "|---|---|---|---|---|"]
    out += [f"| {x['gpu']} | {x['config']} | {_value('', x['predicted'])} | {_value('', x['measured'])} | "
            f"{_pct(x['error'])} |" for x in lines if x["figure"] == NEED_FIGURE]
    out += ["", "Step time (the time model's kernel, GEMM and link inputs never see these rows; the allocator-retry "
            "fraction of pressure rows is fitted on the fit half: 'held out' marks the other half; host = call "
            "overhead + kernel launches + allocator retries):", "",
            "| GPU | config | held out | predicted | host | measured | error |", "|---|---|---|---|---|---|---|"]
    out += [f"| {x['gpu']} | {x['config']} | {'yes' if x.get('held_out') else 'no'} | "
            f"{_value(x['figure'], x['predicted'])} | {_value(x['figure'], x.get('host_s', 0.0))} | "
            f"{_value(x['figure'], x['measured'])} | {_pct(x['error'])} |" for x in lines if x["check"] == "step time"]
    out += ["", "| check | GPU | figure | points | median abs error | max abs error |", "|---|---|---|---|---|---|"]
    out += [f"| {s['check']} | {s['gpu']} | {s['figure']} | {s['points']} | {_pct(s['median_abs_error'])[1:]} | "
            f"{_pct(s['max_abs_error'])[1:]} |" for s in stats]
    out += ["", "Capacity vs OOM (model fitted on every feasible row; feasible when need + residual bound <= usable "
            "memory x (1 - margin); device used at rest is higher than the need):", "",
            "| GPU | config | ran | margin | need + bound | budget | judged feasible | agrees |",
            "|---|---|---|---|---|---|---|---|"]
    out += [f"| {c['gpu']} | {c['config']} | {'yes' if c['ran'] else 'OOM'} | {c['margin']:.2f} | "
            f"{c['predicted_upper_bytes'] / GIB:,.2f} GiB | {c['budget_bytes'] / GIB:,.2f} GiB | "
            f"{c['judged_feasible']} | {c['agrees']} |" for c in capacity]
    out += ["", "| margin | OOM rows | OOM judged feasible (over-predicted) | rows that ran | ran judged infeasible "
            "(under-predicted) |", "|---|---|---|---|---|"]
    out += [f"| {s['margin']:.2f} | {s['oom_rows']} | {s['oom_judged_feasible']} | {s['ran_rows']} | "
            f"{s['ran_judged_infeasible']} |" for s in capacity_stats]
    return "\n".join(out) + "\n"


def report(paths: Sequence[Path], out: Path, command: str) -> dict:
    rows = [row for path in paths for row in load_stack_profile(path).rows]
    lines = memory_lines(rows) + step_time_lines(rows)
    capacity = capacity_lines(rows)
    payload = {"command": command, "profiles": [str(p) for p in paths], "lines": lines, "summary": summary(lines),
               "capacity": capacity, "capacity_summary": capacity_summary(capacity)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "stack_accuracy.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "stack_accuracy.md").write_text(markdown(lines, payload["summary"], capacity,
                                                    payload["capacity_summary"], command))
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="*", type=Path, default=None,
                        help="Stack profile files (default: profiles/measured/stack/*.json).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    paths = args.profiles or sorted(stack_profiles_dir().glob("*.json"))
    command = shlex.join(["python", "benchmarks/stack_accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    payload = report(paths, args.out, command)
    print((args.out / "stack_accuracy.md").read_text())
    over = [s for s in payload["capacity_summary"] if s["margin"] == max(MARGINS) and s["oom_judged_feasible"]]
    return 0 if payload["lines"] and not over else 1


if __name__ == "__main__":
    sys.exit(main())
