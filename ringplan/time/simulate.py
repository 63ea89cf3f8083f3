"""Step-by-step, rank-by-rank simulation of the ring schedule (numpy, vectorised over ranks).

The schedule played is the double-buffered ring of ring-flash-attention / ``ringplan_runtime``:

forward, step s = 0..k−1 on every rank r of a ring group of k ranks::

    post send(K/V → next) + recv(K/V ← prev)   (not on the last step)
    compute the block of the K/V it holds, merge it (fp32 LSE merge)
    wait for the send and the recv               → step s+1 starts

backward, step s (dK/dV accumulators travel with their K/V)::

    post send/recv of K/V for step s+1
    compute the block's backward
    wait for the dK/dV exchange of step s−1, add this block's dK/dV
    wait for the K/V exchange; post send/recv of dK/dV      → step s+1 starts
    (after the last step: wait for the final dK/dV exchange, which returns them to their owner)

A transfer prev→r starts when both ends have posted (NCCL pairs the send with the recv) and
lasts the hop time of that link, so a late rank delays its neighbours and the slowest hop (e.g.
the inter-node one of a hierarchical ring) bounds every step. Ranks are not synchronised
otherwise. Causal attention: with the contiguous layout rank i computes the diagonal block at
step 0, full blocks from earlier ranks and skips later ones (imbalanced); with zigzag every step
after the first is a half block (balanced). Dilated segments longer than a rank's chunk ring only
inside their group of k = segment / chunk ranks.

Ignores: link contention between the K/V and dK/dV exchanges beyond what the caller folds into
hop times, slowdown of kernels by concurrent NCCL traffic, clock jitter, stragglers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ringplan.time.links import previous_ranks

SKIP, FULL, DIAGONAL, HALF_KEYS, HALF_QUERIES = 0, 1, 2, 3, 4
BLOCK_KIND_NAMES = {SKIP: "skip", FULL: "full", DIAGONAL: "diagonal", HALF_KEYS: "half (n x n/2)",
                    HALF_QUERIES: "half (n/2 x n)"}


def block_kinds(ring_size: int, group_size: int, *, causal: bool, layout: str) -> np.ndarray:
    """Kind of block each rank computes at each step, an int array [ring_size, group_size].

    Rank r sits at index i = r mod k of its group; at step s it holds the K/V of group index
    j = (i − s) mod k. Non-causal: FULL. Causal contiguous: DIAGONAL at s = 0, FULL when j < i,
    SKIP when j > i. Causal zigzag: DIAGONAL at s = 0 (causal over its two chunks), then
    HALF_KEYS when j < i (all n queries × the first K/V chunk of n/2) and HALF_QUERIES when j > i
    (the second query chunk of n/2 × all n K/V): every step after the first is half a block.
    """
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"layout {layout!r} is not contiguous or zigzag")
    previous_ranks(ring_size, group_size)  # validates that groups tile the ring
    index = (np.arange(ring_size) % group_size)[:, None]
    step = np.arange(group_size)[None, :]
    source = (index - step) % group_size
    if not causal:
        return np.full((ring_size, group_size), FULL, dtype=np.int8)
    if layout == "zigzag":
        kinds = np.where(step == 0, DIAGONAL, np.where(source < index, HALF_KEYS, HALF_QUERIES))
    else:
        kinds = np.where(step == 0, DIAGONAL, np.where(source < index, FULL, SKIP))
    return np.broadcast_to(kinds, (ring_size, group_size)).astype(np.int8)


@dataclass(frozen=True, slots=True, kw_only=True)
class RingPass:
    """One ring pass to simulate: per-(rank, step) compute seconds and per-rank hop seconds.

    ``kv_hop_s[r]`` is the time of the K/V transfer into rank r (from its previous rank);
    ``grad_hop_s`` the dK/dV transfer of a backward pass (None for forward / local passes).
    Either is one time per rank ``[ring_size]`` or one per rank and step ``[ring_size, group_size]``
    (column s: the K/V hop posted at step s, the dK/dV hop posted after step s; the last column
    of ``grad_hop_s`` is the hop that returns dK/dV to their owner). Stored as the 2-D form.
    A pass with one step (``group_size == 1``) is local compute only, no communication.
    """

    name: str
    compute_s: np.ndarray
    kv_hop_s: np.ndarray
    group_size: int
    grad_hop_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        compute = np.asarray(self.compute_s, dtype=float)
        ring_size = compute.shape[0] if compute.ndim == 2 else -1
        if compute.ndim != 2 or compute.shape[1] != self.group_size:
            raise ValueError(f"{self.name}: compute_s must be [ring_size, {self.group_size}], got {compute.shape}")
        if np.any(compute < 0) or not np.all(np.isfinite(compute)):
            raise ValueError(f"{self.name}: compute times must be finite and >= 0")
        for label in ("kv_hop_s", "grad_hop_s"):
            hop = getattr(self, label)
            if hop is None:
                continue
            hop = np.asarray(hop, dtype=float)
            if hop.shape not in ((ring_size,), (ring_size, self.group_size)) or np.any(hop < 0) \
                    or not np.all(np.isfinite(hop)):
                raise ValueError(f"{self.name}: {label} must be finite times >= 0 of shape ({ring_size},) or "
                                 f"({ring_size}, {self.group_size}), got shape {hop.shape}")
            hop = np.broadcast_to(hop[:, None], (ring_size, self.group_size)) if hop.ndim == 1 else hop
            object.__setattr__(self, label, hop)
        object.__setattr__(self, "compute_s", compute)
        previous_ranks(ring_size, self.group_size)

    @property
    def ring_size(self) -> int:
        return self.compute_s.shape[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class PassTimeline:
    """When each rank did what in one pass: arrays [ring_size, steps] of absolute seconds."""

    name: str
    step_start_s: np.ndarray
    compute_end_s: np.ndarray
    step_end_s: np.ndarray
    recv_start_s: np.ndarray
    recv_end_s: np.ndarray
    finish_s: np.ndarray


def _exchange(post_s: np.ndarray, prev: np.ndarray, nxt: np.ndarray, hop_s: np.ndarray):
    """Both-ends-posted transfers: (recv start, recv end, send end) per rank."""
    recv_start = np.maximum(post_s[prev], post_s)
    recv_end = recv_start + hop_s
    return recv_start, recv_end, recv_end[nxt]


def _forward_loop(compute_t: np.ndarray, kv_hop_t: np.ndarray, start_s: np.ndarray, prev: np.ndarray,
                  nxt: np.ndarray, out: dict) -> np.ndarray:
    """Arrays ``*_t`` are [steps, ranks]; returns when each rank is done."""
    now, last = start_s.copy(), len(compute_t) - 1
    for s in range(len(compute_t)):
        compute_end = now + compute_t[s]
        out["start"][s], out["compute_end"][s] = now, compute_end
        if s < last:
            recv_start, recv_end, send_end = _exchange(now, prev, nxt, kv_hop_t[s])
            out["recv_start"][s], out["recv_end"][s] = recv_start, recv_end
            now = np.maximum(compute_end, np.maximum(recv_end, send_end))
        else:
            now = compute_end
        out["end"][s] = now
    return now


def _backward_loop(compute_t: np.ndarray, kv_hop_t: np.ndarray, grad_hop_t: np.ndarray, start_s: np.ndarray,
                   prev: np.ndarray, nxt: np.ndarray, out: dict) -> np.ndarray:
    now, last = start_s.copy(), len(compute_t) - 1
    grad_done = start_s.copy()  # no dK/dV exchange before step 0
    for s in range(len(compute_t)):
        compute_end = now + compute_t[s]
        out["start"][s], out["compute_end"][s] = now, compute_end
        post = np.maximum(compute_end, grad_done)
        if s < last:
            recv_start, recv_end, send_end = _exchange(now, prev, nxt, kv_hop_t[s])
            out["recv_start"][s], out["recv_end"][s] = recv_start, recv_end
            post = np.maximum(post, np.maximum(recv_end, send_end))
        _, grad_recv_end, grad_send_end = _exchange(post, prev, nxt, grad_hop_t[s])
        grad_done = np.maximum(grad_recv_end, grad_send_end)
        now = post
        out["end"][s] = now
    return np.maximum(now, grad_done)


def simulate_pass(p: RingPass, start_s: np.ndarray) -> PassTimeline:
    """Play one pass from per-rank start times; returns the timeline (finish_s = when each rank is done)."""
    start_s = np.asarray(start_s, dtype=float)
    if start_s.shape != (p.ring_size,):
        raise ValueError(f"{p.name}: need {p.ring_size} start times, got shape {start_s.shape}")
    if _symmetric(p, start_s):  # all ranks in lockstep: play one rank that exchanges with itself
        rows, prev = slice(0, 1), np.zeros(1, dtype=np.int64)
        nxt = prev
    else:
        rows, prev = slice(None), previous_ranks(p.ring_size, p.group_size)
        nxt = np.empty_like(prev)
        nxt[prev] = np.arange(p.ring_size)
    compute_t = np.ascontiguousarray(p.compute_s[rows].T)
    kv_hop_t = np.ascontiguousarray(p.kv_hop_s[rows].T)
    # Filled step by step as rows [steps, ranks] (contiguous writes), returned as [ranks, steps].
    out = {k: np.full(compute_t.shape, np.nan) for k in ("start", "compute_end", "end", "recv_start", "recv_end")}
    if p.grad_hop_s is None or p.group_size == 1:
        finish = _forward_loop(compute_t, kv_hop_t, start_s[rows], prev, nxt, out)
    else:
        grad_hop_t = np.ascontiguousarray(p.grad_hop_s[rows].T)
        finish = _backward_loop(compute_t, kv_hop_t, grad_hop_t, start_s[rows], prev, nxt, out)
    full = lambda a: np.broadcast_to(a, (p.ring_size,) + a.shape[1:])  # noqa: E731
    return PassTimeline(name=p.name, step_start_s=full(out["start"].T), compute_end_s=full(out["compute_end"].T),
                        step_end_s=full(out["end"].T), recv_start_s=full(out["recv_start"].T),
                        recv_end_s=full(out["recv_end"].T), finish_s=full(finish))


def _symmetric(p: RingPass, start_s: np.ndarray) -> bool:
    """Every rank has the same costs, hops and start: all ranks move in lockstep (exact shortcut)."""
    if p.ring_size == 1:
        return False
    hops = [h for h in (p.kv_hop_s, p.grad_hop_s) if h is not None]
    return bool(np.all(start_s == start_s[0]) and all(np.all(h == h[0]) for h in hops)
                and np.all(p.compute_s == p.compute_s[0]))


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationResult:
    """A whole layer step (all passes in order, per rank back to back) and its breakdown.

    ``step_time_s``: when the last rank finishes. ``busy_s[r]``: rank r's compute seconds.
    ``start_s``: when the ranks started (the host's call overhead). ``compute_s``: the busiest
    rank's compute. ``exposed_comm_s`` = step − start − compute (time the busiest rank waits on
    transfers or on neighbours). ``ideal_s`` = mean busy (perfect balance,
    no communication); ``efficiency`` = ideal / step.
    """

    step_time_s: float
    busy_s: np.ndarray
    timelines: tuple[PassTimeline, ...]
    start_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return float(self.busy_s.max())

    @property
    def exposed_comm_s(self) -> float:
        return max(0.0, self.step_time_s - self.start_s - self.compute_s)

    @property
    def ideal_s(self) -> float:
        return float(self.busy_s.mean())

    @property
    def imbalance_s(self) -> float:
        return self.compute_s - self.ideal_s

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.step_time_s if self.step_time_s > 0 else 1.0

    @property
    def critical_rank(self) -> int:
        return int(np.argmax(self.timelines[-1].finish_s)) if self.timelines else 0


def simulate_step(passes: Sequence[RingPass], start_s: float = 0.0) -> SimulationResult:
    """Run ``passes`` one after another on every rank (each rank starts a pass when it finished
    the previous one); all ranks start at ``start_s`` (≥ 0)."""
    if not passes:
        raise ValueError("nothing to simulate: no passes")
    ring_size = passes[0].ring_size
    if any(p.ring_size != ring_size for p in passes):
        raise ValueError(f"passes disagree on the ring size: {[p.ring_size for p in passes]}")
    if not np.isfinite(start_s) or start_s < 0:
        raise ValueError(f"start time must be >= 0 s, got {start_s!r}")
    now = np.full(ring_size, float(start_s))
    busy = np.zeros(ring_size)
    timelines = []
    for p in passes:
        timeline = simulate_pass(p, now)
        timelines.append(timeline)
        busy += p.compute_s.sum(axis=1)
        now = timeline.finish_s
    return SimulationResult(step_time_s=float(now.max()), busy_s=busy, timelines=tuple(timelines),
                            start_s=float(start_s))


def rank_intervals(result: SimulationResult, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end seconds of every non-empty compute interval of ``rank``, in time order."""
    starts = np.concatenate([t.step_start_s[rank] for t in result.timelines])
    ends = np.concatenate([t.compute_end_s[rank] for t in result.timelines])
    keep = ends > starts
    order = np.argsort(starts[keep])
    return starts[keep][order], ends[keep][order]


