"""Per-GPU memory predictions with provenance and uncertainty, and the planner's default model.

Model forms (``MemoryModel.form``):

* ``analytic`` (default): the calibrated form of ``ringplan.memory.calibration`` — the analytic
  byte terms with θ = 1, plus the kernel workspace, the allocator slack and the memory outside the
  allocator fitted per GPU. Predicts peak allocated, peak reserved and device used.
* ``seed``: the seed report's MB-per-token + overhead (``memory_fits.fit_seed_form``).

Free-θ fits (``fit_memory_model``, a diagnostic of the terms) predict through ``predict_memory``.
What must fit in the GPU's usable memory is ``total_bytes``: the device memory used.

The default model reads its calibrations from ``profiles/fitted/memory-fit.json`` (json and a few
multiplications: no numpy or scipy at a cold start) when the file's profile hashes match the
measured profiles, and fits them from ``profiles/measured`` otherwise (``ringplan.memory.fit_cache``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from ringplan.hardware import GpuSpec
from ringplan.memory.calibration import fit_calibrations, overhead_features, slack_features, workspace_features
from ringplan.memory.family_borrow import borrowed_bound_bytes, nearest_family
from ringplan.memory.fit_cache import FitCache, usable_calibrations
from ringplan.memory.part_fit import Calibration, PartFit, with_borrowed
from ringplan.memory.attention_fits import (FIT_KINDS, FitStats, MemoryFit, SeedFit, fit_rows, fit_seed_form,
                                            fit_warnings, kernel_family, row_family, row_inputs, seed_shape_key,
                                            slack_family, workload_family)
from ringplan.memory.attention_terms import TermInputs, term_inputs, terms_at
from ringplan.paths import measured_dir
from ringplan.profiles.attention import Measurement, load_profiles
from ringplan.workload import RingLayout, Workload, tokens_per_rank

#: Relative uncertainty given to what is not backed by a same-GPU fit inside its range (on the
#: fitted parts of a calibrated prediction, on the whole of a seed/free-θ one). A policy, not a
#: measurement: PyTorch's MemTracker test tolerates ±10% (ANCHORS.md).
PRIOR_RELATIVE_UNCERTAINTY = 0.10
PROVENANCE_KINDS: tuple[str, ...] = ("measured", "transferred", "extrapolated", "analytic")
MODEL_FORMS: tuple[str, ...] = ("analytic", "seed")


# ----------------------------------------------------------------------------- prediction


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPrediction:
    """Predicted per-rank device memory, split into named parts that sum to ``total_bytes``.

    ``terms_bytes``: calibrated form: φ_j per analytic term, ``workspace_bytes``,
    ``allocator_slack_bytes``, ``runtime_overhead_bytes``; free-θ form: θ_j·φ_j and
    ``fit_constant_bytes``; seed form: ``per_token_bytes`` and ``fit_constant_bytes``.
    ``total_bytes`` is device-used (what must fit in usable memory); the allocator figures are
    given where the model determines them.
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
    residual_bound_bytes: float = 0.0
    #: Whole-model predictions: device used at rest (allocated + the slack the caching allocator
    #: keeps while memory is free + outside), above ``total_bytes`` (the need); None elsewhere.
    device_used_at_rest_bytes: float | None = None
    #: What a reader must know about this prediction (e.g. a fit its own points contradict).
    warnings: tuple[str, ...] = ()

    @property
    def uncertainty_bytes(self) -> float:
        return self.relative_uncertainty * self.total_bytes

    @property
    def upper_bytes(self) -> float:
        """``total_bytes`` + the fits' worst residuals: what a plan must fit (``ringplan.capacity.attention``)."""
        return self.total_bytes + self.residual_bound_bytes


def predict_memory(fit: MemoryFit | SeedFit, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> MemoryPrediction:
    """Per-rank device memory of ``workload`` on ``layout`` with ``gpu`` from a seed-form or free-θ fit."""
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
                            relative_uncertainty=uncertainty, provenance=label, provenance_kind=kind, model_form=form,
                            warnings=fit_warnings(stats, "seed" if form == "seed" else "free-θ"))


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
    """``memory_terms`` (every context-parallel scheme: ``cp_terms``) memoised on the (frozen, hashable)
    workload and layout."""
    from ringplan.memory.cp_terms import memory_terms

    return memory_terms(workload, layout)


# ----------------------------------------------------------------------------- calibrated prediction


