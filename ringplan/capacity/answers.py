"""The answer ``ringplan capacity`` gives, for one attention layer and for a whole model.

Three questions, one function per front end: S tokens on W GPUs (a check), the fewest GPUs for S
tokens, the most tokens on W GPUs. Each answer carries the rows a table shows and the row that
answers, chosen here, not in the CLI, which only formats (issue 13):

- attention, most tokens: the largest S on each power-of-two ring below W (``SHOWN_RING_SIZES``)
  beside the answer, so the table shows how capacity grows with the ring;
- whole model, a check: the chosen setting when one fits, else the most frugal one (the least
  memory), so the answer says how far off the closest setting is;
- whole model, fewest GPUs: when S splits over few world sizes (the answer is not a power of two,
  or nothing fits), the fewest GPUs for S rounded down to a multiple of ``ROUND_TOKENS``, if fewer;
- when S on W does not fit (a check, or ``ringplan plan``): what would — the fewest GPUs that hold S
  and the longest S that the W GPUs hold (issue 16);
- whole model, offload chosen: the same run without offload, so the answer names what it beat.

Built only on the public searches of ``ringplan.capacity.attention`` and ``ringplan.capacity.stack``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ringplan.capacity import attention

# The whole-model search is imported by the functions that use it: not on an attention query's cold start.
if TYPE_CHECKING:
    from ringplan.capacity import stack

#: Ring sizes whose largest S the attention max-tokens answer shows below the asked W.
SHOWN_RING_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: A sequence rounded down to a multiple of this splits over every power-of-two ring up to 512.
ROUND_TOKENS = 1024

AnswerKind = Literal["check", "min_world_size", "max_tokens"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityAnswer:
    """One capacity answer. ``kind``: which question; ``best``: the row that answers (the checked
    row; the fewest GPUs; the most tokens) or None when nothing fits; ``next_infeasible``: for
    most tokens, the next valid length, which does not fit; ``rows``: the rows a table shows;
    ``feasible``: exit status 0 or 1. Whole model, fewest GPUs: ``rounded_seq_len_tokens`` and
    ``rounded_minimum`` when S rounded down to ``ROUND_TOKENS`` fits on fewer GPUs."""

    kind: AnswerKind
    best: attention.CapacityRow | stack.StackRow | None
    next_infeasible: attention.CapacityRow | stack.StackRow | None = None
    rows: tuple[attention.CapacityRow | stack.StackRow, ...]
    feasible: bool
    rounded_seq_len_tokens: int | None = None
    rounded_minimum: stack.StackRow | None = None
    #: When S on W does not fit: the fewest GPUs that hold S, and the most tokens the W GPUs hold.
    fewest_that_fit: attention.CapacityRow | stack.StackRow | None = None
    longest_that_fits: attention.CapacityRow | stack.StackRow | None = None
    #: Whole model, ``best`` offloads its checkpoints: the same run without offload (what offload beat).
    without_offload: stack.StackRow | None = None
    #: Whole model, fewest GPUs or most tokens: every plan that fits there, fastest first (``best`` first).
    choices: tuple[stack.StackRow, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanAnswer:
    """``ringplan plan``'s answer: the ranked plan, and when nothing fits, what would (the fewest GPUs
    for S, the most tokens on W); when the fastest setting offloads, the same run without offload."""

    plan: stack.StackPlan
    fewest_that_fit: stack.StackRow | None = None
    longest_that_fits: stack.StackRow | None = None
    without_offload: stack.StackRow | None = None


def attention_capacity(query: attention.CapacityQuery, seq_len_tokens: int | None,
                       world_size: int | None) -> CapacityAnswer:
    """One attention layer: check S on W (both given), fewest GPUs for S, or most tokens on W."""
    if seq_len_tokens is None and world_size is None:
        raise ValueError("give --tokens N (fewest GPUs), --world-size K (most tokens), or both")
    if seq_len_tokens is not None and world_size is not None:
        row = attention.evaluate(query, seq_len_tokens, world_size)
        fewest = longest = None
        if not row.feasible:
            fewest = attention.min_world_size(query, seq_len_tokens).minimum
            longest = attention.max_tokens(query, world_size).best
        return CapacityAnswer(kind="check", best=row, rows=(row,), feasible=row.feasible, fewest_that_fit=fewest,
                              longest_that_fits=longest)
    if seq_len_tokens is not None:
        result = attention.min_world_size(query, seq_len_tokens)
        return CapacityAnswer(kind="min_world_size", best=result.minimum, rows=tuple(result.rows),
                              feasible=result.minimum is not None)
    return _attention_max_tokens(query, world_size)


def _attention_max_tokens(query: attention.CapacityQuery, world_size: int) -> CapacityAnswer:
    """Most tokens on W, with the largest S of every ``SHOWN_RING_SIZES`` ring below W first."""
    result = attention.max_tokens(query, world_size)
    smaller = [p for p in SHOWN_RING_SIZES if p < world_size and attention.scheme_allows(query, p)]
    rows = [r.best for p in smaller if (r := attention.max_tokens(query, p)).best is not None]
    if result.best is not None:
        rows.append(result.best)
    return CapacityAnswer(kind="max_tokens", best=result.best, next_infeasible=result.next_infeasible,
                          rows=tuple(rows), feasible=result.best is not None)


def stack_capacity(query: stack.StackQuery, seq_len_tokens: int | None, world_size: int | None) -> CapacityAnswer:
    """A whole model: check S on W, fewest GPUs for S (with the rounded-length hint), or most
    tokens on W, each over the query's candidate settings."""
    from ringplan.capacity import stack

    if seq_len_tokens is None and world_size is None:
        raise ValueError("give --tokens N (fewest GPUs), --world-size K (most tokens), or both")
    if seq_len_tokens is not None:
        query.check_positions(seq_len_tokens)
    if seq_len_tokens is not None and world_size is not None:
        return _stack_check(query, seq_len_tokens, world_size)
    if seq_len_tokens is not None:
        result = stack.min_world_size(query, seq_len_tokens)
        rounded, other = rounder_length(query, seq_len_tokens, result.minimum)
        return CapacityAnswer(kind="min_world_size", best=result.minimum, rows=tuple(result.rows),
                              feasible=result.minimum is not None, rounded_seq_len_tokens=rounded,
                              rounded_minimum=other, without_offload=without_offload(query, result.minimum),
                              choices=result.choices)
    result = stack.max_tokens(query, world_size)
    rows = (result.best,) if result.best else (result.next_infeasible,)
    return CapacityAnswer(kind="max_tokens", best=result.best, next_infeasible=result.next_infeasible, rows=rows,
                          feasible=result.best is not None, without_offload=without_offload(query, result.best),
                          choices=result.choices)


