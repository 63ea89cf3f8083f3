"""Version shims, in one place: everything that differs between torch releases lives here.

The runtime is written against torch 2.13 (CPU, CI) and torch 2.11 (the lent H100 machines).
What differs, or may differ, between builds:

- the log-sum-exp of ``aten._scaled_dot_product_cudnn_attention`` is ``[B, H, S]`` in some
  builds and ``[B, H, S, 1]`` in others (the meta kernel says ``[B, H, S, 1]``): the forward
  records the rank it saw and the backward hands the LSE back with that rank
  (``cudnn_lse_for_backward``);
- the philox seed/offset tensors the fused backward ops require (unused without dropout):
  the last pair a forward returned is reused, else empty int64 tensors (``rng_placeholders``);
- ``dist.P2POp`` gained ``group_peer`` in 2.6; the runtime passes global ranks as ``peer``,
  which every version accepts (``p2p_op``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_CUDNN_LSE_NDIM: dict[str, int] = {}
_RNG_STATE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def aten_op(name: str):
    """The ``torch.ops.aten`` overload packet ``name``, or ``None`` when this build lacks it."""
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


def record_cudnn_lse(lse: torch.Tensor) -> None:
    """Remember the rank of the LSE the cuDNN forward returned (3 or 4, see module docstring)."""
    _CUDNN_LSE_NDIM["cudnn"] = lse.dim()


def cudnn_lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` ``[B, H, S]`` (contiguous fp32) shaped as the cuDNN forward returned it."""
    if _CUDNN_LSE_NDIM.get("cudnn", 4) == 4:
        return lse.unsqueeze(-1)
    return lse


def record_rng_state(backend: str, seed: torch.Tensor, offset: torch.Tensor) -> None:
    """Keep the philox seed/offset a fused forward returned, for the matching backward."""
    if isinstance(seed, torch.Tensor) and isinstance(offset, torch.Tensor):
        _RNG_STATE[(backend, str(seed.device))] = (seed, offset)


def rng_placeholders(backend: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox seed/offset to pass to a fused backward without dropout (values are never read)."""
    for (name, _), pair in _RNG_STATE.items():
        if name == backend:
            return pair
    empty = torch.empty((), dtype=torch.int64, device=device)
    return empty, empty


def p2p_op(op, tensor: torch.Tensor, peer_global_rank: int, group, tag: int) -> dist.P2POp:
    """A point-to-point op addressed by the peer's GLOBAL rank (valid for any group)."""
    return dist.P2POp(op, tensor, peer_global_rank, group, tag)


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` in group-rank order (``group=None``: the default group)."""
    if group is None or group is dist.GroupMember.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))
