"""Per-GPU memory: fits on measured profiles and predictions with provenance and uncertainty.

Two model forms:

* **seed form** (the seed report's): ``bytes = overhead + bytes_per_token · n`` per profile, least
  squares; reported as ``mb_per_token``, ``overhead_mb``, R² and residuals. It ignores the workload
  shape, so it transfers to another shape only as a guess.
* **analytic form** (DESIGN.md): ``bytes = c + Σ_j θ_j · φ_j(workload, layout)`` with the named byte
  terms φ_j of ``ringplan.memory_terms``; θ_j ≥ 0 and c ≥ 0 fitted by bounded least squares on
  relative residuals with a weak prior pulling each θ_j to 1 (so terms the data cannot separate keep
  their analytic value). With no data θ = 1, c = 0: the pure analytic model.

What is predicted is ``device_used_bytes``, what must fit in the GPU's usable memory: the fitted
figure plus, when the fit is of an allocator figure, the non-allocator runtime overhead (measured
NVML used − torch reserved of the same GPU, else the catalog default).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringplan.hardware import GpuSpec
from ringplan.memory_terms import TERM_NAMES, TermInputs, terms_at, term_inputs
from ringplan.profiles import Measurement, load_profiles, measured_dir
from ringplan.workload import DTYPE_BYTES, RingLayout, Workload, tokens_per_rank

#: Figures a fit can target, best first (the first one present in the rows is used by default).
TARGETS: tuple[str, ...] = ("device_used_bytes", "peak_reserved_bytes", "peak_allocated_bytes", "tracked_peak_bytes")
#: Row kinds a default fit uses ("estimated" rows are someone's formula, not data).
FIT_KINDS: tuple[str, ...] = ("measured", "reported")
#: Relative uncertainty given to predictions not backed by a same-GPU fit inside its range.
#: A policy, not a measurement: PyTorch's MemTracker test tolerates ±10% (ANCHORS.md).
PRIOR_RELATIVE_UNCERTAINTY = 0.10
PROVENANCE_KINDS: tuple[str, ...] = ("measured", "transferred", "extrapolated", "analytic")


# ----------------------------------------------------------------------------- shape families


def shape_family(*, dilated: bool, training: bool, projections: bool, backend: str, ring: bool = False) -> str:
    """Which fitted θ and constant may be reused: same pattern kind, mode, projections, workspace
    kind, and one GPU vs a ring (``ring``: P > 1). Heads, dims, dtype and lengths are not part of it:
    φ already scales with them. The ring is: on 2×H200 the memory outside the allocator (context,
    NCCL communicator and P2P buffers) was 1.90 GB at P = 1 and 2.67 GB at P = 2, so one constant
    for both mis-predicted device memory by up to 15% (benchmarks/accuracy_report.py)."""
    workspace = "math" if backend == "math" else "tiled"
    return "/".join(("dilated" if dilated else "dense", "training" if training else "forward",
                     "projections" if projections else "no-projections", workspace, "ring" if ring else "single"))


def workload_family(workload: Workload, layout: RingLayout) -> str:
    return shape_family(dilated=workload.pattern.dilated, training=workload.training,
                        projections=workload.projections, backend=layout.backend, ring=layout.ring_size > 1)


def row_family(row: Measurement) -> str:
    return shape_family(dilated=bool(row.segment_lengths_tokens), training=row.training,
                        projections=row.projections, backend=row.backend, ring=row.ring_size > 1)


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
    def relative_uncertainty(self) -> float:
        """max(largest |relative residual|, 2σ of relative residuals); 0 with a perfect fit."""
        if not self.relative_residuals:
            return 0.0
        worst = max(abs(r) for r in self.relative_residuals)
        spread = 2 * statistics.pstdev(self.relative_residuals) if len(self.relative_residuals) > 1 else 0.0
        return max(worst, spread)


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
    from dataclasses import replace

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


# ----------------------------------------------------------------------------- prediction


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPrediction:
    """Predicted per-rank device memory, split into named parts that sum to ``total_bytes``.

    ``terms_bytes``: θ_j·φ_j per analytic term (seed form: ``per_token_bytes``), then
    ``fit_constant_bytes``, ``allocator_slack_bytes`` and ``runtime_overhead_bytes``.
    ``total_bytes`` is device-used (what must fit in usable memory); the allocator figures are
    given where the fit determines them.
    """

    terms_bytes: dict[str, float]
    total_bytes: float
    tokens_per_rank: int
    fitted_figure: str
    peak_allocated_bytes: float | None
    peak_reserved_bytes: float | None
    relative_uncertainty: float
    provenance: str
    provenance_kind: str
    model_form: str = "analytic"

    @property
    def uncertainty_bytes(self) -> float:
        return self.relative_uncertainty * self.total_bytes


def predict_memory(fit: MemoryFit | SeedFit, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> MemoryPrediction:
    """Per-rank device memory of ``workload`` on ``layout`` with ``gpu``, from ``fit``."""
    n = tokens_per_rank(workload, layout)
    if isinstance(fit, SeedFit):
        parts = {"per_token_bytes": fit.bytes_per_token * n, "fit_constant_bytes": fit.overhead_bytes}
        form, stats, same_gpu = "seed", fit.stats, fit.gpu == gpu.name
    else:
        phi = memory_terms_cached(workload, layout)
        parts = {name: fit.coefficients.get(name, 0.0) * value for name, value in phi.items()}
        parts["fit_constant_bytes"] = fit.constant_bytes
        form, stats, same_gpu = "analytic", fit.stats, fit.gpu == gpu.name
    fitted_bytes = sum(parts.values())
    kind, label = _provenance(fit, gpu, n, stats)
    if isinstance(fit, SeedFit) and fit.shape_key != _workload_seed_key(workload, layout) and kind == "measured":
        kind, label = "transferred", f"transferred from {fit.gpu} (seed form, fitted on another workload shape)"
    uncertainty = stats.relative_uncertainty if stats is not None else PRIOR_RELATIVE_UNCERTAINTY
    if kind != "measured":
        uncertainty = max(uncertainty, PRIOR_RELATIVE_UNCERTAINTY)
    allocated, reserved, slack, overhead = _device_used_parts(fit, fitted_bytes, gpu, same_gpu)
    parts["allocator_slack_bytes"] = slack
    parts["runtime_overhead_bytes"] = overhead
    return MemoryPrediction(terms_bytes=parts, total_bytes=sum(parts.values()), tokens_per_rank=n,
                            fitted_figure=fit.target, peak_allocated_bytes=allocated, peak_reserved_bytes=reserved,
                            relative_uncertainty=uncertainty, provenance=label, provenance_kind=kind, model_form=form)


def _device_used_parts(fit: MemoryFit | SeedFit, fitted_bytes: float, gpu: GpuSpec,
                       same_gpu: bool) -> tuple[float | None, float | None, float, float]:
    """(allocated, reserved, allocator slack, non-allocator overhead) for the fitted figure.

    device used = reserved + overhead; reserved = allocated · (1 + slack). Overhead and slack are
    the fit's measured values on the same GPU, else the catalog default overhead and zero slack.
    """
    if fit.target == "device_used_bytes":
        return None, None, 0.0, 0.0
    overhead = fit.runtime_overhead_bytes if same_gpu and fit.runtime_overhead_bytes is not None \
        else float(gpu.runtime_overhead_bytes)
    if fit.target == "peak_reserved_bytes":
        return None, fitted_bytes, 0.0, overhead
    slack_fraction = fit.reserve_slack if same_gpu and fit.reserve_slack is not None else None
    slack = fitted_bytes * slack_fraction if slack_fraction is not None else 0.0
    reserved = fitted_bytes + slack if slack_fraction is not None else None
    allocated = fitted_bytes if fit.target == "peak_allocated_bytes" else None
    return allocated, reserved, slack, overhead


def _provenance(fit: MemoryFit | SeedFit, gpu: GpuSpec, n: float, stats: FitStats | None) -> tuple[str, str]:
    """("measured" | "transferred" | "extrapolated" | "analytic", label)."""
    if stats is None or fit.gpu is None:
        return "analytic", "analytic (unfitted)"
    lo, hi = stats.tokens_per_rank_range
    suffix = " (seed form)" if isinstance(fit, SeedFit) else ""
    if not lo * (1 - 1e-9) <= n <= hi * (1 + 1e-9):
        origin = "" if fit.gpu == gpu.name else f", transferred from {fit.gpu}"
        return "extrapolated", (f"extrapolated from {fit.gpu}{origin} (n={n:,} tokens/rank outside measured "
                                f"{lo:,.0f}-{hi:,.0f}){suffix}")
    if fit.gpu == gpu.name:
        return "measured", f"measured on {fit.gpu}{suffix}"
    return "transferred", f"transferred from {fit.gpu}{suffix}"


@functools.lru_cache(maxsize=4096)
def memory_terms_cached(workload: Workload, layout: RingLayout) -> dict[str, float]:
    """``memory_terms`` memoised on the (frozen, hashable) workload and layout."""
    from ringplan.memory_terms import memory_terms

    return memory_terms(workload, layout)


# ----------------------------------------------------------------------------- the default model


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryModel:
    """Fits chosen per query from a set of profile rows, computed lazily and cached.

    Analytic form: the fit of the same GPU and shape family when there is one ("measured"), else
    the same family on the GPU with the most points ("transferred"), else θ = 1 ("analytic").
    Seed form: the same GPU and exact shape, else the same GPU's largest shape, else another GPU.
    """

    rows: tuple[tuple[Measurement, str], ...] = ()
    form: str = "analytic"
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.form not in ("analytic", "seed"):
            raise ValueError(f"model form {self.form!r} is not one of ['analytic', 'seed']")

    def predict(self, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> MemoryPrediction:
        return predict_memory(self.fit_for(workload, layout, gpu), workload, layout, gpu)

    def fit_for(self, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> MemoryFit | SeedFit:
        if self.form == "seed":
            return self._seed_fit(workload, layout, gpu)
        family = workload_family(workload, layout)
        key = ("analytic", gpu.name, family)
        if key not in self._cache:
            self._cache[key] = self._choose_analytic(gpu.name, family)
        return self._cache[key]

    def _groups(self, key_of) -> dict:
        groups: dict = {}
        for row, source in self.rows:
            groups.setdefault(key_of(row), []).append((row, source))
        return groups

    def _choose_analytic(self, gpu_name: str, family: str) -> MemoryFit:
        groups = {k: v for k, v in self._groups(lambda r: (r.gpu, row_family(r))).items() if k[1] == family}
        ordered = sorted(groups, key=lambda k: (k[0] != gpu_name, -_fit_size(groups[k]), k[0]))
        for key in ordered:
            try:
                return _fit_group(groups[key], fit_memory_model)
            except ValueError:
                continue
        return unfitted_model()

    def _seed_fit(self, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> SeedFit:
        shape = _workload_seed_key(workload, layout)
        key = ("seed", gpu.name, shape)
        if key in self._cache:
            return self._cache[key]
        groups = self._groups(lambda r: (r.gpu, seed_shape_key(r)))
        ordered = sorted(groups, key=lambda k: (k[0] != gpu.name, k[1] != shape, -_fit_size(groups[k]), k[0]))
        for group_key in ordered:
            try:
                self._cache[key] = _fit_group(groups[group_key], fit_seed_form)
                return self._cache[key]
            except ValueError:
                continue
        raise ValueError(f"the seed model form needs a profile with memory figures in {measured_dir()}")


def _fit_size(group: list[tuple[Measurement, str]]) -> int:
    return sum(1 for row, _ in group if not row.oom and row.kind in FIT_KINDS)


def _fit_group(group: list[tuple[Measurement, str]], fitter):
    sources = ", ".join(sorted({Path(source).name for _, source in group}))
    return fitter([row for row, _ in group], source=sources)


def _workload_seed_key(workload: Workload, layout: RingLayout) -> tuple:
    s, p = workload.shape, workload.pattern
    return (s.batch, s.n_heads, s.n_kv_heads, s.head_dim, s.embed_dim, s.dtype, layout.layout, layout.backend,
            p.segment_lengths_tokens, p.dilation_rates, workload.training, workload.projections)


@functools.lru_cache(maxsize=2)
def default_memory_model(form: str = "analytic") -> MemoryModel:
    """The model over every profile in ``profiles/measured`` (files read once per process)."""
    rows = tuple((row, profile.path or "") for profile in load_profiles() for row in profile.rows)
    return MemoryModel(rows=rows, form=form)
