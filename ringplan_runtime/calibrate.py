"""``ringplan calibrate``: measure this GPU in a short, time-boxed plan, write the rows, refit.

One GPU, about 90 s (``ringplan calibrate --budget-s 90``). Phases, in order, each with a share of what
is left of the budget; a phase cut by the budget keeps what it measured and says what it skipped:

1. **attention** (``ringplan_runtime.sweep.run_sweep``, the ``ringplan profile`` sweep): a few token
   counts of the default layer (32x128, bf16) forward and training, GQA 32/8, with projections, and
   the seed's dilated module, at W = 1 (and W = 2 with two GPUs: the NCCL communicator and P2P
   buffers); what ``memory.calibration`` fits per GPU (kernel workspace, allocator slack, memory
   outside the allocator). Rows merged into ``measured/<gpu>-calibrate.json``. Runs first, in child
   processes, while this process holds no CUDA context (NVML reads the whole device).
2. **link** (two GPUs or more): ``benchmarks/measure_timing.py`` under torchrun, p2p sweep only.
3. **context**: NVML used − the allocator's reserved after a CUDA context, a cuBLAS GEMM and one
   attention block: CUDA context and library memory (reported; the fit takes it from the rows).
4. **kernels**: ``benchmarks/kernel_sweep.py``'s ``Sweep`` on a few bf16 head-dim-128 configurations.
5. **gemm**: ``benchmarks/measure_gemm.py``'s sweep on llama-3-8b's block shapes at two row counts.
6. **refit**: ``ringplan.memory.fit_cache.write_fit(MEMORY_FIT)``, what ``ringplan fit --write`` runs.

Timing files are new files per run (``kernels_<gpu>_calibrate_<stamp>.json``, ``gemm_…``), written
with the standard validating writers; the time model keys them by the driver's GPU name.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ringplan.paths import measured_dir, timing_dir
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload
from ringplan_runtime import nvml
from ringplan_runtime.measure import MeasureSettings
from ringplan_runtime.points import SweepPoint
from ringplan_runtime.provenance import git_sha
from ringplan_runtime.sweep import run_sweep

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
#: Seconds kept for the refit out of the budget.
REFIT_RESERVE_S = 3.0
#: Share of the budget left that each phase may use (the last one takes the rest).
PHASE_SHARES = {"attention": 0.55, "link": 0.3, "kernels": 0.6, "gemm": 1.0}
#: (backend, dtype, head_dim, GQA ratio, causal, (heads, tokens) points) of the kernel phase (GPU / CPU).
KERNEL_CONFIGS = (("auto", "bf16", 128, 1, False, ((16, 4096), (16, 16384), (16, 65536), (64, 8192))),
                  ("auto", "bf16", 128, 1, True, ((16, 4096), (16, 16384), (16, 65536), (64, 8192))),
                  ("auto", "bf16", 128, 4, True, ((16, 4096), (16, 16384), (64, 8192))))
KERNEL_CONFIGS_CPU = (("auto", "fp32", 16, 1, False, ((2, 64), (4, 128))),)
SERIES = "ringplan calibrate"


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    """What one phase measured: ``done`` of ``planned`` items, files written, seconds, what was skipped."""

    name: str
    done: int
    planned: int
    seconds: float
    written: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    figures: dict = field(default_factory=dict)


def attention_points(*, cpu: bool, ring_sizes: tuple[int, ...] = (1,)) -> list[SweepPoint]:
    """The attention plan, most needed first: (shape, pattern, mode, projections, tokens) at each ring size."""
    if cpu:
        dense, gqa = AttentionShape(n_heads=4, head_dim=16, dtype="fp32"), AttentionShape(n_heads=4, n_kv_heads=2,
                                                                                         head_dim=16, dtype="fp32")
        plan = [(dense, None, False, False, (64, 128)), (dense, None, True, False, (64, 128)),
                (gqa, None, True, False, (64,)), (dense, None, False, True, (128,))]
    else:
        dense = AttentionShape(n_heads=32, head_dim=128)
        gqa = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128)
        seed = AttentionShape(n_heads=12, head_dim=64, embed_dim=768)
        dilated = AttentionPattern(segment_lengths_tokens=(4096, 8192, 16384), dilation_rates=(1, 2, 4))
        plan = [(dense, None, False, False, (6144, 12288, 24576)), (dense, None, True, False, (6144, 12288, 24576)),
                (gqa, None, False, False, (6144, 24576)), (gqa, None, True, False, (6144, 24576)),
                (dense, None, False, True, (6144, 24576)), (seed, dilated, False, True, (65536, 196608))]
    points = []
    for ring_size in ring_sizes:
        for shape, pattern, training, projections, tokens in plan[: 2 if ring_size > 1 else None]:
            for seq_len in tokens:
                workload = Workload(seq_len_tokens=seq_len * ring_size, shape=shape, training=training,
                                    pattern=pattern or AttentionPattern(), projections=projections)
                points.append(SweepPoint(workload=workload, layout=RingLayout(ring_size=ring_size)))
    return points


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module: calibrate reuses its timing sweep, never a copy of it."""
    if name in sys.modules:
        return sys.modules[name]
    path = BENCHMARKS_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"calibrate reuses {path}, which is missing: run it from a ringplan checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def file_slug(text: str) -> str:
    """A GPU name as a file-name part, as the benchmarks name their files (``nvidia-h100-80gb-hbm3``)."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def share_s(deadline_s: float, phase: str) -> float:
    """Seconds phase ``phase`` may use: its share of what is left before ``deadline_s`` (monotonic)."""
    return max(0.0, (deadline_s - time.monotonic()) * PHASE_SHARES[phase])


def attention_phase(gpu: str, *, device: str, deadline_s: float, command: str, progress: bool) -> Phase:
    """The attention sweep at W = 1 (and 2 with two GPUs), rows merged into ``measured/<gpu>-calibrate.json``."""
    began = time.monotonic()
    cpu = device == "cpu"
    ring_sizes = (1, 2) if not cpu and torch.cuda.device_count() >= 2 else (1,)
    points = attention_points(cpu=cpu, ring_sizes=ring_sizes)
    path = measured_dir() / f"{gpu}-calibrate.json"
    settings = MeasureSettings(warmup_steps=0 if cpu else 1, timed_steps=1 if cpu else 3)
    phase_deadline_s = began + share_s(deadline_s, "attention")
    results = run_sweep(points, profile_path=path, settings=settings, command=command, progress=progress,
                        timeout_s=max(1.0, phase_deadline_s - began), record_as=gpu, series=SERIES, device=device,
                        deadline_s=phase_deadline_s)
    kept = [r for r in results if r.feasible or r.failure == "oom"]
    lost = [f"{r.point.workload.seq_len_tokens:,} tokens W={r.point.layout.ring_size}: {r.failure}"
            for r in results if not (r.feasible or r.failure == "oom")]
    skipped = lost + [f"{len(points) - len(results)} point(s) (budget)"] * (len(results) < len(points))
    return Phase(name="attention", done=len(kept), planned=len(points), seconds=time.monotonic() - began,
                 written=(str(path),) * bool(kept), skipped=tuple(skipped))


def link_phase(deadline_s: float) -> Phase:
    """The p2p link sweep of ``benchmarks/measure_timing.py`` on two GPUs under torchrun (subprocess)."""
    began, budget_s = time.monotonic(), share_s(deadline_s, "link")
    script = BENCHMARKS_DIR / "measure_timing.py"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
            "--out", str(timing_dir()), "--skip-kernels", "--p2p-max-bytes", str(2**28),
            "--hard-timeout-s", str(max(5.0, budget_s)), "--collective-timeout-s", str(max(5.0, budget_s))]
    before = set(timing_dir().glob("p2p_*.json"))
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=max(5.0, budget_s) + 5)
        failure = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
    except subprocess.TimeoutExpired:
        failure = "budget"
    written = tuple(str(p) for p in sorted(set(timing_dir().glob("p2p_*.json")) - before))
    return Phase(name="link", done=len(written), planned=1, seconds=time.monotonic() - began, written=written,
                 skipped=(f"p2p sweep ({failure})",) if failure else ())


def outside_allocator_bytes(device: torch.device, reference: str | int) -> int | None:
    """NVML's used bytes of the device minus what the allocator reserved: context, libraries, others."""
    torch.cuda.synchronize(device)
    reading = nvml.device_memory(reference)
    return None if reading is None else reading.used_bytes - torch.cuda.memory_reserved(device)


