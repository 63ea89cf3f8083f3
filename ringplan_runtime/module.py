"""``RingDilatedAttention``: the seed's module, split BEFORE projection (each rank projects its own tokens).

``forward(x)`` takes the FULL sequence ``[B, S, E]`` (identical on every rank) and slices this
rank's chunk per ``layout`` before the Q/K/V projections; ``forward(x, already_split=True)`` takes
the local chunk ``[B, n, E]`` directly. Either way it returns the local output chunk ``[B, n, E]``.
Projections: separate Q, K, V linears (their outputs are contiguous, so K/V travel the ring
without a copy) of E -> H·D, H_kv·D, H_kv·D, and an output linear H·D -> E.

Weight gradients on each rank cover only its tokens: sum them over the ring before the optimizer
step -- DDP/FSDP over the context-parallel ranks does exactly that; without them, all-reduce
(SUM) the parameter gradients yourself.
"""

from __future__ import annotations

import torch
from torch import nn

from ringplan.workload import LAYOUTS
from ringplan_runtime.dilated import ring_dilated_attention
from ringplan_runtime.layouts import shard_sequence
from ringplan_runtime.ring_attention import ring_attention, ring_members


class RingDilatedAttention(nn.Module):
    """Multi-head (GQA) attention over a context-parallel ring; dilated when ``segment_lengths`` is given."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, segment_lengths=(),
                 dilation_rates=(), *, causal: bool = False, bias: bool = True, layout: str = "contiguous",
                 group=None, backend: str = "auto", hilbert: bool = False, check_consistency: bool = True) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or num_kv_heads <= 0:
            raise ValueError(f"embed_dim, num_heads, num_kv_heads must be positive, got "
                             f"{embed_dim}, {num_heads}, {num_kv_heads}")
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}, and num_heads "
                             f"a multiple of num_kv_heads {num_kv_heads}")
        if len(tuple(segment_lengths)) != len(tuple(dilation_rates)):
            raise ValueError(f"segment_lengths {list(segment_lengths)} and dilation_rates {list(dilation_rates)} "
                             f"must have the same length")
        if hilbert and not tuple(segment_lengths):
            raise ValueError("hilbert ordering applies to dilated segments: give segment_lengths or hilbert=False")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
        if tuple(segment_lengths) and layout != "contiguous":
            raise ValueError(f"dilated attention runs on the contiguous layout only, got layout={layout!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.segment_lengths, self.dilation_rates = tuple(segment_lengths), tuple(dilation_rates)
        self.causal, self.layout, self.group, self.backend, self.hilbert = causal, layout, group, backend, hilbert
        self.check_consistency = check_consistency  # compare the ranks' inputs before each call's exchange
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)

    def local_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of the full sequence ``x`` ``[B, S, E]`` (per ``layout``)."""
        ranks, index = ring_members(self.group)
        return shard_sequence(x, rank=index, ring_size=len(ranks), layout=self.layout, dim=1)

    def forward(self, x: torch.Tensor, *, already_split: bool = False) -> torch.Tensor:
        """Local output chunk ``[B, n, E]`` from the full ``x`` (or the local chunk when ``already_split``)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [batch, tokens, {self.embed_dim}], got {tuple(x.shape)}")
        local = x if already_split else self.local_chunk(x)
        batch, n, _ = local.shape
        q = self.q_proj(local).view(batch, n, self.num_heads, self.head_dim)
        k = self.k_proj(local).view(batch, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(local).view(batch, n, self.num_kv_heads, self.head_dim)
        if self.segment_lengths:
            out = ring_dilated_attention(q, k, v, segment_lengths=self.segment_lengths,
                                         dilation_rates=self.dilation_rates, group=self.group, causal=self.causal,
                                         backend=self.backend, hilbert=self.hilbert,
                                         check_consistency=self.check_consistency)
        else:
            out = ring_attention(q, k, v, group=self.group, causal=self.causal, layout=self.layout,
                                 backend=self.backend, check_consistency=self.check_consistency)
        return self.out_proj(out.reshape(batch, n, self.num_heads * self.head_dim))
