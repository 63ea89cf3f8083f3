"""Does Hilbert token order (the seed's feature) make dilated attention faster? Time it on and off.

One GPU (bf16; the lead's command)::

    python benchmarks/hilbert_bench.py --json benchmarks/results/hilbert_h100.json

CPU smoke run (fp32, small)::

    python benchmarks/hilbert_bench.py --tokens 4Ki --heads 4 --head-dim 32 --steps 2

Runs ``ring_dilated_attention`` on one device (a ring of one: every segment is local) with
``hilbert=False`` and ``hilbert=True`` on the same inputs, forward and forward+backward, for each
(segments, rates) configuration; reports medians and the on/off ratio, and checks that both
orders give the same output (relative difference, rounding only). Hilbert order can only move
memory locality: the FLOPs are identical, and the SDPA kernels already stream K/V in tiles, so a
ratio near (or above) 1.0 means it does not pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ringplan.units import parse_tokens
from ringplan_runtime import ring_dilated_attention
from ringplan_runtime.reference import relative_error

CONFIGS = (((2048, 4096, 8192), (1, 2, 4)), ((4096, 16384), (1, 4)), ((1024,), (1,)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_config(segments, rates, *, tokens, heads, head_dim, dtype, device, steps) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(1, tokens, heads, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    row = {"segments": list(segments), "rates": list(rates), "tokens": tokens}

    def run(hilbert):
        return ring_dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=rates, hilbert=hilbert)

    for hilbert in (False, True):
        tag = "on" if hilbert else "off"
        with torch.no_grad():
            row[f"forward_ms_{tag}"] = _median_ms(lambda: run(hilbert), device, steps)
        row[f"train_ms_{tag}"] = _median_ms(lambda: run(hilbert).backward(dout), device, steps)
    with torch.no_grad():
        row["out_rel_diff"] = relative_error(run(True), run(False))
    row["forward_ratio_on_off"] = row["forward_ms_on"] / row["forward_ms_off"]
    row["train_ratio_on_off"] = row["train_ms_on"] / row["train_ms_off"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("64Ki" if cuda else "4Ki"))
    parser.add_argument("--heads", type=int, default=32 if cuda else 4)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 32)
    parser.add_argument("--steps", type=int, default=10 if cuda else 2)
    parser.add_argument("--json", default=None, help="write the rows (and provenance) to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for segments, rates in CONFIGS:
        segments = tuple(min(s, args.tokens) for s in segments)
        row = bench_config(segments, rates, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim,
                           dtype=dtype, device=device, steps=args.steps)
        rows.append(row)
        print(f"segments {row['segments']} rates {row['rates']}: forward off {row['forward_ms_off']:.2f} ms / "
              f"on {row['forward_ms_on']:.2f} ms (x{row['forward_ratio_on_off']:.3f}); fwd+bwd off "
              f"{row['train_ms_off']:.2f} / on {row['train_ms_on']:.2f} ms (x{row['train_ratio_on_off']:.3f}); "
              f"output rel diff {row['out_rel_diff']:.1e}")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                "dtype": str(dtype), "heads": args.heads, "head_dim": args.head_dim, "steps": args.steps,
                "command": " ".join(["python", "benchmarks/hilbert_bench.py", *(argv or sys.argv[1:])]),
                "date": time.strftime("%Y-%m-%d"), "method": "median of --steps wall times after 1 warm-up, synced"}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
