"""Fits of profile rows that the memory model builds on: shape families, fit statistics, the seed
form and the free-θ diagnostic form.

* **seed form** (the seed report's): ``bytes = overhead + bytes_per_token · n`` per profile, least
  squares; reported as ``mb_per_token``, ``overhead_mb``, R² and residuals. It ignores the workload
  shape, so it transfers to another shape only as a guess.
* **free-θ form** (a diagnostic): ``bytes = c + Σ_j θ_j · φ_j(workload, layout)`` with θ_j ≥ 0 and
  c ≥ 0 fitted by bounded least squares. θ_j near 1 says the term's formula is right; as a predictor
  it does not transfer (q, K/V and the block result all scale with n, so the θ are ill-conditioned:
  on 2×H200 it put q at 0.67 and the received K/V at 1.7). Planning uses the calibrated form
  (``ringplan.memory.calibration``): θ = 1, and only what the terms cannot know is fitted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ringplan.memory.attention_terms import TERM_NAMES, TermInputs, terms_at
from ringplan.profiles.attention import Measurement
from ringplan.workload import DTYPE_BYTES, RingLayout, Workload

#: Figures a fit can target, best first (the first one present in the rows is used by default).
TARGETS: tuple[str, ...] = ("device_used_bytes", "peak_reserved_bytes", "peak_allocated_bytes", "tracked_peak_bytes")
#: Row kinds a default fit uses ("estimated" rows are someone's formula, not data).
FIT_KINDS: tuple[str, ...] = ("measured", "reported")


# ----------------------------------------------------------------------------- shape families


def shape_family(*, dilated: bool, training: bool, projections: bool, backend: str, ring: bool = False) -> str:
    """Which fitted parts may be reused: same pattern kind, mode, projections, workspace kind, and
    one GPU vs a ring (``ring``: P > 1). Heads, dims, dtype and lengths are not part of it: φ
    already scales with them. The ring is: on 2×H200 the allocator's slack in training was ~1% of
    the reservation at P = 1 and ~43% at P = 2, and the memory outside the allocator 1.90 vs
    2.67 GB (benchmarks/accuracy_report.py)."""
    workspace = "math" if backend == "math" else "tiled"
    return "/".join(("dilated" if dilated else "dense", "training" if training else "forward",
                     "projections" if projections else "no-projections", workspace, "ring" if ring else "single"))


def workload_family(workload: Workload, layout: RingLayout) -> str:
    return shape_family(dilated=workload.pattern.dilated, training=workload.training,
                        projections=workload.projections, backend=layout.backend, ring=layout.ring_size > 1)


def row_family(row: Measurement) -> str:
    return shape_family(dilated=bool(row.segment_lengths_tokens), training=row.training,
                        projections=row.projections, backend=row.backend, ring=row.ring_size > 1)


def kernel_family(family: str) -> str:
    """The family without its ring part: the local kernel's workspace does not know about the ring
    (on 2×H200 the allocator's excess over the terms was the same at P = 1 and P = 2)."""
    return family.rsplit("/", 1)[0]


def slack_family(family: str) -> str:
    """The family the allocator's slack is fitted per: the kernel family, split into one GPU and a
    ring in training only (2×H200: the ring's backward kept 1.3 × its ring state cached, 43% of the
    reservation; forward slack was a few MiB either way)."""
    return family if "/training/" in family else kernel_family(family)


def row_inputs(row: Measurement) -> TermInputs:
    """Evaluation point of a recorded run at its reported tokens per rank (no divisibility check)."""
    return TermInputs(batch=row.batch, n_heads=row.n_heads, n_kv_heads=row.n_kv_heads, head_dim=row.head_dim,
                      embed_dim=row.embed_dim, dtype_bytes=DTYPE_BYTES[row.dtype], tokens_per_rank=row.tokens_per_rank,
                      ring_size=row.ring_size, backend=row.backend, segment_lengths_tokens=row.segment_lengths_tokens,
                      dilation_rates=row.dilation_rates, training=row.training, projections=row.projections)


def fit_rows(rows: Sequence[Measurement], target: str | None = None,
             kinds: Sequence[str] = FIT_KINDS) -> tuple[str, list[Measurement]]:
    """The target figure (``target`` or the first of ``TARGETS`` present) and the rows to fit:
    not OOM, of an accepted kind, with that figure. ``ValueError`` when nothing is left."""
    usable = [r for r in rows if not r.oom and r.kind in kinds]
    candidates = [target] if target else list(TARGETS)
    for name in candidates:
        if name not in TARGETS:
            raise ValueError(f"fit target {name!r} is not one of {list(TARGETS)}")
        chosen = [r for r in usable if getattr(r, name) is not None]
        if chosen:
            return name, chosen
    raise ValueError(f"no rows to fit: {len(rows)} rows, none non-OOM of kind {list(kinds)} "
                     f"with {'/'.join(candidates)}")


# ----------------------------------------------------------------------------- fit statistics


@dataclass(frozen=True, slots=True, kw_only=True)
class FitStats:
    """Goodness of fit on the fitted figure. ``r_squared`` is None when the data have no spread."""

    n_points: int
    r_squared: float | None
    residuals_bytes: tuple[float, ...]
    relative_residuals: tuple[float, ...]
    tokens_per_rank_range: tuple[float, float]

    @property
    def worst_relative_residual(self) -> float:
        """The largest |residual / observed| of the fitted points (0 without points)."""
        return max((abs(r) for r in self.relative_residuals), default=0.0)

    @property
    def relative_uncertainty(self) -> float:
        """max(largest |relative residual|, 2σ of relative residuals); 0 with a perfect fit."""
        if not self.relative_residuals:
            return 0.0
        worst = max(abs(r) for r in self.relative_residuals)
        spread = 2 * statistics.pstdev(self.relative_residuals) if len(self.relative_residuals) > 1 else 0.0
        return max(worst, spread)


#: A fit whose own points sit further than this from it contradicts its model: answers warn.
CONTRADICTED_FIT_RESIDUAL = 0.10


def fit_warnings(stats: FitStats | None, form: str) -> tuple[str, ...]:
    """A warning when the fit's worst residual exceeds ``CONTRADICTED_FIT_RESIDUAL``: its own points
    contradict the linear model (the seed's GTX 1080 readings sit 11–24% off its 0.0089 MB/token +
    150 MB line), so an answer from it can be far off."""
    if stats is None or stats.worst_relative_residual <= CONTRADICTED_FIT_RESIDUAL:
        return ()
    return (f"the {form}-form fit's own points sit up to {stats.worst_relative_residual:.0%} off its line "
            f"(more than {CONTRADICTED_FIT_RESIDUAL:.0%}): the profile contradicts the model; treat this answer "
            "with care",)


def fit_stats(observed: Sequence[float], predicted: Sequence[float], tokens: Sequence[float]) -> FitStats:
    """R² = 1 − SS_res / SS_tot on bytes; residual = observed − predicted."""
    residuals = [o - p for o, p in zip(observed, predicted)]
    mean = sum(observed) / len(observed)
    ss_tot = sum((o - mean) ** 2 for o in observed)
    ss_res = sum(r * r for r in residuals)
    r_squared = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    return FitStats(n_points=len(observed), r_squared=r_squared, residuals_bytes=tuple(residuals),
                    relative_residuals=tuple(r / o for r, o in zip(residuals, observed)),
                    tokens_per_rank_range=(min(tokens), max(tokens)))


def runtime_overhead_measured(rows: Sequence[Measurement]) -> float | None:
    """Median of NVML device used − torch reserved over rows that have both: the memory a process
    holds outside the caching allocator (CUDA context, NCCL buffers). None without such rows."""
    gaps = [r.device_used_bytes - r.peak_reserved_bytes for r in rows
            if r.device_used_bytes is not None and r.peak_reserved_bytes is not None and not r.oom]
    return max(0.0, statistics.median(gaps)) if gaps else None


def reserve_slack_measured(rows: Sequence[Measurement]) -> float | None:
    """Median of (reserved − allocated) / allocated: the caching allocator's slack. None without data."""
    ratios = [(r.peak_reserved_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes for r in rows
              if r.peak_reserved_bytes is not None and r.peak_allocated_bytes and not r.oom]
    return max(0.0, statistics.median(ratios)) if ratios else None


# ----------------------------------------------------------------------------- seed form


@dataclass(frozen=True, slots=True, kw_only=True)
class SeedFit:
    """The seed's form: ``overhead_bytes + bytes_per_token · n`` for one profile's rows."""

    gpu: str
    target: str
    bytes_per_token: float
    overhead_bytes: float
    stats: FitStats
    shape_key: tuple = ()
    runtime_overhead_bytes: float | None = None
    reserve_slack: float | None = None
    source: str = ""

    @property
    def mb_per_token(self) -> float:
        return self.bytes_per_token / 1e6

    @property
    def overhead_mb(self) -> float:
        return self.overhead_bytes / 1e6

    def predict_bytes(self, n_tokens_per_rank: float) -> float:
        return self.overhead_bytes + self.bytes_per_token * n_tokens_per_rank


def seed_shape_key(row: Measurement) -> tuple:
    """Everything of a row's workload except S and P: the seed form is valid for one such shape."""
    return (row.batch, row.n_heads, row.n_kv_heads, row.head_dim, row.embed_dim, row.dtype, row.layout,
            row.backend, row.segment_lengths_tokens, row.dilation_rates, row.training, row.projections)


def fit_seed_form(rows: Sequence[Measurement], *, target: str | None = None, source: str = "") -> SeedFit:
    """Ordinary least squares of the target figure on tokens per rank (closed form, no scipy).

    slope = Σ(n−n̄)(y−ȳ) / Σ(n−n̄)², intercept = ȳ − slope·n̄ (slope 0 when every n is equal).
    Rows must share one GPU; shapes may differ (the seed form ignores them).
    """
    target, chosen = fit_rows(rows, target)
    gpus = sorted({r.gpu for r in chosen})
    if len(gpus) != 1:
        raise ValueError(f"the seed form fits one GPU at a time, rows cover {gpus}")
    n = [r.tokens_per_rank for r in chosen]
    y = [float(getattr(r, target)) for r in chosen]
    n_mean, y_mean = sum(n) / len(n), sum(y) / len(y)
    sxx = sum((a - n_mean) ** 2 for a in n)
    slope = sum((a - n_mean) * (b - y_mean) for a, b in zip(n, y)) / sxx if sxx > 0 else 0.0
    intercept = y_mean - slope * n_mean
    stats = fit_stats(y, [intercept + slope * a for a in n], n)
    return SeedFit(gpu=gpus[0], target=target, bytes_per_token=slope, overhead_bytes=intercept, stats=stats,
                   shape_key=seed_shape_key(chosen[0]), runtime_overhead_bytes=runtime_overhead_measured(rows),
                   reserve_slack=reserve_slack_measured(rows), source=source)


# ----------------------------------------------------------------------------- analytic form


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryFit:
    """Analytic form: ``constant_bytes + Σ θ_j φ_j``. ``gpu`` None and ``stats`` None: unfitted."""

    coefficients: dict[str, float]
    constant_bytes: float = 0.0
    target: str = "device_used_bytes"
    gpu: str | None = None
    family: str | None = None
    stats: FitStats | None = None
    runtime_overhead_bytes: float | None = None
    reserve_slack: float | None = None
    prior_weight: float = 0.0
    source: str = ""

    @property
    def fitted(self) -> bool:
        return self.stats is not None

    def predict_bytes(self, terms: dict[str, float]) -> float:
        return self.constant_bytes + sum(self.coefficients.get(k, 0.0) * v for k, v in terms.items())


def unfitted_model() -> MemoryFit:
    """θ_j = 1 for every term, no constant: the pure analytic model (predicts allocator bytes)."""
    return MemoryFit(coefficients={name: 1.0 for name in TERM_NAMES}, target="peak_allocated_bytes")


def fit_memory_model(rows: Sequence[Measurement], *, terms: Sequence[str] | None = None, target: str | None = None,
                     prior_weight: float = 1e-3, kinds: Sequence[str] = FIT_KINDS, source: str = "") -> MemoryFit:
    """Fit θ ≥ 0 and c ≥ 0 on rows of one GPU (``scipy.optimize.lsq_linear``, imported here).

    Minimises Σ_i ((c + Σ_j θ_j φ_ij − y_i) / y_i)² + λ Σ_j (θ_j − 1)² with λ = ``prior_weight``.
    Relative residuals weigh small and large runs alike; the prior only decides directions the data
    leave free (e.g. two terms that are always proportional split their weight evenly).
    ``terms`` restricts the model to those names (others get θ = 0).
    """
    if not (math.isfinite(prior_weight) and prior_weight >= 0):
        raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight!r}")
    names = tuple(terms) if terms is not None else TERM_NAMES
    unknown = [name for name in names if name not in TERM_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown memory terms {unknown}; known: {list(TERM_NAMES)}")
    target, chosen = fit_rows(rows, target, kinds)
    gpus = sorted({r.gpu for r in chosen})
    if len(gpus) != 1:
        raise ValueError(f"a memory fit covers one GPU at a time, rows cover {gpus}")
    phi = [terms_at(row_inputs(r)) for r in chosen]
    y = [float(getattr(r, target)) for r in chosen]
    if min(y) <= 0:
        raise ValueError(f"cannot fit relative residuals: a row has {target} = {min(y)}")
    constant, theta = _solve_bounded(phi, y, names, prior_weight)
    coefficients = {name: theta.get(name, 0.0) for name in TERM_NAMES}
    fit = MemoryFit(coefficients=coefficients, constant_bytes=constant, target=target, gpu=gpus[0],
                    family=row_family(chosen[0]), runtime_overhead_bytes=runtime_overhead_measured(rows),
                    reserve_slack=reserve_slack_measured(rows), prior_weight=prior_weight, source=source)
    predicted = [fit.predict_bytes(p) for p in phi]
    return _with_stats(fit, fit_stats(y, predicted, [r.tokens_per_rank for r in chosen]))


def _with_stats(fit: MemoryFit, stats: FitStats) -> MemoryFit:
    return replace(fit, stats=stats)


def _solve_bounded(phi: list[dict[str, float]], y: list[float], names: Sequence[str],
                   prior_weight: float) -> tuple[float, dict[str, float]]:
    """Bounded linear least squares in scaled units: unknowns [c / median(y), θ_1 … θ_m] ≥ 0."""
    import numpy as np
    from scipy.optimize import lsq_linear

    scale = float(np.median(y))
    rows = [[scale / yi] + [p[name] / yi for name in names] for p, yi in zip(phi, y)]
    rhs = [1.0] * len(y)
    root = math.sqrt(prior_weight)
    for j in range(len(names)):
        rows.append([0.0] + [root if k == j else 0.0 for k in range(len(names))])
        rhs.append(root)
    result = lsq_linear(np.array(rows), np.array(rhs), bounds=(0.0, np.inf), method="bvls")
    return float(result.x[0]) * scale, {name: float(v) for name, v in zip(names, result.x[1:])}
