"""Measure what ringplan's time model fits: a ring-exchange sweep and local block-kernel timings.

Two GPUs of one node (p2p sweep + kernels; about 2-3 minutes on H100)::

    torchrun --standalone --nproc-per-node 2 benchmarks/measure_timing.py --out profiles/measured/timing

One GPU (kernels only)::  python benchmarks/measure_timing.py --out profiles/measured/timing
CPU smoke test (gloo, tiny sizes, seconds)::

    torchrun --standalone --nproc-per-node 2 benchmarks/measure_timing.py --cpu-smoke --out /tmp/timing

Writes ``ringplan.p2p/1`` (rank 0, when world size > 1) and ``ringplan.kernels/1`` (rank 0) JSON files
with provenance; ``ringplan.profiles.timing`` reads them. Never hangs: process-group operations
time out after --collective-timeout-s, a watchdog kills the process after --hard-timeout-s, and
kernel configurations that would not fit the --budget-s are skipped (and listed in the method).
Kernels are timed through ``ringplan_runtime.kernels.block_forward``/``block_backward`` and the
merge through ``ringplan_runtime.merge.merge_`` — exactly what the ring calls per step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ringplan.profiles.timing import KERNELS_FORMAT, P2P_FORMAT, write_timing_profile  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the JSON profiles")
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU at tiny sizes (for CI)")
    p.add_argument("--shapes", default="32x128,16x64", help="heads x head_dim list, e.g. 32x128,16x64")
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536,131072", help="block tokens list")
    p.add_argument("--backends", default="cudnn,flash,efficient", help="kernels to time")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--p2p-min-bytes", type=int, default=4096)
    p.add_argument("--p2p-max-bytes", type=int, default=2**30)
    p.add_argument("--skip-p2p", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting kernel configs after this")
    p.add_argument("--hard-timeout-s", type=float, default=225.0, help="watchdog: exit 3 after this")
    p.add_argument("--collective-timeout-s", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.shapes, args.sizes, args.backends, args.dtype = "2x16", "64,128", "cpu", "fp32"
        args.p2p_max_bytes = min(args.p2p_max_bytes, 2**16)
    return args


def start_watchdog(seconds: float) -> None:
    def fire() -> None:
        print(f"measure_timing: watchdog fired after {seconds:.0f} s; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def provenance(device: torch.device, method: str) -> dict[str, object]:
    """GPU name and driver from NVML (torch as fallback), versions, git sha, UTC date, command."""
    name, driver = None, None
    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            name, driver = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlSystemGetDriverVersion()
            name, driver = (x.decode() if isinstance(x, bytes) else x for x in (name, driver))
        except Exception as exc:  # NVML absent: torch's name, no driver version
            print(f"measure_timing: NVML unavailable ({exc}); using torch's device name", file=sys.stderr)
        name = name or torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = os.environ.get("RINGPLAN_GIT_SHA", "unknown")
    nccl = None
    if device.type == "cuda":
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
    if "WORLD_SIZE" in os.environ:
        command = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')} " + shlex.join(sys.argv)
    return {"gpu_driver_name": name, "driver_version": driver, "torch_version": torch.__version__,
            "nccl_version": nccl, "cuda_version": torch.version.cuda if device.type == "cuda" else None,
            "git_sha": sha, "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "command": os.environ.get("RINGPLAN_COMMAND", command), "method": method,
            "hostname": platform.node(), "gpu_count": int(os.environ.get("WORLD_SIZE", "1"))}


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

    def median(self, fn, *, warmup: int, min_reps: int, max_reps: int, target_s: float) -> tuple[float, int]:
        for _ in range(warmup):
            self.once(fn)
        times: list[float] = []
        while len(times) < min_reps or (sum(times) < target_s and len(times) < max_reps):
            times.append(self.once(fn))
        return statistics.median(times), len(times)


def p2p_sweep(args, device: torch.device, timer: Timer) -> list[dict[str, object]]:
    """Ring exchange of K-like and V-like halves (one batch_isend_irecv, as the runtime's RingComm)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    sizes = [1 << k for k in range(int(math.log2(args.p2p_min_bytes)), int(math.log2(args.p2p_max_bytes)) + 1)]
    send = torch.ones(sizes[-1], dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    rows = []
    for size in sizes:
        half = size // 2
        parts = [(send[:half], recv[:half]), (send[half:size], recv[half:size])]

        def exchange() -> None:
            ops = []
            for s, r in parts:
                ops += [dist.P2POp(dist.isend, s, nxt), dist.P2POp(dist.irecv, r, prv)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()

        times = []
        reps = 20 if size <= 2**26 else 8
        for i in range(3 + reps):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = timer.once(exchange)
            if i >= 3:
                times.append(t)
        local = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        rows.append({"message_bytes": size, "seconds_median": float(local.item()), "repeats": reps,
                     "bandwidth_bytes_per_s": size / float(local.item())})
        if rank == 0:
            print(f"p2p {size:>12,} B  {local.item() * 1e3:8.3f} ms  {size / local.item() / 1e9:7.1f} GB/s", flush=True)
    return rows


def _attention_row(backend, pass_name, causal, dtype, b, h, d, n, seconds, reps) -> dict[str, object]:
    return {"op": "attention", "backend": backend, "pass": pass_name, "causal": causal, "dtype": dtype, "batch": b,
            "n_heads": h, "n_kv_heads": h, "head_dim": d, "q_tokens": n, "kv_tokens": n, "seconds_median": seconds,
            "repeats": reps}


class KernelSweep:
    """Times forward, backward (and fwd+bwd at small sizes) per (shape, size, backend, causal), plus merges."""

    def __init__(self, args, device: torch.device, timer: Timer) -> None:
        from ringplan_runtime.kernels import block_backward, block_forward
        from ringplan_runtime.merge import merge_

        self.forward, self.backward, self.merge = block_forward, block_backward, merge_
        self.args, self.device, self.timer = args, device, timer
        self.rows: list[dict[str, object]] = []
        self.skipped: list[str] = []
        self.last: dict[tuple, tuple[int, float]] = {}  # (h, d, backend, causal, pass) -> (n, seconds)
        self.began = time.monotonic()

    def fits_budget(self, key: tuple, n: int) -> bool:
        """Skip a config whose time, extrapolated ~n² from the last size, would overrun the budget."""
        if key not in self.last:
            return time.monotonic() - self.began < self.args.budget_s
        last_n, last_s = self.last[key]
        estimate = last_s * (n / last_n) ** 2 * 4  # warm-up + 3 repeats
        return time.monotonic() - self.began + estimate < self.args.budget_s

    def timed(self, key: tuple, n: int, fn) -> tuple[float, int] | None:
        if not self.fits_budget(key, n):
            self.skipped.append(f"{key} at {n} tokens (budget)")
            return None
        try:
            seconds, reps = self.timer.median(fn, warmup=1, min_reps=3, max_reps=20, target_s=0.3)
        except (RuntimeError, NotImplementedError) as exc:  # unsupported backend/shape or OOM
            self.skipped.append(f"{key} at {n} tokens: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        self.last[key] = (n, seconds)
        return seconds, reps

    def run_block(self, h: int, d: int, n: int, backend: str, causal: bool) -> tuple | None:
        dtype, b = DTYPES[self.args.dtype], 1
        q, k, v = (torch.randn(b, n, h, d, dtype=dtype, device=self.device) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        fwd = lambda: self.forward(q, k, v, backend=backend, causal=causal, scale=scale)  # noqa: E731
        got = self.timed((h, d, backend, causal, "forward"), n, fwd)
        if got is None:
            return None
        self.rows.append(_attention_row(backend, "forward", causal, self.args.dtype, b, h, d, n, *got))
        out, lse = fwd()
        dout = torch.randn_like(out)
        bwd = lambda: self.backward(dout, q, k, v, out, lse, backend=backend, causal=causal, scale=scale)  # noqa: E731
        got = self.timed((h, d, backend, causal, "backward"), n, bwd)
        if got is not None:
            self.rows.append(_attention_row(backend, "backward", causal, self.args.dtype, b, h, d, n, *got))
        if n <= 16384 and got is not None:
            def both() -> None:
                self.backward(dout, q, k, v, *fwd(), backend=backend, causal=causal, scale=scale)

            got = self.timed((h, d, backend, causal, "forward_backward"), n, both)
            if got is not None:
                self.rows.append(_attention_row(backend, "forward_backward", causal, self.args.dtype, b, h, d, n, *got))
        return out, lse

    def run_merge(self, h: int, d: int, n: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        acc = torch.zeros(out.shape, dtype=torch.float32, device=self.device)
        lse_acc = torch.zeros(lse.shape, dtype=torch.float32, device=self.device)
        merge = lambda: self.merge(acc, lse_acc.transpose(1, 2), out, lse.transpose(1, 2))  # noqa: E731
        got = self.timed((h, d, "merge"), n, merge)
        if got is not None:
            self.rows.append({"op": "merge", "dtype": self.args.dtype, "batch": 1, "n_heads": h, "head_dim": d,
                              "q_tokens": n, "seconds_median": got[0], "repeats": got[1]})

    def run(self) -> None:
        shapes = [tuple(int(x) for x in s.split("x")) for s in self.args.shapes.split(",")]
        sizes = sorted(int(x) for x in self.args.sizes.split(","))
        for n in sizes:
            for h, d in shapes:
                merged = False
                for backend in self.args.backends.split(","):
                    for causal in (False, True):
                        result = self.run_block(h, d, n, backend, causal)
                        if result is not None and not merged:
                            self.run_merge(h, d, n, *result)
                            merged = True
                        result = None
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                print(f"kernels: {h}x{d} at {n:,} tokens done ({time.monotonic() - self.began:.0f} s)", flush=True)


P2P_METHOD = ("ring exchange: every rank sends to the next and receives from the previous at once, the message "
              "split in two halves (like K and V) in one dist.batch_isend_irecv; per size 3 warm-up and 20 "
              "(8 above 64 MiB) timed exchanges, each after dist.barrier + device sync, timed with CUDA events "
              "(perf_counter on CPU); seconds = max over ranks of the per-rank median")
KERNEL_METHOD = ("ringplan_runtime.kernels.block_forward/block_backward (the ring's per-step calls; inputs "
                 "[B, n, H, D], random, H_kv = H) and ringplan_runtime.merge.merge_ into fp32 accumulators; "
                 "1 warm-up, then >= 3 and <= 20 repeats until 0.3 s; median of CUDA-event timings; "
                 "forward_backward (forward then backward) only up to 16,384 tokens")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_watchdog(args.hard_timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("measure_timing: no CUDA device (use --cpu-smoke for the CPU/gloo smoke run)")
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timer, rank = Timer(device), int(os.environ.get("RANK", "0"))
    out_dir = Path(args.out)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if world > 1 and not args.skip_p2p:
        dist.init_process_group("gloo" if args.cpu_smoke else "nccl",
                                timeout=dt.timedelta(seconds=args.collective_timeout_s))
        rows = p2p_sweep(args, device, timer)
        if rank == 0:
            prov = provenance(device, P2P_METHOD)
            scope = "intra_node" if local_world == world else "inter_node"
            data = {"schema": P2P_FORMAT, "provenance": prov, "rows": rows,
                    "link": {"scope": scope, "world_size": world, "gpus_per_node": local_world,
                             "nodes": world // local_world}}
            path = out_dir / f"p2p_{_slug(prov['gpu_driver_name'])}_{scope}_{world}x_{stamp}.json"
            write_timing_profile(path, data)
            print(f"wrote {path}", flush=True)
        dist.destroy_process_group()
    if rank != 0 or args.skip_kernels:
        return 0
    sweep = KernelSweep(args, device, timer)
    sweep.run()
    method = KERNEL_METHOD + (f"; skipped: {'; '.join(sweep.skipped)}" if sweep.skipped else "")
    prov = provenance(device, method)
    path = out_dir / f"kernels_{_slug(prov['gpu_driver_name'])}_{stamp}.json"
    write_timing_profile(path, {"schema": KERNELS_FORMAT, "provenance": prov, "rows": sweep.rows})
    print(f"wrote {path} ({len(sweep.rows)} rows, {len(sweep.skipped)} skipped)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
