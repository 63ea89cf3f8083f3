"""Sweep the local block kernel the runtime runs, by shape, for the kernel-rate model; time held-out steps.

One GPU (about 5-7 minutes on H100/H200)::

    python benchmarks/kernel_sweep.py --out $OUT
    python benchmarks/kernel_sweep.py --large-blocks --out $OUT   # long blocks only (about 3 minutes)

CPU smoke test (tiny sizes, seconds; what CI runs)::

    python benchmarks/kernel_sweep.py --cpu-smoke --out /tmp/sweep

Two files, written again after every configuration (a run stopped by its budget keeps what it timed):

- ``kernels_<gpu>_<stamp>.json`` (``ringplan.kernels/1``, the FIT data): ``block_forward`` /
  ``block_backward`` of ``ringplan_runtime.kernels`` — exactly the ring's per-step calls, GQA
  expansion included when the op is not natively GQA — with the backend the runtime's ``auto``
  picks for (dtype, head_dim) on this GPU, over head_dim × dtype × GQA ratio × causal × pass at a
  few (heads, tokens) points per configuration; plus fp32 LSE merges.
- ``steps_<gpu>_<stamp>.json`` (``ringplan.kernel_steps/1``, HELD OUT, never fitted on): one layer
  step at world size 1 measured as ``ringplan validate --world-size 1`` does
  (``ringplan_runtime.measure.measure_step``) for shapes whose (heads, tokens, batch) are not
  sweep points.

Timing: CUDA events around one call, 1 warm-up (cuDNN plan build), then >= 3 and <= 30 repeats
until 0.05 s; median. Inputs random normal (never zeros). A watchdog ends the run after
--hard-timeout-s; configurations that would overrun --budget-s are skipped and listed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KERNELS_FORMAT = "ringplan.kernels/1"
STEPS_FORMAT = "ringplan.kernel_steps/1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (dtype, head_dim, GQA ratios): the fit grid. bf16 is the main dtype; fp16 and fp32 sampled.
GRID: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("bf16", 128, (1, 4, 8)), ("bf16", 64, (1, 4, 8)), ("bf16", 256, (1, 4, 8)),
    ("fp16", 128, (1, 4, 8)), ("fp16", 64, (1, 4)), ("fp16", 256, (1,)),
    ("fp32", 64, (1, 8)), ("fp32", 128, (1, 8)), ("fp32", 256, (1,)),
)
# (heads, tokens) per configuration: short blocks (fixed cost), a token ladder at 16 heads, many heads.
POINTS_HALF = ((8, 2048), (16, 4096), (16, 16384), (16, 65536), (64, 8192), (8, 131072))
POINTS_HD256 = ((8, 2048), (16, 4096), (16, 16384), (8, 65536), (64, 4096))
POINTS_FP32 = ((8, 2048), (16, 4096), (8, 16384), (8, 32768), (32, 4096))
# Forced other backends at bf16 / head_dim 128 / MHA (what --backend flash|efficient plans with).
FORCED = (("flash", (16, 4096), (16, 16384), (16, 65536), (64, 8192)),
          ("efficient", (16, 4096), (16, 16384), (8, 32768), (64, 4096)))
MERGE_POINTS = ((32, 4096), (32, 16384), (32, 65536))
# --large-blocks: long blocks (few heads), where the rate still moves with tokens per block (dtype, head_dim,
# GQA ratios, points).
LARGE_HALF = ((4, 131072), (2, 262144), (1, 524288))
LARGE: tuple[tuple[str, int, tuple[int, ...], tuple[tuple[int, int], ...]], ...] = (
    ("bf16", 128, (1,), LARGE_HALF), ("bf16", 128, (8,), ((8, 131072), (8, 262144))),
    ("fp16", 128, (1,), LARGE_HALF), ("bf16", 64, (1,), LARGE_HALF), ("fp16", 64, (1,), LARGE_HALF),
    ("fp32", 64, (1,), ((2, 65536), (1, 131072), (1, 262144))),
    ("fp32", 128, (1,), ((2, 65536), (1, 131072), (1, 262144))),
    ("bf16", 256, (1,), LARGE_HALF), ("fp16", 256, (1,), LARGE_HALF),
)

# Held-out step shapes (world size 1): name, heads, kv heads, head_dim, dtype, tokens, batch, causal,
# training, projections. The first five are issue 20's.
STEPS = (
    ("40/8x128 bf16 training causal 128Ki", 40, 8, 128, "bf16", 131072, 1, True, True, False),
    ("64/8x128 bf16 forward causal 256Ki", 64, 8, 128, "bf16", 262144, 1, True, False, False),
    ("8x256 bf16 training 64Ki", 8, 8, 256, "bf16", 65536, 1, False, True, False),
    ("16x64 fp32 forward +proj 128Ki", 16, 16, 64, "fp32", 131072, 1, False, False, True),
    ("32x128 b2 bf16 training causal 64Ki", 32, 32, 128, "bf16", 65536, 2, True, True, False),
    ("16/4x128 fp16 training 128Ki", 16, 4, 128, "fp16", 131072, 1, False, True, False),
    ("8x64 bf16 forward causal 512Ki", 8, 8, 64, "bf16", 524288, 1, True, False, False),
    ("24/8x128 fp16 forward causal 192Ki", 24, 8, 128, "fp16", 196608, 1, True, False, False),
    ("16x256 fp16 forward causal 96Ki", 16, 16, 256, "fp16", 98304, 1, True, False, False),
    ("32/4x64 bf16 training causal 128Ki", 32, 4, 64, "bf16", 131072, 1, True, True, False),
    ("8/1x128 fp32 training causal 32Ki", 8, 1, 128, "fp32", 32768, 1, True, True, False),
    ("16/2x64 fp32 forward 48Ki", 16, 2, 64, "fp32", 49152, 1, False, False, False),
    ("64x128 bf16 forward 16Ki", 64, 64, 128, "bf16", 16384, 1, False, False, False),
    ("8x256 bf16 forward 128Ki", 8, 8, 256, "bf16", 131072, 1, False, False, False),
    ("48/8x128 bf16 training 32Ki", 48, 8, 128, "bf16", 32768, 1, False, True, False),
    ("16/2x128 bf16 training causal 256Ki", 16, 2, 128, "bf16", 262144, 1, True, True, False),
)
SMOKE_STEPS = (("4/2x16 fp32 training causal 128", 4, 2, 16, "fp32", 128, 1, True, True, False),
               ("2x16 fp32 forward +proj 64", 2, 2, 16, "fp32", 64, 1, False, False, True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the two JSON files")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (for CI)")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting kernel configurations after this")
    p.add_argument("--steps-budget-s", type=float, default=470.0, help="stop starting step shapes after this")
    p.add_argument("--hard-timeout-s", type=float, default=540.0, help="watchdog: exit 3 after this")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--large-blocks", action="store_true",
                   help="time only the long-block points (LARGE), no merges, no steps; a second kernels file")
    return p.parse_args(argv)


def start_watchdog(seconds: float) -> None:
    def fire() -> None:
        print(f"kernel_sweep: watchdog fired after {seconds:.0f} s; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def gpu_name_and_driver(device: torch.device) -> tuple[str, str | None]:
    """The GPU's name and driver version as NVML reports them (torch's name if NVML is absent)."""
    if device.type != "cuda":
        return platform.processor() or platform.machine() or "cpu", None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        name, driver = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlSystemGetDriverVersion()
        return tuple(x.decode() if isinstance(x, bytes) else x for x in (name, driver))
    except Exception as exc:  # noqa: BLE001 - NVML absent: torch's name, no driver
        print(f"kernel_sweep: NVML unavailable ({exc}); using torch's device name", file=sys.stderr)
        return torch.cuda.get_device_name(device), None


def provenance(device: torch.device, method: str) -> dict[str, object]:
    name, driver = gpu_name_and_driver(device)
    nccl = None
    if device.type == "cuda":
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {"gpu_driver_name": name, "driver_version": driver, "torch_version": torch.__version__,
            "nccl_version": nccl, "cuda_version": torch.version.cuda if device.type == "cuda" else None,
            "git_sha": os.environ.get("RINGPLAN_GIT_SHA", "unknown"),
            "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "command": os.environ.get("RINGPLAN_COMMAND", shlex.join(["python", *sys.argv])), "method": method,
            "cudnn_version": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "hostname": platform.node(), "gpu_count": 1}


class Timer:
    """Median seconds of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def once(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    def median(self, fn) -> tuple[float, int]:
        self.once(fn)
        times: list[float] = []
        while len(times) < 3 or (sum(times) < 0.05 and len(times) < 30):
            times.append(self.once(fn))
        return statistics.median(times), len(times)


def _row(backend, pass_name, causal, dtype, b, h, h_kv, d, n, seconds, reps) -> dict[str, object]:
    return {"op": "attention", "backend": backend, "pass": pass_name, "causal": causal, "dtype": dtype, "batch": b,
            "n_heads": h, "n_kv_heads": h_kv, "head_dim": d, "q_tokens": n, "kv_tokens": n,
            "seconds_median": seconds, "repeats": reps}


class Sweep:
    """Kernel configurations in priority order, each at its (heads, tokens) points, forward then backward."""

    def __init__(self, args, device: torch.device) -> None:
        from ringplan_runtime.backends import select_backend
        from ringplan_runtime.kernels import block_backward, block_forward, native_gqa

        self.select, self.forward, self.backward, self.native = select_backend, block_forward, block_backward, native_gqa
        self.args, self.device, self.timer = args, device, Timer(device)
        self.rows: list[dict[str, object]] = []
        self.skipped: list[str] = []
        self.native_gqa: dict[str, bool] = {}
        self.began = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.began

    def configs(self) -> list[tuple[str, str, int, int, bool, tuple]]:
        """(backend, dtype, head_dim, gqa, causal, points): the runtime's auto backend per (dtype, head_dim)."""
        out = []
        if self.args.cpu_smoke:
            for gqa in (1, 2):
                for causal in (False, True):
                    out.append(("auto", "fp32", 16, gqa, causal, ((2, 64), (4, 128), (2, 256))))
            return out
        if self.args.large_blocks:
            return [("auto", dtype, d, gqa, causal, points) for dtype, d, ratios, points in LARGE
                    for gqa in ratios for causal in (False, True)]
        for dtype, d, ratios in GRID:
            points = POINTS_FP32 if dtype == "fp32" else POINTS_HD256 if d == 256 else POINTS_HALF
            for gqa in ratios:
                for causal in (False, True):
                    out.append(("auto", dtype, d, gqa, causal, points))
        for backend, *points in FORCED:
            for causal in (False, True):
                out.append((backend, "bf16", 128, 1, causal, tuple(points)))
        return out

    def time_point(self, what: str, fn) -> tuple[float, int] | None:
        try:
            return self.timer.median(fn)
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # unsupported, or out of memory
            self.skipped.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            return None

    def run_config(self, backend: str, dtype_name: str, d: int, gqa: int, causal: bool, points: tuple) -> None:
        dtype = DTYPES[dtype_name]
        chosen = self.select(self.device, dtype, d, backend)
        for direction in ("forward", "backward"):
            if gqa > 1 and self.device.type == "cuda":
                self.native_gqa[f"{chosen} {dtype_name} {direction}"] = self.native(chosen, str(self.device), dtype,
                                                                                    direction)
        for h, n in points:
            what = f"{chosen} {dtype_name} {h}/{h // gqa}x{d} {'causal' if causal else 'non-causal'} {n} tokens"
            q = torch.randn(1, n, h, d, dtype=dtype, device=self.device)
            k, v = (torch.randn(1, n, h // gqa, d, dtype=dtype, device=self.device) for _ in range(2))
            scale = 1.0 / math.sqrt(d)
            fwd = lambda: self.forward(q, k, v, backend=chosen, causal=causal, scale=scale)  # noqa: E731
            got = self.time_point(f"{what} forward", fwd)
            if got is not None:
                self.rows.append(_row(chosen, "forward", causal, dtype_name, 1, h, h // gqa, d, n, *got))
                out, lse = fwd()
                dout = torch.randn_like(out)
                bwd = lambda: self.backward(dout, q, k, v, out, lse, backend=chosen, causal=causal,  # noqa: E731
                                            scale=scale)
                got = self.time_point(f"{what} backward", bwd)
                if got is not None:
                    self.rows.append(_row(chosen, "backward", causal, dtype_name, 1, h, h // gqa, d, n, *got))
                out = lse = dout = None
            q = k = v = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run_merges(self) -> None:
        from ringplan_runtime.merge import merge_

        points = ((2, 64), (2, 128)) if self.args.cpu_smoke else MERGE_POINTS
        for h, n in points:
            d = 16 if self.args.cpu_smoke else 128
            dtype = torch.float32 if self.args.cpu_smoke else torch.bfloat16
            out = torch.randn(1, n, h, d, dtype=dtype, device=self.device)
            lse = torch.randn(1, h, n, dtype=torch.float32, device=self.device)
            acc = torch.randn(out.shape, dtype=torch.float32, device=self.device)
            lse_acc = torch.randn(lse.shape, dtype=torch.float32, device=self.device)
            got = self.time_point(f"merge {h}x{d} {n}", lambda: merge_(acc, lse_acc.transpose(1, 2), out,
                                                                        lse.transpose(1, 2)))
            if got is not None:
                self.rows.append({"op": "merge", "dtype": "fp32" if self.args.cpu_smoke else "bf16", "batch": 1,
                                  "n_heads": h, "head_dim": d, "q_tokens": n, "seconds_median": got[0],
                                  "repeats": got[1]})

    def run(self, write) -> None:
        if not self.args.large_blocks:
            self.run_merges()
        for backend, dtype, d, gqa, causal, points in self.configs():
            label = f"{backend} {dtype} hd{d} gqa{gqa} {'causal' if causal else 'non-causal'}"
            if self.elapsed_s() > self.args.budget_s:
                self.skipped.append(f"{label} (budget)")
                continue
            self.run_config(backend, dtype, d, gqa, causal, points)
            print(f"kernels: {label} done ({self.elapsed_s():.0f} s, {len(self.rows)} rows)", flush=True)
            write()


KERNEL_METHOD = ("ringplan_runtime.kernels.block_forward/block_backward (the ring's per-step calls, inputs [B, n, H, D] "
                 "random normal, K/V with H/gqa heads: expanded before the op unless native_gqa), backend = "
                 "ringplan_runtime.backends.select_backend(device, dtype, head_dim, 'auto') unless forced; "
                 "ringplan_runtime.merge.merge_ into fp32 accumulators; per point 1 warm-up, then >= 3 and <= 30 "
                 "repeats until 0.05 s; median of CUDA-event timings")


def step_records(args, device: torch.device, sweep_began: float, write_steps) -> tuple[list[dict], list[str]]:
    """Each held-out shape's world-size-1 step time, measured by ringplan_runtime.measure.measure_step."""
    from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload
    from ringplan_runtime.measure import MeasureSettings, measure_step

    settings = MeasureSettings(warmup_steps=1, timed_steps=3, track_live_tensors=False, count_sent_bytes=False)
    records, skipped = [], []
    for name, h, h_kv, d, dtype, tokens, batch, causal, training, projections in \
            (SMOKE_STEPS if args.cpu_smoke else STEPS):
        if time.monotonic() - sweep_began > args.steps_budget_s:
            skipped.append(f"{name} (budget)")
            continue
        shape = AttentionShape(n_heads=h, n_kv_heads=h_kv, head_dim=d, batch=batch, dtype=dtype,
                               embed_dim=h * d)
        work = Workload(seq_len_tokens=tokens, shape=shape, pattern=AttentionPattern(causal=causal),
                        training=training, projections=projections)
        layout = RingLayout(ring_size=1, layout="zigzag" if causal else "contiguous", backend="auto")
        began = time.monotonic()
        try:
            result = measure_step(work, layout, device=device, settings=settings)
        except Exception as exc:  # noqa: BLE001 - record and go on
            skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        records.append({"name": name, "n_heads": h, "n_kv_heads": h_kv, "head_dim": d, "dtype": dtype,
                        "seq_len_tokens": tokens, "batch": batch, "causal": causal, "training": training,
                        "projections": projections, "embed_dim": h * d, "ring_size": 1, "backend": result.backend,
                        "feasible": result.feasible, "step_time_s": result.step_time_s,
                        "step_times_s": list(result.step_times_s)})
        print(f"step: {name}: {result.backend} {result.step_time_s and result.step_time_s * 1e3:.3f} ms "
              f"({time.monotonic() - began:.1f} s)", flush=True)
        write_steps(records, skipped)
    return records, skipped


STEP_METHOD = ("ringplan_runtime.measure.measure_step at ring size 1 (what `ringplan validate --world-size 1` runs): "
               "random inputs, 1 warm-up step, one memory step, then the median of 3 CUDA-event step timings; "
               "training = forward + backward through autograd; backend 'auto'")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_watchdog(args.hard_timeout_s)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("kernel_sweep: no CUDA device (use --cpu-smoke for the CPU smoke run)")
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = Path(args.out)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    gpu, _ = gpu_name_and_driver(device)
    sweep = Sweep(args, device)
    kernels_path = out_dir / f"kernels_{_slug(gpu)}_{stamp}.json"
    steps_path = out_dir / f"steps_{_slug(gpu)}_{stamp}.json"

    def method() -> str:
        native = "; ".join(f"{k}: {'native' if v else 'expanded'}" for k, v in sorted(sweep.native_gqa.items()))
        text = KERNEL_METHOD + (f"; GQA {native}" if native else "")
        return text + (f"; skipped: {'; '.join(sweep.skipped)}" if sweep.skipped else "")

    def write_kernels() -> None:
        if sweep.rows:
            _write_json(kernels_path, {"schema": KERNELS_FORMAT, "provenance": provenance(device, method()),
                                       "rows": sweep.rows})

    def write_steps(records: list[dict], skipped: list[str]) -> None:
        text = STEP_METHOD + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
        _write_json(steps_path, {"schema": STEPS_FORMAT, "provenance": provenance(device, text), "rows": records})

    sweep.run(write_kernels)
    write_kernels()
    print(f"wrote {kernels_path} ({len(sweep.rows)} rows, {len(sweep.skipped)} skipped)", flush=True)
    for line in sweep.skipped:
        print(f"  skipped {line}", flush=True)
    if not args.skip_steps and not args.large_blocks:
        records, skipped = step_records(args, device, sweep.began, write_steps)
        write_steps(records, skipped)
        print(f"wrote {steps_path} ({len(records)} steps, {len(skipped)} skipped)", flush=True)
        for line in skipped:
            print(f"  skipped {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
