"""One fitted part and the one way parts are fitted, for every memory model.

A *part* is what the byte terms cannot know (a kernel's workspace, the allocator's slack, memory
outside the allocator), fitted per GPU as ``bytes = Σ_k c_k · feature_k`` with c ≥ 0 by least
squares (``scipy.optimize.lsq_linear``, imported only to fit). The attention-level calibration
(``ringplan.memory.calibration``) and the whole-model fits (``ringplan.memory.stack_model``) both
fit through ``fit_part``, borrow unidentified coefficients through ``with_borrowed``, and store
their ``Calibration`` per GPU in the same JSON form, validated when read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

#: Row kinds the fits use: this runtime's own measurements (a report's figures are of another
#: implementation; estimates are formulas).
CALIBRATION_KINDS: tuple[str, ...] = ("measured",)

@dataclass(frozen=True, slots=True, kw_only=True)
class PartPoint:
    """One measured run as a part fit sees it: the part's features, the observed part (e.g. peak
    allocated − Σφ for the workspace) and the figure it belongs to (e.g. peak allocated), in bytes."""

    features: dict[str, float]
    observed_bytes: float
    figure_bytes: float
    tokens_per_rank: float
    ring_size: int


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
    #: Worst |residual| and largest figure, computed once (every prediction asks for them: a fit
    #: over many rows must not make each prediction linear in the rows).
    max_abs_residual_bytes: float = field(init=False, compare=False)
    largest_figure_bytes: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_abs_residual_bytes", max((abs(r) for r in self.residuals_bytes), default=0.0))
        object.__setattr__(self, "largest_figure_bytes", max(self.figures_bytes, default=0.0))

    @property
    def n_points(self) -> int:
        return len(self.residuals_bytes)

    @property
    def relative_residuals(self) -> tuple[float, ...]:
        """Residual / figure per row: the error this part adds to its figure."""
        return tuple(r / f for r, f in zip(self.residuals_bytes, self.figures_bytes))

    def bytes(self, features: dict[str, float]) -> float:
        return sum(c * features[name] for name, c in self.coefficients.items())

    def uncertainty_bytes(self, figure_bytes: float, tokens_per_rank: float | None = None) -> float:
        """The worst residual seen, grown in proportion beyond the measured range: by the figure
        over the largest figure measured, and — when ``tokens_per_rank`` is given (parts whose
        figure does not follow the tokens, e.g. a whole model's, dominated by model states) — by the
        tokens per rank over the most measured, whichever is larger."""
        largest = self.largest_figure_bytes
        growth = figure_bytes / largest if largest > 0 else 1.0
        most_tokens = self.tokens_per_rank_range[1]
        if tokens_per_rank is not None and most_tokens > 0:
            growth = max(growth, tokens_per_rank / most_tokens)
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


def fit_part(part: str, gpu: str, family: str, points: Sequence[PartPoint], names: Sequence[str], *,
             relative: bool, stale_rows: int = 0, source: str = "") -> PartFit:
    """Fit one part over ``points``: non-negative coefficients of the features ``names`` that best
    give each point's observed part bytes (weighted by 1 / figure when ``relative``: the error the
    part adds to its figure, in relative terms)."""
    design = [[p.features[name] for name in names] for p in points]
    observed = [p.observed_bytes for p in points]
    figures = [p.figure_bytes for p in points]
    weights = [1.0 / figure for figure in figures] if relative else [1.0] * len(points)
    coefficients = dict(zip(names, nonnegative_least_squares(design, observed, weights)))
    fitted = [sum(coefficients[name] * p.features[name] for name in names) for p in points]
    identified = tuple(name for name in names if any(p.features[name] for p in points))
    tokens = [p.tokens_per_rank for p in points]
    return PartFit(part=part, gpu=gpu, family=family, coefficients=coefficients,
                   residuals_bytes=tuple(o - f for o, f in zip(observed, fitted)), figures_bytes=tuple(figures),
                   tokens_per_rank_range=(min(tokens), max(tokens)),
                   ring_sizes=tuple(sorted({p.ring_size for p in points})), stale_rows=stale_rows, source=source,
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


# ----------------------------------------------------------------------------- JSON form (the fit cache)


def part_to_json(fit: PartFit) -> dict:
    return {"part": fit.part, "gpu": fit.gpu, "family": fit.family, "coefficients": fit.coefficients,
            "residuals_bytes": list(fit.residuals_bytes), "figures_bytes": list(fit.figures_bytes),
            "tokens_per_rank_range": list(fit.tokens_per_rank_range), "ring_sizes": list(fit.ring_sizes),
            "stale_rows": fit.stale_rows, "source": fit.source, "identified": list(fit.identified)}


def _checked_numbers(raw: dict, key: str, *, nonnegative: bool) -> tuple[float, ...]:
    """The list ``raw[key]`` as floats: ``ValueError`` naming the key unless every one is a finite
    number (and ≥ 0 when ``nonnegative``)."""
    values = raw[key]
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise ValueError(f"{key} must be a list of numbers")
    for value in values:
        if not math.isfinite(value) or (nonnegative and value < 0):
            raise ValueError(f"{key} holds {value!r}: must be finite{' and ≥ 0' if nonnegative else ''}")
    return tuple(values)


def part_from_json(raw: dict) -> PartFit:
    """A part from its JSON form; ``ValueError`` (naming the part and field) unless every figure is a
    finite number and every coefficient, figure and token count is ≥ 0 (a fit never produces
    others: such a file is corrupt)."""
    where = f"{raw.get('gpu')}/{raw.get('part')}/{raw.get('family')}"
    try:
        coefficients = raw["coefficients"]
        if not isinstance(coefficients, dict):
            raise ValueError("coefficients must be an object")
        values = _checked_numbers({"coefficients": list(coefficients.values())}, "coefficients", nonnegative=True)
        return PartFit(part=raw["part"], gpu=raw["gpu"], family=raw["family"],
                       coefficients={k: float(v) for k, v in zip(coefficients, values)},
                       residuals_bytes=_checked_numbers(raw, "residuals_bytes", nonnegative=False),
                       figures_bytes=_checked_numbers(raw, "figures_bytes", nonnegative=True),
                       tokens_per_rank_range=_checked_numbers(raw, "tokens_per_rank_range", nonnegative=True),
                       ring_sizes=_checked_numbers(raw, "ring_sizes", nonnegative=True),
                       stale_rows=raw["stale_rows"], source=raw["source"], identified=tuple(raw["identified"]))
    except KeyError as exc:
        raise ValueError(f"fitted part {where}: missing {exc}") from None
    except ValueError as exc:
        raise ValueError(f"fitted part {where}: {exc}") from None


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
