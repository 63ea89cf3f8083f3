"""Wall time of ``ringplan plan`` and ``capacity --model`` over the whole technique space, in fresh processes.

    python benchmarks/plan_speed.py [--runs 5] [--target-s 1.0]

The space a whole-model query searches now: tensor parallelism (powers of two up to a node) × the
context-parallel scheme (ring, all-gather, Ulysses) × sharding × checkpointing × checkpoint offload × loss
× MLP tile × parameter offload (when the GPUs are given) — several hundred candidates per world size, pruned
by certified lower bounds (``StackMemoryModel.lower_bound_bytes``) before a full prediction, and step times
cached per workload. Each query runs ``--runs`` times after one warm-up (OS file cache); the median wall
and user CPU seconds are compared with the target (1 s, issue 13's ``plan`` budget). Writes
``benchmarks/results/plan_speed.json`` with the machine and its load average; exit code 1 when a median
misses the target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import console_script  # noqa: E402  (the installed script, as a user types it)

QUERIES = (
    ["plan", "--model", "llama-3-70b", "--gpu", "h100", "--gpus", "64", "--tokens", "1M"],
    ["plan", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "1M"],
    ["plan", "--model", "llama-3-8b", "--gpu", "h100", "--gpus", "8", "--tokens", "1M"],
    ["capacity", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "128K", "--train"],
    ["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--gpus", "1", "--train"],
)
RESULTS = Path(__file__).resolve().parent / "results" / "plan_speed.json"


def timed(command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """(wall seconds, user + system CPU seconds) of ``runs`` fresh processes after one untimed run."""
    walls, cpus = [], []
    for i in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        if i:
            walls.append(wall)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--target-s", type=float, default=1.0)
    args = parser.parse_args()
    script = console_script()
    rows, missed = [], 0
    for query in QUERIES:
        walls, cpus = timed(script + query, args.runs)
        median_wall, median_cpu = statistics.median(walls), statistics.median(cpus)
        missed += median_wall > args.target_s
        rows.append({"query": "ringplan " + " ".join(query), "median_wall_s": round(median_wall, 3),
                     "min_wall_s": round(min(walls), 3), "median_cpu_s": round(median_cpu, 3),
                     "meets_target": median_wall <= args.target_s})
        print(f"{median_wall:6.2f} s wall (min {min(walls):.2f}, CPU {median_cpu:.2f})  ringplan {' '.join(query)}")
    record = {"target_s": args.target_s, "runs": args.runs, "rows": rows,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average": os.getloadavg()},
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/plan_speed.py " + " ".join(sys.argv[1:])}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'MISSED' if missed else 'met'}: {missed} of {len(rows)} medians above {args.target_s} s; {RESULTS}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
