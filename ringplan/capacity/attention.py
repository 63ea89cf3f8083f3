"""Capacity search: the fewest GPUs for S tokens, and the most tokens K GPUs can hold.

A plan is feasible when the predicted per-GPU device memory, plus the memory model's worst fit
residual, fits in the usable memory less a safety margin:
``total_bytes + residual_bound_bytes <= usable_memory_bytes · (1 − safety_margin)`` (a plan called
feasible must run: on 2×H200 an emulated A100's boundary sat 1.5 MB above the point prediction).

* ``min_world_size``: the first feasible ring size over which S splits (``search.first_feasible``:
  memory is not monotone from one GPU to a ring, so a linear scan, not a bisection).
* ``max_tokens``: the largest feasible S at a fixed ring size (``search.largest_within``: per-GPU
  memory never decreases with tokens).

Step time: another module (``ringplan.time.attention_time``) fills ``CapacityRow.step_time_s`` and
``exposed_comm_s`` through the ``step_time`` hook, for the rows an answer returns only (the
searches evaluate memory alone); ``None`` leaves them empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ringplan.capacity import search
from ringplan.hardware import GpuSpec
from ringplan.memory.attention_model import MemoryModel, MemoryPrediction, default_memory_model
from ringplan.workload import (RingLayout, Workload, check_cp_scheme, check_layout_fits, check_scheme_workload,
                               check_ulysses_heads)

#: (workload, layout, gpu) → (step_time_s, exposed_comm_s), or None when the time model cannot say.
StepTimeFn = Callable[[Workload, RingLayout, GpuSpec], "tuple[float, float] | None"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityRow:
    """One candidate plan: ``world_size`` GPUs (the ring) holding ``seq_len_tokens`` tokens."""

    world_size: int
    seq_len_tokens: int
    tokens_per_rank: int
    prediction: MemoryPrediction
    usable_memory_bytes: int
    budget_bytes: float
    feasible: bool
    # Time model hook (ringplan.time.attention_time): filled when a step_time function is given.
    step_time_s: float | None = None
    exposed_comm_s: float | None = None

    @property
    def headroom_bytes(self) -> float:
        """Budget left after the predicted peak and its residual bound (negative when infeasible)."""
        return self.budget_bytes - self.prediction.upper_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityQuery:
    """What is asked: a workload shape, a layout/backend, a GPU, a margin, a model, and the
    context-parallel scheme (``workload.CP_SCHEMES``; ``ulysses_degree`` U for hybrid, whose plans
    are then the world sizes W = U·R with R > 1; Ulysses runs over all W GPUs, so W must divide H)."""

    workload: Workload
    layout: str = "contiguous"
    backend: str = "auto"
    gpu: GpuSpec
    safety_margin: float = 0.05
    max_world_size: int = 1024
    model: MemoryModel = field(default_factory=default_memory_model)
    step_time: StepTimeFn | None = None
    cp_scheme: str = "ring"
    ulysses_degree: int | None = None

    def __post_init__(self) -> None:
        search.check_search_limits(safety_margin=self.safety_margin, max_world_size=self.max_world_size)
        RingLayout(ring_size=1, layout=self.layout, backend=self.backend)  # validates names
        check_cp_scheme(self.cp_scheme, self.ulysses_degree)
        if self.cp_scheme == "ulysses" and self.ulysses_degree not in (None, 1):
            raise ValueError(f"Ulysses runs over every GPU of the plan (U = W): a Ulysses degree "
                             f"({self.ulysses_degree}) applies to the hybrid scheme; give --cp hybrid")
        check_scheme_workload(self.workload, self.cp_scheme, self.backend)
        if self.cp_scheme == "hybrid":
            check_ulysses_heads(self.workload.shape.n_heads, self.ulysses_degree)
        if self.cp_scheme != "ring" and self.model.form != "analytic":
            raise ValueError(f"the {self.model.form} memory model knows the ring only; the {self.cp_scheme} "
                             f"scheme needs the analytic model")

    @property
    def budget_bytes(self) -> float:
        return search.budget_bytes(self.gpu.usable_memory_bytes, self.safety_margin)

    def ring(self, world_size: int) -> RingLayout:
        return RingLayout(ring_size=world_size, layout=self.layout, backend=self.backend, cp_scheme=self.cp_scheme,
                          ulysses_degree=self.ulysses_degree if self.cp_scheme == "hybrid" else None)


def evaluate(query: CapacityQuery, seq_len_tokens: int, world_size: int) -> CapacityRow:
    """Predict one plan, memory and step time (raises ``ValueError`` when the sequence does not
    split over the ring)."""
    return timed(query, memory_row(query, seq_len_tokens, world_size))


def memory_row(query: CapacityQuery, seq_len_tokens: int, world_size: int) -> CapacityRow:
    """Predict one plan's memory only (what the searches evaluate)."""
    workload = query.workload.with_seq_len(seq_len_tokens)
    prediction = query.model.predict(workload, query.ring(world_size), query.gpu)
    return CapacityRow(world_size=world_size, seq_len_tokens=seq_len_tokens, tokens_per_rank=prediction.tokens_per_rank,
                       prediction=prediction, usable_memory_bytes=query.gpu.usable_memory_bytes,
                       budget_bytes=query.budget_bytes, feasible=prediction.upper_bytes <= query.budget_bytes)


