"""Issue 15's leftover: the PINNED HOST MEMORY of offload runs on one GPU against the planner's host terms.

For each case (a whole-model stack, W = 1, FSDP2 with ``CPUOffloadPolicy(pin_memory=True)`` and/or
``save_on_cpu(pin_memory=True)`` checkpoints; ``CASES``), in a fresh process (so torch's caching host
allocator, its peaks and ``/proc/self/status`` start clean): ``build_stack``, the runtime's warm-up
step (``stack_measure.run_one_step``), then the runtime's memory step (``stack_measure._memory_step``:
gc, ``empty_cache``, device peaks reset, the host tracker of offloaded checkpoints) with the host
allocator's peaks reset before it, a sampler reading the pinned host memory every 50 ms during it
(``ringplan_runtime.host_pinned``) and an optimizer pre-step hook that takes a census of the host
tensors at the host's planned peak (parameters, gradients, AdamW's exp_avg / exp_avg_sq, pinned or not).

Predicted: ``ringplan.memory.host_memory.host_memory_bytes_per_gpu(w)`` and the per-term
``stack_terms.host_terms(w)``. Measured: torch's host allocator peak (blocks held: in use + cached,
each rounded up to a power of two; and in use), the sampled peaks, ``VmLck`` / ``VmPin`` / ``VmRSS``,
and the census. Also compared: "pinned per torch source" = offloaded parameters + gradients +
checkpoints (FSDP2 pins the master shards and copies reduced gradients into pinned memory;
``torch.optim.AdamW`` makes exp_avg / exp_avg_sq with ``zeros_like``, which does not pin, and its
step's temporaries are pageable): a reading of torch's source, checked by the census, not a planner term.

Usage (device machine, repository root; one GPU, ~3 minutes on an H100)::

    OUT=dir PYTHONPATH=. RINGPLAN_GIT_SHA=$(git rev-parse HEAD) python3 benchmarks/pinned_host_check.py

Writes ``pinned_host_check.json`` and ``pinned_host_check.md`` under ``$OUT`` (``benchmarks/results/``
when OUT is unset) and prints the table. ``--cases a,b`` runs some cases; ``--budget-s`` bounds the whole
run (a case that would start past it is recorded as skipped; a running one is stopped at the budget).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ringplan.memory.host_memory import host_memory_bytes_per_gpu  # noqa: E402
from ringplan.memory.stack_terms import host_terms  # noqa: E402
from ringplan.models import load_model_catalog  # noqa: E402
from ringplan.stack import StackSettings, StackWorkload  # noqa: E402
from ringplan.workload import RingLayout  # noqa: E402

GIB = 2**30
SCHEMA = "ringplan.pinned_host_check/1"
METHOD = ("one process per case, W = 1, NCCL; build_stack; 1 warm-up step (stack_measure.run_one_step); "
          "torch.cuda.reset_peak_host_memory_stats; stack_measure._memory_step (gc, empty_cache, device peaks, "
          "no live-tensor tracker) under a 50 ms sampler of torch.cuda.host_memory_stats and /proc/self/status, "
          "with an optimizer step pre-hook taking the host tensor census (host_pinned.host_tensor_census)")
DEFAULT_BUDGET_S = 230.0
CASE_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One whole-model point on one GPU. ``expected_s``: a rough wall time, for the budget."""

    name: str
    model: str
    layers: int | None = None
    tokens: int
    checkpointing: str = "none"
    offload_params: bool = True
    offload_checkpoints: bool = False
    mlp_tile_tokens: int | None = 4096
    expected_s: float = 40.0


#: Cheapest first: the budget drops the tail.
CASES: tuple[Case, ...] = (
    Case(name="qwen3-0.6b_full-ckpt_offload-ckpt", model="qwen3-0.6b", tokens=32768, checkpointing="full",
         offload_params=False, offload_checkpoints=True, expected_s=30.0),
    Case(name="qwen3-0.6b_tiled_offload-params", model="qwen3-0.6b", tokens=16384, expected_s=40.0),
    Case(name="qwen3-0.6b_full-ckpt_offload-params+ckpt", model="qwen3-0.6b", tokens=32768, checkpointing="full",
         offload_checkpoints=True, expected_s=40.0),
    Case(name="llama-3-8b@4L_tiled_offload-params", model="llama-3-8b", layers=4, tokens=8192, expected_s=90.0),
)


