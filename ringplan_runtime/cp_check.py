"""Run all-gather, Ulysses or hybrid context-parallel attention on this job's ranks: check it
against the dense reference and time it (the ``ringplan_runtime.check`` of these schemes).

One node, 4 GPUs (NCCL), Ulysses 2 inside × ring 2 across::

    torchrun --standalone --nproc_per_node=4 -m ringplan_runtime.cp_check --scheme hybrid \
        --ulysses-size 2 --tokens 16Ki --dtype bf16 --causal --layout zigzag

CPU only (gloo), all-gather over 2 ranks::

    torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.cp_check --scheme allgather \
        --tokens 1Ki --dtype fp32 --causal --layout zigzag

``--scheme ulysses`` uses every rank as one Ulysses group (its size must divide ``--heads``).
Hybrid: global rank g = j·U + u sits at Ulysses index u of ring index j (``hybrid_grid``). The dense
reference runs only while its [B, H, S, S] float64 scores fit ``--check-max-bytes``. Rank 0 prints
the errors and times; the exit code is 1 when an error exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from ringplan.units import parse_bytes, parse_tokens
from ringplan_runtime.allgather_attention import allgather_attention
from ringplan_runtime.check import DEFAULT_CHECK_MAX_BYTES, TOLERANCE
from ringplan_runtime.dtypes import TORCH_DTYPES
from ringplan_runtime.hybrid_attention import hybrid_attention, hybrid_shard_sequence
from ringplan_runtime.launch import init_from_env
from ringplan_runtime.layouts import shard_sequence
from ringplan_runtime.reference import reference_attention, relative_error
from ringplan_runtime.ulysses_attention import ulysses_attention

SCHEMES = ("allgather", "ulysses", "hybrid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=SCHEMES, required=True, help="context-parallel scheme")
    parser.add_argument("--ulysses-size", type=int, default=2, help="hybrid: Ulysses degree U (divides the ranks)")
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("8Ki"), help="global sequence length S")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--heads", type=int, default=8, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension D")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="bf16", help="input dtype")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous", help="sequence layout")
    parser.add_argument("--backend", default="auto", help="local block kernel (auto, cudnn, flash, ...)")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (after one warm-up)")
    parser.add_argument("--check-max-bytes", type=parse_bytes, default=parse_bytes(DEFAULT_CHECK_MAX_BYTES),
                        help="largest dense reference (float64 scores) to run")
    return parser.parse_args(argv)


def hybrid_grid(ulysses_size: int, rank: int, world: int) -> dict[str, object]:
    """Every U × R group of the job (created on every rank, as ``new_group`` requires) and this rank's place."""
    if ulysses_size <= 0 or world % ulysses_size:
        raise ValueError(f"--ulysses-size {ulysses_size} does not divide the {world} ranks")
    ring_size = world // ulysses_size
    ulysses_groups = [dist.new_group([j * ulysses_size + u for u in range(ulysses_size)]) for j in range(ring_size)]
    ring_groups = [dist.new_group([j * ulysses_size + u for j in range(ring_size)]) for u in range(ulysses_size)]
    u, j = rank % ulysses_size, rank // ulysses_size
    return dict(ulysses_index=u, ring_index=j, ring_size=ring_size, ulysses_group=ulysses_groups[j],
                ring_group=ring_groups[u])


def scheme_and_shard(args, rank: int, world: int):
    """(attention call on local q, k, v; this rank's part of a full-sequence tensor)."""
    flags = dict(causal=args.causal, layout=args.layout, backend=args.backend)
    if args.scheme != "hybrid":
        call = allgather_attention if args.scheme == "allgather" else ulysses_attention
        return (lambda q, k, v: call(q, k, v, **flags),
                lambda t: shard_sequence(t, rank=rank, ring_size=world, layout=args.layout))
    grid = hybrid_grid(args.ulysses_size, rank, world)
    return (lambda q, k, v: hybrid_attention(q, k, v, ulysses_group=grid["ulysses_group"],
                                             ring_group=grid["ring_group"], **flags),
            lambda t: hybrid_shard_sequence(t, ring_index=grid["ring_index"], ring_size=grid["ring_size"],
                                            ulysses_index=grid["ulysses_index"], ulysses_size=args.ulysses_size,
                                            layout=args.layout))


def timed_ms(fn, device, steps: int) -> float:
    """Mean wall time of ``fn`` in ms over ``steps`` runs after one warm-up (CUDA synchronised)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def check_scheme(args, rank: int, world: int, device) -> dict[str, object]:
    """This rank's relative errors (None when the reference is too large) and forward / training times."""
    call, shard = scheme_and_shard(args, rank, world)
    gen = torch.Generator(device="cpu").manual_seed(0)
    kv_heads, dtype = args.kv_heads or args.heads, TORCH_DTYPES[args.dtype]
    full = {name: torch.randn(args.batch, args.tokens, heads, args.head_dim, generator=gen).to(device, dtype)
            for name, heads in (("q", args.heads), ("k", kv_heads), ("v", kv_heads), ("dout", args.heads))}
    local = {name: shard(t).contiguous() for name, t in full.items()}
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    out = call(q, k, v)
    out.backward(local["dout"])
    errors = None
    if args.batch * args.heads * args.tokens ** 2 * 8 <= args.check_max_bytes:
        ref_in = {n: full[n].double().requires_grad_() for n in ("q", "k", "v")}
        ref = reference_attention(ref_in["q"], ref_in["k"], ref_in["v"], causal=args.causal)
        ref.backward(full["dout"].double())
        errors = {"out": relative_error(out, shard(ref))}
        errors.update({"d" + n: relative_error(t.grad, shard(ref_in[n].grad)) for n, t in zip("qkv", (q, k, v))})
    with torch.no_grad():
        forward_ms = timed_ms(lambda: call(q, k, v), device, args.steps)
    train_ms = timed_ms(lambda: call(q, k, v).backward(local["dout"]), device, args.steps)
    return {"errors": errors, "forward_ms": forward_ms, "train_ms": train_ms}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = init_from_env()
    result = check_scheme(args, ctx.rank, ctx.world_size, ctx.device)
    errors = result["errors"]
    worst = torch.tensor([max(errors.values()) if errors else 0.0], device=ctx.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tolerance = TOLERANCE[args.dtype]
    if ctx.rank == 0:
        grid = f" U={args.ulysses_size} x R={ctx.world_size // args.ulysses_size}" if args.scheme == "hybrid" else ""
        print(f"{args.scheme}{grid} over {ctx.world_size} ranks ({ctx.backend}, {ctx.device.type}), S={args.tokens:,} "
              f"B={args.batch} H={args.heads} H_kv={args.kv_heads or args.heads} D={args.head_dim} {args.dtype} "
              f"causal={args.causal} layout={args.layout}")
        print(f"forward {result['forward_ms']:.2f} ms, forward+backward {result['train_ms']:.2f} ms "
              f"(rank 0, mean of {args.steps})")
        if errors is None:
            print("reference check skipped: the dense reference would exceed --check-max-bytes")
        else:
            print("rank 0 relative errors: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
                  + f"; worst over ranks {worst.item():.2e} (tolerance {tolerance})")
    dist.destroy_process_group()
    return int(worst.item() > tolerance)


if __name__ == "__main__":
    sys.exit(main())
