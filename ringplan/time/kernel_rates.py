"""Effective rate of one block kernel versus tokens per block, fitted from a kernel sweep.

One curve per kernel key (backend, head_dim, dtype, GQA ratio, causal, pass; ``kernels.KernelKey``)::

    seconds = overhead_s + FLOPs / R(n),   n = tokens per block = √(n_q · n_k)

``overhead_s`` is the per-call fixed cost (host dispatch, launch, the prologue/epilogue of tiny
blocks); R(n) the effective FLOP/s at n tokens per block, piecewise power-law (linear in log–log)
through the rates measured at the swept n. Why tokens per block and not FLOPs alone: the
``ringplan.kernels/1`` sweep of 2026-12-05 on one H100 (benchmarks/results/h100x1-2026-12-05)
shows short blocks paying a fixed cost (cuDNN bf16 causal forward, head_dim 128: 149 TFLOP/s at
2,048 tokens, 619 at 16,384) and long causal blocks losing rate (551 at 131,072, 520 at
524,288), at every head count; FLOPs alone cannot tell 64 heads × 8Ki from 16 × 16Ki.

Fit (``fit_rate_curve``): the overhead by non-negative least squares on relative error of
t ≈ c0 + a·B·H·D·(n_q + n_k) + b·FLOPs (``scipy.optimize.nnls``; only c0 is kept, capped at 80%
of the fastest call), then R at each swept n = median over its points of FLOPs / (t − c0). R is
capped so that time never falls as n grows (R(n₂)/R(n₁) ≤ (n₂/n₁)²: the FLOPs grow as n²).

Outside the swept n: below, R stays at its smallest-n value (time falls with the work towards
the overhead; optimistic, since short blocks still lose rate: labelled extrapolated); above, R follows a ``trend`` curve of the same kernel family that reaches further (another GQA
ratio's long-block sweep), else stays at its last value. Both are labelled by the caller
(``covers``). Ignores: the head count's own effect at a given n (wave quantisation of few heads
× short blocks), which the sweep shows within ±5% from 16,384 tokens up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The overhead may take at most this share of the fastest measured call (the rest is work).
MAX_OVERHEAD_SHARE = 0.8


@dataclass(frozen=True, slots=True, kw_only=True)
class RatePoint:
    """One timed kernel call: batch × heads, head_dim, query and key tokens, FLOPs, seconds."""

    batch_heads: int
    head_dim: int
    q_tokens: int
    kv_tokens: int
    flops: float
    seconds: float

    @property
    def tokens(self) -> float:
        return block_tokens(self.q_tokens, self.kv_tokens)


def block_tokens(q_tokens: float, kv_tokens: float) -> float:
    """Tokens per block, √(n_q · n_k): n for an n×n block, n/√2 for n × n/2 (the rate's size variable)."""
    if q_tokens <= 0 or kv_tokens <= 0:
        raise ValueError(f"a block needs positive query and key tokens, got {q_tokens!r} x {kv_tokens!r}")
    return float(np.sqrt(float(q_tokens) * float(kv_tokens)))


@dataclass(frozen=True, slots=True, kw_only=True)
class RateCurve:
    """seconds = overhead_s + FLOPs / R(n); R through (``tokens``, ``flops_per_s``), log–log.

    ``own_max_tokens``: the largest n this key was swept at (beyond it, up to ``tokens[-1]``, the
    rates come from a trend curve); ``relative_errors``: fitted / measured − 1 of every point.
    """

    overhead_s: float
    tokens: tuple[float, ...]
    flops_per_s: tuple[float, ...]
    own_max_tokens: float
    relative_errors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not np.isfinite(self.overhead_s) or self.overhead_s < 0:
            raise ValueError(f"overhead must be >= 0 s, got {self.overhead_s!r}")
        if len(self.tokens) != len(self.flops_per_s) or not self.tokens:
            raise ValueError(f"need one rate per swept size, got {len(self.tokens)} sizes, {len(self.flops_per_s)} rates")
        if list(self.tokens) != sorted(set(self.tokens)) or self.tokens[0] <= 0:
            raise ValueError(f"swept sizes must be positive and increasing, got {self.tokens}")
        if not all(np.isfinite(r) and r > 0 for r in self.flops_per_s):
            raise ValueError(f"rates must be positive and finite, got {self.flops_per_s}")

    @property
    def measured_range(self) -> tuple[float, float]:
        """(smallest, largest) tokens per block with a measured rate (trend-extended included)."""
        return self.tokens[0], self.tokens[-1]

    def covers(self, tokens: float) -> bool:
        lo, hi = self.measured_range
        return lo <= tokens <= hi

    def from_trend(self, tokens: float) -> bool:
        """True when the rate at ``tokens`` comes from another key's long-block trend."""
        return self.own_max_tokens < tokens <= self.tokens[-1]

    def rate_flops_per_s(self, tokens: float | np.ndarray) -> float | np.ndarray:
        """R(n): log–log interpolation inside; flat below the smallest n and above the largest."""
        n = np.asarray(tokens, dtype=float)
        if np.any(n <= 0):
            raise ValueError(f"tokens per block must be positive, got {n[n <= 0][:3].tolist()}")
        rate = np.exp(np.interp(np.log(n), np.log(self.tokens), np.log(self.flops_per_s)))
        return float(rate) if np.ndim(rate) == 0 else rate

    def time_s(self, flops: float | np.ndarray, tokens: float | np.ndarray) -> float | np.ndarray:
        """Seconds of one call of ``flops`` at ``tokens`` per block; 0 FLOPs: 0 s."""
        f = np.asarray(flops, dtype=float)
        if np.any(f < 0):
            raise ValueError(f"FLOPs must be >= 0, got {f[f < 0][:3].tolist()}")
        seconds = np.where(f == 0, 0.0, self.overhead_s + f / self.rate_flops_per_s(tokens))
        return float(seconds) if np.ndim(seconds) == 0 else seconds

    def scaled(self, factor: float) -> RateCurve:
        """The same curve on a GPU ``1/factor`` as fast: every rate / factor; the per-call overhead is kept
        (host dispatch and launch, not the GPU's FLOP rate: ASSUMED the same on another GPU)."""
        if not np.isfinite(factor) or factor <= 0:
            raise ValueError(f"scale factor must be positive, got {factor!r}")
        return RateCurve(overhead_s=self.overhead_s, tokens=self.tokens,
                         flops_per_s=tuple(r / factor for r in self.flops_per_s), own_max_tokens=self.own_max_tokens,
                         relative_errors=self.relative_errors)

    def capped(self, peak_flops_per_s: float) -> RateCurve:
        """Rates no higher than ``peak_flops_per_s`` (a measured rate above the catalog peak is noise)."""
        return RateCurve(overhead_s=self.overhead_s, tokens=self.tokens,
                         flops_per_s=tuple(min(r, peak_flops_per_s) for r in self.flops_per_s),
                         own_max_tokens=self.own_max_tokens, relative_errors=self.relative_errors)


def _monotone_rates(tokens: Sequence[float], rates: Sequence[float]) -> list[float]:
    """Cap each rate so that time (∝ n² / R) never falls from one swept n to the next."""
    out = [float(rates[0])]
    for i in range(1, len(rates)):
        out.append(min(float(rates[i]), out[-1] * (tokens[i] / tokens[i - 1]) ** 2))
    return out


def fit_overhead_s(points: Sequence[RatePoint]) -> float:
    """c0 of t ≈ c0 + a·B·H·D·(n_q + n_k) + b·FLOPs, non-negative least squares on relative error, capped at
    ``MAX_OVERHEAD_SHARE`` of the fastest call (``links.nonnegative_least_squares``: the exact
    non-negative solution, as scipy.optimize.nnls)."""
    from ringplan.time.links import nonnegative_least_squares

    seconds = np.array([p.seconds for p in points])
    design = np.array([[1.0, p.batch_heads * p.head_dim * (p.q_tokens + p.kv_tokens), p.flops] for p in points])
    scale = design.max(axis=0)
    coef = nonnegative_least_squares(design / scale / seconds[:, None], np.ones(len(points)))
    return float(min(coef[0] / scale[0], MAX_OVERHEAD_SHARE * seconds.min()))


def fit_rate_curve(points: Sequence[RatePoint]) -> RateCurve:
    """The rate curve of one kernel key from its timed calls (≥ 2 distinct tokens per block).

    Raises ValueError on fewer than 2 sizes or a non-positive time.
    """
    if len({p.tokens for p in points}) < 2:
        raise ValueError(f"need calls at >= 2 tokens per block to fit a rate curve, got {len(points)} point(s)")
    if any(not (p.seconds > 0 and p.flops > 0) for p in points):
        raise ValueError("every point needs positive FLOPs and seconds")
    overhead = fit_overhead_s(points)
    by_tokens: dict[float, list[float]] = {}
    for p in points:
        by_tokens.setdefault(p.tokens, []).append(p.flops / (p.seconds - overhead))
    tokens = sorted(by_tokens)
    rates = _monotone_rates(tokens, [float(np.median(by_tokens[n])) for n in tokens])
    curve = RateCurve(overhead_s=overhead, tokens=tuple(tokens), flops_per_s=tuple(rates), own_max_tokens=tokens[-1])
    errors = tuple(float(curve.time_s(p.flops, p.tokens) / p.seconds - 1.0) for p in points)
    return RateCurve(overhead_s=overhead, tokens=curve.tokens, flops_per_s=curve.flops_per_s,
                     own_max_tokens=tokens[-1], relative_errors=errors)


def extended_by_trend(curve: RateCurve, trend: RateCurve) -> RateCurve:
    """``curve`` continued past its largest n along ``trend``: R(n) = R(n_max) · R_trend(n) / R_trend(n_max).

    For a key swept only up to n_max whose kernel family was swept further (another GQA ratio).
    Unchanged when the trend does not reach further.
    """
    n_max = curve.tokens[-1]
    extra = [n for n in trend.tokens if n > n_max]
    if not extra:
        return curve
    base = curve.flops_per_s[-1] / trend.rate_flops_per_s(n_max)
    tokens = curve.tokens + tuple(extra)
    rates = _monotone_rates(tokens, list(curve.flops_per_s) + [base * trend.rate_flops_per_s(n) for n in extra])
    return RateCurve(overhead_s=curve.overhead_s, tokens=tokens, flops_per_s=tuple(rates),
                     own_max_tokens=curve.own_max_tokens, relative_errors=curve.relative_errors)


def blended(low: RateCurve, high: RateCurve, weight: float) -> RateCurve:
    """The curve between two keys (GQA ratios g_lo < g < g_hi, ``weight`` = (g − g_lo)/(g_hi − g_lo)):
    overhead and rate linear in ``weight`` at every n either swept. Source: none better than linear
    between neighbours; the sweep shows rates within ±3% across GQA 1/4/8 at n ≥ 16,384."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must be in [0, 1], got {weight!r}")
    lo, hi = max(low.tokens[0], high.tokens[0]), min(low.tokens[-1], high.tokens[-1])
    tokens = tuple(sorted(n for n in set(low.tokens) | set(high.tokens) if lo <= n <= hi)) or (lo,)
    rates = [(1 - weight) * low.rate_flops_per_s(n) + weight * high.rate_flops_per_s(n) for n in tokens]
    return RateCurve(overhead_s=(1 - weight) * low.overhead_s + weight * high.overhead_s, tokens=tokens,
                     flops_per_s=tuple(_monotone_rates(tokens, rates)),
                     own_max_tokens=min(low.own_max_tokens, high.own_max_tokens))
