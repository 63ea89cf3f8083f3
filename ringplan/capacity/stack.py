"""Whole-model capacity: the fewest GPUs and the settings that hold S tokens, the most tokens K
GPUs hold, and every setting at one world size ranked (``ringplan plan``).

W = DP × P × T GPUs: context-parallel groups of P ranks, tensor-parallel groups of T, DP data-parallel
replicas. The minimum search varies whichever of P and DP the query leaves open (by default DP = 1).

Candidates are (settings, parallelism) pairs: the settings of ``ringplan.capacity.candidates``
(sharding, checkpointing, offload, loss, MLP tile, parameter offload) times the splits of
``ringplan.capacity.parallelism`` (tensor-parallel degree T, context-parallel scheme). Candidates whose
predictions are identical at a world size (e.g. every sharding on one GPU) count once, as the preferred one.

A setting is feasible when ``total + residual bound <= usable memory × (1 − safety margin)``
(``ringplan.memory.stack_model``): capacity is never over-predicted by more than the fits' worst residual.
Among feasible settings the fastest predicted step time wins (the ``step_time`` hook, from
``ringplan.time.stack_time``); settings it cannot time, or all when there is no hook, follow
``preference_key``: no parameter offload first, then no MLP tile, then less recomputation
(checkpointing none < selective < full < full with offload), then less communication (sharding none
< zero1 < zero2 < zero3), then the full loss.

* ``min_world_size``: the first valid W with a feasible setting (``search.first_feasible``:
  memory is not monotone from one GPU to a ring).
* ``max_tokens``: per-GPU memory never decreases with S at fixed settings, so each setting's
  largest S is ``search.largest_within`` over valid lengths; a setting that cannot hold the best
  length found so far is not searched.

Every candidate is judged, none is assumed to dominate another (fewer saved activations do not
always mean less memory: the peak instant moves). What keeps a search cheap is a certified lower
bound (``StackMemoryModel.lower_bound_bytes``, one instant's terms at ~1/50 of the cost): a
candidate whose bound exceeds the budget is infeasible without its full prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ringplan.capacity import search
from ringplan.capacity.parallelism import DEFAULT_PARALLELISM, Parallelism, check_placement, parallelism_key
from ringplan.hardware import GpuSpec
from ringplan.memory.attention_model import MemoryPrediction
from ringplan.models import ModelSpec
from ringplan.capacity.candidates import model_mlp_tiles, preference_key, settings_space
from ringplan.stack import StackSettings, StackWorkload
from ringplan.memory.stack_model import StackMemoryModel, default_stack_memory_model
from ringplan.memory.host_memory import (default_host_memory_bytes_per_node, host_memory_bytes_per_gpu,
                                         host_memory_bytes_per_node, host_memory_fits)
from ringplan.workload import RingLayout

#: (workload, gpu) → predicted step time in seconds, or None when the time model cannot say.
StackStepTimeFn = Callable[[StackWorkload, GpuSpec], "float | None"]
# ----------------------------------------------------------------------------- query and rows


@dataclass(frozen=True, slots=True, kw_only=True)
class StackQuery:
    """What is asked: a model, a GPU, a mode, a layout, the candidate settings and the margin.

    ``ring_size`` P and ``data_parallel`` DP: None means searched (at most one of them; the
    default searches P with DP = 1); W = DP × P × T. ``parallelisms``: the (T, context-parallel
    scheme) choices tried (``ringplan.capacity.parallelism``), T and T × U inside one node unless
    ``allow_cross_node``. ``host_memory_bytes_per_node``: the host RAM of one node
    (None: the catalog GPU's host system, ``ringplan.memory.host_memory.HOST_SYSTEMS``; no check for a
    GPU without one); a plan whose host memory per node for what it offloads exceeds it is infeasible."""

    model: ModelSpec
    gpu: GpuSpec
    training: bool = True
    batch: int = 1
    layout: str = "contiguous"
    backend: str = "auto"
    candidates: tuple[StackSettings, ...] = ()
    ring_size: int | None = None
    data_parallel: int | None = 1
    safety_margin: float = 0.05
    max_world_size: int = 1024
    memory: StackMemoryModel = field(default_factory=default_stack_memory_model)
    step_time: StackStepTimeFn | None = None
    host_memory_bytes_per_node: float | None = None
    parallelisms: tuple[Parallelism, ...] = (DEFAULT_PARALLELISM,)
    allow_cross_node: bool = False

    def __post_init__(self) -> None:
        if self.host_memory_bytes_per_node is not None and not self.host_memory_bytes_per_node > 0:
            raise ValueError(f"host memory per node must be positive, got {self.host_memory_bytes_per_node!r}")
        search.check_search_limits(safety_margin=self.safety_margin, max_world_size=self.max_world_size)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch <= 0:
            raise ValueError(f"batch must be a positive integer, got {self.batch!r}")
        for name in ("ring_size", "data_parallel"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.ring_size is None and self.data_parallel is None:
            raise ValueError("fix the ring size or the data-parallel size (the search varies the other)")
        RingLayout(ring_size=1, layout=self.layout, backend=self.backend)  # validates names
        if not self.candidates:
            object.__setattr__(self, "candidates", settings_space(training=self.training,
                                                                  mlp_tiles=model_mlp_tiles(self.model)))

    @property
    def budget_bytes(self) -> float:
        return search.budget_bytes(self.gpu.usable_memory_bytes, self.safety_margin)

    @property
    def host_budget_bytes_per_node(self) -> float | None:
        """The node's host RAM the plans may pin: the given value, else the GPU's host system's."""
        if self.host_memory_bytes_per_node is not None:
            return float(self.host_memory_bytes_per_node)
        return default_host_memory_bytes_per_node(self.gpu.name)

    def host_fits(self, w: StackWorkload) -> bool:
        """Whether ``w``'s host memory per node (what it offloads) fits ``host_budget_bytes_per_node``."""
        budget = self.host_budget_bytes_per_node
        return budget is None or host_memory_fits(w, gpus_per_node=self.gpu.gpus_per_node,
                                                  host_memory_bytes_per_node_available=budget)

    def positions_fit(self, seq_len_tokens: int) -> bool:
        """False when the model has learned positions and S is beyond them (GPT-2: 1,024): such a
        model cannot run that length as it is. RoPE models extrapolate (a warning, not a limit)."""
        m = self.model
        return not (m.position == "learned" and m.max_positions and seq_len_tokens > m.max_positions)

    def check_positions(self, seq_len_tokens: int) -> None:
        """``ValueError`` (bad input) when S is beyond the model's learned positions."""
        if not self.positions_fit(seq_len_tokens):
            raise ValueError(f"{seq_len_tokens:,} tokens > {self.model.name}'s {self.model.max_positions:,} learned "
                             "positions: the model cannot run that length as it is (its position table ends there)")

    def ring_for(self, world_size: int, tp_degree: int = 1) -> int:
        """P for W GPUs: the fixed ring size, else W / (DP·T) (``ValueError`` when it does not divide)."""
        t = tp_degree
        p = self.ring_size if self.ring_size is not None else world_size // (self.data_parallel * t)
        if p <= 0 or world_size % (p * t) or (self.ring_size is None and world_size % (self.data_parallel * t)):
            fixed = f"ring size {self.ring_size}" if self.ring_size is not None else \
                f"{self.data_parallel} data-parallel replicas"
            raise ValueError(f"{world_size} GPUs cannot be split into {fixed}" + (f" x tensor parallel {t}" if t > 1
                                                                                  else ""))
        return p

    def candidate_pairs(self) -> list[tuple[StackSettings, Parallelism]]:
        """Every (settings, parallelism) candidate, in ``candidate_key`` order."""
        pairs = [(s, par) for par in self.parallelisms for s in self.candidates]
        return sorted(pairs, key=lambda pair: (parallelism_key(pair[1]), preference_key(pair[0])))

    def workload(self, seq_len_tokens: int, world_size: int, settings: StackSettings,
                 parallelism: Parallelism = DEFAULT_PARALLELISM) -> StackWorkload:
        """The ``StackWorkload`` of one candidate (``ValueError`` when it is not a valid run)."""
        p = self.ring_for(world_size, parallelism.tp_degree)
        if p == 1 and parallelism.cp_scheme != "ring" and Parallelism(tp_degree=parallelism.tp_degree) in self.parallelisms:
            raise ValueError(f"with one context-parallel rank the {parallelism.cp_scheme} scheme is the ring's single "
                             f"kernel: planned once, as the ring")
        check_placement(parallelism, ring_size=p, model=self.model, gpus_per_node=self.gpu.gpus_per_node,
                        allow_cross_node=self.allow_cross_node)
        layout = RingLayout(ring_size=p, layout=self.layout, backend=self.backend, cp_scheme=parallelism.cp_scheme,
                            ulysses_degree=parallelism.ulysses_degree)
        return StackWorkload(model=self.model, seq_len_tokens=seq_len_tokens, batch=self.batch,
                             training=self.training, world_size=world_size, layout=layout, settings=settings,
                             tp_degree=parallelism.tp_degree)


