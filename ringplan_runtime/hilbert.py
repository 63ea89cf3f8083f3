"""Hilbert-curve token order (the seed's feature), applied only where it cannot change the result.

The positions 0..L-1 of a sparse segment are laid row-major on a side x side grid (side = the
smallest power of two with side^2 >= L) and visited in Hilbert-curve order. The same permutation
is applied to queries, keys and values, and its inverse to the output: non-causal attention is
equivariant under such a joint permutation, so the result is identical up to rounding (the
summation order changes). With a causal mask the permuted order would need a permuted mask;
the runtime refuses that combination instead. Whether it pays on GPUs (it cannot reduce FLOPs,
only change memory locality) is measured by ``benchmarks/hilbert_bench.py``.
"""

from __future__ import annotations

import functools

import torch


def hilbert_distance(x: torch.Tensor, y: torch.Tensor, side: int) -> torch.Tensor:
    """Distance along the Hilbert curve of grid cells (x, y) on a ``side`` x ``side`` grid (side a power of 2).

    The classic iterative xy -> d conversion (Hilbert 1891; e.g. Warren, Hacker's Delight, 16-2),
    vectorised over int64 tensors.
    """
    if side <= 0 or side & (side - 1):
        raise ValueError(f"grid side must be a power of two, got {side}")
    x, y = x.clone(), y.clone()
    distance = torch.zeros_like(x)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        distance += s * s * ((3 * rx.long()) ^ ry.long())
        flip = (~ry) & rx
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return distance


@functools.lru_cache(maxsize=64)
def _permutation_cpu(length: int) -> torch.Tensor:
    side = 1
    while side * side < length:
        side *= 2
    positions = torch.arange(length, dtype=torch.int64)
    distance = hilbert_distance(positions % side, positions // side, side)
    return torch.argsort(distance)


_ON_DEVICE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def hilbert_permutation(length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) int64 tensors: ``x.index_select(dim, perm)`` visits positions in Hilbert order.

    Cached per (length, device): no host-to-device copy after the first call.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    key = (length, str(torch.device(device) if device is not None else "cpu"))
    if key not in _ON_DEVICE:
        perm = _permutation_cpu(length)
        _ON_DEVICE[key] = (perm.to(device), torch.argsort(perm).to(device))
    return _ON_DEVICE[key]