def case_workload(case: Case, *, tiny: bool = False) -> StackWorkload:
    """The case's workload; ``tiny`` shrinks the model and length (a CPU dry run of the plumbing only)."""
    spec = load_model_catalog().model(case.model)
    if case.layers is not None:
        spec = spec.with_layers(case.layers)
    tokens, tile, chunk = case.tokens, case.mlp_tile_tokens, 4096
    if tiny:
        spec = replace(spec, name=spec.name + "@tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                       ffn_dim=128, vocab_size=1000)
        tokens, tile, chunk = 512, 128 if tile else None, 256
    return StackWorkload(model=spec, seq_len_tokens=tokens, world_size=1, layout=RingLayout(ring_size=1),
                         training=True, settings=StackSettings(
                             sharding="zero3", checkpointing=case.checkpointing,
                             offload_checkpoints=case.offload_checkpoints, offload_params=case.offload_params,
                             mlp_tile_tokens=tile, loss_chunk_tokens=chunk))


def predicted(w: StackWorkload) -> dict[str, object]:
    """The planner's host memory of ``w``: per-term ``host_terms`` and their sum per GPU."""
    terms = {k: float(v) for k, v in host_terms(w).items()}
    return {"host_terms": terms, "host_memory_bytes_per_gpu": float(host_memory_bytes_per_gpu(w)),
            "pinned_per_torch_source_bytes": terms["offloaded_params_bytes"] + terms["offloaded_gradients_bytes"]
            + terms["offloaded_checkpoints_bytes"]}


# ----------------------------------------------------------------------------- the GPU part (child process)


def _write(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, default=str)
    os.replace(tmp, path)


def measure_case(case: Case, out_path: str, command: str, *, cpu_dry_run: bool = False) -> None:
    """Run ``case`` on GPU 0 and write what it measured to ``out_path`` (after every phase, so a
    stopped case leaves what it had). ``cpu_dry_run``: a tiny model on the CPU (gloo; nothing is
    pinned), to check the plumbing without a GPU."""
    import gc

    import torch
    import torch.distributed as dist

    from ringplan_runtime.host_pinned import PinnedSampler, host_tensor_census, read_pinned_host, reset_host_peak
    from ringplan_runtime.measure import MeasureSettings, is_out_of_memory, synchronize
    from ringplan_runtime.provenance import current_provenance
    from ringplan_runtime.stack_measure import _memory_step, rank_batch, run_one_step
    from ringplan_runtime.stack_parallel import build_stack

    record: dict = {"case": case.name, "ok": False, "failure": None, "phase": "start", "readings": {}}
    device = torch.device("cpu") if cpu_dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.init()
    record["provenance"] = current_provenance(method=METHOD, gpu_count=0 if cpu_dry_run else 1,
                                              device_index=device.index, command=command).as_dict()
    record["readings"]["before_build"] = read_pinned_host().as_dict()
    if cpu_dry_run:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    w = case_workload(case, tiny=cpu_dry_run)
    record["workload_run"] = {"model": w.model.name, "tokens": w.seq_len_tokens}
    run = batch = None
    try:
        start = time.perf_counter()
        run = build_stack(w, device=device, seed=0)
        run.positions = run.positions.clone(memory_format=torch.contiguous_format)
        batch = rank_batch(w, run, 0)
        synchronize(device)
        record["build_s"] = time.perf_counter() - start
        record["readings"]["after_build"] = read_pinned_host().as_dict()
        record["census_after_build"] = host_tensor_census(run.model, run.optimizer)
        record["phase"] = "built"
        _write(out_path, record)

        start = time.perf_counter()
        run_one_step(run, batch)
        synchronize(device)
        record["warmup_s"] = time.perf_counter() - start
        record["readings"]["after_warmup"] = read_pinned_host().as_dict()
        record["phase"] = "warmed up"
        _write(out_path, record)

        def at_optimizer_step(optimizer, args, kwargs):  # the host's planned peak: grads, m, v all alive
            record["census_at_optimizer_step"] = host_tensor_census(run.model, optimizer)
            record["readings"]["at_optimizer_step"] = read_pinned_host().as_dict()

        handle = run.optimizer.register_step_pre_hook(at_optimizer_step)
        record["host_peak_reset"] = reset_host_peak()
        settings = MeasureSettings(warmup_steps=1, timed_steps=1, track_live_tensors=False, count_sent_bytes=False)
        start = time.perf_counter()
        with PinnedSampler(interval_s=0.05) as sampler:
            figures = _memory_step(run, batch, settings)
        record["step_wall_s"] = time.perf_counter() - start
        handle.remove()
        record["readings"]["after_step"] = read_pinned_host().as_dict()
        record["sampled_peak"] = sampler.peak.as_dict() if sampler.peak else None
        record["samples"] = sampler.samples
        record["census_after_step"] = host_tensor_census(run.model, run.optimizer)
        record["device"] = {k: figures.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                                        "device_used_bytes", "non_allocator_bytes")}
        record["runtime_host_tracker_peak_bytes"] = figures.get("host_bytes")
        stats = getattr(torch.cuda, "host_memory_stats", None) if device.type == "cuda" else None
        record["host_memory_stats_raw"] = {k: v for k, v in (stats() if stats else {}).items()
                                           if isinstance(v, (int, float))}
        record["ok"], record["phase"] = True, "done"
    except Exception as error:  # noqa: BLE001 - recorded: the parent goes on with the next case
        record["failure"] = "oom" if is_out_of_memory(error) else f"{type(error).__name__}: {error}"
    run = batch = None
    gc.collect()
    _write(out_path, record)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- comparing (pure)


