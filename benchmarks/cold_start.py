"""Cold start of the planner: ``ringplan capacity --gpu a100-40gb --tokens 1M`` in fresh processes.

    python benchmarks/cold_start.py [--runs 30] [--target-s 0.15]

Each run is a new process (the installed console script, as a user would type it); the median
wall time is compared with the 0.15 s target (issue 13; it was 0.3 s before). One extra run under ``python -X importtime``
lists what was imported and fails the benchmark if torch (or scipy/matplotlib) was among them.
Writes ``benchmarks/results/cold_start.json`` with the machine it ran on. Exit code 1 when the
median misses the target or a forbidden module was imported. Also recorded, not judged: the same
query with ``--step-time`` (the time model: numpy, and scipy while it fits its timing profiles).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["capacity", "--gpu", "a100-40gb", "--tokens", "1M"]
FORBIDDEN = ("torch", "scipy", "matplotlib")
RESULTS = Path(__file__).resolve().parent / "results" / "cold_start.json"


def console_script() -> list[str]:
    """The installed ``ringplan`` script next to this interpreter (not a pyenv/shell shim)."""
    beside = Path(sys.executable).parent / "ringplan"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ringplan")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from ringplan.cli import main; sys.exit(main())"]


def timed_runs(command: list[str], runs: int, warmup: int) -> list[float]:
    """Wall seconds of ``runs`` fresh processes after ``warmup`` untimed ones (OS file cache warm)."""
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        if i >= warmup:
            times.append(elapsed)
    return times


def imported_modules() -> dict[str, int]:
    """Module → cumulative import microseconds of one run, from ``python -X importtime``."""
    code = f"import sys; sys.argv = ['ringplan', *{ARGS!r}]; from ringplan.cli import main; main()"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    modules = {}
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = (part.strip() for part in line.split("|"))
            if cumulative.isdigit():
                modules[name] = int(cumulative)
    return modules


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "git_sha": sha or None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed fresh processes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--target-s", type=float, default=0.15, help="median wall-time target")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    command = console_script() + ARGS
    times = timed_runs(command, args.runs, args.warmup)
    modules = imported_modules()
    forbidden = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    top = sorted(((us, name) for name, us in modules.items() if "." not in name), reverse=True)[:10]
    median = statistics.median(times)
    step_times = timed_runs(command + ["--step-time"], max(3, args.runs // 3), 1)
    result = {
        "command": " ".join(["ringplan", *ARGS]), "executable": command[0], "runs": len(times),
        "median_s": median, "p90_s": statistics.quantiles(times, n=10)[-1] if len(times) > 1 else median,
        "min_s": min(times), "max_s": max(times), "target_s": args.target_s, "meets_target": median <= args.target_s,
        "forbidden_imports": forbidden, "top_level_imports_ms": {name: us / 1000 for us, name in top},
        "with_step_time": {"args": "--step-time", "runs": len(step_times), "median_s": statistics.median(step_times)},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['command']}: median {median * 1e3:.0f} ms over {len(times)} fresh processes "
          f"(min {min(times) * 1e3:.0f}, p90 {result['p90_s'] * 1e3:.0f}); target {args.target_s * 1e3:.0f} ms "
          f"-> {'OK' if result['meets_target'] else 'MISSED'}")
    print("largest imports (ms): " + ", ".join(f"{n} {ms:.0f}" for n, ms in result["top_level_imports_ms"].items()))
    print(f"with --step-time (not judged): median {result['with_step_time']['median_s'] * 1e3:.0f} ms")
    if forbidden:
        print(f"FORBIDDEN imports: {forbidden}")
    print(f"written to {args.output}")
    return 0 if result["meets_target"] and not forbidden else 1


if __name__ == "__main__":
    sys.exit(main())
