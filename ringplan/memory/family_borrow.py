"""A fitted part for a row family nobody measured: borrow the nearest measured family's, with a stated extra ±.

Families (``attention_fits.shape_family``) are ``pattern/mode/projections/workspace[/ring]``. The runtime
can run every combination, the measured profiles hold three (dense forward and training without
projections, dilated forward with projections; ``profiles/measured/``): dense with projections — the
fp32 ``dense/forward/projections`` family among them — had no workspace or slack fit, so its peak
allocation lost the projections' cuBLAS workspace (33 MiB, 1.06% of an fp32 query's allocation) with no
bound. Such a family now borrows the part of the family nearest to it (``family_distance``) and its
bound grows by ``BORROWED_COMPONENT_BYTES`` per component in which the two differ. Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable

from ringplan.units import MIB

#: How much a mismatch in each family component matters to the allocator's excess over the terms, so
#: which measured family is nearest: the mode first (training keeps fp32 dQ/statistics buffers a forward
#: never has: the workspace coefficients of fp32 rows, ≈ 1.0, exist only in training fits), then the
#: projections (their cuBLAS workspace), the workspace kind (math vs tiled kernels), the pattern, the ring.
#: Order from the measured fits in ``profiles/fitted/memory-fit.json``; the weights only rank.
COMPONENT_WEIGHTS: tuple[float, ...] = (1.0, 8.0, 4.0, 2.0, 0.5)  # pattern, mode, projections, workspace, ring

#: Extra ± per differing component of a borrowed family's fit: 33 MiB, the largest excess measured
#: between two fitted families of one mode (the projections' cuBLAS workspace: the workspace constant
#: is 34.6 MB in the dilated module with projections, 3 KB in the dense one without, on h100 and h200;
#: ``profiles/fitted/memory-fit.json``). The slack fits of all families are 7–10 MB constants with
#: residuals ≤ 17 MiB: within it. Ignores differences no measured pair of families shows.
BORROWED_COMPONENT_BYTES = 33 * MIB


def family_components(family: str) -> tuple[str, ...]:
    """``family`` split into its five components (the ring part '' when absent, as in a kernel family)."""
    parts = family.split("/")
    if len(parts) not in (4, 5):
        raise ValueError(f"not a row family: {family!r} (pattern/mode/projections/workspace[/ring])")
    return tuple(parts) + ("",) * (5 - len(parts))


def family_distance(a: str, b: str) -> float:
    """Σ ``COMPONENT_WEIGHTS`` over the components in which families ``a`` and ``b`` differ (0: the same)."""
    return sum(w for w, x, y in zip(COMPONENT_WEIGHTS, family_components(a), family_components(b)) if x != y)


def differing_components(a: str, b: str) -> int:
    """How many of the five components of families ``a`` and ``b`` differ."""
    return sum(x != y for x, y in zip(family_components(a), family_components(b)))


def nearest_family(family: str, available: Iterable[str]) -> str | None:
    """The measured family nearest to ``family`` (``family_distance``; ties by name), None when none.
    Only families of the same depth compete (kernel families with kernel families)."""
    depth = len(family.split("/"))
    candidates = sorted({f for f in available if len(f.split("/")) == depth},
                        key=lambda f: (family_distance(family, f), f))
    return candidates[0] if candidates else None


def borrowed_bound_bytes(family: str, donor_family: str) -> float:
    """Extra ± bytes of a part of ``family`` taken from ``donor_family``'s fit:
    ``BORROWED_COMPONENT_BYTES`` × the components in which they differ (0 for its own fit)."""
    return BORROWED_COMPONENT_BYTES * differing_components(family, donor_family)