def _stack_check(query: stack.StackQuery, seq_len_tokens: int, world_size: int) -> CapacityAnswer:
    """S on W: the chosen setting when one fits, else the most frugal one; ``ValueError`` when no
    candidate is a valid run there (its reason)."""
    from ringplan.capacity import stack

    found = stack.scan(query, seq_len_tokens, world_size, first_only=query.step_time is None)
    chosen = stack.chosen_rows(query, found)
    if not chosen and not found.evaluated and not found.pruned:
        raise ValueError(found.rejected[0].reason if found.rejected else "no candidate settings")
    row = chosen[0] if chosen else stack.frugal_row(query, found)
    fewest, longest = (None, None) if chosen else what_would_fit(query, seq_len_tokens, world_size)
    return CapacityAnswer(kind="check", best=row, rows=(row,), feasible=bool(chosen), fewest_that_fit=fewest,
                          longest_that_fits=longest, without_offload=without_offload(query, row if chosen else None))


def what_would_fit(query: stack.StackQuery, seq_len_tokens: int,
                   world_size: int) -> tuple[stack.StackRow | None, stack.StackRow | None]:
    """(the fewest GPUs that hold S, the most tokens W GPUs hold), each None when there is none."""
    from ringplan.capacity import stack

    fewest = stack.min_world_size(query, seq_len_tokens).minimum
    try:
        longest = stack.max_tokens(query, world_size).best
    except ValueError:  # no valid length on W GPUs (e.g. a ring size that does not divide W)
        longest = None
    return fewest, longest


def without_offload(query: stack.StackQuery, row: stack.StackRow | None) -> stack.StackRow | None:
    """The same run as ``row`` with its checkpoints kept on the GPU, when ``row`` offloads them."""
    from ringplan.capacity import stack

    if row is None or not row.settings.offload_checkpoints:
        return None
    settings = replace(row.settings, offload_checkpoints=False)
    return stack.memory_row(query, replace(row.workload, settings=settings))


def plan_answer(query: stack.StackQuery, seq_len_tokens: int, world_size: int | None, *,
                every_row: bool = True) -> PlanAnswer:
    """``ringplan plan``: every setting ranked (``stack.plan``; ``every_row`` False: the infeasible ones
    only counted where their lower bound says so); when none fits, what would; when the fastest
    offloads, the same run without offload."""
    from ringplan.capacity import stack

    query.check_positions(seq_len_tokens)
    result = stack.plan(query, seq_len_tokens, world_size, every_row=every_row)
    if not result.feasible:
        fewest, longest = what_would_fit(query, seq_len_tokens, result.world_size)
        return PlanAnswer(plan=result, fewest_that_fit=fewest, longest_that_fits=longest)
    return PlanAnswer(plan=result, without_offload=without_offload(query, result.feasible[0]))


def rounder_length(query: stack.StackQuery, seq_len_tokens: int,
                   best: stack.StackRow | None) -> tuple[int | None, stack.StackRow | None]:
    """(S rounded down to a multiple of ``ROUND_TOKENS``, its fewest-GPUs row) when S's answer is
    not a power of two (or nothing fits) and the rounded length fits on fewer GPUs; else (None, None)."""
    from ringplan.capacity import stack

    rounded = seq_len_tokens - seq_len_tokens % ROUND_TOKENS
    if rounded <= 0 or rounded == seq_len_tokens or (best is not None and best.world_size & (best.world_size - 1) == 0):
        return None, None
    other = stack.min_world_size(query, rounded).minimum
    if other is None or (best is not None and other.world_size >= best.world_size):
        return None, None
    return rounded, other
