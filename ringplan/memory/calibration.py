"""Calibrated memory model: the analytic byte terms with θ = 1, and only what they cannot know fitted.

The terms φ_j of ``ringplan.memory.attention_terms`` are the bytes of the tensors live at the peak, which is
what the live-tensor tracker measures (CI checks it on CPU for every runtime path; on 2×H200 the
tracked peak was Σφ + 16-32 bytes on every row of the current runtime). They are used as they are.
Three parts the terms cannot know are fitted per GPU (kernels and allocators differ):

* **workspace** ``W = peak allocated − Σφ``: memory the local kernel allocates inside the op (cuDNN's
  fp32 dQ accumulator and softmax statistics in backward, the cuBLAS workspace of the projections)
  and allocator granularity. Linear in a constant, the fp32 rows ``B·n·H·(D+1)·4`` and the same
  again under GQA; per kernel family (``memory_fits.kernel_family``: the ring does not matter).
  2×H200, cuDNN, bf16: forward 3 KiB; training one fp32 row block (two under GQA); the seed's
  dilated module with projections 33 MiB.
* **allocator slack** ``R = peak reserved − peak allocated``: the caching allocator's rounding and
  the blocks it keeps. Linear in a constant, the allocated bytes and the ring state (received K/V,
  fp32 accumulators and merge temporaries, fp32 dQ and travelling dK/dV); per kernel family, one GPU
  and a ring apart in training (``memory_fits.slack_family``). 2×H200: a few MiB up to 0.25% of
  allocated, but training on a ring 1.3 × the ring state.
* **memory outside the allocator** ``O = device used − peak reserved`` (CUDA context, cuBLAS/cuDNN
  handles, NCCL communicator and P2P buffers): a context constant, plus indicator terms for the
  projections (GEMM libraries), a ring (NCCL communicator) and ring traffic (P2P buffers, made on the
  first send/recv). 2×H200: 1.90 GB + 0.06 + 0.30 + 0.46 GB. Assumes one peer pair per rank whatever
  P (a rank sends to one neighbour and receives from the other).

Each part is a non-negative least-squares fit (``scipy.optimize.lsq_linear``, imported only to fit).

Rows of an older runtime (tracked peak above Σφ by more than ``STALE_TOLERANCE``: the runtime then
held tensors it no longer does) do not enter W when the kernel family has current rows; when it has
none they do, as measured (conservative: their extra tensors count as workspace). Their slack and
outside-allocator memory are used as measured.

Plans assume NCCL's P2P buffers on every ring (``assume_ring_traffic``): once any exchange has run
in the process (another layer, a warm-up, the emulator's calibration step) NCCL keeps them, and a
plan must not depend on a dilated layer never exchanging. A recorded run is predicted as it ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ringplan.memory.attention_fits import kernel_family, row_family, row_inputs, slack_family
from ringplan.memory.attention_terms import TermInputs, branches, terms_at
from ringplan.profiles.attention import Measurement

FP32_BYTES = 4
#: Row kinds the calibration uses: this runtime's own measurements (a report's figures are of
#: another implementation; estimates are formulas).
CALIBRATION_KINDS: tuple[str, ...] = ("measured",)
#: Tracked peak above Σφ by more than this fraction: the row was measured with an older runtime.
STALE_TOLERANCE = 0.005
WORKSPACE_FEATURES: tuple[str, ...] = ("constant_bytes", "fp32_rows", "gqa_fp32_rows")
SLACK_FEATURES: tuple[str, ...] = ("constant_bytes", "allocated", "ring_state")
OVERHEAD_FEATURES: tuple[str, ...] = ("context_bytes", "projections_bytes", "communicator_bytes", "p2p_buffers_bytes")
#: Terms held by the ring machinery (zero on one GPU).
RING_STATE_TERMS: tuple[str, ...] = ("kv_recv_bytes", "accumulator_bytes", "merge_temporaries_bytes",
                                     "dq_accumulator_bytes", "dkv_accumulator_bytes")


# ----------------------------------------------------------------------------- features


def fp32_rows_bytes(p: TermInputs) -> float:
    """One fp32 row block of the local queries: B·n·H·(D+1)·4 bytes (a dQ-sized fp32 buffer plus
    one fp32 statistic per row), the size of a tiled backward's internal workspace."""
    return p.batch * p.tokens_per_rank * p.n_heads * (p.head_dim + 1) * FP32_BYTES


def gqa_fp32_rows_bytes(p: TermInputs) -> float:
    """``fp32_rows_bytes`` again under GQA (H_kv < H), else 0: on H200 cuDNN's GQA backward held
    twice the MHA workspace."""
    return fp32_rows_bytes(p) if p.n_kv_heads < p.n_heads else 0.0


