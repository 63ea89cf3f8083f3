"""Local block kernels that RETURN the log-sum-exp, and their backwards with a GLOBAL (out, lse).

Every block function takes the runtime layout ``[B, n, H, D]`` and hands the aten SDPA ops
transposed VIEWS ``[B, H, n, D]`` (no copies; all ops accept a unit last-dim stride). Results:
``out`` ``[B, n_q, H, D]`` in the input dtype (a view of the kernel's BSHD output) and ``lse``
``[B, H, n_q]`` fp32, natural log, scale included. The backward takes the merged (global) out
and lse of the whole ring, as ring-flash-attention does, so its dq/dk/dv are the exact
contributions of this block to the full gradient.

GQA: when ``H != H_kv`` the K/V heads are expanded right before the kernel (``repeat_interleave``,
query head h uses KV head h // (H/H_kv), as ``F.scaled_dot_product_attention(enable_gqa=True)``)
and dk/dv are summed back over each group in fp32 -- unless a one-time probe shows the op
itself takes ``H != H_kv`` and gives the same result (``native_gqa``).
"""

from __future__ import annotations

import functools
import math

import torch

from ringplan_runtime import _compat

aten = torch.ops.aten
LSE_ALIGN_EFFICIENT = 32  # the memory-efficient kernel pads its LSE along S to a multiple of 32