def timeline_ranks(result: SimulationResult, limit: int = 8) -> list[int]:
    """Ranks worth drawing: all of a small ring, else the first, last, busiest and critical ones."""
    ring_size = len(result.busy_s)
    if ring_size <= limit:
        return list(range(ring_size))
    picks = [0, 1, ring_size // 2, ring_size - 2, ring_size - 1, int(np.argmax(result.busy_s)),
             int(np.argmin(result.busy_s)), result.critical_rank]
    return sorted(dict.fromkeys(picks))[:limit]


def text_timeline(result: SimulationResult, ranks: Sequence[int] | None = None, width: int = 72) -> list[str]:
    """One text line per rank: ``#`` computing, ``-`` waiting on a transfer or a neighbour, blank = done.

    Each character is a slice of step_time / width seconds, classified at its midpoint.
    """
    if width < 10:
        raise ValueError(f"timeline width must be at least 10 characters, got {width}")
    ranks = timeline_ranks(result) if ranks is None else list(ranks)
    ring_size = len(result.busy_s)
    bad = [r for r in ranks if not 0 <= r < ring_size]
    if bad:
        raise ValueError(f"ranks {bad} are outside the ring of {ring_size}")
    total = result.step_time_s or 1.0
    centers = (np.arange(width) + 0.5) * total / width
    finish = result.timelines[-1].finish_s
    label_width = len(str(ring_size - 1))
    lines = []
    for rank in ranks:
        starts, ends = rank_intervals(result, rank)
        idx = np.searchsorted(starts, centers, side="right") - 1
        computing = (idx >= 0) & (centers < ends[np.clip(idx, 0, None)]) if len(starts) else np.zeros(width, bool)
        chars = np.where(computing, "#", np.where(centers < finish[rank], "-", " "))
        lines.append(f"rank {rank:>{label_width}} |{''.join(chars)}|")
    return lines
