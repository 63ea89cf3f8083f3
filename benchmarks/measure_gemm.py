"""Time the bf16 GEMMs of transformer blocks on one GPU: what ``ringplan.time.gemms`` reads.

One GPU (about 20-40 s on H100/H200; the whole run stops starting shapes after --budget-s)::

    python benchmarks/measure_gemm.py --out profiles/measured/timing

CPU smoke test (tiny shapes, fp32, seconds; CI runs it)::

    python benchmarks/measure_gemm.py --cpu-smoke --out /tmp/gemm

For every linear layer of the --models' blocks (q, k/v, o, gate/up, down; catalog shapes,
deduplicated by (in, out)) and the LM head, at each of --tokens rows (the LM head only up to
--lm-head-max-tokens: the loss runs over chunks of logits), three GEMMs are timed as autograd runs
them for ``F.linear(x, W)`` with x [tokens, in] and W [out, in]: ``forward`` x·Wᵀ, ``backward_input``
dy·W, ``backward_weight`` dyᵀ·x. Median of CUDA-event timings after a warm-up. Writes one
``ringplan.gemm/1`` profile (``ringplan.profiles.gemm.write_gemm_profile``) with provenance. Shapes that
run out of memory are skipped and listed in the method. A watchdog exits 3 after --hard-timeout-s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from measure_timing import Timer, _slug, provenance, start_watchdog  # noqa: E402

from ringplan.profiles.gemm import GEMM_FORMAT, write_gemm_profile  # noqa: E402
from ringplan.time.gemms import GemmShape, block_gemms, lm_head_gemm  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MODELS = "llama-3-8b,qwen3-8b,qwen3-0.6b,qwen3-32b,llama-3-70b"
DEFAULT_TOKENS = "2048,4096,8192,16384,32768,65536,131072"
#: The tiny shapes of --cpu-smoke: (name, in, out).
SMOKE_SHAPES = (("q", 64, 64), ("kv", 64, 32), ("gate_up", 64, 128), ("down", 128, 64), ("lm_head", 64, 256))
METHOD = ("torch.mm on random inputs as F.linear's autograd runs them (x [tokens, in], W [out, in]): forward "
          "x @ W.T, backward_input dy @ W, backward_weight dy.T @ x; {dtype}; 1 warm-up, then >= 3 and <= 20 "
          "repeats until 0.05 s; median of CUDA-event timings (perf_counter on CPU)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the JSON profile")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, fp32, on CPU (for CI)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="catalog models whose GEMM shapes are timed")
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help="GEMM rows (tokens per rank) list")
    p.add_argument("--lm-head-max-tokens", type=int, default=16384, help="largest rows for the LM head")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--budget-s", type=float, default=45.0, help="stop starting shapes after this")
    p.add_argument("--hard-timeout-s", type=float, default=58.0, help="watchdog: exit 3 after this")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.tokens, args.dtype, args.lm_head_max_tokens = "32,64", "fp32", 64
    return args


def shapes_to_time(args) -> list[GemmShape]:
    """Unique (in, out) linear layers of the models' blocks and LM heads (the first name kept)."""
    if args.cpu_smoke:
        return [GemmShape(name=n, in_features=i, out_features=o) for n, i, o in SMOKE_SHAPES]
    from ringplan.models import load_model_catalog

    catalog, seen, shapes = load_model_catalog(), set(), []
    for name in args.models.split(","):
        model = catalog.model(name.strip())
        for shape in (*block_gemms(model), lm_head_gemm(model)):
            if (shape.in_features, shape.out_features) not in seen:
                seen.add((shape.in_features, shape.out_features))
                shapes.append(GemmShape(name=shape.name, in_features=shape.in_features,
                                        out_features=shape.out_features))
    return shapes


def time_shape(shape: GemmShape, tokens: int, dtype: torch.dtype, device: torch.device,
               timer: Timer) -> list[dict[str, object]]:
    """The three GEMMs of one linear layer at ``tokens`` rows, as profile rows."""
    x = torch.randn(tokens, shape.in_features, dtype=dtype, device=device)
    weight = torch.randn(shape.out_features, shape.in_features, dtype=dtype, device=device)
    dy = torch.randn(tokens, shape.out_features, dtype=dtype, device=device)
    calls = {"forward": lambda: torch.mm(x, weight.t()), "backward_input": lambda: torch.mm(dy, weight),
             "backward_weight": lambda: torch.mm(dy.t(), x)}
    rows = []
    for pass_name, call in calls.items():
        seconds, reps = timer.median(call, warmup=1, min_reps=3, max_reps=20, target_s=0.05)
        rows.append({"op": "gemm", "name": shape.name, "pass": pass_name, "dtype": _dtype_name(dtype),
                     "tokens": tokens, "in_features": shape.in_features, "out_features": shape.out_features,
                     "seconds_median": seconds, "repeats": reps,
                     "flops_per_s": 2.0 * tokens * shape.in_features * shape.out_features / seconds})
    return rows


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def sweep(args, device: torch.device) -> tuple[list[dict[str, object]], list[str]]:
    """Every (shape, tokens) within the budget; (rows, skipped descriptions)."""
    timer, dtype, began = Timer(device), DTYPES[args.dtype], time.monotonic()
    rows, skipped = [], []
    for tokens in sorted(int(t) for t in args.tokens.split(",")):
        for shape in shapes_to_time(args):
            if shape.name == "lm_head" and tokens > args.lm_head_max_tokens:
                continue
            if time.monotonic() - began > args.budget_s:
                skipped.append(f"{shape.name} {shape.in_features}x{shape.out_features} at {tokens} (budget)")
                continue
            try:
                rows += time_shape(shape, tokens, dtype, device, timer)
            except torch.cuda.OutOfMemoryError:
                skipped.append(f"{shape.name} {shape.in_features}x{shape.out_features} at {tokens} (out of memory)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"gemm: {tokens:,} rows done ({time.monotonic() - began:.1f} s)", flush=True)
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_watchdog(args.hard_timeout_s)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("measure_gemm: no CUDA device (use --cpu-smoke for the CPU smoke run)")
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows, skipped = sweep(args, device)
    method = METHOD.format(dtype=args.dtype) + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
    prov = provenance(device, method)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"gemm_{_slug(prov['gpu_driver_name'])}_{stamp}.json"
    write_gemm_profile(path, {"schema": GEMM_FORMAT, "provenance": prov, "rows": rows})
    print(f"wrote {path} ({len(rows)} rows, {len(skipped)} skipped)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
