"""Issue 17's proof on one GPU: held-out rows of this GPU predicted from the other GPU's profiles
(transferred), then again after ``ringplan calibrate`` (calibrated).

On an H100 or H200 (about 2-3 minutes; ``benchmarks/calibrate_gpu.sh`` runs it)::

    RINGPLAN_GIT_SHA=$(git rev-parse HEAD) python benchmarks/calibrate_transfer.py --out $OUT

CPU dry run of the plumbing (the tracker in place of the allocator, so no error figures)::

    python benchmarks/calibrate_transfer.py --device cpu --gpu h100 --out /tmp/transfer

1. Copy ``profiles/`` to a temporary tree and remove every file of this GPU's there (attention, stack and
   timing profiles: its rows, or its driver name); the other GPU's stay.
2. Refit in the tree (``write_fit(MEMORY_FIT)``, as ``ringplan fit --write``) and predict the held-out rows:
   the committed attention rows of this GPU (measured, not out of memory, with device used), each as it
   ran (``MemoryModel.predict_row``): the transferred error, predicted vs measured device-used peak.
3. Run ``ringplan calibrate --profiles-dir <tree>`` (a subprocess, wall-timed); it refits the tree.
4. Predict the same rows again (less any row whose key calibrate measured itself): the calibrated error.

Writes ``calibrate_transfer.json`` and ``calibrate_transfer.md`` to --out (default ``$OUT``, else
``benchmarks/results``) with provenance: driver GPU name and version, torch, date, git sha
(``$RINGPLAN_GIT_SHA``), the exact commands. This process never creates a CUDA context (NVML only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ringplan.hardware import load_catalog  # noqa: E402
from ringplan.memory.attention_fits import row_family  # noqa: E402
from ringplan.memory.attention_model import MEMORY_FIT, MemoryModel  # noqa: E402
from ringplan.memory.fit_cache import write_fit  # noqa: E402
from ringplan.memory.part_fit import calibration_from_json  # noqa: E402
from ringplan.paths import PROFILES_DIR_ENV  # noqa: E402
from ringplan.profiles.attention import load_profile, load_profiles  # noqa: E402
from ringplan_runtime import nvml  # noqa: E402 - pynvml only: no torch, no CUDA context

RINGPLAN = "import sys; from ringplan.cli import main; sys.argv[0] = 'ringplan'; main()"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    p.add_argument("--budget-s", type=float, default=90.0, help="ringplan calibrate --budget-s")
    p.add_argument("--gpu", default=None, help="catalog name (default: the local GPU's, by its driver name)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the plumbing")
    return p.parse_args(argv)


def this_gpu(args) -> tuple[str, str]:
    """(catalog name, driver name) of the GPU under test."""
    driver = nvml.gpu_name(nvml.first_visible_device()) if args.device == "cuda" else None
    spec = load_catalog().gpu(args.gpu) if args.gpu else load_catalog().gpu_by_driver_name(driver or "")
    if spec is None:
        raise SystemExit(f"calibrate_transfer: {driver!r} is not in the catalog; pass --gpu NAME")
    return spec.name, driver or spec.driver_name


def files_of(tree: Path, gpu: str, driver: str) -> list[Path]:
    """Files of ``gpu`` in the tree: attention/stack profiles whose rows are its, timing files of its driver name."""
    found = []
    for path in sorted((tree / "measured").rglob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", []) if isinstance(data, dict) else []
        name = str((data.get("provenance") or {}).get("gpu_driver_name") or "") if isinstance(data, dict) else ""
        if "timing" in path.parts and name.lower() == driver.lower() or rows and all(
                isinstance(r, dict) and r.get("gpu") == gpu for r in rows):
            found.append(path)
    return found


def held_out_rows(gpu: str) -> list[tuple[str, object]]:
    """(file name, row) of the committed attention rows of ``gpu`` that a prediction can be checked on."""
    return [(Path(p.path).name, r) for p in load_profiles(REPO / "profiles" / "measured") for r in p.rows
            if r.gpu == gpu and r.kind == "measured" and not r.oom and r.device_used_bytes is not None]


def predicted_bytes(tree: Path, rows: list, gpu: str) -> list[float]:
    """Refit the tree and predict each row's device-used peak as it ran."""
    os.environ[PROFILES_DIR_ENV] = str(tree)
    payload = write_fit(MEMORY_FIT)
    model = MemoryModel(calibrations={g: calibration_from_json(c) for g, c in payload["calibrations"].items()})
    spec = load_catalog().gpu(gpu)
    return [model.predict_row(row, spec).total_bytes for _, row in rows]


def errors_pct(rows: list, predicted: list[float]) -> list[float]:
    """(predicted − measured) / measured × 100 per row."""
    return [100.0 * (p - row.device_used_bytes) / row.device_used_bytes for (_, row), p in zip(rows, predicted)]


def summary(errors: list[float]) -> dict[str, float | int]:
    absolute = [abs(e) for e in errors]
    return {"rows": len(errors), "median_abs_error_pct": statistics.median(absolute) if absolute else None,
            "max_abs_error_pct": max(absolute) if absolute else None}


def by_scope(rows: list, errors: list[float], kept: list[bool]) -> dict[str, dict]:
    """``summary`` of the kept rows at W = 1 (``single``) and on a ring (``ring``: a one-GPU calibrate
    measures no ring, so these show what is left transferred)."""
    return {scope: summary([e for (_, r), e, k in zip(rows, errors, kept) if k and (r.ring_size > 1) == ring])
            for scope, ring in (("single", False), ("ring", True))}