def ring_state_bytes(terms: dict[str, float]) -> float:
    """Bytes of the terms the ring machinery holds (received K/V, accumulators, merge temporaries,
    travelling gradients): what the allocator caches between ring steps."""
    return sum(terms.get(name, 0.0) for name in RING_STATE_TERMS)


def ring_traffic(p: TermInputs) -> bool:
    """True when some attention branch exchanges K/V between ranks (a dilated branch whose segment
    fits one rank's chunk does not, so no NCCL P2P buffers are made)."""
    return any(b.group > 1 for b in branches(p))


def workspace_features(p: TermInputs) -> dict[str, float]:
    return {"constant_bytes": 1.0, "fp32_rows": fp32_rows_bytes(p), "gqa_fp32_rows": gqa_fp32_rows_bytes(p)}


def slack_features(terms: dict[str, float], allocated_bytes: float) -> dict[str, float]:
    return {"constant_bytes": 1.0, "allocated": allocated_bytes, "ring_state": ring_state_bytes(terms)}


def overhead_features(p: TermInputs, *, assume_ring_traffic: bool = False) -> dict[str, float]:
    """Indicators of the outside-allocator parts; ``assume_ring_traffic``: P2P buffers on any ring."""
    traffic = ring_traffic(p) or (assume_ring_traffic and p.ring_size > 1)
    return {"context_bytes": 1.0, "projections_bytes": float(p.projections),
            "communicator_bytes": float(p.ring_size > 1), "p2p_buffers_bytes": float(traffic)}


# ----------------------------------------------------------------------------- one fitted part


@dataclass(frozen=True, slots=True, kw_only=True)
class PartFit:
    """One fitted part on one GPU: ``bytes = Σ_k coefficients[k] · features[k]``.

    ``residuals_bytes`` are observed − fitted part per row; ``figures_bytes`` the figure the part
    belongs to on that row (allocated for the workspace, reserved for the slack, device used for the
    memory outside the allocator). ``identified``: features non-zero on some fitted row (the others'
    coefficients are 0 for want of data); ``borrowed``: feature → GPU whose coefficient was taken
    for an unidentified feature (``with_borrowed``).
    """

    part: str
    gpu: str
    family: str
    coefficients: dict[str, float]
    residuals_bytes: tuple[float, ...]
    figures_bytes: tuple[float, ...]
    tokens_per_rank_range: tuple[float, float]
    ring_sizes: tuple[int, ...]
    stale_rows: int = 0
    source: str = ""
    identified: tuple[str, ...] = ()
    borrowed: dict[str, str] = field(default_factory=dict)

    @property
    def n_points(self) -> int:
        return len(self.residuals_bytes)

    @property
    def max_abs_residual_bytes(self) -> float:
        return max((abs(r) for r in self.residuals_bytes), default=0.0)

    @property
    def relative_residuals(self) -> tuple[float, ...]:
        """Residual / figure per row: the error this part adds to its figure."""
        return tuple(r / f for r, f in zip(self.residuals_bytes, self.figures_bytes))

    def bytes(self, features: dict[str, float]) -> float:
        return sum(c * features[name] for name, c in self.coefficients.items())

    def uncertainty_bytes(self, figure_bytes: float) -> float:
        """The worst residual seen, grown in proportion beyond the largest figure measured."""
        largest = max(self.figures_bytes, default=0.0)
        growth = figure_bytes / largest if largest > 0 else 1.0
        return self.max_abs_residual_bytes * max(1.0, growth)

    def borrowed_in_use(self, features: dict[str, float]) -> set[str]:
        """GPUs whose borrowed coefficients contribute to ``features``."""
        return {gpu for name, gpu in self.borrowed.items() if features.get(name)}

    def covers_tokens(self, tokens_per_rank: float) -> bool:
        """Inside the measured tokens-per-rank range."""
        lo, hi = self.tokens_per_rank_range
        return lo * (1 - 1e-9) <= tokens_per_rank <= hi * (1 + 1e-9)


# ----------------------------------------------------------------------------- fitting


def nonnegative_least_squares(design: Sequence[Sequence[float]], target: Sequence[float],
                              weights: Sequence[float]) -> list[float]:
    """x ≥ 0 minimising Σ_i (w_i·(design_i · x − target_i))² (``scipy.optimize.lsq_linear``, bvls).
    Columns are scaled to unit norm first; an all-zero column gets 0."""
    import numpy as np
    from scipy.optimize import lsq_linear

    a = np.asarray(design, dtype=float) * np.asarray(weights, dtype=float)[:, None]
    b = np.asarray(target, dtype=float) * np.asarray(weights, dtype=float)
    norms = np.linalg.norm(a, axis=0)
    used = norms > 0
    x = np.zeros(a.shape[1])
    if used.any():
        scaled = a[:, used] / norms[used]
        solution = lsq_linear(scaled, b, bounds=(0.0, np.inf), method="bvls").x
        x[used] = solution / norms[used]
    return [float(v) for v in x]


