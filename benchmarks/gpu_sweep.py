"""The measurement run of issue 4 on the GPU machine: profile sweeps and OOM-boundary bisections.

One command per part, each within ~7 minutes (``--budget-s``); everything goes under OUT_DIR::

    RINGPLAN_GIT_SHA=$(git rev-parse HEAD) python benchmarks/gpu_sweep.py $OUT --part profile
    RINGPLAN_GIT_SHA=$(git rev-parse HEAD) python benchmarks/gpu_sweep.py $OUT --part bisect-full
    RINGPLAN_GIT_SHA=$(git rev-parse HEAD) python benchmarks/gpu_sweep.py $OUT --part bisect-emulated

Parts (world size 2 steps are skipped when one GPU is visible):

- ``profile``: ``ringplan profile`` on 1 and 2 GPUs, bf16, forward and training, shapes 12×64
  (E 768), 32×128 and 32q/8kv×128 (GQA), four lengths per world size (the accuracy report holds
  some out), plus the seed's module (dilated 4096/8192/16384 at 1/2/4, projections, 12×64, E 768)
  forward at four lengths → ``OUT/profile-<local GPU>.json``.
- ``bisect-full`` (alias ``bisect-h100``): ``ringplan validate --bisect`` of the seed's module on the
  local GPU's full memory, 1 and 2 GPUs (dilated attention costs O(S·w), so the boundary at millions
  of tokens is reachable); probes → ``OUT/bisect-<local GPU>.json``.
- ``bisect-emulated``: the same with ``--emulate-gpu a100-40gb``, and dense 32×128 forward with
  ``--emulate-gpu gtx-1080`` (dense attention costs O(S²): only a small card's boundary is
  reachable in minutes); probes → ``OUT/bisect-<gpu>.json`` (rows named after the emulated GPU).
  Run it after ``profile``'s rows are in ``profiles/measured/`` (or in OUT): the predictions the
  bisections start from are fitted on them, not on the seed's reported GTX 1080 rows.

Every step is a subprocess with a timeout: a failure or a hang costs that step, never the run.
``OUT/summary-<part>.json`` lists each step's command, exit code, seconds and output tail;
``OUT/validate-*.json`` keep validate's JSON. Commit ``profile-<gpu>.json`` and ``bisect-<gpu>.json``
to ``profiles/measured/`` and the emulated ones to ``profiles/emulated/`` (not fitted by default:
their memory is an H100's under a cap), then run ``benchmarks/accuracy_report.py``.

CPU smoke run (CI: tests/test_cli_runtime.py does not run it; seconds): ``--part profile --dry-run``
prints the commands without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = ["--heads", "12", "--head-dim", "64", "--embed-dim", "768", "--segment-lengths", "4096,8192,16384",
        "--dilation-rates", "1,2,4", "--projections", "--dtype", "bf16"]
DENSE_32 = ["--heads", "32", "--head-dim", "128", "--dtype", "bf16"]
PROFILE_TOKENS = {1: "8Ki,16Ki,32Ki,48Ki", 2: "16Ki,32Ki,64Ki,96Ki"}
# Up to 4Mi tokens per rank: on 2×H200 the seed module's allocator peak was Σφ·1.13 at n ≤ 1Mi but
# Σφ + 35 MB at n ≈ 12M, so fits on short runs only extrapolated capacity 11% low.
SEED_TOKENS = {1: "256Ki,1Mi,2Mi,4Mi", 2: "512Ki,2Mi,4Mi,8Mi"}
BISECT_START_TOKENS = {1: "256Ki", 2: "512Ki"}
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
RINGPLAN_MAIN = "import sys; sys.argv[0] = 'ringplan'; from ringplan.cli import main; main()"


def ringplan(*args: str) -> list[str]:
    """``ringplan ARGS`` from this checkout, whether or not the package is installed here."""
    return [sys.executable, "-c", RINGPLAN_MAIN, *args]


def local_gpu_label() -> str:
    """Catalog name of local GPU 0 from its driver name (NVML: no CUDA context here), else ``gpu``."""
    from ringplan.hardware import load_catalog
    from ringplan_runtime import nvml

    name = nvml.gpu_name(nvml.first_visible_device())
    spec = load_catalog().gpu_by_driver_name(name) if name else None
    return spec.name if spec else "gpu"


def profile_steps(out: Path, world_sizes: list[int]) -> list[tuple[str, list[str]]]:
    path = str(out / f"profile-{local_gpu_label()}.json")
    steps = []
    for p in world_sizes:
        steps.append((f"profile-dense-p{p}", ringplan(
            "profile", "--out", path, "--tokens", PROFILE_TOKENS[p], "--world-sizes", str(p),
            "--shape", "12x64@768", "--shape", "32x128", "--shape", "32/8x128", "--mode", "forward", "--mode",
            "training", "--dtype", "bf16", "--warmup", "2", "--steps", "3", "--timeout", "400", "--no-progress",
            "--series", f"gpu_sweep profile P={p}", "--format", "json")))
        steps.append((f"profile-seed-p{p}", ringplan(
            "profile", "--out", path, "--tokens", SEED_TOKENS[p], "--world-sizes", str(p), *SEED, "--mode",
            "forward", "--warmup", "1", "--steps", "3", "--timeout", "300", "--no-progress",
            "--series", f"gpu_sweep seed module P={p}", "--format", "json")))
    return steps


def fit_profiles(out: Path) -> list[str]:
    """``--profile`` options for validate: this run's or the committed H100 sweep (never the seed's
    reported rows, which the default model would otherwise consider for a family it lacks)."""
    found = sorted(out.glob("profile-*.json")) or sorted((REPO / "profiles" / "measured").glob("*profile*.json"))
    return [arg for path in found for arg in ("--profile", str(path))]


def bisect_step(name: str, out: Path, record: str, p: int, tokens: str, workload: list[str],
                emulate: str | None) -> tuple[str, list[str]]:
    args = ["validate", "--world-size", str(p), "--tokens", tokens, *workload, "--bisect", "--warmup", "1",
            "--steps", "3", "--timeout", "240", "--record", str(out / record), "--format", "json", *fit_profiles(out)]
    if emulate:
        args += ["--emulate-gpu", emulate]
    return name, ringplan(*args)


def bisect_steps(part: str, out: Path, world_sizes: list[int]) -> list[tuple[str, list[str]]]:
    if part in ("bisect-full", "bisect-h100"):
        label = local_gpu_label()
        return [bisect_step(f"bisect-seed-{label}-p{p}", out, f"bisect-{label}.json", p, BISECT_START_TOKENS[p], SEED,
                            None) for p in world_sizes]
    steps = [bisect_step(f"bisect-seed-a100-40gb-p{p}", out, "bisect-a100-40gb.json", p, BISECT_START_TOKENS[p], SEED,
                         "a100-40gb") for p in world_sizes]
    steps += [bisect_step(f"bisect-dense-gtx-1080-p{p}", out, "bisect-gtx-1080.json", p, "64Ki", DENSE_32, "gtx-1080")
              for p in world_sizes]
    return steps


def run_step(name: str, command: list[str], out: Path, timeout_s: float) -> dict:
    """Run one step as a subprocess; its failure or timeout is recorded, never raised."""
    started = time.monotonic()
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("RINGPLAN_GIT_SHA", _git_sha())
    try:
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as expired:
        code, stdout, stderr = "timeout", _text(expired.stdout), _text(expired.stderr)
    except OSError as error:
        code, stdout, stderr = "error", "", str(error)
    if name.startswith("bisect"):
        (out / f"validate-{name}.json").write_text(stdout)
    seconds = time.monotonic() - started
    print(f"[{name}] exit {code} in {seconds:.0f} s", flush=True)
    return {"step": name, "command": shlex.join(command), "exit_code": code, "seconds": round(seconds, 1),
            "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-3000:]}


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="Directory for every file this run writes.")
    parser.add_argument("--part", choices=["profile", "bisect-full", "bisect-h100", "bisect-emulated"], required=True)
    parser.add_argument("--budget-s", type=float, default=420.0, help="Stop starting steps after this many seconds.")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands, run nothing.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    world_sizes = [1, 2] if args.dry_run or visible_gpus() >= 2 else [1]
    steps = profile_steps(args.out, world_sizes) if args.part == "profile" else \
        bisect_steps(args.part, args.out, world_sizes)
    started, records = time.monotonic(), []
    for name, command in steps:
        left = args.budget_s - (time.monotonic() - started)
        if args.dry_run:
            print(shlex.join(["ringplan", *command[3:]]))
            continue
        if left < 30:
            records.append({"step": name, "command": shlex.join(command), "exit_code": "skipped (budget)"})
            continue
        records.append(run_step(name, command, args.out, timeout_s=left))
    summary = {"part": args.part, "world_sizes": world_sizes, "budget_s": args.budget_s,
               "seconds": round(time.monotonic() - started, 1), "steps": records}
    if not args.dry_run:
        (args.out / f"summary-{args.part}.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