@dataclass(frozen=True, slots=True, kw_only=True)
class StackRow:
    """One candidate: a workload (GPUs, ring, tokens, settings), its memory and its verdict; the pinned
    host memory it needs per GPU and per node (``ringplan.memory.host_memory``) and the node's host RAM."""

    workload: StackWorkload
    prediction: MemoryPrediction
    usable_memory_bytes: int
    budget_bytes: float
    feasible: bool
    step_time_s: float | None = None
    host_memory_bytes_per_gpu: float = 0.0
    host_memory_bytes_per_node: float = 0.0
    host_budget_bytes_per_node: float | None = None

    @property
    def world_size(self) -> int:
        return self.workload.world_size

    @property
    def ring_size(self) -> int:
        return self.workload.layout.ring_size

    @property
    def data_parallel(self) -> int:
        return self.workload.world_size // (self.workload.layout.ring_size * self.workload.tp_degree)

    @property
    def tp_degree(self) -> int:
        return self.workload.tp_degree

    @property
    def parallelism(self) -> Parallelism:
        return parallelism_of(self.workload)

    @property
    def seq_len_tokens(self) -> int:
        return self.workload.seq_len_tokens

    @property
    def tokens_per_rank(self) -> int:
        return self.prediction.tokens_per_rank

    @property
    def settings(self) -> StackSettings:
        return self.workload.settings

    @property
    def headroom_bytes(self) -> float:
        """Budget left after the predicted peak and its residual bound (negative when infeasible)."""
        return self.budget_bytes - self.prediction.upper_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A candidate that is not a valid run at this world size (e.g. a shard group larger than W)."""

    settings: StackSettings
    world_size: int
    reason: str


def parallelism_of(w: StackWorkload) -> Parallelism:
    """The (T, scheme) of a workload."""
    layout = w.layout
    return Parallelism(tp_degree=w.tp_degree, cp_scheme=layout.cp_scheme,
                       ulysses_degree=layout.ulysses_degree if layout.cp_scheme == "hybrid" else None)


def candidate_key(w: StackWorkload) -> tuple:
    """Order of candidates without a time model: ``parallelism_key``, then ``preference_key``."""
    return parallelism_key(parallelism_of(w)), preference_key(w.settings)


def memory_row(query: StackQuery, w: StackWorkload) -> StackRow:
    """Predict one candidate's memory (what the searches evaluate)."""
    prediction = query.memory.predict(w, query.gpu)
    return StackRow(workload=w, prediction=prediction, usable_memory_bytes=query.gpu.usable_memory_bytes,
                    budget_bytes=query.budget_bytes,
                    feasible=prediction.upper_bytes <= query.budget_bytes and query.host_fits(w),
                    host_memory_bytes_per_gpu=host_memory_bytes_per_gpu(w),
                    host_memory_bytes_per_node=host_memory_bytes_per_node(w, query.gpu.gpus_per_node),
                    host_budget_bytes_per_node=query.host_budget_bytes_per_node)