def error_pct(predicted_value: float | None, measured_value: float | None) -> float | None:
    """100 · (predicted − measured) / measured (the runtime's ``Figure.error`` in percent); None
    without both or with a measured 0."""
    if predicted_value is None or not measured_value:
        return None
    return 100.0 * (predicted_value - measured_value) / measured_value


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


_ALL_STATES = ("params", "grads", "exp_avg", "exp_avg_sq", "step")


def _census_sum(census: dict | None, names: tuple[str, ...], field: str) -> int | None:
    if not isinstance(census, dict) or not any(n in census for n in names):
        return None
    return sum(int(census[n].get(field, 0)) for n in names if n in census)


def rows_for(case_name: str, predicted_figures: dict, measured: dict) -> list[dict]:
    """Predicted vs measured rows of one case (bytes; ``error_pct``; the measured figure's source).
    ``measured``: the child's record (``measure_case``), possibly partial or a failure."""
    terms, total = predicted_figures["host_terms"], predicted_figures["host_memory_bytes_per_gpu"]
    by_torch = predicted_figures["pinned_per_torch_source_bytes"]
    peak = _get(measured, "readings", "after_step") or {}
    sampled = measured.get("sampled_peak") or {}
    at_step = measured.get("census_at_optimizer_step")
    states = _census_sum(at_step, ("exp_avg", "exp_avg_sq"), "bytes")
    states_pinned = _census_sum(at_step, ("exp_avg", "exp_avg_sq"), "pinned_bytes")
    source = peak.get("allocator_source") or "torch.cuda.host_memory_stats"
    spec = [
        ("host total (Σ host_terms) vs allocator held peak", total, peak.get("allocator_held_peak_bytes"),
         f"{source}: held (in use + cached) peak during the measured step"),
        ("host total (Σ host_terms) vs allocator in-use peak", total, peak.get("allocator_in_use_peak_bytes"),
         f"{source}: in-use peak during the measured step"),
        ("host total (Σ host_terms) vs sampled held peak", total, sampled.get("allocator_held_bytes"),
         f"max of {measured.get('samples', 0)} samples (50 ms) of the held bytes"),
        ("pinned per torch source (params + grads + ckpt) vs allocator in-use peak", by_torch,
         peak.get("allocator_in_use_peak_bytes"), "same in-use peak; predicted = planner terms FSDP2 / save_on_cpu pin"),
        ("pinned per torch source (params + grads + ckpt) vs census pinned at the optimizer step", by_torch,
         _census_sum(at_step, _ALL_STATES, "pinned_bytes")
         if not terms["offloaded_checkpoints_bytes"] else None,
         "host_tensor_census at AdamW's pre-step hook (pinned storages); checkpoints are gone by then"),
        ("cross-check: census pinned, each rounded to a power of two (here as predicted) vs allocator in use, "
         "both at the optimizer step", _census_sum(at_step, _ALL_STATES, "pinned_rounded_bytes"),
         _get(measured, "readings", "at_optimizer_step", "allocator_in_use_bytes"),
         "the allocator's in-use bytes read in AdamW's pre-step hook; 'predicted' is the census, not the planner"),
        ("offloaded_params_bytes vs census params (pinned)", terms["offloaded_params_bytes"],
         _census_sum(at_step, ("params",), "pinned_bytes"), "census at the optimizer step: pinned parameter storages"),
        ("offloaded_gradients_bytes vs census grads (pinned)", terms["offloaded_gradients_bytes"],
         _census_sum(at_step, ("grads",), "pinned_bytes"), "census at the optimizer step: pinned gradient storages"),
        ("offloaded_optimizer_states_bytes vs census exp_avg + exp_avg_sq (any)", terms["offloaded_optimizer_states_bytes"],
         states, f"census at the optimizer step: host storages of m and v ({states_pinned} bytes of them pinned)"
         if states is not None else "census at the optimizer step"),
        ("offloaded_optimizer_step_bytes (sqrt(v) in the CPU step)", terms["offloaded_optimizer_step_bytes"], None,
         "not measured apart: a pageable temporary inside torch's foreach AdamW (see the RSS rows)"),
        ("offloaded_checkpoints_bytes vs runtime host tracker peak", terms["offloaded_checkpoints_bytes"],
         measured.get("runtime_host_tracker_peak_bytes"),
         "stack_measure._memory_step's CPU live-tensor tracker (save_on_cpu's pinned copies; with offload_params also "
         "every CPU tensor the step makes)"),
    ]
    rows = []
    for figure, pred, meas, why in spec:
        if not pred:
            continue  # a term this case does not have (not offloaded: its tensors are on the GPU)
        rows.append({"case": case_name, "figure": figure, "predicted_bytes": pred, "measured_bytes": meas,
                     "error_pct": error_pct(pred, meas), "source": why})
    for figure, meas, why in (
            ("/proc VmLck (sampled max)", sampled.get("proc_locked_bytes"), "/proc/self/status VmLck"),
            ("/proc VmPin (sampled max)", sampled.get("proc_pinned_bytes"), "/proc/self/status VmPin"),
            ("/proc VmRSS (sampled max during the step)", sampled.get("proc_rss_bytes"),
             "/proc/self/status VmRSS: resident memory, pinned or pageable (AdamW's m, v and step temporaries)"),
            ("/proc VmHWM after the step", peak.get("proc_rss_peak_bytes"),
             "/proc/self/status VmHWM: the process's resident peak, pinned or not, since it started")):
        rows.append({"case": case_name, "figure": figure, "predicted_bytes": None, "measured_bytes": meas,
                     "error_pct": None, "source": why})
    return rows


