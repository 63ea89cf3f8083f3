"""Communication time of one ring hop: α–β per link, fitted from a point-to-point sweep.

Model (Hockney): moving m bytes over a link takes ``α + m / β`` seconds, α the latency (s),
β the one-way bandwidth (bytes/s). α and β are fitted by least squares from measured
(message bytes, seconds) rows; each row is weighted by 1/seconds so a 4 KiB and a 1 GiB message
count equally in relative error (plain least squares in seconds would ignore small messages).

A real NCCL send/recv is not one straight line from 4 KiB to 1 GiB: ANCHORS.md's 2×H100 NVLink
exchange has a ~0.14 ms floor yet only reaches 91 GB/s at 16 MiB and 335 GB/s at 1 GiB (protocol
and channel changes). So a link model that carries measured points interpolates between them
(log–log, piecewise linear) and uses the fitted α–β only outside the measured range; the fit's R²
and per-point residuals say how far the straight line is from the measurement.

The same affine form (time = intercept + x · slope) also describes a kernel's time versus its
FLOPs (launch overhead + FLOPs / effective FLOP/s); ``kernels`` reuses ``TimeCurve``.

Hierarchical rings: ranks are placed node by node (ranks 0..g-1 on node 0, ...). A hop between
two ranks of the same node uses the intra-node link, a hop across nodes the inter-node link; in a
synchronous ring the slowest hop bounds every step (the simulator plays that out).
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass, field

import numpy as np

from ringplan.units import MIB

# Ring exchange between the two GPUs of the lent 2×H100 80GB HBM3 machine (NVLink NV18),
# batch_isend_irecv to next and from previous at once, one direction; ANCHORS.md (2026-11-25).
H100_NVLINK_ANCHOR_POINTS: tuple[tuple[float, float], ...] = (
    (4096.0, 0.14e-3),                      # "~0.14 ms floor for small messages"
    (16 * MIB, 16 * MIB / 91e9),            # 91 GB/s at 16 MiB
    (256 * MIB, 256 * MIB / 251e9),         # 251 GB/s at 256 MiB
    (1024 * MIB, 1024 * MIB / 335e9),       # 335 GB/s at 1 GiB
)
H100_NVLINK_ANCHOR_SOURCE = ("ANCHORS.md: 2xH100 NVLink ring exchange "
                             "(0.14 ms floor; 91/251/335 GB/s at 16 MiB/256 MiB/1 GiB)")


def _positive_finite(name: str, value: float) -> None:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


EXTRAPOLATIONS = ("link", "kernel")


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeCurve:
    """Seconds as a function of a size x (bytes or FLOPs): ``intercept_s + x · seconds_per_unit``.

    ``points`` (sorted (x, seconds) pairs, optional) are measurements: inside their range the
    time is interpolated piecewise-linearly in log–log space. Outside it, ``extrapolation`` says
    what physics continues:

    - ``"link"`` (a transfer): below the range the smallest measured time (a latency floor);
      above it the last measured time plus the fitted slope for the extra bytes.
    - ``"kernel"`` (a compute kernel): below the range the straight line of the fitted slope
      through the first point (never below the intercept; no floor: a smaller block is faster);
      above it the power law of the last measured segment, t = t_max·(x/x_max)^p with p ≥ 1
      (the effective FLOP rate keeps its last trend and never rises). Source: the H200 kernel
      sweep loses rate from 65,536 to 131,072 tokens, and ANCHORS.md's H100 SDPA causal rate falls
      from 597 to 535 TFLOP/s from 131,072 to 262,144 tokens; a fitted constant rate would not.
    """

    intercept_s: float
    seconds_per_unit: float
    points: tuple[tuple[float, float], ...] = ()
    extrapolation: str = "link"

    def __post_init__(self) -> None:
        if not np.isfinite(self.intercept_s) or self.intercept_s < 0:
            raise ValueError(f"intercept (latency/overhead) must be >= 0 s, got {self.intercept_s!r}")
        _positive_finite("seconds per unit (1/bandwidth or 1/FLOP rate)", self.seconds_per_unit)
        if self.extrapolation not in EXTRAPOLATIONS:
            raise ValueError(f"extrapolation {self.extrapolation!r} is not one of {list(EXTRAPOLATIONS)}")
        pts = tuple(sorted((float(x), float(t)) for x, t in self.points))
        for x, t in pts:
            _positive_finite("measured size", x)
            _positive_finite("measured seconds", t)
        object.__setattr__(self, "points", pts)

    @property
    def measured_range(self) -> tuple[float, float] | None:
        return (self.points[0][0], self.points[-1][0]) if self.points else None

    def time_s(self, x: float | np.ndarray) -> float | np.ndarray:
        """Seconds for size x (array or scalar); 0 for x == 0 (nothing to move or compute)."""
        xs = np.asarray(x, dtype=float)
        if np.any(xs < 0):
            raise ValueError(f"size must be >= 0, got {xs[xs < 0][:3].tolist()}")
        result = self.intercept_s + xs * self.seconds_per_unit
        if len(self.points) >= 2:
            result = self._measured_time_s(xs)
        result = np.where(xs == 0, 0.0, result)
        return float(result) if np.ndim(result) == 0 else result

    def _measured_time_s(self, xs: np.ndarray) -> np.ndarray:
        px = np.log([p[0] for p in self.points])
        pt = np.log([p[1] for p in self.points])
        inside = np.exp(np.interp(np.log(np.maximum(xs, 1e-300)), px, pt))  # flat outside the range
        (x_min, t_min), (x_max, t_max) = self.points[0], self.points[-1]
        if self.extrapolation == "link":
            above = t_max + (xs - x_max) * self.seconds_per_unit
            return np.where(xs > x_max, above, inside)
        below = np.maximum(self.intercept_s, t_min - (x_min - xs) * self.seconds_per_unit)
        exponent = max(1.0, (pt[-1] - pt[-2]) / (px[-1] - px[-2]))
        above = t_max * (np.maximum(xs, x_max) / x_max) ** exponent
        return np.where(xs > x_max, above, np.where(xs < x_min, below, inside))


@dataclass(frozen=True, slots=True, kw_only=True)
class AffineFit:
    """Least-squares fit of seconds = intercept + slope · x, with its quality.

    ``residuals_s`` are measured − fitted seconds per row; ``relative_errors`` (fitted − measured)
    / measured; ``r_squared`` is computed on seconds.
    """

    curve: TimeCurve
    r_squared: float
    residuals_s: tuple[float, ...]
    relative_errors: tuple[float, ...]
    n_points: int
    x_range: tuple[float, float]


def fit_time_curve(x: np.ndarray | list[float], seconds: np.ndarray | list[float], *,
                   keep_points: bool = True, extrapolation: str = "link") -> AffineFit:
    """Fit seconds ≈ intercept + slope·x by bounded least squares (intercept ≥ 0, slope > 0).

    Rows are weighted by 1/seconds (minimises relative error). Source: scipy.optimize.lsq_linear.
    Raises ValueError on fewer than 2 distinct sizes, non-positive values, or a slope that comes
    out non-positive (time not growing with size: the sweep is broken).
    """
    xs, ts = np.asarray(x, dtype=float), np.asarray(seconds, dtype=float)
    if xs.shape != ts.shape or xs.ndim != 1:
        raise ValueError(f"sizes and seconds must be two equal-length lists, got shapes {xs.shape} and {ts.shape}")
    if np.any(~np.isfinite(xs)) or np.any(xs <= 0) or np.any(~np.isfinite(ts)) or np.any(ts <= 0):
        raise ValueError(f"sizes and seconds must be positive and finite, got sizes {xs.tolist()[:5]}..., "
                         f"seconds {ts.tolist()[:5]}...")
    if len(np.unique(xs)) < 2:
        raise ValueError(f"need at least 2 distinct sizes to fit latency and bandwidth, got {np.unique(xs).tolist()}")
    if ts[np.argmax(xs)] <= ts[np.argmin(xs)]:
        raise ValueError(f"time does not grow with size ({ts[np.argmin(xs)]!r} s at {xs.min():.0f}, "
                         f"{ts[np.argmax(xs)]!r} s at {xs.max():.0f}); the sweep is not usable")
    weights = 1.0 / ts
    design = np.column_stack([np.ones_like(xs), xs]) * weights[:, None]
    scale = np.array([1.0, 1.0 / xs.max()])  # columns of similar magnitude for the solver
    intercept, slope = nonnegative_least_squares(design * scale, ts * weights) * scale
    if slope <= 0:
        raise ValueError(f"fitted time does not grow with size (slope {slope!r}); the sweep is not usable")
    fitted = intercept + slope * xs
    ss_res = float(np.sum((ts - fitted) ** 2))
    ss_tot = float(np.sum((ts - ts.mean()) ** 2))
    points = tuple(zip(xs.tolist(), ts.tolist())) if keep_points else ()
    curve = TimeCurve(intercept_s=float(intercept), seconds_per_unit=float(slope), points=points,
                      extrapolation=extrapolation)
    return AffineFit(curve=curve,
                     r_squared=1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
                     residuals_s=tuple((ts - fitted).tolist()),
                     relative_errors=tuple(((fitted - ts) / ts).tolist()),
                     n_points=len(xs), x_range=(float(xs.min()), float(xs.max())))


def nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||design·c − target|| subject to c ≥ 0. For the affine fits here (two columns) the
    optimum is the least-squares solution on one face of the orthant: every face (a subset of the
    coefficients held at 0) is solved with numpy's ``lstsq`` and the best non-negative solution kept
    (exact for a convex problem, and no scipy import on a planner command's path); wider designs go
    to scipy's bounded solver (``scipy.optimize.lsq_linear``, BVLS)."""
    columns = design.shape[1]
    if columns > 3:
        from scipy.optimize import lsq_linear

        return lsq_linear(design, target, bounds=(np.zeros(columns), np.full(columns, np.inf)), method="bvls").x
    best, best_residual = np.zeros(columns), float(np.sum(target ** 2))
    for free in itertools.product((True, False), repeat=columns):
        if not any(free):
            continue
        keep = np.array(free)
        solution = np.zeros(columns)
        solution[keep] = np.linalg.lstsq(design[:, keep], target, rcond=None)[0]
        residual = float(np.sum((design @ solution - target) ** 2))
        if np.all(solution >= 0.0) and residual < best_residual:
            best, best_residual = solution, residual
    return best


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkModel:
    """One link type's transfer time: α (``latency_s``) + bytes / β (``bandwidth_bytes_per_s``).

    ``points`` are measured (message bytes, seconds) of a ring exchange, used for interpolation;
    ``source`` says where α and β come from (catalog citation, ANCHORS.md, or a profile path).
    """

    name: str
    latency_s: float
    bandwidth_bytes_per_s: float
    points: tuple[tuple[float, float], ...] = ()
    source: str = ""
    measured: bool = False
    curve: TimeCurve = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("link name must not be empty")
        if not np.isfinite(self.latency_s) or self.latency_s <= 0:
            raise ValueError(f"link {self.name!r}: latency must be positive, got {self.latency_s!r} s")
        if not np.isfinite(self.bandwidth_bytes_per_s) or self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be positive, "
                             f"got {self.bandwidth_bytes_per_s!r} bytes/s")
        object.__setattr__(self, "curve", TimeCurve(intercept_s=self.latency_s,
                                                    seconds_per_unit=1.0 / self.bandwidth_bytes_per_s,
                                                    points=self.points))

    def transfer_time_s(self, message_bytes: float | np.ndarray) -> float | np.ndarray:
        """Seconds to move ``message_bytes`` one way: interpolated where measured, else α + m/β."""
        return self.curve.time_s(message_bytes)