def timed(query: StackQuery, row: StackRow) -> StackRow:
    """``row`` with the hook's step time, when there is a hook."""
    if query.step_time is None or row.step_time_s is not None:
        return row
    return replace(row, step_time_s=query.step_time(row.workload, query.gpu))


def ranked(rows: list[StackRow]) -> list[StackRow]:
    """Fastest predicted step first; rows without a step time after, in ``preference_key`` order."""
    return sorted(rows, key=lambda r: (r.step_time_s is None, r.step_time_s or 0.0, candidate_key(r.workload)))


def candidate_workloads(query: StackQuery, seq_len_tokens: int, world_size: int
                        ) -> tuple[list[StackWorkload], list[Rejected]]:
    """The workload of every candidate setting at one (S, W), in preference order, and the
    candidates that are not valid runs there (e.g. a shard group larger than W)."""
    workloads, rejected = [], []
    for settings, par in query.candidate_pairs():
        try:
            workloads.append(query.workload(seq_len_tokens, world_size, settings, par))
        except ValueError as exc:
            rejected.append(Rejected(settings=settings, world_size=world_size, reason=str(exc)))
    return workloads, rejected


def candidate_rows(query: StackQuery, seq_len_tokens: int, world_size: int) -> tuple[list[StackRow], list[Rejected]]:
    """Every candidate at one (S, W), each predicted (duplicates of a preferred candidate's
    prediction dropped), and the candidates that are not valid runs there."""
    workloads, rejected = candidate_workloads(query, seq_len_tokens, world_size)
    return distinct_rows([memory_row(query, w) for w in workloads]), rejected


