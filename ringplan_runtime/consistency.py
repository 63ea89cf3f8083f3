"""Inputs every rank of a ring must agree on, compared once before the first exchange.

A ring whose ranks were given different inputs (another local length, KV-head count, dtype,
``causal`` flag, ...) would post sends and receives of different sizes or counts: gloo aborts, NCCL
hangs until its timeout. ``checked_on_every_rank`` runs the local validation on each rank, then
all-gathers a small description of the call and every rank's validation error over the ring's
group (``all_gather_object``: two small collectives, once per call) and raises the same
``ValueError`` on every rank: a rank that failed its own checks, or the fields that differ, by rank.
``check=False`` skips the gather (the caller vouches for its ranks), and local errors are then raised
as they come, on the ranks that see them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def tensor_description(name: str, tensor: torch.Tensor) -> dict[str, object]:
    """What a rank's peers must match about one input: its shape, dtype and device type."""
    return {f"{name}.shape": tuple(tensor.shape), f"{name}.dtype": str(tensor.dtype).removeprefix("torch."),
            f"{name}.device": tensor.device.type}


def differing_fields(descriptions: list[dict[str, object]], ranks: tuple[int, ...]) -> list[str]:
    """``"name: rank r = value, ..."`` for every field whose value is not the same on all ranks."""
    lines = []
    for key in descriptions[0]:
        values = [d.get(key) for d in descriptions]
        if any(value != values[0] for value in values):
            lines.append(f"{key}: " + ", ".join(f"rank {rank} = {value}" for rank, value in zip(ranks, values)))
    return lines


def checked_on_every_rank(validate: Callable[[], T], *, description: dict[str, object], ranks: tuple[int, ...],
                          group, check: bool = True) -> T:
    """``validate()`` (this rank's own checks), then, when ``check`` and the ring has several ranks,
    the cross-rank comparison of ``description`` (module docstring): every rank raises the same
    ``ValueError`` (a call all ranks rejected alike keeps its own error), or none does. ``ranks``: the
    ring's global ranks, in ``group`` order."""
    try:
        result, error = validate(), None
    except Exception as exc:  # noqa: BLE001 -- every rank must learn of it before raising
        result, error = None, exc
    if check and len(ranks) > 1 and dist.is_available() and dist.is_initialized():
        gathered: list = [None] * len(ranks)
        own = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(gathered, (description, own), group=group)
        texts = [text for _, text in gathered]
        if error is not None and all(text == own for text in texts):
            raise error  # every rank rejected the same call alike: its own words
        problems = [f"rank {rank} rejected its inputs ({text})" for rank, text in zip(ranks, texts) if text]
        problems += differing_fields([d for d, _ in gathered], ranks)
        if problems:
            raise ValueError("the ranks of the ring disagree (every rank must call with the same shapes, dtypes "
                             "and flags): " + "; ".join(problems))
    if error is not None:
        raise error
    return result