def link_model_from_spec(spec: object) -> LinkModel:
    """``LinkModel`` from a catalog ``LinkSpec`` (fields name, bandwidth_bytes_per_s, latency_s, sources)."""
    for attr in ("name", "bandwidth_bytes_per_s", "latency_s"):
        if not hasattr(spec, attr):
            raise ValueError(f"{spec!r} is not a link spec (missing {attr})")
    sources = getattr(spec, "sources", {}) or {}
    source = "; ".join(f"{k}: {v}" for k, v in sorted(dict(sources).items())) or "catalog"
    return LinkModel(name=spec.name, latency_s=float(spec.latency_s),
                     bandwidth_bytes_per_s=float(spec.bandwidth_bytes_per_s), source=source)


def link_model_from_fit(name: str, fit: AffineFit, *, source: str) -> LinkModel:
    """``LinkModel`` whose α, β are a sweep's fit and whose points are that sweep's rows."""
    # An intercept fitted to 0 (bounded) is no latency estimate: fall back to the smallest measured time.
    latency = fit.curve.intercept_s if fit.curve.intercept_s > 0 else min(t for _, t in fit.curve.points)
    return LinkModel(name=name, latency_s=latency, bandwidth_bytes_per_s=1.0 / fit.curve.seconds_per_unit,
                     points=fit.curve.points, source=source, measured=True)


