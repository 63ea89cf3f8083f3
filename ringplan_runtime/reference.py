"""Dense single-device references, in float64, written from the definitions (no runtime code).

``reference_attention`` is the masked dense form of every pattern the runtime runs: full,
causal, and LongNet dilated (each branch a boolean mask; the branches' keys form one softmax, which
is exactly the LSE merge of torchscale's ``gathering``). Uncovered (head, position) rows give 0.
Differentiable (autograd through float64 ops), so tests take gradients from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dilated_mask(seq_len_tokens: int, heads: int, segment_tokens: int, rate: int, causal: bool,
                 device=None) -> torch.Tensor:
    """Bool ``[H, S, S]``: query i of head h sees key j in branch (segment, rate).

    Same segment; both offsets inside the segment ≡ head h's group (h // (H/rate)) mod rate;
    and j <= i when causal.
    """
    pos = torch.arange(seq_len_tokens, device=device)
    segment, offset = pos // segment_tokens, pos % segment_tokens
    same_segment = segment[:, None] == segment[None, :]
    group_of_head = torch.arange(heads, device=device) // (heads // rate)
    on_group = (offset % rate)[None, :] == group_of_head[:, None]  # [H, S]
    mask = same_segment[None] & on_group[:, :, None] & on_group[:, None, :]
    if causal:
        mask &= pos[None, :, None] >= pos[None, None, :]
    return mask


def pattern_masks(seq_len_tokens: int, heads: int, *, causal: bool, segment_lengths=(), dilation_rates=(),
                  device=None) -> list[torch.Tensor]:
    """One ``[H, S, S]`` mask per branch; a single full (or causal) mask when not dilated."""
    if not segment_lengths:
        return [dilated_mask(seq_len_tokens, heads, seq_len_tokens, 1, causal, device)]
    return [dilated_mask(seq_len_tokens, heads, w, r, causal, device) for w, r in zip(segment_lengths, dilation_rates)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        segment_lengths=(), dilation_rates=(), scale: float | None = None) -> torch.Tensor:
    """Dense attention of full sequences q ``[B, S, H, D]``, k/v ``[B, S, H_kv, D]`` -> ``[B, S, H, D]`` float64.

    One softmax over the concatenation of every branch's masked keys (LongNet/torchscale merge);
    fully masked rows give 0. GQA: query head h uses KV head h // (H / H_kv).
    """
    heads, head_dim = q.shape[2], q.shape[3]
    groups = heads // k.shape[2]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(groups, dim=1), vd.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qd, kd.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(head_dim))
    masks = pattern_masks(q.shape[1], heads, causal=causal, segment_lengths=segment_lengths,
                          dilation_rates=dilation_rates, device=q.device)
    masked = torch.cat([torch.where(m, scores, -math.inf) for m in masks], dim=-1)
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    prob = torch.exp(masked - safe)
    out = torch.matmul(prob, torch.cat([vd] * len(masks), dim=-2))
    return out.transpose(1, 2)


def reference_module_forward(module, x: torch.Tensor) -> torch.Tensor:
    """``RingDilatedAttention``'s math on the FULL sequence ``x`` ``[B, S, E]``, in float64, with its weights."""
    batch, seq, _ = x.shape
    xd = x.double()

    def project(linear, heads):
        bias = None if linear.bias is None else linear.bias.double()
        return F.linear(xd, linear.weight.double(), bias).view(batch, seq, heads, module.head_dim)

    q = project(module.q_proj, module.num_heads)
    k = project(module.k_proj, module.num_kv_heads)
    v = project(module.v_proj, module.num_kv_heads)
    attn = reference_attention(q, k, v, causal=module.causal, segment_lengths=module.segment_lengths,
                               dilation_rates=module.dilation_rates)
    out_bias = None if module.out_proj.bias is None else module.out_proj.bias.double()
    return F.linear(attn.reshape(batch, seq, -1), module.out_proj.weight.double(), out_bias)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ‖actual - expected‖₂ / ‖expected‖₂ (float64; 0 when both are 0)."""
    a, e = actual.detach().double(), expected.detach().double()
    denominator = e.norm().item()
    difference = (a - e).norm().item()
    return difference / denominator if denominator > 0 else difference