def timed(query: CapacityQuery, row: CapacityRow) -> CapacityRow:
    """``row`` with the step-time hook's (step_time_s, exposed_comm_s), when there is a hook."""
    if query.step_time is None:
        return row
    step = query.step_time(query.workload.with_seq_len(row.seq_len_tokens), query.ring(row.world_size), query.gpu)
    return replace(row, step_time_s=step[0] if step else None, exposed_comm_s=step[1] if step else None)


def splits(query: CapacityQuery, seq_len_tokens: int, world_size: int) -> bool:
    """True when S tokens form a valid workload that splits over ``world_size`` ranks."""
    try:
        check_layout_fits(query.workload.with_seq_len(seq_len_tokens), query.ring(world_size))
    except ValueError:
        return False
    return True


def valid_world_sizes(query: CapacityQuery, seq_len_tokens: int) -> list[int]:
    """Every ring size 1..max_world_size over which the sequence splits (all integers, not only
    powers of two). Raises ``ValueError`` with the reason when there is none."""
    chunks = RingLayout(ring_size=1, layout=query.layout).chunks_per_rank
    dividing = search.dividing_sizes(seq_len_tokens, range(1, min(query.max_world_size, seq_len_tokens) + 1),
                                     lambda p: p * chunks)
    sizes = [p for p in dividing if splits(query, seq_len_tokens, p)]
    if not sizes:
        query.workload.with_seq_len(seq_len_tokens)  # raises the workload's own message if invalid
        if query.cp_scheme != "ring":
            raise ValueError(f"{seq_len_tokens:,} tokens do not split over any {query.cp_scheme} group of "
                             f"1..{query.max_world_size} ranks{_scheme_rule(query)}")
        check_layout_fits(query.workload.with_seq_len(seq_len_tokens), query.ring(1))
        raise ValueError(f"{seq_len_tokens:,} tokens do not split over any ring of 1..{query.max_world_size} ranks")
    return sizes


def scheme_allows(query: CapacityQuery, world_size: int) -> bool:
    """True when the query's scheme can run on ``world_size`` GPUs at all (any group size for the ring and
    all-gather; Ulysses: W divides H; hybrid: W = U·R with R > 1)."""
    try:
        check_ulysses_heads(query.workload.shape.n_heads, query.ring(world_size).ulysses_size)
    except ValueError:
        return False
    return True


def _scheme_rule(query: CapacityQuery) -> str:
    """Why a scheme's group sizes are few (for the no-valid-size message)."""
    heads = query.workload.shape.n_heads
    if query.cp_scheme == "ulysses":
        return f" (Ulysses needs the group size to divide the {heads} query heads)"
    if query.cp_scheme == "hybrid":
        u = query.ulysses_degree
        return f" (hybrid needs W = {u}·R with R > 1, and {u} to divide {heads} heads)"
    return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MinWorldSize:
    """Answer to "how many GPUs for S tokens": ``minimum`` is None when none fits."""

    seq_len_tokens: int
    minimum: CapacityRow | None
    rows: tuple[CapacityRow, ...]


