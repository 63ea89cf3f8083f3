"""Merge of partial attention results by their log-sum-exp, in place, in fp32 (fp64 for fp64 inputs).

Two partial results over disjoint key sets, (o₁, l₁) and (o₂, l₂), combine exactly into
    l = logaddexp(l₁, l₂),   o = o₁·exp(l₁ - l) + o₂·exp(l₂ - l)
(the online-softmax identity; Milakov & Gimelshein 2018, FlashAttention). ``logaddexp`` is
the stable form (no log(1 + exp(x)) overflow). Rows where both sides are fully masked
(l₁ = l₂ = -inf) stay o = 0, l = -inf, without NaN: the shift is taken as 0 there.

Memory: the accumulator is updated in place (``mul_`` then ``addcmul_``); the only temporaries
are LSE-sized (B·H·n), never an fp32 copy of the output.
"""

from __future__ import annotations

import math

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (never narrower than fp32)."""
    return torch.promote_types(dtype, torch.float32)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Fold one block result into the accumulator, in place.

    ``out_*`` have any shape ``[..., D]``; ``lse_*`` are shaped like ``out[..., 0]`` (views with any
    strides are fine, e.g. ``lse.transpose(1, 2)`` for ``[B, H, n]`` storage and ``[B, n, H, D]`` outputs).
    ``out_acc`` and ``lse_acc`` must be floating accumulators (``accumulator_dtype``); the block may be
    in a narrower dtype.
    """
    if out_acc.shape != out_blk.shape or lse_acc.shape != lse_blk.shape or out_acc.shape[:-1] != lse_acc.shape:
        raise ValueError(f"merge shapes do not match: out {tuple(out_acc.shape)} += {tuple(out_blk.shape)}, "
                         f"lse {tuple(lse_acc.shape)} += {tuple(lse_blk.shape)}")
    new_lse = torch.logaddexp(lse_acc, lse_blk.to(lse_acc.dtype))
    shift = new_lse.masked_fill(new_lse == -math.inf, 0.0)
    weight_acc = torch.exp(lse_acc - shift).unsqueeze(-1)
    weight_blk = torch.exp(lse_blk - shift).unsqueeze(-1)
    out_acc.mul_(weight_acc).addcmul_(out_blk, weight_blk)
    lse_acc.copy_(new_lse)


def start_accumulator(out_blk: torch.Tensor, lse_blk: torch.Tensor, *, lse_shape: tuple[int, ...],
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators initialised from the first block (a copy, no merge): out like ``out_blk``, lse ``lse_shape``.

    ``out_blk`` ``[B, n, H, D]`` (any strides) -> contiguous accumulator; ``lse_blk`` ``[B, H, n]``.
    """
    dtype = accumulator_dtype(out_blk.dtype)
    out_acc = torch.empty(out_blk.shape, dtype=dtype, device=out_blk.device)
    out_acc.copy_(out_blk)
    lse_acc = torch.empty(lse_shape, dtype=dtype, device=lse_blk.device)
    lse_acc.copy_(lse_blk)
    return out_acc, lse_acc
