"""Spawned-rank bodies for the all-gather, Ulysses and hybrid context-parallel tests.

Each check runs one scheme on this rank's part of a seeded full sequence (``helpers.full_inputs``),
backpropagates a random upstream gradient, and compares the local output and the gradients of q, k,
v with the matching rows of the dense float64 reference. Workers return errors; tests assert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringplan_runtime import allgather_attention, hybrid_attention, ring_attention, shard_sequence, ulysses_attention
from ringplan_runtime.cp_check import check_scheme, parse_args
from ringplan_runtime.hybrid_attention import hybrid_shard_sequence
from ringplan_runtime.reference import reference_attention, relative_error
from ringplan_runtime.tracker import LiveTensorTracker
from runtime.helpers import Case, full_inputs, rank_and_size

COUNTED_COLLECTIVES = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                       "reduce_scatter_tensor", "batch_isend_irecv")


@dataclass(frozen=True, slots=True, kw_only=True)
class Grid:
    """Where this rank sits in a U × R hybrid grid (global rank g = j·U + u) and its two groups."""

    ulysses_size: int
    ring_size: int
    ulysses_index: int
    ring_index: int
    ulysses_group: object
    ring_group: object


def make_grid(ulysses_size: int) -> Grid:
    """Every rank creates every group (``dist.new_group`` is collective), keeps the two through it."""
    rank, world = rank_and_size()
    ring_size = world // ulysses_size
    ulysses_groups = [dist.new_group([j * ulysses_size + u for u in range(ulysses_size)]) for j in range(ring_size)]
    ring_groups = [dist.new_group([j * ulysses_size + u for j in range(ring_size)]) for u in range(ulysses_size)]
    u, j = rank % ulysses_size, rank // ulysses_size
    return Grid(ulysses_size=ulysses_size, ring_size=ring_size, ulysses_index=u, ring_index=j,
                ulysses_group=ulysses_groups[j], ring_group=ring_groups[u])


def scheme_call(scheme: str, case: Case, grid: Grid | None):
    """(local sharding function, attention call) for ``scheme`` on this rank."""
    rank, world = rank_and_size()
    flags = dict(causal=case.causal, layout=case.layout, backend=case.backend)
    if scheme == "hybrid":
        def local(t):
            return hybrid_shard_sequence(t, ring_index=grid.ring_index, ring_size=grid.ring_size,
                                         ulysses_index=grid.ulysses_index, ulysses_size=grid.ulysses_size,
                                         layout=case.layout).contiguous()
        return local, lambda q, k, v: hybrid_attention(q, k, v, ulysses_group=grid.ulysses_group,
                                                       ring_group=grid.ring_group, **flags)

    def local(t):
        return shard_sequence(t, rank=rank, ring_size=world, layout=case.layout).contiguous()
    call = {"allgather": allgather_attention, "ulysses": ulysses_attention, "ring": ring_attention}[scheme]
    return local, lambda q, k, v: call(q, k, v, **flags)


def scheme_errors(scheme: str, case: Case, grid: Grid | None = None) -> dict[str, float]:
    """Relative errors of this rank's out, dq, dk, dv (and dtype kept) against the reference rows."""
    full = full_inputs(case)
    local, call = scheme_call(scheme, case, grid)
    q, k, v = (local(full[name]).requires_grad_() for name in ("q", "k", "v"))
    out = call(q, k, v)
    out.backward(local(full["dout"]))
    ref_in = {name: full[name].detach().double().requires_grad_() for name in ("q", "k", "v")}
    ref = reference_attention(ref_in["q"], ref_in["k"], ref_in["v"], causal=case.causal)
    ref.backward(full["dout"].double())
    errors = {"out": relative_error(out, local(ref))}
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        errors["d" + name] = relative_error(tensor.grad, local(ref_in[name].grad))
    errors["dtype_ok"] = float(out.dtype == q.dtype and all(t.grad.dtype == t.dtype for t in (q, k, v)))
    return errors


def tracked_peak_bytes(scheme: str, case: Case, grid: Grid | None = None) -> dict[str, int]:
    """Peak live bytes (``LiveTensorTracker``) of one forward and of one forward + backward, inputs included."""
    full = full_inputs(case)
    local, call = scheme_call(scheme, case, grid)
    peaks = {}
    for mode in ("forward", "training"):
        q, k, v, dout = (local(full[name]).clone().requires_grad_(name != "dout") for name in ("q", "k", "v", "dout"))
        with LiveTensorTracker(device="cpu") as tracker:
            tracker.track(q, k, v, dout)
            out = call(q, k, v)
            if mode == "training":
                out.backward(dout)
            peaks[mode] = tracker.peak_bytes
            del out
    return peaks