def _fit_part(part: str, gpu: str, family: str, rows: Sequence[Measurement], names: Sequence[str],
              point: Callable[[Measurement], tuple[dict[str, float], float, float]], *, relative: bool,
              stale_rows: int = 0, source: str = "") -> PartFit:
    """Fit one part: ``point(row)`` gives (features, observed part bytes, figure bytes)."""
    points = [point(r) for r in rows]
    design = [[features[name] for name in names] for features, _, _ in points]
    observed = [value for _, value, _ in points]
    figures = [figure for _, _, figure in points]
    weights = [1.0 / figure for figure in figures] if relative else [1.0] * len(points)
    coefficients = dict(zip(names, nonnegative_least_squares(design, observed, weights)))
    fitted = [sum(coefficients[name] * features[name] for name in names) for features, _, _ in points]
    identified = tuple(name for name in names if any(features[name] for features, _, _ in points))
    return PartFit(part=part, gpu=gpu, family=family, coefficients=coefficients,
                   residuals_bytes=tuple(o - f for o, f in zip(observed, fitted)), figures_bytes=tuple(figures),
                   tokens_per_rank_range=(min(r.tokens_per_rank for r in rows), max(r.tokens_per_rank for r in rows)),
                   ring_sizes=tuple(sorted({r.ring_size for r in rows})), stale_rows=stale_rows, source=source,
                   identified=identified)


def with_borrowed(own: PartFit, donors: Sequence[PartFit]) -> PartFit:
    """``own`` with each unidentified coefficient taken from the first donor that identifies it
    (e.g. the NCCL parts of a GPU measured at P = 1 only, from a GPU measured on a ring); the
    donors' ring sizes count as covered."""
    coefficients, borrowed, rings = dict(own.coefficients), dict(own.borrowed), set(own.ring_sizes)
    for name in own.coefficients:
        donor = next((d for d in donors if name not in own.identified and name in d.identified), None)
        if donor is not None:
            coefficients[name], borrowed[name] = donor.coefficients[name], donor.gpu
            rings |= set(donor.ring_sizes)
    if not borrowed:
        return own
    return replace(own, coefficients=coefficients, borrowed=borrowed, ring_sizes=tuple(sorted(rings)))


def is_stale(row: Measurement, analytic_bytes: float) -> bool:
    """The row's tracked peak exceeds Σφ by more than ``STALE_TOLERANCE``: an older runtime."""
    return row.tracked_peak_bytes is not None and row.tracked_peak_bytes > analytic_bytes * (1 + STALE_TOLERANCE)


def fit_workspace(rows: Sequence[Measurement], *, source: str = "") -> PartFit:
    """W = allocated − Σφ on rows of one GPU and kernel family (relative weights: allocated).
    Rows of the current runtime only, when the family has any (else all, marked ``stale_rows``)."""
    analytic = {id(r): sum(terms_at(row_inputs(r)).values()) for r in rows}
    current = [r for r in rows if not is_stale(r, analytic[id(r)])]
    used = current or list(rows)

    def point(row: Measurement) -> tuple[dict[str, float], float, float]:
        allocated = row.peak_allocated_bytes
        return workspace_features(row_inputs(row)), allocated - analytic[id(row)], allocated

    first = used[0]
    return _fit_part("workspace", first.gpu, kernel_family(row_family(first)), used, WORKSPACE_FEATURES, point,
                     relative=True, stale_rows=0 if current else len(used), source=source)


def fit_slack(rows: Sequence[Measurement], *, source: str = "") -> PartFit:
    """R = reserved − allocated on rows of one GPU and family (relative weights: reserved)."""
    def point(row: Measurement) -> tuple[dict[str, float], float, float]:
        features = slack_features(terms_at(row_inputs(row)), row.peak_allocated_bytes)
        return features, row.peak_reserved_bytes - row.peak_allocated_bytes, row.peak_reserved_bytes

    return _fit_part("slack", rows[0].gpu, slack_family(row_family(rows[0])), rows, SLACK_FEATURES, point,
                     relative=False, source=source)


