"""How long ``ringplan fit`` takes on a large profile (issue 18: it was quadratic in rows).

    python benchmarks/fit_speed.py --rows 16200 100000

Builds a synthetic profile of N distinct rows from the committed H100 profile (each row a copy of a
measured one at a longer, unique length, its figures scaled by ±1%), runs ``ringplan fit`` on it in
a fresh process and prints the wall time per size. Writes ``benchmarks/results/fit_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "profiles" / "measured" / "h100-profile-2026-11-25.json"


def synthetic_profile(rows: int, path: Path) -> None:
    data = json.loads(SOURCE.read_text())
    base = [r for r in data["rows"] if not r["oom"]]
    rng = random.Random(0)
    out = []
    for i in range(rows):
        row = dict(base[i % len(base)])
        row["seq_len_tokens"] += 128 * (i + 1) * row["ring_size"]
        scale = 1 + rng.uniform(-0.01, 0.01)
        for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes"):
            if row.get(key):
                row[key] = int(row[key] * scale)
        out.append(row)
    data["rows"] = out
    path.write_text(json.dumps(data))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 16200])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fit_speed.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path = Path(tmp) / f"rows-{rows}.json"
            synthetic_profile(rows, path)
            start = time.perf_counter()
            done = subprocess.run(["ringplan", "fit", str(path), "--format", "json"],
                                  capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - start
            results.append({"rows": rows, "wall_s": round(seconds, 2), "exit_code": done.returncode})
            print(f"{rows:>8,} rows: {seconds:6.1f} s (exit {done.returncode})")
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                                    "cpus": __import__("os").cpu_count(), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