def h100_nvlink_anchor_link() -> LinkModel:
    """2×H100 NVLink ring exchange from ANCHORS.md's four points (default until a sweep exists)."""
    xs, ts = zip(*H100_NVLINK_ANCHOR_POINTS)
    fit = fit_time_curve(list(xs), list(ts))
    return link_model_from_fit("nvlink-h100-anchor", fit, source=H100_NVLINK_ANCHOR_SOURCE)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLayout:
    """How the ring's ranks sit on nodes: ``nodes`` nodes, ``ranks_per_node`` consecutive ranks each."""

    ring_size: int
    gpus_per_node: int
    nodes: int

    @property
    def ranks_per_node(self) -> int:
        return self.ring_size // self.nodes


def node_layout(ring_size: int, gpus_per_node: int, nodes: int | None = None) -> NodeLayout:
    """Place ``ring_size`` ranks on nodes of ``gpus_per_node`` GPUs, node by node.

    Without ``nodes``: one node if the ring fits in it, else ring_size / gpus_per_node full nodes.
    With ``nodes``: the ranks split evenly, at most ``gpus_per_node`` per node. Anything else
    (e.g. 12 ranks on nodes of 8, or 10 ranks over 4 nodes) raises ValueError.
    """
    for name, value in (("ring_size", ring_size), ("gpus_per_node", gpus_per_node)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if nodes is None:
        if ring_size > gpus_per_node and ring_size % gpus_per_node:
            raise ValueError(f"{ring_size} ranks do not fill nodes of {gpus_per_node} GPUs "
                             f"(use a multiple of {gpus_per_node}, e.g. {ring_size // gpus_per_node * gpus_per_node} "
                             f"or {(ring_size // gpus_per_node + 1) * gpus_per_node}, or give --nodes)")
        nodes = max(1, ring_size // gpus_per_node) if ring_size > gpus_per_node else 1
    if not isinstance(nodes, (int, np.integer)) or nodes <= 0:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    if ring_size % nodes:
        raise ValueError(f"{ring_size} ranks do not split evenly over {nodes} nodes")
    if ring_size // nodes > gpus_per_node:
        raise ValueError(f"{ring_size} ranks over {nodes} nodes needs {ring_size // nodes} GPUs per node, "
                         f"but a node has {gpus_per_node}")
    return NodeLayout(ring_size=int(ring_size), gpus_per_node=int(gpus_per_node), nodes=int(nodes))


def previous_ranks(ring_size: int, group_size: int) -> np.ndarray:
    """For each rank r, the rank it receives from: r−1 inside its ring group of ``group_size``.

    Groups are consecutive ranks [g·k, (g+1)·k); the first rank of a group receives from the
    group's last rank. ``group_size == ring_size`` is the whole ring.
    """
    if group_size <= 0 or ring_size % group_size:
        raise ValueError(f"ring group of {group_size} ranks does not divide a ring of {ring_size}")
    ranks = np.arange(ring_size)
    return (ranks // group_size) * group_size + (ranks % group_size - 1) % group_size


def hop_times_s(message_bytes: float, layout: NodeLayout, group_size: int, *,
                intra: LinkModel, inter: LinkModel | None) -> np.ndarray:
    """Seconds for the hop into each rank (from ``previous_ranks``) carrying ``message_bytes``.

    A hop inside a node costs ``intra.transfer_time_s``; a hop between nodes ``inter``'s. Ignores
    contention of several rings sharing one NIC and NVLink-vs-PCIe topology inside a node.
    """
    prev = previous_ranks(layout.ring_size, group_size)
    ranks = np.arange(layout.ring_size)
    crosses = (prev // layout.ranks_per_node) != (ranks // layout.ranks_per_node)
    if crosses.any() and inter is None:
        raise ValueError(f"the ring crosses {layout.nodes} nodes but no inter-node link is known")
    times = np.full(layout.ring_size, float(intra.transfer_time_s(message_bytes)))
    if crosses.any():
        times[crosses] = float(inter.transfer_time_s(message_bytes))
    return times