def fit_overhead(rows: Sequence[Measurement], *, source: str = "") -> PartFit:
    """O = device used − reserved on every row of one GPU (absolute least squares: a near-constant)."""
    def point(row: Measurement) -> tuple[dict[str, float], float, float]:
        used = row.device_used_bytes
        return overhead_features(row_inputs(row)), used - row.peak_reserved_bytes, used

    return _fit_part("overhead", rows[0].gpu, "all", rows, OVERHEAD_FEATURES, point, relative=False, source=source)


# ----------------------------------------------------------------------------- one GPU's calibration


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """The fitted parts of one GPU: workspace by kernel family, slack by family, the outside memory."""

    gpu: str
    workspace: dict[str, PartFit] = field(default_factory=dict)
    slack: dict[str, PartFit] = field(default_factory=dict)
    overhead: PartFit | None = None

    @property
    def n_points(self) -> int:
        return sum(f.n_points for f in self.workspace.values())


def _grouped(rows: Sequence[Measurement], key: Callable[[Measurement], str]) -> dict[str, list[Measurement]]:
    groups: dict[str, list[Measurement]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def fit_calibrations(rows: Sequence[Measurement], *, kinds: Sequence[str] = CALIBRATION_KINDS,
                     source: str = "") -> dict[str, Calibration]:
    """Calibrations of every GPU with usable rows (not OOM, of ``kinds``): a part is fitted wherever
    rows carry its two figures. GPUs with no figure at all are left out."""
    usable = [r for r in rows if not r.oom and r.kind in kinds]
    result = {}
    for gpu, members in sorted(_grouped(usable, lambda r: r.gpu).items()):
        allocated = [r for r in members if r.peak_allocated_bytes is not None]
        reserved = [r for r in allocated if r.peak_reserved_bytes is not None]
        used = [r for r in members if r.device_used_bytes is not None and r.peak_reserved_bytes is not None]
        workspace = {k: fit_workspace(v, source=source)
                     for k, v in _grouped(allocated, lambda r: kernel_family(row_family(r))).items()}
        slack = {k: fit_slack(v, source=source)
                 for k, v in _grouped(reserved, lambda r: slack_family(row_family(r))).items()}
        overhead = fit_overhead(used, source=source) if used else None
        if workspace or overhead is not None:
            result[gpu] = Calibration(gpu=gpu, workspace=workspace, slack=slack, overhead=overhead)
    return result


# ----------------------------------------------------------------------------- JSON form (the fit cache)


def part_to_json(fit: PartFit) -> dict:
    return {"part": fit.part, "gpu": fit.gpu, "family": fit.family, "coefficients": fit.coefficients,
            "residuals_bytes": list(fit.residuals_bytes), "figures_bytes": list(fit.figures_bytes),
            "tokens_per_rank_range": list(fit.tokens_per_rank_range), "ring_sizes": list(fit.ring_sizes),
            "stale_rows": fit.stale_rows, "source": fit.source, "identified": list(fit.identified)}


def part_from_json(raw: dict) -> PartFit:
    return PartFit(part=raw["part"], gpu=raw["gpu"], family=raw["family"],
                   coefficients={k: float(v) for k, v in raw["coefficients"].items()},
                   residuals_bytes=tuple(raw["residuals_bytes"]), figures_bytes=tuple(raw["figures_bytes"]),
                   tokens_per_rank_range=tuple(raw["tokens_per_rank_range"]), ring_sizes=tuple(raw["ring_sizes"]),
                   stale_rows=raw["stale_rows"], source=raw["source"], identified=tuple(raw["identified"]))


def calibration_to_json(calibration: Calibration) -> dict:
    return {"gpu": calibration.gpu,
            "workspace": {k: part_to_json(v) for k, v in sorted(calibration.workspace.items())},
            "slack": {k: part_to_json(v) for k, v in sorted(calibration.slack.items())},
            "overhead": part_to_json(calibration.overhead) if calibration.overhead else None}


def calibration_from_json(raw: dict) -> Calibration:
    return Calibration(gpu=raw["gpu"], workspace={k: part_from_json(v) for k, v in raw["workspace"].items()},
                       slack={k: part_from_json(v) for k, v in raw["slack"].items()},
                       overhead=part_from_json(raw["overhead"]) if raw["overhead"] else None)


def relative_residual_summary(fit: PartFit) -> tuple[float, float]:
    """(median, max) |residual / figure| of one part (0, 0 without points)."""
    values = sorted(abs(r) for r in fit.relative_residuals)
    if not values:
        return 0.0, 0.0
    middle = len(values) // 2
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    return median, values[-1]


def finite_coefficients(fit: PartFit) -> bool:
    return all(math.isfinite(v) for v in fit.coefficients.values())
