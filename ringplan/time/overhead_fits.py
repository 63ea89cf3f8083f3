"""Least-squares fits of the attention step's two overheads from measured step times.

- ``fit_step_overhead_s``: the fixed GPU cost per ring step (``kernels.DEFAULT_STEP_OVERHEAD_S``
  is assumed until fitted);
- ``fit_call_overhead_s``: the host time before the first kernel
  (``attention_time.DEFAULT_CALL_OVERHEAD_S`` was fitted this way on half of the H200 rows,
  ``benchmarks/time_accuracy.py``).

Both minimise the relative error of ``attention_time.step_time_prediction`` against the measured
seconds; each returns the overhead and the relative errors it leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ringplan.time.attention_time import step_time_prediction
from ringplan.workload import RingLayout, Workload

#: The second overhead at which the prediction's slope in the overhead is taken (the first is 0).
SLOPE_PROBE_S = 1e-3


def _linear_overhead_fit(rows: Sequence[tuple[Workload, RingLayout, float]], gpu: object, name: str,
                         **kwargs: object) -> tuple[float, tuple[float, ...]]:
    """Least-squares ``name`` (≥ 0; a keyword of ``step_time_prediction``) minimising relative error.

    The prediction is close to linear in the overhead, so its slope is taken from two predictions
    (0 and 1 ms) per row: with b = t(0)/measured and d = slope/measured, the overhead
    max(0, d·(1 − b) / d·d). Returns the overhead and the relative errors it leaves.
    """
    if not rows:
        raise ValueError(f"need at least one measured step time to fit the {name.replace('_', ' ')}")
    base, slope, measured = [], [], []
    for workload, layout, seconds in rows:
        if not seconds > 0:
            raise ValueError(f"measured step time must be positive, got {seconds!r}")
        t0 = step_time_prediction(workload, layout, gpu, **{name: 0.0}, **kwargs).step_time_s
        t1 = step_time_prediction(workload, layout, gpu, **{name: SLOPE_PROBE_S}, **kwargs).step_time_s
        base.append(t0 / seconds)
        slope.append((t1 - t0) / SLOPE_PROBE_S / seconds)
        measured.append(seconds)
    b, d = np.array(base), np.array(slope)
    overhead = float(max(0.0, np.dot(d, 1.0 - b) / np.dot(d, d))) if np.dot(d, d) > 0 else 0.0
    errors = tuple(step_time_prediction(w, l, gpu, **{name: overhead}, **kwargs).step_time_s / m - 1.0
                   for (w, l, _), m in zip(rows, measured))
    return overhead, errors


def fit_step_overhead_s(rows: Sequence[tuple[Workload, RingLayout, float]], gpu: object,
                        **kwargs: object) -> tuple[float, tuple[float, ...]]:
    """Least-squares fixed GPU cost per ring step (≥ 0) from measured step times, and the relative errors.

    rows: (workload, layout, measured step seconds).
    """
    return _linear_overhead_fit(rows, gpu, "step_overhead_s", **kwargs)


def fit_call_overhead_s(rows: Sequence[tuple[Workload, RingLayout, float]], gpu: object,
                        **kwargs: object) -> tuple[float, tuple[float, ...]]:
    """Least-squares host call overhead (≥ 0) from measured step times, and the relative errors.

    rows: (workload, layout, measured step seconds). Fit it on rows you do not report on.
    """
    return _linear_overhead_fit(rows, gpu, "call_overhead_s", **kwargs)