def min_world_size(query: CapacityQuery, seq_len_tokens: int) -> MinWorldSize:
    """Smallest feasible ring size for S tokens (``search.first_feasible`` over the valid sizes),
    plus a table: the valid powers of two up to 4× the answer (all of them when none fits) and the
    answer."""
    sizes = valid_world_sizes(query, seq_len_tokens)
    evaluated: dict[int, CapacityRow] = {}

    def feasible(p: int) -> bool:
        evaluated[p] = memory_row(query, seq_len_tokens, p)
        return evaluated[p].feasible

    minimum = search.first_feasible(sizes, feasible)
    shown = search.shown_world_sizes(sizes, minimum, factor=4, max_world_size=query.max_world_size)
    rows = tuple(timed(query, evaluated[p]) if p in evaluated else evaluate(query, seq_len_tokens, p) for p in shown)
    return MinWorldSize(seq_len_tokens=seq_len_tokens, minimum=next((r for r in rows if r.world_size == minimum), None),
                        rows=rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class MaxTokens:
    """Answer to "how many tokens on K GPUs": ``best`` None when not even the shortest valid
    sequence fits; ``next_infeasible`` is the next valid length (proof that ``best`` is maximal)."""

    world_size: int
    best: CapacityRow | None
    next_infeasible: CapacityRow | None


def token_unit(query: CapacityQuery, world_size: int) -> int:
    """Tokens per rank n = m·unit is valid for every m ≥ 1: lcm of the layout's chunks per rank,
    every segment length and every dilation rate."""
    unit = query.ring(world_size).chunks_per_rank
    for value in (*query.workload.pattern.segment_lengths_tokens, *query.workload.pattern.dilation_rates):
        unit = math.lcm(unit, value)
    return unit


def prime_factors(value: int) -> dict[int, int]:
    """prime → exponent of a positive integer, by trial division up to its square root."""
    factors: dict[int, int] = {}
    p = 2
    while p * p <= value:
        while value % p == 0:
            factors[p] = factors.get(p, 0) + 1
            value //= p
        p += 1 if p == 2 else 2
    if value > 1:
        factors[value] = factors.get(value, 0) + 1
    return factors


def unit_divisors(query: CapacityQuery, world_size: int) -> list[int]:
    """Every divisor of ``token_unit``, ascending, from the factors of the numbers it is the lcm of
    (chunks, segment lengths, dilation rates: each factored on its own, so a unit near 2^50 costs
    the square root of its largest part, not of itself)."""
    exponents: dict[int, int] = {}
    pattern = query.workload.pattern
    for value in (query.ring(world_size).chunks_per_rank, *pattern.segment_lengths_tokens, *pattern.dilation_rates):
        for prime, power in prime_factors(value).items():
            exponents[prime] = max(exponents.get(prime, 0), power)
    divisors = [1]
    for prime, power in exponents.items():
        divisors = [d * prime**k for d in divisors for k in range(power + 1)]
    return sorted(divisors)


def valid_tokens_per_rank_below_unit(query: CapacityQuery, world_size: int) -> list[int]:
    """Valid n smaller than ``token_unit`` (divisors of the unit that split; dilated patterns allow
    a rank to hold part of a segment)."""
    unit = token_unit(query, world_size)
    return [n for n in unit_divisors(query, world_size) if n < unit and splits(query, n * world_size, world_size)]


def max_tokens(query: CapacityQuery, world_size: int) -> MaxTokens:
    """Largest feasible S on ``world_size`` GPUs (its step time filled, the search's memory only)."""
    result = _max_tokens_search(query, world_size)
    best = timed(query, result.best) if result.best is not None else None
    return MaxTokens(world_size=world_size, best=best, next_infeasible=result.next_infeasible)


def _max_tokens_search(query: CapacityQuery, world_size: int) -> MaxTokens:
    """``search.largest_within`` over n = m·unit tokens per rank, falling back to the few valid n
    below the unit when not even one unit fits."""
    unit = token_unit(query, world_size)
    rows: dict[int, CapacityRow] = {}

    def row(n: int) -> CapacityRow:
        if n not in rows:
            rows[n] = memory_row(query, n * world_size, world_size)
        return rows[n]

    limit = search.MAX_SEARCH_TOKENS // (unit * world_size)
    best_m = search.largest_within(lambda m: row(m * unit).prediction.upper_bytes, query.budget_bytes, 0, limit)
    if best_m:
        return MaxTokens(world_size=world_size, best=row(best_m * unit), next_infeasible=row((best_m + 1) * unit))
    best = None
    for n in valid_tokens_per_rank_below_unit(query, world_size):
        if not row(n).feasible:
            return MaxTokens(world_size=world_size, best=best, next_infeasible=row(n))
        best = row(n)
    return MaxTokens(world_size=world_size, best=best, next_infeasible=row(unit))
