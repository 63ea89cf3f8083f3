"""ringplan: how many GPUs ring attention needs for N tokens, from measured models.

The planner imports numpy/scipy only (and those only when fitting); torch lives in
``ringplan_runtime``. Names below are loaded on first use, so ``import ringplan`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ringplan.units import format_bytes, format_tokens, parse_bytes, parse_tokens
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload, tokens_per_rank

_LAZY = {
    # hardware catalog
    "GpuSpec": "hardware", "LinkSpec": "hardware", "Catalog": "hardware", "load_catalog": "hardware",
    # measured profiles
    "Measurement": "profiles", "Profile": "profiles", "Provenance": "profiles", "load_profile": "profiles",
    "load_profiles": "profiles", "write_profile": "profiles",
    # memory model
    "memory_terms": "memory_terms", "TERM_NAMES": "memory_terms",
    "MemoryFit": "memory_model", "SeedFit": "memory_model", "MemoryPrediction": "memory_model",
    "MemoryModel": "memory_model", "fit_memory_model": "memory_model", "fit_seed_form": "memory_model",
    "predict_memory": "memory_model", "default_memory_model": "memory_model",
    # capacity search
    "CapacityQuery": "capacity", "CapacityRow": "capacity", "min_world_size": "capacity", "max_tokens": "capacity",
    # whole-model planning
    "ModelSpec": "models", "load_model_catalog": "models", "model_from_hf_config": "models",
    "parameter_count": "models", "StackSettings": "stack", "StackWorkload": "stack",
}

__all__ = [
    "AttentionPattern", "AttentionShape", "RingLayout", "Workload", "format_bytes", "format_tokens",
    "parse_bytes", "parse_tokens", "tokens_per_rank", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"ringplan.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ringplan' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ringplan.capacity.attention import CapacityQuery, CapacityRow, max_tokens, min_world_size
    from ringplan.hardware import Catalog, GpuSpec, LinkSpec, load_catalog
    from ringplan.memory.attention_model import MemoryModel, MemoryPrediction, default_memory_model, predict_memory
    from ringplan.memory.attention_fits import MemoryFit, SeedFit, fit_memory_model, fit_seed_form
    from ringplan.memory.attention_terms import TERM_NAMES, memory_terms
    from ringplan.profiles.attention import Measurement, Profile, load_profile, load_profiles, write_profile
    from ringplan.profiles.envelope import Provenance