def _bhsd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def _cpu_forward(q, k, v, causal, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(*_bhsd(q, k, v), 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_bhsd(dout, q, k, v, out), lse, 0.0, causal, scale=scale)
    return _bhsd(*grads)


def _cudnn_forward(q, k, v, causal, scale):
    res = aten._scaled_dot_product_cudnn_attention(*_bhsd(q, k, v), None, True, 0.0, causal, False, scale=scale)
    _compat.record_cudnn_lse(res[1])
    _compat.record_rng_state("cudnn", res[6], res[7])
    return res[0].transpose(1, 2), res[1].reshape(q.shape[0], q.shape[2], q.shape[1])


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    seed, offset = _compat.rng_placeholders("cudnn", q.device)
    grads = aten._scaled_dot_product_cudnn_attention_backward(
        *_bhsd(dout, q, k, v, out), _compat.cudnn_lse_for_backward(lse), seed, offset,
        None, None, None, q.shape[1], k.shape[1], 0.0, causal, scale=scale)
    return _bhsd(*grads[:3])


def _flash_forward(q, k, v, causal, scale):
    res = aten._scaled_dot_product_flash_attention(*_bhsd(q, k, v), 0.0, causal, False, scale=scale)
    _compat.record_rng_state("flash", res[6], res[7])
    return res[0].transpose(1, 2), res[1]


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    seed, offset = _compat.rng_placeholders("flash", q.device)
    grads = aten._scaled_dot_product_flash_attention_backward(
        *_bhsd(dout, q, k, v, out), lse, None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset,
        scale=scale)
    return _bhsd(*grads[:3])


def _efficient_forward(q, k, v, causal, scale):
    res = aten._scaled_dot_product_efficient_attention(*_bhsd(q, k, v), None, True, 0.0, causal, scale=scale)
    _compat.record_rng_state("efficient", res[2], res[3])
    return res[0].transpose(1, 2), res[1][..., : q.shape[1]]


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    batch, n_q, heads = q.shape[0], q.shape[1], q.shape[2]
    padded = lse.new_zeros(batch, heads, -(-n_q // LSE_ALIGN_EFFICIENT) * LSE_ALIGN_EFFICIENT)
    padded[..., :n_q].copy_(lse)
    seed, offset = _compat.rng_placeholders("efficient", q.device)
    grads = aten._scaled_dot_product_efficient_attention_backward(
        *_bhsd(dout, q, k, v), None, out.transpose(1, 2), padded, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale)
    return _bhsd(*grads[:3])


def _math_scores(q, k, causal, scale):
    """Scores ``[B, H, n_q, n_k]`` in at least fp32; causal masks key j > query i (n_q == n_k)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.transpose(1, 2).to(compute), k.transpose(1, 2).to(compute).transpose(-1, -2))
    scores.mul_(scale)
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(mask, -math.inf)
    return scores


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    safe = lse.masked_fill(lse == -math.inf, 0.0)
    return torch.exp(scores - safe.unsqueeze(-1))


def _math_forward(q, k, v, causal, scale):
    scores = _math_scores(q, k, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(_probabilities(scores, lse), v.transpose(1, 2).to(scores.dtype))
    return out.transpose(1, 2).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    """Flash-attention backward formula: P = exp(S - lse); dS = P * (dO Vᵀ - rowsum(dO * O))."""
    scores = _math_scores(q, k, causal, scale)
    prob = _probabilities(scores, lse.to(scores.dtype))
    d_out = dout.transpose(1, 2).to(scores.dtype)
    dv = torch.matmul(prob.transpose(-1, -2), d_out)
    delta = (d_out * out.transpose(1, 2).to(scores.dtype)).sum(-1, keepdim=True)
    d_scores = prob * (torch.matmul(d_out, v.transpose(1, 2).to(scores.dtype).transpose(-1, -2)) - delta)
    dq = torch.matmul(d_scores, k.transpose(1, 2).to(scores.dtype)) * scale
    dk = torch.matmul(d_scores.transpose(-1, -2), q.transpose(1, 2).to(scores.dtype)) * scale
    return [g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v))]


FORWARD = {"cpu": _cpu_forward, "cudnn": _cudnn_forward, "flash": _flash_forward,
           "efficient": _efficient_forward, "math": _math_forward}
BACKWARD = {"cpu": _cpu_backward, "cudnn": _cudnn_backward, "flash": _flash_backward,
            "efficient": _efficient_backward, "math": _math_backward}


def _check_block(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")


def _expanded(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    return tensor.repeat_interleave(groups, dim=2)


def _group_sum(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """dK of expanded heads ``[B, n, H, D]`` summed per KV head -> ``[B, n, H_kv, D]`` fp32."""
    return grad.unflatten(2, (grad.shape[2] // groups, groups)).sum(3, dtype=torch.float32)


def _probe_inputs(device: str, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(1, 16, heads, 16, generator=gen).to(device=device, dtype=dtype) for heads in (2, 1, 1, 2)]


@functools.cache
def native_gqa(backend: str, device: str, dtype: torch.dtype, direction: str = "forward") -> bool:
    """Whether ``backend``'s ``direction`` ('forward'/'backward') takes ``H != H_kv`` itself, matching expansion.

    Probed once per (backend, device, dtype, direction) on a 2-query-head / 1-KV-head block of 16 tokens;
    any exception or mismatch means no (the runtime then expands K/V heads).
    """
    if backend == "math":
        return False
    q, k, v, dout = _probe_inputs(device, dtype)
    scale, tol = 0.25, (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5)
    try:
        out_ref, lse_ref = FORWARD[backend](q, _expanded(k, 2), _expanded(v, 2), False, scale)
        if direction == "forward":
            out, lse = FORWARD[backend](q, k, v, False, scale)
            pairs = [(out, out_ref), (lse, lse_ref)]
        else:
            lse_ref = lse_ref.contiguous()
            grads = BACKWARD[backend](dout, q, k, v, out_ref, lse_ref, False, scale)
            ref = BACKWARD[backend](dout, q, _expanded(k, 2), _expanded(v, 2), out_ref, lse_ref, False, scale)
            pairs = [(grads[0], ref[0]), (grads[1], _group_sum(ref[1], 2)), (grads[2], _group_sum(ref[2], 2))]
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in pairs)


def _needs_expansion(backend: str, q: torch.Tensor, k: torch.Tensor, direction: str) -> int:
    groups = q.shape[2] // k.shape[2]
    if groups == 1 or native_gqa(backend, str(q.device), q.dtype, direction):
        return 1
    return groups


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block: q ``[B, n_q, H, D]``, k/v ``[B, n_k, H_kv, D]``.

    Returns ``out`` ``[B, n_q, H, D]`` (q's dtype, possibly a strided view) and ``lse`` ``[B, H, n_q]`` fp32.
    ``causal`` masks key j > query i and needs n_q == n_k. ``backend`` must come from ``select_backend``.
    """
    _check_block(q, k, causal)
    groups = _needs_expansion(backend, q, k, "forward")
    if groups > 1:
        k, v = _expanded(k, groups), _expanded(v, groups)
    return FORWARD[backend](q, k, v, causal, scale)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, backend: str, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the GLOBAL ``out`` ``[B, n_q, H, D]`` and ``lse`` ``[B, H, n_q]``.

    Returns dq ``[B, n_q, H, D]``, dk/dv ``[B, n_k, H_kv, D]`` (the kernel's dtype, fp32 after a GQA
    group sum). ``dout`` is given out's strides (the cuDNN backward requires it); ``lse`` is made
    contiguous (the cuDNN graph cache does not key on its strides).
    """
    _check_block(q, k, causal)
    if dout.stride() != out.stride():
        dout, out = dout.contiguous(), out.contiguous()
    lse = lse.contiguous()
    groups = _needs_expansion(backend, q, k, "backward")
    if groups == 1:
        dq, dk, dv = BACKWARD[backend](dout, q, k, v, out, lse, causal, scale)
        return dq, dk, dv
    dq, dk, dv = BACKWARD[backend](dout, q, _expanded(k, groups), _expanded(v, groups), out, lse, causal, scale)
    return dq, _group_sum(dk, groups), _group_sum(dv, groups)
