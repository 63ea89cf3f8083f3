"""Sequence-tiled MLP: the FFN runs ``tile_rows`` local tokens at a time and is recomputed per tile
in backward, so only one tile's FFN-wide activations exist at any time.

Long-context recipes (Arctic Long Sequence Training's ``TiledMLP``, Bekman et al. 2025,
arXiv:2506.13996) tile the token-wise MLP over the sequence: its intermediate activations
(gate, up, their product: 3·T·F·e saved by an untiled SwiGLU) are the largest per-block tensors
once attention is ring-sharded. ``tiled_mlp(x, mlp, tile_rows)`` is exact (the MLP is token-wise;
only the summation order of the weight gradients over tiles changes).

Memory plan (T = B·n local tokens, t_r = ``tile_rows``, E width, F FFN width, e activation bytes):

* forward (every tile under ``no_grad``): the output ``[T, E]`` is allocated once and each tile's
  down projection writes its rows in place; per tile gate and up t_r·F·e each, silu and the
  product computed in place into the gate. Saved for backward: the input x only (the MLP norm's
  output, which an untiled MLP saves too). Nothing FFN-wide outlives a tile.
* backward: the input gradient ``[T, E]`` is allocated once; per tile the untiled MLP
  (``mlp.dense``) is recomputed with grad on a detached view of x's rows and back-propagated with
  the tile's rows of the incoming gradient (``torch.autograd.backward``): the weight gradients
  accumulate into ``.grad`` (the first tile's are stored, later tiles' are added in place), the
  tile's input gradient is copied into its rows. Alive inside a tile: as an untiled SwiGLU
  backward on t_r rows, plus the recomputed tile output t_r·E·e.

The weights are read from ``mlp`` at call time (not saved): under FSDP2 the block's parameters are
gathered again before its backward, and the gradients land in the gathered parameters' ``.grad``
before the block's input gradient exists (FSDP2's post-backward hook).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_tile_rows(tile_rows: int) -> None:
    """``ValueError`` unless ``tile_rows`` is a positive integer."""
    if isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows <= 0:
        raise ValueError(f"an MLP tile must be a positive number of tokens, got {tile_rows!r}")


@torch.no_grad()
def swiglu_rows_into(mlp: nn.Module, rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` ← down(silu(gate(rows)) · up(rows)) for ``rows`` ``[t, E]``, without grad; silu and the
    product are computed in place, the down projection writes into ``out`` ``[t, E]`` (contiguous)."""
    gate = F.linear(rows, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(rows, mlp.up_proj.weight, mlp.up_proj.bias)
    product = F.silu(gate, inplace=True).mul_(up)
    del up
    down = mlp.down_proj
    if down.bias is None:
        torch.mm(product, down.weight.t(), out=out)
    else:
        torch.addmm(down.bias, product, down.weight.t(), out=out)


def tiled_forward(x: torch.Tensor, mlp: nn.Module, tile_rows: int) -> torch.Tensor:
    """The MLP of ``x`` ``[..., E]`` without grad, ``tile_rows`` rows at a time into one output."""
    rows = x.reshape(-1, x.shape[-1])
    out = x.new_empty(rows.shape[0], mlp.down_proj.out_features)
    for start in range(0, rows.shape[0], tile_rows):
        swiglu_rows_into(mlp, rows[start:start + tile_rows], out[start:start + tile_rows])
    return out.view(*x.shape[:-1], out.shape[-1])


class _TiledMLP(torch.autograd.Function):
    """See the module docstring; ``mlp`` provides ``gate_proj``/``up_proj``/``down_proj`` and ``dense``."""

    @staticmethod
    def forward(ctx, x, mlp, tile_rows):
        ctx.mlp, ctx.tile_rows = mlp, tile_rows
        ctx.save_for_backward(x)
        return tiled_forward(x, mlp, tile_rows)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(rows)
        for start in range(0, rows.shape[0], ctx.tile_rows):
            stop = start + ctx.tile_rows
            tile = rows[start:stop].detach().requires_grad_()
            with torch.enable_grad():
                torch.autograd.backward(ctx.mlp.dense(tile), grads[start:stop])
            grad_x[start:stop].copy_(tile.grad)
            tile.grad = None
        return grad_x.view(x.shape), None, None


def tiled_mlp(x: torch.Tensor, mlp: nn.Module, tile_rows: int) -> torch.Tensor:
    """``mlp.dense(x)`` computed ``tile_rows`` rows of ``x.reshape(-1, E)`` at a time, recomputed per
    tile in backward (module docstring). A last tile shorter than ``tile_rows`` is allowed."""
    check_tile_rows(tile_rows)
    if not torch.is_grad_enabled():
        return tiled_forward(x, mlp, tile_rows)
    if not x.requires_grad and any(p.requires_grad for p in mlp.parameters()):
        raise ValueError("a tiled MLP back-propagates through its input: its input must require grad "
                         "when its weights do")
    return _TiledMLP.apply(x, mlp, tile_rows)