def build_record(case: Case, measured: dict, *, command: str, git_sha: str | None, tiny: bool = False) -> dict:
    """One case's record: the workload, the planner's prediction, the measurement and the rows."""
    w = case_workload(case, tiny=tiny)
    pred = predicted(w)
    provenance = dict(measured.get("provenance") or {})
    if git_sha:
        provenance["git_sha_runtime"] = provenance.get("git_sha")
        provenance["git_sha"] = git_sha
    provenance["command"] = command
    return {"case": asdict(case), "workload": {"model": w.model.name, "tokens": w.seq_len_tokens, "world_size": 1,
                                                "settings": asdict(w.settings)},
            "predicted": pred, "measured": measured, "ok": bool(measured.get("ok")),
            "failure": measured.get("failure"), "provenance": provenance,
            "rows": rows_for(case.name, pred, measured)}


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.3f}"


def markdown(records: list[dict], header: dict) -> str:
    lines = ["# Pinned host memory of offload runs: planner vs measured (issue 15)", "",
             f"GPU {header.get('gpu_name')} (driver {header.get('driver_version')}), torch "
             f"{header.get('torch_version')}, {header.get('date_utc')}, git {header.get('git_sha')}", "",
             f"Command: `{header.get('command')}`", "", f"Method: {METHOD}.", "",
             "| case | figure | predicted GiB | measured GiB | error % | measured source |", "|---|---|---|---|---|---|"]
    for record in records:
        if not record["rows"] or not record["ok"]:
            lines.append(f"| {record['case']['name']} | (run: {record.get('failure') or 'incomplete'}) | | | | |")
        for row in record["rows"]:
            err = "-" if row["error_pct"] is None else f"{row['error_pct']:+.1f}"
            lines.append(f"| {row['case']} | {row['figure']} | {_gib(row['predicted_bytes'])} | "
                         f"{_gib(row['measured_bytes'])} | {err} | {row['source']} |")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver (parent process)


