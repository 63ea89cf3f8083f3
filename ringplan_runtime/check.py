"""Run ring attention on this job's ranks: check it against the dense reference and time it.

One node, 2 GPUs (NCCL)::

    torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.check \
        --tokens 16Ki --dtype bf16 --causal --layout zigzag

CPU only (gloo)::

    torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.check --tokens 1Ki --dtype fp32

Dilated: add ``--segments 2048,8192 --rates 1,2``. The dense reference runs only while its
[H, S, S] float64 scores fit ``--check-max-bytes`` (it is skipped, with a note, above that).
Rank 0 prints one line per quantity; the exit code is 1 when an error exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from ringplan.units import parse_bytes, parse_tokens
from ringplan_runtime.dilated import ring_dilated_attention
from ringplan_runtime.dtypes import TORCH_DTYPES
from ringplan_runtime.launch import init_from_env
from ringplan_runtime.layouts import shard_sequence
from ringplan_runtime.reference import reference_attention, relative_error
from ringplan_runtime.ring_attention import make_spec

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}  # issue 3
DEFAULT_CHECK_MAX_BYTES = "4GiB"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(parse_tokens(part) for part in text.split(",") if part) if text else ()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("8Ki"), help="global sequence length S")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="bf16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--segments", type=_ints, default=(), help="dilated segment lengths, comma-separated")
    parser.add_argument("--rates", type=_ints, default=(), help="dilation rates, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (after one warm-up)")
    parser.add_argument("--check-max-bytes", type=parse_bytes, default=parse_bytes(DEFAULT_CHECK_MAX_BYTES))
    return parser.parse_args(argv)


def _attention(args, q, k, v):
    if args.segments:
        return ring_dilated_attention(q, k, v, segment_lengths=args.segments, dilation_rates=args.rates,
                                      causal=args.causal, backend=args.backend)
    from ringplan_runtime.ring_attention import ring_attention

    return ring_attention(q, k, v, causal=args.causal, layout=args.layout, backend=args.backend)


def _inputs(args, device, rank, world):
    gen = torch.Generator(device="cpu").manual_seed(0)
    kv_heads = args.kv_heads or args.heads
    full = {name: torch.randn(args.batch, args.tokens, heads, args.head_dim, generator=gen)
            for name, heads in (("q", args.heads), ("k", kv_heads), ("v", kv_heads), ("dout", args.heads))}
    layout = "contiguous" if args.segments else args.layout
    dtype = TORCH_DTYPES[args.dtype]
    local = {name: shard_sequence(t, rank=rank, ring_size=world, layout=layout).to(device, dtype).contiguous()
             for name, t in full.items()}
    return full, local, layout


def _timed_ms(fn, device, steps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return (time.perf_counter() - start) / steps * 1e3


def _errors(args, full, local, out, layout, rank, world, device) -> dict[str, float] | None:
    scores_bytes = args.batch * args.heads * args.tokens * args.tokens * 8 * max(1, len(args.segments))
    if scores_bytes > args.check_max_bytes:
        return None
    ref_in = {n: full[n].to(device, TORCH_DTYPES[args.dtype]).double().requires_grad_() for n in ("q", "k", "v")}
    ref = reference_attention(ref_in["q"], ref_in["k"], ref_in["v"], causal=args.causal,
                              segment_lengths=args.segments, dilation_rates=args.rates)
    ref.backward(full["dout"].to(device, TORCH_DTYPES[args.dtype]).double())

    def mine(t):
        return shard_sequence(t, rank=rank, ring_size=world, layout=layout)

    errors = {"out": relative_error(out, mine(ref))}
    errors.update({"d" + n: relative_error(local[n].grad, mine(ref_in[n].grad)) for n in ("q", "k", "v")})
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = init_from_env()
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    full, local, layout = _inputs(args, device, rank, world)
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    backend = make_spec(q, k, v, group=None, causal=args.causal, layout=layout, backend=args.backend,
                        scale=None).backend
    out = _attention(args, q, k, v)
    out.backward(local["dout"])
    errors = _errors(args, full, {"q": q, "k": k, "v": v}, out, layout, rank, world, device)
    with torch.no_grad():
        forward_ms = _timed_ms(lambda: _attention(args, q, k, v), device, args.steps)
    train_ms = _timed_ms(lambda: _attention(args, q, k, v).backward(local["dout"]), device, args.steps)
    worst = torch.tensor([max(errors.values()) if errors else 0.0], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tolerance = TOLERANCE[args.dtype]
    if rank == 0:
        print(f"ring of {world} ({ctx.backend}, {device.type}), S={args.tokens:,} B={args.batch} H={args.heads} "
              f"H_kv={args.kv_heads or args.heads} D={args.head_dim} {args.dtype} causal={args.causal} "
              f"layout={layout} backend={backend} segments={list(args.segments)} rates={list(args.rates)}")
        print(f"forward {forward_ms:.2f} ms, forward+backward {train_ms:.2f} ms (rank 0, mean of {args.steps})")
        if errors is None:
            print("reference check skipped: the dense reference would exceed --check-max-bytes")
        else:
            print("rank 0 relative errors: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
                  + f"; worst over ranks {worst.item():.2e} (tolerance {tolerance})")
    dist.destroy_process_group()
    return int(worst.item() > tolerance)


if __name__ == "__main__":
    sys.exit(main())
