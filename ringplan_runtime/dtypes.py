"""The planner's dtype names and the torch dtypes they stand for: one table, one lookup."""

from __future__ import annotations

import torch

#: Planner dtype name → torch dtype (``ringplan.workload.AttentionShape.dtype``, ``StackSettings`` dtypes).
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a planner dtype name (``bf16`` → ``torch.bfloat16``); ``ValueError`` otherwise."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