@dataclass(frozen=True, slots=True, kw_only=True)
class ChosenParts:
    """The fitted parts a calibrated prediction uses (None: no fit anywhere for that part)."""

    workspace: PartFit | None = None
    slack: PartFit | None = None
    overhead: PartFit | None = None
    #: ± bytes added to the bound for parts borrowed from another row family (``family_borrow``), and which.
    extra_bound_bytes: float = 0.0
    borrowed_families: tuple[str, ...] = ()


def predict_calibrated(chosen: ChosenParts, workload: Workload, layout: RingLayout, gpu: GpuSpec, *,
                       plan: bool = True) -> MemoryPrediction:
    """Per-rank memory of ``workload`` on ``layout`` with ``gpu`` from calibrated parts (see
    ``calibrated_prediction``)."""
    return calibrated_prediction(chosen, term_inputs(workload, layout), memory_terms_cached(workload, layout), gpu,
                                 tokens_per_rank(workload, layout), plan=plan)


def calibrated_prediction(chosen: ChosenParts, p: TermInputs, phi: dict[str, float], gpu: GpuSpec,
                          n_tokens: int, *, plan: bool = True) -> MemoryPrediction:
    """Σφ (θ = 1) + workspace = allocated; + slack = reserved; + memory outside the allocator =
    device used (the catalog's ``runtime_overhead_bytes`` when nothing was measured). A ``plan``
    counts NCCL's P2P buffers on every ring; a recorded run (``plan=False``) only where it exchanged.

    Residual bound (bytes): each part's worst fit residual, grown beyond the measured range; plans
    must fit ``total + bound``. Uncertainty: the bound plus ``PRIOR_RELATIVE_UNCERTAINTY`` × the
    fitted parts when they are not measured on this GPU inside their range, or × the catalog
    overhead when that is used."""
    analytic = sum(phi.values())
    features = {"workspace": workspace_features(p, gpu.name),
                "overhead": overhead_features(p, assume_ring_traffic=plan)}
    allocated = analytic + (chosen.workspace.bytes(features["workspace"]) if chosen.workspace else 0.0)
    features["slack"] = slack_features(phi, allocated)
    slack = chosen.slack.bytes(features["slack"]) if chosen.slack else 0.0
    overhead = chosen.overhead.bytes(features["overhead"]) if chosen.overhead else float(gpu.runtime_overhead_bytes)
    reserved = allocated + slack
    parts = {**phi, "workspace_bytes": allocated - analytic, "allocator_slack_bytes": slack,
             "runtime_overhead_bytes": overhead}
    total = reserved + overhead
    borrowed = set().union(*(fit.borrowed_in_use(features[name]) for name, fit in
                             (("workspace", chosen.workspace), ("slack", chosen.slack), ("overhead", chosen.overhead))
                             if fit))
    kind, label = calibrated_provenance(chosen, gpu, p.tokens_per_rank, p.ring_size, borrowed)
    # One layer's figures grow in proportion to its tokens (Σφ ∝ n): a residual grows with its figure.
    bound = sum(fit.uncertainty_bytes(figure) for fit, figure in
                ((chosen.workspace, allocated), (chosen.slack, reserved), (chosen.overhead, total)) if fit)
    bound += chosen.extra_bound_bytes
    if chosen.borrowed_families:
        kind = "transferred" if kind == "measured" else kind
        label += f"; {', '.join(chosen.borrowed_families)} (± {chosen.extra_bound_bytes / 2**20:.0f} MiB)"
    uncertainty = bound
    if kind != "measured":
        fitted = allocated - analytic + slack + (overhead if chosen.overhead else 0.0)
        uncertainty += PRIOR_RELATIVE_UNCERTAINTY * fitted
    if chosen.overhead is None:
        uncertainty += PRIOR_RELATIVE_UNCERTAINTY * overhead
    return MemoryPrediction(terms_bytes=parts, total_bytes=total, tokens_per_rank=n_tokens,
                            fitted_figure="device_used_bytes", peak_allocated_bytes=allocated,
                            peak_reserved_bytes=reserved if chosen.slack else None,
                            relative_uncertainty=uncertainty / total if total > 0 else 0.0, provenance=label,
                            provenance_kind=kind, model_form="analytic", residual_bound_bytes=bound)