def run_calibrate(tree: Path, args) -> tuple[list[str], float, int, dict | None, str]:
    """``ringplan calibrate`` into the tree: (command, wall seconds, exit code, its JSON answer, stderr tail)."""
    command = ["calibrate", "--profiles-dir", str(tree), "--budget-s", f"{args.budget_s:g}", "--no-progress",
               "--format", "json"] + (["--device", "cpu", "--record-as", args.gpu] if args.device == "cpu" else [])
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", RINGPLAN, *command], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, PROFILES_DIR_ENV: str(tree)}, timeout=args.budget_s + 240)
    wall_s = time.monotonic() - began
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = None
    return ["ringplan", *command], wall_s, done.returncode, answer, done.stderr[-3000:]


def markdown(report: dict) -> str:
    q = report["default_query"]
    pct = lambda s, k: "-" if s[k] is None else f"{s[k]:.1f}%"  # noqa: E731
    gib = lambda d: f"± {d['uncertainty_bytes'] / 2**30:.3f} GiB" if d else "-"  # noqa: E731
    lines = [f"# ringplan calibrate on {report['gpu']} ({report['provenance']['gpu_driver_name']})", "",
             "| GPU | held-out rows | transferred error (median / worst) | calibrate wall s | "
             "calibrated error (median / worst) | ± default layer before → after |",
             "|---|---|---|---:|---|---|"]
    for scope in ("single", "ring"):
        t, c = report["transferred"][scope], report["calibrated"][scope]
        if t["rows"]:
            lines.append(f"| {report['gpu']} | {t['rows']} at {'W = 1' if scope == 'single' else 'W = 2'} "
                         f"({c['rows']} after) | {pct(t, 'median_abs_error_pct')} / {pct(t, 'max_abs_error_pct')} | "
                         f"{report['calibrate']['wall_s']:.1f} | {pct(c, 'median_abs_error_pct')} / "
                         f"{pct(c, 'max_abs_error_pct')} | {gib(q.get('before'))} → {gib(q.get('after'))} |")
    lines += ["",
             "| file | family | tokens | W | measured GiB | transferred | calibrated |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['file']} | {row['family']} | {row['seq_len_tokens']:,} | {row['ring_size']} | "
                     f"{row['measured_bytes'] / 2**30:.3f} | {row['transferred_error_pct']:+.2f}% | "
                     f"{'-' if row['calibrated_error_pct'] is None else format(row['calibrated_error_pct'], '+.2f') + '%'} |")
    lines += ["", f"Command: `{report['provenance']['command']}`; calibrate: `{report['calibrate']['command']}` "
              f"(exit {report['calibrate']['exit_code']}); git {report['provenance']['git_sha']}; "
              f"{report['provenance']['date']}; torch {report['provenance']['torch_version']}; "
              f"driver {report['provenance']['driver_version']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu, driver = this_gpu(args)
    args.gpu = gpu
    rows = held_out_rows(gpu)
    if not rows:
        raise SystemExit(f"calibrate_transfer: no committed rows of {gpu} to hold out")
    with tempfile.TemporaryDirectory(prefix="ringplan-transfer-") as tmp:
        tree = Path(tmp) / "profiles"
        shutil.copytree(REPO / "profiles", tree, ignore=shutil.ignore_patterns("*.lock"))
        removed = files_of(tree, gpu, driver)
        for path in removed:
            path.unlink()
        transferred = errors_pct(rows, predicted_bytes(tree, rows, gpu))
        command, wall_s, code, answer, stderr = run_calibrate(tree, args)
        print(stderr, file=sys.stderr)
        calibrated_path = tree / "measured" / f"{gpu}-calibrate.json"
        measured_keys = {r.key for r in load_profile(calibrated_path).rows} if calibrated_path.exists() else set()
        calibrated = errors_pct(rows, predicted_bytes(tree, rows, gpu))
    own = [row.key not in measured_keys for _, row in rows]
    report = {
        "gpu": gpu, "held_out": "committed attention rows of this GPU (measured, not OOM, with device used) "
                                "that calibrate did not measure itself",
        "removed_files": [str(p.relative_to(tree)) for p in removed],
        "transferred": by_scope(rows, transferred, [True] * len(rows)),
        "calibrated": by_scope(rows, calibrated, own),
        "calibrate": {"command": shlex.join(command), "wall_s": wall_s, "exit_code": code, "answer": answer},
        "default_query": (answer or {}).get("default_query", {}),
        "rows": [{"file": f, "family": row_family(r), "seq_len_tokens": r.seq_len_tokens, "ring_size": r.ring_size,
                  "n_heads": r.n_heads, "n_kv_heads": r.n_kv_heads, "head_dim": r.head_dim, "training": r.training,
                  "measured_bytes": r.device_used_bytes, "transferred_error_pct": t,
                  "calibrated_error_pct": c if k else None}
                 for (f, r), t, c, k in zip(rows, transferred, calibrated, own)],
        "provenance": {"gpu_driver_name": driver, "driver_version": nvml.driver_version(),
                       "torch_version": importlib.metadata.version("torch"),
                       "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
                       "git_sha": os.environ.get("RINGPLAN_GIT_SHA", "unknown"),
                       "command": shlex.join([Path(sys.executable).name, *sys.argv])}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibrate_transfer.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "calibrate_transfer.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if code in (0, 1) else code


if __name__ == "__main__":
    sys.exit(main())
