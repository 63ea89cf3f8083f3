"""Profiles: measured runs on disk, one envelope shared by every format.

Modules: ``envelope`` (``Provenance``, the ``Checker`` whose errors name file and field, the envelope
check, the row merge and the merged write), then one module per format with its row type, reader and
writer — ``attention`` (``ringplan.profile/1``), ``stack`` (``ringplan.stack/1``), ``timing``
(``ringplan.p2p/1``, ``ringplan.kernels/1``) and ``gemm`` (``ringplan.gemm/1``). Where the files live
is ``ringplan.paths``'s; the JSON reader and the locked atomic writer are ``ringplan.jsonfile``'s.

The names below load on first use, so importing one module does not import every format.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Provenance": "envelope", "Checker": "envelope", "PROVENANCE_KEYS": "envelope", "ROW_KINDS": "envelope",
    "merge_rows": "envelope",
    "Measurement": "attention", "Profile": "attention", "load_profile": "attention", "load_profiles": "attention",
    "write_profile": "attention",
    "StackMeasurement": "stack", "StackProfile": "stack", "load_stack_profile": "stack",
    "load_stack_profiles": "stack", "write_stack_profile": "stack",
    "P2pProfile": "timing", "KernelProfile": "timing", "load_timing_profile": "timing",
    "timing_profiles_in": "timing", "write_timing_profile": "timing",
    "GemmProfile": "gemm", "load_gemm_profile": "gemm", "gemm_profiles_in": "gemm", "write_gemm_profile": "gemm",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"ringplan.profiles.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ringplan.profiles' has no attribute {name!r}")