def run_cases(cases: list[Case], *, budget_s: float, command: str, cpu_dry_run: bool = False) -> list[dict]:
    """Each case in its own process, within ``budget_s`` in all; the children's records."""
    start, out = time.monotonic(), []
    for case in cases:
        left = budget_s - (time.monotonic() - start)
        if left < min(case.expected_s, 20.0):
            out.append((case, {"case": case.name, "ok": False, "failure": f"skipped: {left:.0f} s of budget left"}))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "case.json")
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", case.name, "--child-out", path,
                    "--command", command] + (["--cpu-dry-run"] if cpu_dry_run else [])
            began = time.monotonic()
            try:
                proc = subprocess.run(argv, timeout=min(CASE_TIMEOUT_S, left), capture_output=True, text=True)
                failure = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-800:]}"
            except subprocess.TimeoutExpired:
                failure = f"timeout after {time.monotonic() - began:.0f} s"
            try:
                with open(path, encoding="utf-8") as handle:
                    measured = json.load(handle)
            except (OSError, ValueError):
                measured = {"case": case.name, "ok": False}
            if failure and not measured.get("failure"):
                measured["failure"] = failure
            measured["wall_s"] = time.monotonic() - began
            print(f"{case.name}: ok={measured.get('ok')} phase={measured.get('phase')} "
                  f"failure={measured.get('failure')} {measured['wall_s']:.0f} s", flush=True)
            out.append((case, measured))
    return out


def write_outputs(records: list[dict], out_dir: Path, *, command: str, git_sha: str | None) -> tuple[Path, Path]:
    prov = next((r["provenance"] for r in records if r["provenance"].get("gpu_name")), {})
    header = {"gpu_name": prov.get("gpu_name"), "driver_version": prov.get("driver_version"),
              "torch_version": prov.get("torch_version"), "cuda_version": prov.get("cuda_version"),
              "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
              "command": command, "git_sha": git_sha or prov.get("git_sha"), "method": METHOD}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "pinned_host_check.json", out_dir / "pinned_host_check.md"
    json_path.write_text(json.dumps({"schema": SCHEMA, **header, "records": records}, indent=1, default=str) + "\n")
    md_path.write_text(markdown(records, header))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--command", default=None, help="the command to record (default: this one)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny models on the CPU: checks the plumbing, measures nothing pinned")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_name = {c.name: c for c in CASES}
    command = args.command or shlex.join([Path(sys.executable).name, *sys.argv])
    if args.child:
        measure_case(by_name[args.child], args.child_out, command, cpu_dry_run=args.cpu_dry_run)
        return 0
    unknown = [n for n in args.cases.split(",") if n not in by_name]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(by_name)}")
    git_sha = os.environ.get("RINGPLAN_GIT_SHA")
    results = run_cases([by_name[n] for n in args.cases.split(",")], budget_s=args.budget_s, command=command,
                        cpu_dry_run=args.cpu_dry_run)
    records = [build_record(case, measured, command=command, git_sha=git_sha, tiny=args.cpu_dry_run)
               for case, measured in results]
    json_path, md_path = write_outputs(records, Path(args.out), command=command, git_sha=git_sha)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