def context_phase(device: torch.device) -> Phase:
    """CUDA context, cuBLAS and attention-kernel library bytes: steps of NVML used − allocator reserved."""
    from ringplan_runtime.backends import select_backend
    from ringplan_runtime.kernels import block_forward

    began, reference = time.monotonic(), nvml.first_visible_device()
    baseline = nvml.device_memory(reference)
    torch.cuda.set_device(device)
    torch.empty(1, device=device)
    context = outside_allocator_bytes(device, reference)
    a = torch.randn(1024, 1024, dtype=torch.bfloat16, device=device)
    (a @ a).sum().item()
    cublas = outside_allocator_bytes(device, reference)
    q = torch.randn(1, 1024, 8, 128, dtype=torch.bfloat16, device=device)
    backend = select_backend(device, torch.bfloat16, 128)
    block_forward(q, q, q, backend=backend, causal=False, scale=1 / math.sqrt(128))
    attention = outside_allocator_bytes(device, reference)
    if baseline is None or None in (context, cublas, attention):
        return Phase(name="context", done=0, planned=1, seconds=time.monotonic() - began, skipped=("no NVML",))
    figures = {"device_used_before_bytes": baseline.used_bytes, "context_bytes": context - baseline.used_bytes,
               "cublas_bytes": cublas - context, "attention_library_bytes": attention - cublas,
               "attention_backend": backend, "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    return Phase(name="context", done=1, planned=1, seconds=time.monotonic() - began, figures=figures)


def timing_provenance(module, device: torch.device, method: str, command: str, gpu: str) -> dict:
    """A benchmark module's provenance, with this command, this checkout's sha and the catalog name."""
    provenance = module.provenance(device, method)
    return {**provenance, "command": command, "git_sha": git_sha(), "notes": [f"{SERIES}: recorded as {gpu}"]}


def kernel_phase(device: torch.device, deadline_s: float, command: str, gpu: str, stamp: str) -> Phase:
    """A few kernel-sweep configurations (``kernel_sweep.Sweep``), written as one ``ringplan.kernels/1`` file."""
    from ringplan.profiles.timing import KERNELS_FORMAT, write_timing_profile

    sweeps = benchmark_module("kernel_sweep")
    configs = KERNEL_CONFIGS_CPU if device.type == "cpu" else KERNEL_CONFIGS

    class FewConfigs(sweeps.Sweep):
        def configs(self) -> list:
            return list(configs)

    began = time.monotonic()
    sweep = FewConfigs(argparse.Namespace(cpu_smoke=device.type == "cpu", large_blocks=False,
                                          budget_s=share_s(deadline_s, "kernels")), device)
    sweep.run(lambda: None)
    path = timing_dir() / f"kernels_{file_slug(sweeps.gpu_name_and_driver(device)[0])}_calibrate_{stamp}.json"
    method = sweeps.KERNEL_METHOD + (f"; skipped: {'; '.join(sweep.skipped)}" if sweep.skipped else "")
    if sweep.rows:
        write_timing_profile(path, {"schema": KERNELS_FORMAT, "rows": sweep.rows,
                                    "provenance": timing_provenance(sweeps, device, method, command, gpu)})
    cut = sum(entry.endswith("(budget)") for entry in sweep.skipped)
    return Phase(name="kernels", done=len(configs) - cut, planned=len(configs), seconds=time.monotonic() - began,
                 written=(str(path),) * bool(sweep.rows), skipped=tuple(sweep.skipped))


def gemm_phase(device: torch.device, deadline_s: float, command: str, gpu: str, stamp: str) -> Phase:
    """``measure_gemm.sweep`` on llama-3-8b's block GEMMs at two row counts, one ``ringplan.gemm/1`` file."""
    from ringplan.profiles.gemm import GEMM_FORMAT, write_gemm_profile

    gemms = benchmark_module("measure_gemm")
    cpu = device.type == "cpu"
    args = argparse.Namespace(cpu_smoke=cpu, models="llama-3-8b", tokens="32,64" if cpu else "4096,16384",
                              lm_head_max_tokens=64 if cpu else 16384, dtype="fp32" if cpu else "bf16",
                              budget_s=share_s(deadline_s, "gemm"))
    began = time.monotonic()
    rows, skipped = gemms.sweep(args, device)
    method = gemms.METHOD.format(dtype=args.dtype) + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
    provenance = timing_provenance(gemms, device, method, command, gpu)
    path = timing_dir() / f"gemm_{file_slug(provenance['gpu_driver_name'])}_calibrate_{stamp}.json"
    if rows:
        write_gemm_profile(path, {"schema": GEMM_FORMAT, "provenance": provenance, "rows": rows})
    return Phase(name="gemm", done=len(rows) // 3, planned=len(rows) // 3 + len(skipped),
                 seconds=time.monotonic() - began, written=(str(path),) * bool(rows), skipped=tuple(skipped))


def refit_phase() -> Phase:
    """Refit the memory calibrations of every measured profile (``ringplan fit --write``'s ``write_fit``)."""
    from ringplan.memory.attention_model import MEMORY_FIT
    from ringplan.memory.fit_cache import write_fit

    began = time.monotonic()
    payload = write_fit(MEMORY_FIT)
    return Phase(name="refit", done=len(payload["calibrations"]), planned=len(payload["calibrations"]),
                 seconds=time.monotonic() - began, written=(str(MEMORY_FIT.path()),))


def calibrate(gpu: str, *, device: str = "cuda", budget_s: float = 90.0, command: str = "",
              progress: bool = True, on_phase: Callable[[Phase], None] | None = None) -> list[Phase]:
    """Run every phase within ``budget_s`` seconds (the refit last, always) and return what each did.

    ``device``: ``cuda`` (the GPUs), or ``cpu`` (tests only: gloo ranks, the live-tensor tracker in place
    of the allocator, no context phase, tiny shapes). ``gpu`` is the catalog name the rows are recorded as.
    """
    if not budget_s > 0:
        raise ValueError(f"--budget-s must be > 0 seconds, got {budget_s}")
    deadline_s = time.monotonic() + budget_s - min(REFIT_RESERVE_S, 0.1 * budget_s)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    torch_device = torch.device("cpu") if device == "cpu" else torch.device("cuda", 0)
    steps: list[Callable[[], Phase]] = [
        lambda: attention_phase(gpu, device=device, deadline_s=deadline_s, command=command, progress=progress)]
    if device != "cpu" and torch.cuda.device_count() >= 2:
        steps.append(lambda: link_phase(deadline_s))
    if device != "cpu":
        steps.append(lambda: context_phase(torch_device))
    steps += [lambda: kernel_phase(torch_device, deadline_s, command, gpu, stamp),
              lambda: gemm_phase(torch_device, deadline_s, command, gpu, stamp), refit_phase]
    phases = []
    for step in steps:
        with contextlib.redirect_stdout(sys.stderr):  # the benchmarks print progress lines
            phases.append(step())
        if on_phase is not None:
            on_phase(phases[-1])
    return phases
