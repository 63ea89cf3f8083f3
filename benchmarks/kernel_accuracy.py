"""Held-out accuracy of the kernel-rate model: swept kernels left out of the fit, and world-size-1 step times.

Run (CPU is enough; reads only committed files)::

    python benchmarks/kernel_accuracy.py
    python benchmarks/kernel_accuracy.py --timing-dir DIR --steps STEPS.json --gpu h100 --out /tmp/acc

Two checks, neither fitted on what it reports:

1. Kernels: for every kernel key (backend, head_dim, dtype, GQA ratio, causal, pass) of the GPU's
   ``ringplan.kernels/1`` sweeps, the swept tokens-per-block sizes alternate between fit and held out
   (sorted; 1st, 3rd, … fit, 2nd, 4th, … held out; the largest always fitted, so held-out sizes are
   interpolated); each held-out call is predicted by ``kernels.fit_kernel_rates`` of the fit half.
2. Steps: every row of the ``ringplan.kernel_steps/1`` file (``benchmarks/kernel_sweep.py``: one layer
   step at world size 1, measured as ``ringplan validate --world-size 1`` does, at (heads, batch,
   tokens) that are not sweep points) predicted by ``step_time_prediction`` from the whole sweep.
   Target (issue 20): median |error| ≤ 3%, max ≤ 10%.

Writes ``OUT/kernel_accuracy.md`` and ``OUT/kernel_accuracy.json`` (default OUT: benchmarks/results), each
with the exact command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ringplan.profiles.timing import timing_profiles_in  # noqa: E402
from ringplan.time import kernels as cp  # noqa: E402
from ringplan.time.attention_time import step_time_prediction  # noqa: E402
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload  # noqa: E402

DEFAULT_TIMING = REPO / "profiles/measured/timing"
DEFAULT_STEPS = REPO / "benchmarks/results/h100x1-2026-12-05/steps_nvidia-h100-80gb-hbm3_20261205T232309Z.json"
TARGET_MEDIAN, TARGET_MAX = 0.03, 0.10
LONG_BLOCK_TOKENS = 16384  # the kernel table's second column: blocks the ring runs at scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timing-dir", type=Path, default=DEFAULT_TIMING, help="directory of the timing profiles")
    p.add_argument("--steps", type=Path, default=DEFAULT_STEPS, help="ringplan.kernel_steps/1 file (held out)")
    p.add_argument("--gpu", default="h100-80gb-sxm", help="catalog GPU the sweep and steps ran on")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    return p.parse_args(argv)


def _stats(errors: list[float]) -> dict[str, float | int | None]:
    magnitudes = [abs(e) for e in errors]
    return {"points": len(magnitudes), "median_abs_error": statistics.median(magnitudes) if magnitudes else None,
            "max_abs_error": max(magnitudes) if magnitudes else None}


def kernel_records(rows: list) -> list[dict]:
    """Every held-out swept call: its key, shape, measured and predicted seconds (fit on the other sizes)."""
    groups: dict[cp.KernelKey, list] = defaultdict(list)
    for row in rows:
        if row.op == "attention" and row.pass_name in cp.PASSES:
            groups[cp.kernel_row_key(row)].append(row)
    fit_rows, held = [], []
    for members in groups.values():
        sizes = sorted({r.q_tokens for r in members})
        out = {n for i, n in enumerate(sizes) if i % 2 == 1 and n != sizes[-1]}
        fit_rows += [r for r in members if r.q_tokens not in out]
        held += [r for r in members if r.q_tokens in out]
    curves = cp.fit_kernel_rates(fit_rows)
    records = []
    for row in held:
        key = cp.kernel_row_key(row)
        if key not in curves:
            continue
        predicted = float(curves[key].time_s(cp.kernel_row_flops(row), cp.block_tokens(row.q_tokens, row.kv_tokens)))
        records.append({"backend": key.backend, "dtype": key.dtype, "head_dim": key.head_dim, "gqa": key.gqa_ratio,
                        "causal": key.causal, "pass": key.pass_name, "n_heads": row.n_heads, "tokens": row.q_tokens,
                        "measured_s": row.seconds, "predicted_s": predicted, "error": predicted / row.seconds - 1.0})
    return records


def step_records(steps_path: Path, gpu: str, timing_dir: Path) -> list[dict]:
    records = []
    for s in json.loads(steps_path.read_text())["rows"]:
        if not s.get("feasible", True) or not s.get("step_time_s"):
            continue
        shape = AttentionShape(n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], head_dim=s["head_dim"],
                               batch=s["batch"], dtype=s["dtype"], embed_dim=s["embed_dim"])
        work = Workload(seq_len_tokens=s["seq_len_tokens"], shape=shape, pattern=AttentionPattern(causal=s["causal"]),
                        training=s["training"], projections=s["projections"])
        layout = RingLayout(ring_size=1, layout="zigzag" if s["causal"] else "contiguous")
        prediction = step_time_prediction(work, layout, gpu, timing_dir=timing_dir)
        kernels = [v for k, v in prediction.provenance_details if k.startswith("kernel")]
        records.append({"name": s["name"], "backend_measured": s["backend"], "backend_planned": prediction.backend,
                        "measured_s": s["step_time_s"], "predicted_s": prediction.step_time_s,
                        "error": prediction.step_time_s / s["step_time_s"] - 1.0,
                        "kernel_source": "; ".join(dict.fromkeys(kernels))})
    return records


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.1f}%"


def kernel_table(records: list[dict]) -> list[str]:
    """Median / max |error| per (backend, dtype, head_dim, causal, pass) over GQA ratios, all sizes and ≥ 16Ki."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["backend"], r["dtype"], r["head_dim"], "causal" if r["causal"] else "non-causal", r["pass"])].append(r)
    lines = ["| kernel | GQA | held-out calls | median \\|error\\| | max \\|error\\| | max \\|error\\| at ≥ 16Ki tokens |",
             "|---|---|---|---|---|---|"]
    for key in sorted(groups):
        members = groups[key]
        every, long = _stats([r["error"] for r in members]), _stats(
            [r["error"] for r in members if r["tokens"] >= LONG_BLOCK_TOKENS])
        gqa = "/".join(str(g) for g in sorted({r["gqa"] for r in members}))
        lines.append(f"| {' '.join(map(str, key))} | {gqa} | {every['points']} | {_pct(every['median_abs_error'])} | "
                     f"{_pct(every['max_abs_error'])} | {_pct(long['max_abs_error'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ringplan.time.timing_data import resolve_gpu

    driver = resolve_gpu(args.gpu).driver_name.lower()
    _, profiles = timing_profiles_in(args.timing_dir)
    mine = [p for p in profiles if p.gpu_driver_name.lower() == driver]
    if not mine:
        raise SystemExit(f"kernel_accuracy: no ringplan.kernels/1 profile of {args.gpu} under {args.timing_dir}")
    kernels = kernel_records([r for p in mine for r in p.rows])
    steps = step_records(args.steps, args.gpu, args.timing_dir)
    kernel_all = _stats([r["error"] for r in kernels])
    kernel_long = _stats([r["error"] for r in kernels if r["tokens"] >= LONG_BLOCK_TOKENS])
    step_all = _stats([r["error"] for r in steps])
    meets = step_all["points"] > 0 and step_all["median_abs_error"] <= TARGET_MEDIAN and \
        step_all["max_abs_error"] <= TARGET_MAX
    command = shlex.join(["python", "benchmarks/kernel_accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    sources = sorted(str(Path(p.path).relative_to(REPO)) if Path(p.path).is_relative_to(REPO) else p.path
                     for p in mine)
    steps_source = str(args.steps.relative_to(REPO)) if args.steps.is_relative_to(REPO) else str(args.steps)
    md = [f"# Kernel-rate model: held-out accuracy ({mine[0].gpu_driver_name})", "", f"Command: `{command}`", "",
          f"Fit data: {', '.join(f'`{s}`' for s in sources)}. Held-out steps: `{steps_source}`.", "",
          "## World-size-1 step times (not in the fit)", "",
          f"{step_all['points']} shapes: median |error| {_pct(step_all['median_abs_error'])}, max "
          f"{_pct(step_all['max_abs_error'])} — target median ≤ 3%, max ≤ 10%: {'met' if meets else 'NOT met'}.", "",
          "| shape | backend | measured | predicted | error | kernel source |", "|---|---|---|---|---|---|"]
    md += [f"| {r['name']} | {r['backend_planned']} | {r['measured_s'] * 1e3:,.1f} ms | {r['predicted_s'] * 1e3:,.1f} ms | "
           f"{r['error'] * 100:+.1f}% | {r['kernel_source']} |" for r in steps]
    md += ["", "## Swept kernel calls, every other tokens-per-block size held out", "",
           f"{kernel_all['points']} held-out calls: median |error| {_pct(kernel_all['median_abs_error'])}, max "
           f"{_pct(kernel_all['max_abs_error'])}; at ≥ 16Ki tokens per block ({kernel_long['points']} calls): median "
           f"{_pct(kernel_long['median_abs_error'])}, max {_pct(kernel_long['max_abs_error'])}.", ""]
    md += kernel_table(kernels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_accuracy.md").write_text("\n".join(md) + "\n")
    (args.out / "kernel_accuracy.json").write_text(json.dumps(
        {"command": command, "fit_sources": sources, "steps_source": steps_source,
         "targets": {"median_abs_error": TARGET_MEDIAN, "max_abs_error": TARGET_MAX}, "steps_summary": step_all,
         "steps_meet_target": meets, "kernel_summary": kernel_all, "kernel_summary_long_blocks": kernel_long,
         "steps": steps, "kernels": kernels}, indent=1) + "\n")
    print("\n".join(md[:12 + len(steps)]))
    return 0 if meets else 1


if __name__ == "__main__":
    sys.exit(main())