def distinct_rows(rows: list[StackRow]) -> list[StackRow]:
    """``rows`` without those whose prediction repeats an earlier (preferred) row's."""
    kept, seen = [], set()
    for row in rows:
        key = tuple(sorted(row.prediction.terms_bytes.items()))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


@dataclass(frozen=True, slots=True, kw_only=True)
class Scan:
    """The candidates at one (S, W) as the searches see them: ``feasible`` rows in preference
    order, ``evaluated`` rows predicted in full, ``pruned`` (lower bound, workload) pairs judged
    infeasible by ``StackMemoryModel.lower_bound_bytes`` alone, and ``rejected`` invalid runs."""

    feasible: tuple[StackRow, ...]
    evaluated: tuple[StackRow, ...]
    pruned: tuple[tuple[float, StackWorkload], ...]
    rejected: tuple[Rejected, ...]


def scan(query: StackQuery, seq_len_tokens: int, world_size: int, *, first_only: bool) -> Scan:
    """Candidates at one (S, W) in preference order (stopping at the first feasible one when
    ``first_only``). A candidate whose certified lower bound exceeds the budget is infeasible
    without a full prediction: that keeps a cold start's search to a few full predictions."""
    workloads, rejected = candidate_workloads(query, seq_len_tokens, world_size)
    feasible, evaluated, pruned = [], [], []
    for w in workloads:
        bound = query.memory.lower_bound_bytes(w, query.gpu)
        if bound > query.budget_bytes:
            pruned.append((bound, w))
            continue
        row = memory_row(query, w)
        evaluated.append(row)
        if row.feasible:
            feasible.append(row)
            if first_only:
                break
    return Scan(feasible=tuple(feasible), evaluated=tuple(evaluated), pruned=tuple(pruned), rejected=tuple(rejected))


def chosen_rows(query: StackQuery, found: Scan) -> list[StackRow]:
    """The feasible rows of a scan, timed and ranked (the first is the answer)."""
    return ranked([timed(query, r) for r in found.feasible])


def frugal_row(query: StackQuery, found: Scan) -> StackRow | None:
    """For a (S, W) where nothing fits: the candidate with the least memory. Which candidates were
    pruned depends on what the model had already predicted (its lower bound is the exact figure
    then), the answer must not: the pruned ones are predicted in full in the order of their certified
    lower bounds until the next bound exceeds the least memory found (an exact branch and bound)."""
    rows = list(found.evaluated)
    for bound, w in sorted(found.pruned, key=lambda pair: pair[0]):  # branch and bound: exact, whatever the bounds
        if rows and bound > min(r.prediction.upper_bytes for r in rows):
            break
        rows.append(memory_row(query, w))
    return lowest_memory_row(rows) if rows else None


def lowest_memory_row(rows: list[StackRow]) -> StackRow:
    return min(rows, key=lambda r: (r.prediction.upper_bytes, candidate_key(r.workload)))


# ----------------------------------------------------------------------------- fewest GPUs


def valid_world_sizes(query: StackQuery, seq_len_tokens: int) -> list[int]:
    """Every W ≤ ``max_world_size`` of the form P × DP × T (the open one of P and DP varied, T of any
    candidate parallelism) over whose ring S splits, ascending. ``ValueError`` with the layout's reason when there is none."""
    if query.ring_size is not None and query.data_parallel is not None:
        sizes = [query.ring_size * query.data_parallel]
    elif query.ring_size is not None:
        sizes = list(range(query.ring_size, query.max_world_size + 1, query.ring_size))
    else:
        sizes = list(range(query.data_parallel, query.max_world_size + 1, query.data_parallel))
    chunks = RingLayout(ring_size=1, layout=query.layout, backend=query.backend).chunks_per_rank
    degrees = sorted({par.tp_degree for par in query.parallelisms})

    def ring_units(w: int) -> list[int]:  # the ring unit P·chunks of every T that splits W
        units = []
        for t in degrees:
            try:
                units.append(query.ring_for(w, t) * chunks)
            except ValueError:
                continue
        return units

    valid = [w for w in sizes if w <= query.max_world_size and any(seq_len_tokens % u == 0 for u in ring_units(w))]
    if not valid:
        if sizes:
            query.workload(seq_len_tokens, sizes[0], query.candidates[0])  # raises the layout's own message
        raise ValueError(f"{seq_len_tokens:,} tokens do not split over any ring of at most "
                         f"{query.max_world_size} GPUs with the {query.layout} layout")
    return valid


