"""The TP byte terms against the live-tensor tracker for every case of tests/memory/test_tp_terms_tracker.py,
as a markdown table (the README shows it): python3 benchmarks/tp_tracker_table.py (CPU, gloo, ~2 min)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "memory"), str(REPO / "tests"), str(REPO)]

import test_tp_terms_tracker as t  # noqa: E402  (the test's cases, workloads and spawned measurement)


def main() -> None:
    rows = []
    for world in sorted({t.world_of(n) for n in t.CASES}):
        names = [n for n in t.CASES if t.world_of(n) == world]
        for name, res in zip(names, t._spawn_measure(names)):
            w = t.case_workload(name)
            pred, instant = t.analytic_cpu_peak(w)
            rows.append((name, w.world_size, w.tp_degree, w.layout.ring_size, w.layout.cp_scheme, res["tracked"], pred, instant))
    print("| case | W | T | CP | scheme | tracked peak B | Σ terms B | error | instant |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for name, W, T, P, sch, tr, pr, inst in rows:
        print(f"| {name} | {W} | {T} | {P} | {sch} | {tr:,} | {pr:,.0f} | {(pr-tr)/tr:+.3%} | {inst} |")

if __name__ == '__main__':
    main()
