"""Time: links (α–β), kernels, GEMMs, ring passes, the simulator, attention and whole-model step time.

Modules, lowest first: ``links`` (α–β link model), ``provenance`` (source labels), ``kernels``
(attention kernel compute model), ``gemms`` (GEMM model), ``simulate`` (the ring schedule),
``timing_data`` (measured timing data; the GPU, links and compute model), ``ring_passes`` (one
layer's passes, costed), ``attention_time`` (one attention layer's step time), ``overlap`` (the
overlap threshold), ``overhead_fits`` (the overheads fitted), ``stack_bytes`` and
``fsdp_schedule`` (a stack's memory-bound kernels, FSDP), ``stack_time`` (whole-model step time).

The names below load on first use: ``import ringplan.time.stack_time`` must not pull numpy.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "StepTimePrediction": "attention_time", "step_time_prediction": "attention_time",
    "capacity_step_time": "attention_time", "OverlapThreshold": "overlap", "overlap_threshold": "overlap",
    "fit_step_overhead_s": "overhead_fits", "fit_call_overhead_s": "overhead_fits",
    "TimingData": "timing_data", "load_timing_data": "timing_data", "LinkModel": "links",
    "SimulationResult": "simulate", "simulate_step": "simulate", "StepTime": "stack_time", "step_time": "stack_time",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"ringplan.time.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ringplan.time' has no attribute {name!r}")