@dataclass(frozen=True, slots=True, kw_only=True)
class StackMinWorldSize:
    """Fewest GPUs for S tokens: ``minimum`` (None when nothing fits up to the maximum), ``choices``
    the feasible settings there, ranked (all of them with a time model; without one the search
    stops at the first in preference order), ``rows`` one per shown W (its chosen setting, or the
    most frugal one where none fits)."""

    seq_len_tokens: int
    minimum: StackRow | None
    choices: tuple[StackRow, ...]
    rows: tuple[StackRow, ...]


def min_world_size(query: StackQuery, seq_len_tokens: int) -> StackMinWorldSize:
    """Smallest W with a feasible setting (``search.first_feasible`` over ``valid_world_sizes``);
    the table shows the valid powers of two up to 2× the answer (all of them when none fits) and
    the answer."""
    first_only = query.step_time is None
    sizes = valid_world_sizes(query, seq_len_tokens)
    scans: dict[int, Scan] = {}

    def feasible(size: int) -> bool:
        scans[size] = scan(query, seq_len_tokens, size, first_only=first_only)
        return bool(scans[size].feasible)

    minimum = search.first_feasible(sizes, feasible)
    if not any(found.evaluated or found.pruned for found in scans.values()):
        raise ValueError(next((r.reason for found in scans.values() for r in found.rejected), "no candidate settings"))
    table = []
    for size in search.shown_world_sizes(sizes, minimum, factor=2, max_world_size=query.max_world_size):
        found = scans.get(size) or scan(query, seq_len_tokens, size, first_only=first_only)
        row = (chosen_rows(query, found) or [None])[0] or frugal_row(query, found)
        if row is not None:
            table.append(row)
    choices = tuple(chosen_rows(query, scans[minimum])) if minimum else ()
    table = [choices[0] if choices and row.world_size == minimum else row for row in table]
    return StackMinWorldSize(seq_len_tokens=seq_len_tokens, minimum=choices[0] if choices else None,
                             choices=choices, rows=tuple(table))


# ----------------------------------------------------------------------------- most tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class StackMaxTokens:
    """Most tokens on W GPUs: ``best`` (None when not even the shortest valid length fits),
    ``choices`` the feasible settings at that length (as in ``StackMinWorldSize``),
    ``next_infeasible`` the chosen setting at the next valid length (no candidate fits there)."""

    world_size: int
    best: StackRow | None
    choices: tuple[StackRow, ...]
    next_infeasible: StackRow | None


def token_unit(query: StackQuery, world_size: int, settings: StackSettings,
               parallelism: Parallelism = DEFAULT_PARALLELISM) -> int:
    """S = m·unit is valid for ``settings`` for every m ≥ 1: P × chunks per rank (1 contiguous, 2
    zigzag), × the MLP tile (their least common multiple: a tile divides n = S / P)."""
    p = query.ring_for(world_size, parallelism.tp_degree)
    chunks = RingLayout(ring_size=p, layout=query.layout, backend=query.backend).chunks_per_rank
    return p * math.lcm(chunks, settings.mlp_tile_tokens or 1)