def calibrated_provenance(chosen: ChosenParts, gpu: GpuSpec, n: float, ring_size: int,
                          borrowed: set[str] = frozenset()) -> tuple[str, str]:
    """("measured" | "transferred" | "extrapolated" | "analytic", label) of a calibrated prediction:
    measured when every fitted part (and every coefficient used, ``borrowed`` naming the GPUs lent
    some) is this GPU's and covers n and P; parts not fitted anywhere are named ("no slack fit",
    "catalog overhead")."""
    fits = {"workspace": chosen.workspace, "slack": chosen.slack, "overhead": chosen.overhead}
    present = [f for f in fits.values() if f is not None]
    if not present:
        return "analytic", "analytic (unfitted)"
    others = sorted({f.gpu for f in present if f.gpu != gpu.name} | {name for name in borrowed if name != gpu.name})
    own = any(f.gpu == gpu.name for f in present)
    if own:
        kind, label = ("transferred", f"measured on {gpu.name}, partly transferred from {', '.join(others)}") \
            if others else ("measured", f"measured on {gpu.name}")
    else:
        kind, label = "transferred", f"transferred from {', '.join(others)}"
    outside = [f for f in (chosen.workspace, chosen.slack) if f is not None and not f.covers_tokens(n)]
    largest_ring = max((max(f.ring_sizes) for f in (chosen.slack, chosen.overhead) if f is not None), default=ring_size)
    if outside:
        lo, hi = outside[0].tokens_per_rank_range
        where = f"n={n:,} tokens/rank outside measured {lo:,.0f}-{hi:,.0f}"
        kind, label = "extrapolated", f"extrapolated ({where}): {label}"
    elif ring_size > largest_ring:
        kind, label = "extrapolated", f"extrapolated (ring of {ring_size} beyond measured {largest_ring}): {label}"
    missing = [name for name in ("workspace", "slack") if fits[name] is None]
    if missing:
        label += f"; no {'/'.join(missing)} fit"
    if chosen.overhead is None:
        label += "; catalog overhead"
    return kind, label


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryModel:
    """Predictions from profile rows or from ready calibrations, fits chosen per query.

    Analytic (calibrated) form: ``calibrations`` when given (the fit cache), else fitted from
    ``rows`` on first use. Each part comes from the queried GPU when it has a fit of the workload's
    family ("measured"), else from another GPU's ("transferred": see ``_part``), else it is left
    out ("analytic").
    Seed form: the same GPU and exact shape, else the same GPU's largest shape, else another GPU.
    """

    rows: tuple[tuple[Measurement, str], ...] = ()
    form: str = "analytic"
    calibrations: dict[str, Calibration] | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.form not in MODEL_FORMS:
            raise ValueError(f"model form {self.form!r} is not one of {list(MODEL_FORMS)}")

    def predict(self, workload: Workload, layout: RingLayout, gpu: GpuSpec, *, plan: bool = True) -> MemoryPrediction:
        """Per-rank memory of a plan; ``plan=False``: of one run as it will run (NCCL P2P buffers only
        where a branch exchanges — for comparing with a fresh process's measurement)."""
        if self.form == "seed":
            return predict_memory(self._seed_fit(workload, layout, gpu), workload, layout, gpu)
        return predict_calibrated(self.parts_for(workload, layout, gpu), workload, layout, gpu, plan=plan)

    def predict_row(self, row: Measurement, gpu: GpuSpec) -> MemoryPrediction:
        """Calibrated prediction of a recorded run as it ran (its tokens per rank, no divisibility check;
        NCCL P2P buffers only where it exchanged)."""
        family = row_family(row)
        chosen = self._chosen(gpu.name, family)
        return calibrated_prediction(chosen, row_inputs(row), terms_at(row_inputs(row)), gpu,
                                     round(row.tokens_per_rank), plan=False)

    def calibrations_in_use(self) -> dict[str, Calibration]:
        """The given calibrations, or those fitted from ``rows`` (once)."""
        if self.calibrations is not None:
            return self.calibrations
        if "calibrations" not in self._cache:
            sources = ", ".join(sorted({Path(source).name for _, source in self.rows if source}))
            self._cache["calibrations"] = fit_calibrations([row for row, _ in self.rows], source=sources)
        return self._cache["calibrations"]

    def parts_for(self, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> ChosenParts:
        return self._chosen(gpu.name, workload_family(workload, layout))

    def _chosen(self, gpu_name: str, family: str) -> ChosenParts:
        key = ("parts", gpu_name, family)
        if key not in self._cache:
            wanted = {"workspace": kernel_family(family), "slack": slack_family(family)}
            parts = {part: self._part(part, gpu_name, f) for part, f in wanted.items()}
            borrowed = {part: fit.family for part, fit in parts.items() if fit and fit.family != wanted[part]}
            self._cache[key] = ChosenParts(
                **parts, overhead=self._part("overhead", gpu_name, "all"),
                extra_bound_bytes=sum(borrowed_bound_bytes(wanted[p], f) for p, f in borrowed.items()),
                borrowed_families=tuple(f"{p} borrowed from {f}" for p, f in borrowed.items()))
        return self._cache[key]

    def _part(self, part: str, gpu_name: str, family: str) -> PartFit | None:
        """The fit of ``part`` for ``family``: this GPU's, else the other GPU's that reached the most
        tokens per rank (the outside memory: the largest context), then the most points — a fit of
        the current runtime before one of older-runtime rows, wherever it is. Coefficients the
        chosen fit could not identify are borrowed from the others."""
        def fit_of(calibration: Calibration) -> PartFit | None:
            if part == "overhead":
                return calibration.overhead
            return (calibration.workspace if part == "workspace" else calibration.slack).get(family)

        fits = [f for c in self.calibrations_in_use().values() if (f := fit_of(c)) is not None]
        if not fits and part != "overhead":  # nobody measured this family: the nearest measured one's
            donor = nearest_family(family, {f for c in self.calibrations_in_use().values()
                                            for f in (c.workspace if part == "workspace" else c.slack)})
            return self._part(part, gpu_name, donor) if donor is not None else None

        def reach(f: PartFit) -> float:  # the outside memory does not grow with n: the largest is safest
            return f.coefficients.get("context_bytes", 0.0) if part == "overhead" else f.tokens_per_rank_range[1]

        ordered = sorted(fits, key=lambda f: (f.stale_rows > 0, f.gpu != gpu_name, -reach(f), -f.n_points, f.gpu))
        if not ordered:
            return None
        return with_borrowed(ordered[0], [f for f in ordered[1:] if f.gpu != ordered[0].gpu])

    def _seed_fit(self, workload: Workload, layout: RingLayout, gpu: GpuSpec) -> SeedFit:
        shape = _workload_seed_key(workload, layout)
        key = ("seed", gpu.name, shape)
        if key in self._cache:
            return self._cache[key]
        groups: dict = {}
        for row, source in self.rows:
            groups.setdefault((row.gpu, seed_shape_key(row)), []).append((row, source))
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


def measured_rows(directory: str | Path | None = None) -> tuple[tuple[Measurement, str], ...]:
    """(row, source file) of every profile in ``directory`` (default ``profiles/measured``)."""
    return tuple((row, profile.path or "") for profile in load_profiles(directory) for row in profile.rows)


def memory_model_from_profiles(profiles, form: str = "analytic") -> MemoryModel:
    """The model fitted on the rows of the given profiles (``capacity --profile``). ``ValueError``
    naming the files when they hold no row a fit can use — the same rule as ``ringplan fit`` (a file
    of zero rows must not answer as "analytic, unfitted")."""
    rows = tuple((row, p.path or "") for p in profiles for row in p.rows)
    try:
        fit_rows([row for row, _ in rows])
    except ValueError as exc:
        names = ", ".join(p.path or "<profile>" for p in profiles)
        raise ValueError(f"{names}: {exc}") from None
    return MemoryModel(rows=rows, form=form)


def _fit_measured(directory: Path | None) -> tuple[dict[str, Calibration], str]:
    """The calibrations of every measured profile in ``directory`` and the names of their files."""
    rows = measured_rows(directory)
    sources = ", ".join(sorted({Path(source).name for _, source in rows if source}))
    return fit_calibrations([row for row, _ in rows], source=sources), sources


#: ``profiles/fitted/memory-fit.json``: the calibrations of ``profiles/measured``.
MEMORY_FIT = FitCache(schema="ringplan.memory-fit/1", file_name="memory-fit.json",
                      sources=("attention_terms.py", "attention_fits.py", "calibration.py", "part_fit.py"),
                      profiles_dir=measured_dir, fit=_fit_measured)


@functools.lru_cache(maxsize=2)
def default_memory_model(form: str = "analytic") -> MemoryModel:
    """The model of ``profiles/measured``: calibrations from the committed fit when it is usable,
    else fitted from the profiles (files read once per process)."""
    if form == "analytic":
        calibrations = usable_calibrations(MEMORY_FIT)
        if calibrations is not None:
            return MemoryModel(calibrations=calibrations)
    return MemoryModel(rows=measured_rows(), form=form)