def bad_scheme_calls(grid: Grid):
    """(label, call) pairs that must raise ``ValueError`` before any communication, on every rank."""
    def qkv(n=8, heads=4, kv_heads=4):
        return tuple(torch.randn(1, n, h, 8) for h in (heads, kv_heads, kv_heads))

    def hybrid(*tensors, **kw):
        return lambda: hybrid_attention(*tensors, ulysses_group=grid.ulysses_group, ring_group=grid.ring_group, **kw)

    world = rank_and_size()[1]
    return [
        ("allgather: unknown layout", lambda: allgather_attention(*qkv(), layout="striped")),
        ("allgather: zigzag needs an even chunk", lambda: allgather_attention(*qkv(7), causal=True, layout="zigzag")),
        ("ulysses: unknown layout", lambda: ulysses_attention(*qkv(), layout="striped")),
        ("ulysses: U does not divide the heads", lambda: ulysses_attention(*qkv(heads=3 * world - 1, kv_heads=1))),
        ("ulysses: too few KV heads without replication",
         lambda: ulysses_attention(*qkv(kv_heads=1), replicate_kv_heads=False)),
        ("hybrid: unknown layout", hybrid(*qkv(), layout="striped")),
        ("hybrid: U does not divide the heads", hybrid(*qkv(heads=3, kv_heads=1))),
        ("hybrid: too few KV heads without replication", hybrid(*qkv(kv_heads=1), replicate_kv_heads=False)),
    ]


def bad_scheme_outcomes(grid: Grid) -> list[tuple[str, str, str, int]]:
    """(label, exception type, message, collectives started) per bad call (``bad_scheme_calls``)."""
    started = [0]
    originals = {name: getattr(dist, name) for name in COUNTED_COLLECTIVES if hasattr(dist, name)}

    def counting(original):
        def wrapped(*args, **kwargs):
            started[0] += 1
            return original(*args, **kwargs)
        return wrapped

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    outcomes = []
    try:
        for label, call in bad_scheme_calls(grid):
            started[0] = 0
            try:
                call()
                outcomes.append((label, "none", "", started[0]))
            except Exception as error:  # noqa: BLE001 -- the test checks the type
                outcomes.append((label, type(error).__name__, str(error), started[0]))
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return outcomes


def run_world(runs: list[tuple[str, int, Case]], bad_input_grids: tuple[int, ...] = (),
              peak_cases: tuple[Case, ...] = (), entry_argvs: tuple[tuple[str, ...], ...] = ()) -> dict:
    """Body of every spawned rank (one spawn per world size: starting ranks is what costs on CI):

    ``errors`` per (scheme, U, case name) (U: the hybrid's Ulysses degree, 0 for the others);
    ``bad`` per Ulysses degree of the grid: ``bad_scheme_outcomes``; ``peaks`` per peak case name
    and scheme (``ring_attention`` too, for comparison; hybrid on the U = W × R = 1 grid);
    ``entry`` per argv: the errors ``ringplan_runtime.cp_check`` finds (its torchrun body, in-process).
    """
    torch.set_num_threads(1)
    world = rank_and_size()[1]
    needed = {u for scheme, u, _ in runs if scheme == "hybrid"} | set(bad_input_grids)
    needed |= {world} if peak_cases else set()
    grids = {u: make_grid(u) for u in sorted(needed)}
    errors = {(scheme, u, case.name): scheme_errors(scheme, case, grids.get(u)) for scheme, u, case in runs}
    bad = {u: bad_scheme_outcomes(grids[u]) for u in bad_input_grids}
    peaks = {case.name: {scheme: tracked_peak_bytes(scheme, case, grids[world])
                         for scheme in ("ring", "allgather", "ulysses", "hybrid")} for case in peak_cases}
    entry = {argv: check_scheme(parse_args(list(argv)), dist.get_rank(), world, torch.device("cpu"))["errors"]
             for argv in entry_argvs}
    return {"errors": errors, "bad": bad, "peaks": peaks, "entry": entry}