def max_tokens(query: StackQuery, world_size: int) -> StackMaxTokens:
    """Largest S on ``world_size`` GPUs over every candidate setting, each on its own unit of valid
    lengths (``token_unit``). Candidates are searched from the least preferred (most memory-frugal)
    on; one that cannot hold the first of its lengths above the best found so far is skipped. The
    chosen setting at that length follows ``scan``; ``next_infeasible`` is that setting's next
    valid length."""
    best_tokens, reasons, finest = 0, [], None
    pairs = query.candidate_pairs()
    for settings, par in reversed(pairs):
        try:
            unit = token_unit(query, world_size, settings, par)
            query.workload(unit, world_size, settings, par)
        except ValueError as exc:
            reasons.append(str(exc))
            continue
        finest = unit if finest is None else min(finest, unit)

        def needed(m: int, settings: StackSettings = settings, unit: int = unit, par: Parallelism = par) -> float:
            """Memory + bound of S = m·unit (the lower bound where that already exceeds the budget)."""
            w = query.workload(m * unit, world_size, settings, par)
            if not query.host_fits(w) or not query.positions_fit(w.seq_len_tokens):
                return math.inf
            bound = query.memory.lower_bound_bytes(w, query.gpu)
            return bound if bound > query.budget_bytes else query.memory.predict(w, query.gpu).upper_bytes

        above = best_tokens // unit + 1  # the first of this candidate's lengths above the best so far
        if best_tokens == 0 or needed(above) <= query.budget_bytes:
            start = above if best_tokens else 0
            found = search.largest_within(needed, query.budget_bytes, start, search.MAX_SEARCH_TOKENS // unit)
            best_tokens = max(best_tokens, found * unit)
    if len(reasons) == len(pairs):
        raise ValueError(reasons[0])
    if best_tokens == 0:
        frugal = frugal_row(query, scan(query, finest, world_size, first_only=False))
        return StackMaxTokens(world_size=world_size, best=None, choices=(), next_infeasible=frugal)
    choices = tuple(chosen_rows(query, scan(query, best_tokens, world_size, first_only=query.step_time is None)))
    chosen, par = choices[0].settings, choices[0].parallelism
    following = memory_row(query, query.workload(best_tokens + token_unit(query, world_size, chosen, par), world_size,
                                                 chosen, par))
    return StackMaxTokens(world_size=world_size, best=choices[0], choices=choices, next_infeasible=following)


# ----------------------------------------------------------------------------- every setting at one W


@dataclass(frozen=True, slots=True, kw_only=True)
class StackPlan:
    """Every candidate at S tokens on W GPUs: feasible ones ranked by predicted step time,
    infeasible ones by memory (all of them, or — ``pruned`` > 0 — those predicted in full and, when
    nothing fits, the least-memory one), and those that are no valid run there."""

    seq_len_tokens: int
    world_size: int
    feasible: tuple[StackRow, ...]
    infeasible: tuple[StackRow, ...]
    rejected: tuple[Rejected, ...]
    pruned: int = 0

    @property
    def infeasible_count(self) -> int:
        """Candidates that do not fit: the rows in ``infeasible`` and those judged by their lower bound."""
        return len(self.infeasible) + self.pruned


def plan(query: StackQuery, seq_len_tokens: int, world_size: int | None = None, *,
         every_row: bool = True) -> StackPlan:
    """Rank the settings for S tokens on ``world_size`` GPUs (default: the fewest that hold S, or
    the largest valid W when none does). ``every_row`` False: candidates whose certified lower bound
    exceeds the budget are counted, not predicted, and infeasible candidates are counted once each
    (``every_row`` counts identical predictions once); the feasible ones are the same either way."""
    if world_size is None:
        answer = min_world_size(query, seq_len_tokens)
        world_size = answer.minimum.world_size if answer.minimum else valid_world_sizes(query, seq_len_tokens)[-1]
    if every_row:
        rows, rejected = candidate_rows(query, seq_len_tokens, world_size)
        pruned = 0
    else:
        # which candidates the lower bound prunes depends on what was predicted before (the bound is then
        # exact): feasible rows are always predicted, so only they are de-duplicated; the rest are counted
        found = scan(query, seq_len_tokens, world_size, first_only=False)
        rows = distinct_rows(list(found.feasible)) + [r for r in found.evaluated if not r.feasible]
        rejected, pruned = list(found.rejected), len(found.pruned)
        if not found.feasible and found.pruned:
            frugal = frugal_row(query, found)
            if frugal not in rows:
                rows, pruned = [*rows, frugal], pruned - 1
    if not rows:
        raise ValueError(rejected[0].reason if rejected else "no candidate settings")
    feasible = ranked([timed(query, r) for r in rows if r.feasible])
    infeasible = sorted((r for r in rows if not r.feasible),
                        key=lambda r: (r.prediction.upper_bytes, candidate_key(r.workload)))
    return StackPlan(seq_len_tokens=seq_len_tokens, world_size=world_size, feasible=tuple(feasible),
                     infeasible=tuple(infeasible), rejected=tuple(rejected), pruned=pruned)
