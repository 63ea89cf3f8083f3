"""One capacity search for every front end: the fewest GPUs that hold S tokens, and the longest S
that W GPUs hold. The front ends (``ringplan.capacity.attention`` for one attention layer,
``ringplan.capacity.stack`` for a whole model) say what a plan is and how to predict it; this
module only searches.

* Fewest GPUs (``first_feasible``): a linear scan over the world sizes over which S splits, in
  order. Not a bisection: per-GPU memory is not monotone from one GPU to a ring (a ring adds
  received K/V buffers and fp32 accumulators that a single device does not hold), so a single GPU
  can fit where two cannot. The valid sizes are found arithmetically first (``dividing_sizes``:
  S must be a multiple of the ring's token unit), so only those few are checked in full.
* Longest S (``largest_within``): at a fixed world size per-GPU memory never decreases with S (a
  tested property), so the largest length whose memory fits the budget is found by bracketing and
  a safeguarded secant search — a few evaluations for a near-linear memory curve, O(log S) for any
  monotone one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: Largest sequence a token search considers (2^50 tokens): beyond it something is wrong.
MAX_SEARCH_TOKENS = 2**50
#: Largest world size any search scans (the CLI refuses larger ``--max-world-size`` values).
MAX_WORLD_SIZE = 1_000_000


def budget_bytes(usable_memory_bytes: float, safety_margin: float) -> float:
    """Bytes a plan may use per GPU: usable memory × (1 − safety margin)."""
    return usable_memory_bytes * (1.0 - safety_margin)


def check_search_limits(*, safety_margin: float, max_world_size: int) -> None:
    """``ValueError`` naming the value when the margin is outside [0, 1) or the largest world size is
    not a positive integer ≤ ``MAX_WORLD_SIZE``."""
    if not (isinstance(safety_margin, (int, float)) and 0 <= safety_margin < 1):
        raise ValueError(f"safety margin must be in [0, 1), got {safety_margin!r}")
    if isinstance(max_world_size, bool) or not isinstance(max_world_size, int) or max_world_size <= 0:
        raise ValueError(f"max world size must be a positive integer, got {max_world_size!r}")
    if max_world_size > MAX_WORLD_SIZE:
        raise ValueError(f"max world size must be at most {MAX_WORLD_SIZE:,}, got {max_world_size:,}")


def dividing_sizes(seq_len_tokens: int, sizes: Iterable[int], tokens_unit: Callable[[int], int]) -> list[int]:
    """The sizes W for which S is a multiple of ``tokens_unit(W)`` (the fewest tokens a valid
    length on W GPUs is a multiple of): a cheap arithmetic filter before the full validity check."""
    return [w for w in sizes if seq_len_tokens % tokens_unit(w) == 0]


def first_feasible(sizes: Iterable[int], feasible: Callable[[int], bool]) -> int | None:
    """The first size (in the given order) that ``feasible`` accepts; None when none does."""
    return next((size for size in sizes if feasible(size)), None)


def shown_world_sizes(valid: Iterable[int], minimum: int | None, *, factor: int, max_world_size: int) -> list[int]:
    """The sizes an answer's table shows: the valid powers of two up to ``factor`` × the minimum
    (up to the largest size when nothing fits) and the minimum itself, ascending."""
    limit = factor * minimum if minimum else max_world_size
    shown = {w for w in valid if w & (w - 1) == 0 and w <= limit}
    return sorted(shown | ({minimum} if minimum else set()))


def largest_within(value: Callable[[int], float], budget: float, lo: int = 0,
                   limit: int = MAX_SEARCH_TOKENS) -> int:
    """Largest m ≥ ``lo`` with ``value(m) <= budget`` for a non-decreasing ``value``, given that
    ``lo`` qualifies (lo = 0: nothing known; 0 is returned when ``value(1)`` exceeds the budget).
    Bracketing by secant extrapolation (at least doubling), then regula falsi safeguarded by
    bisection: a near-linear memory curve takes a few calls, any monotone one O(log m).
    ``ValueError`` when m passes ``limit``."""
    v_lo = value(lo) if lo > 0 else None
    hi = lo + max(lo, 1)
    v_hi = value(hi)
    while v_hi <= budget:
        if hi > limit:
            raise ValueError(f"no memory limit found below {MAX_SEARCH_TOKENS:,} tokens; check the GPU and model")
        guess = 2 * hi
        if v_lo is not None and v_hi > v_lo:
            guess = max(guess, int(hi + 1.05 * (budget - v_hi) * (hi - lo) / (v_hi - v_lo)) + 1)
        lo, v_lo, hi = hi, v_hi, guess
        v_hi = value(hi)
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        mid = (lo + hi) // 2
        if not bisect and v_lo is not None and v_hi > v_lo:
            mid = min(max(lo + int((budget - v_lo) * width / (v_hi - v_lo)), lo + 1), hi - 1)
        v = value(mid)
        lo, v_lo, hi, v_hi = (mid, v, hi, v_hi) if v <= budget else (lo, v_lo, mid, v)
        bisect = not bisect and hi - lo > width // 2  # the bracket did not halve: bisect next
    return lo
