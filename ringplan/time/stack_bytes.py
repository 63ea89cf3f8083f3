"""HBM bytes of a transformer stack's memory-bound kernels, per token or per parameter, as the
runtime's eager ops run them (``ringplan_runtime.transformer``): RMSNorm, RoPE, the MLP activation,
residual adds, the fp32 cross-entropy and the foreach AdamW step.

The whole-model step time (``stack_time``) turns these bytes into seconds at the elementwise HBM
rate (``kernels.ELEMENTWISE_HBM_EFFICIENCY`` × catalog bandwidth). Pure Python: no numpy.
"""

from __future__ import annotations

from ringplan import models as mdl
from ringplan.units import FP32_BYTES

#: HBM bytes per fp32 parameter of one ``torch.optim.AdamW(foreach=True)`` step, counted from
#: ``torch.optim.adam._multi_tensor_adam`` (decoupled weight decay, not capturable): mul_ (param,
#: 8), lerp_ (m, grad → m, 12), mul_ (v, 8), addcmul_ (v, grad → v, 12), sqrt (v → tmp, 8), div_
#: (tmp, 8), add_ (tmp, 8), addcdiv_ (param, m, tmp → param, 16).
ADAMW_FOREACH_BYTES_PER_PARAM = 80


def rms_norm_bytes(dtype_bytes: int) -> tuple[float, float]:
    """(forward, backward) HBM bytes per normalised value of the runtime's eager RMSNorm
    (``ringplan_runtime.transformer._RMSNorm``), e bytes per activation value, fp32 inside.

    Forward: x.float() (e + 4), pow(2) (8), mean (4), x32·rstd (8), .to(e) (4 + e), weight· (2e)
    = 28 + 4e. Backward: x.float() (e + 4), xhat (8), grad.float() (e + 4), grad·xhat (12) and its sum
    over rows (4), g = grad·w (8), g·xhat (12) and its mean (4), xhat·mean (8), g − … (12), rstd·…
    (8), .to(e) (4 + e) = 88 + 3e. Ignores the per-row rstd vectors."""
    return 28.0 + 4 * dtype_bytes, 88.0 + 3 * dtype_bytes


def block_op_bytes(model: mdl.ModelSpec, dtype_bytes: int) -> dict[str, tuple[float, float]]:
    """HBM bytes per token of one block's elementwise kernels: name → (forward, backward), as the
    runtime's eager ops run them (``ringplan_runtime.transformer``), e bytes per value.

    norms: two RMSNorms over E (``rms_norm_bytes``); qk_norm: RMSNorm over (H + H_kv)·D values;
    rope: per value of q and k, x·cos (2e), rotate-half (neg of a half, cat: 3e), addcmul_ (3e)
    = 8e; backward grad·cos, grad·sin (4e), rotate (3e), add (3e) = 10e; mlp_act: per value of F,
    silu (2e) and ·up (3e); backward silu (2e), ·silu (3e), ·up (3e), silu_backward (3e) = 11e;
    residual: two adds over E (6e); backward the gradient sums where a tensor has several users
    (x and h: 2 adds; the q/k/v input: 2; the gate/up input: 1 = 5 adds of 3e). GELU models:
    the MLP activation as 2e / 3e per value (not run by the runtime). Ignores the RoPE tables.
    """
    e, qk = model.embed_dim, (model.n_heads + model.n_kv_heads) * model.head_dim
    norm = rms_norm_bytes(dtype_bytes)
    act = (5, 11) if model.ffn_type == "swiglu" else (2, 3)
    ops = {"norms": (2 * e * norm[0], 2 * e * norm[1]),
           "rope": (8 * dtype_bytes * qk, 10 * dtype_bytes * qk),
           "mlp_act": (act[0] * dtype_bytes * model.ffn_dim, act[1] * dtype_bytes * model.ffn_dim),
           "residual": (6 * dtype_bytes * e, 15 * dtype_bytes * e)}
    if model.qk_norm:
        ops["qk_norm"] = (qk * norm[0], qk * norm[1])
    return ops


def tp_block_op_bytes(model: mdl.ModelSpec, dtype_bytes: int, tp_degree: int) -> dict[str, tuple[float, float]]:
    """``block_op_bytes`` per local token (B·n rows) on one rank of a tensor-parallel group of T: the
    sequence-parallel regions (both norms, the residual adds, the residual-stream gradient sums of x and h)
    run on ⌈n/T⌉ of the rows, so 1/T of their bytes per token (Korthikanti et al. 2022, Sec. 4.2.2); RoPE
    and the qk norms on the local heads ((H/T + max(1, H_kv/T))·D values), the MLP activation on F/T; the
    gradient sums of the gathered q/k/v and gate/up inputs (3 adds of 3e over E) stay on all rows.
    ``block_op_bytes`` itself at T = 1."""
    if tp_degree == 1:
        return block_op_bytes(model, dtype_bytes)
    t, e = tp_degree, model.embed_dim
    heads = model.n_heads // t + max(1, model.n_kv_heads // t)
    local = block_op_bytes(model, dtype_bytes)
    scale = {"norms": 1 / t, "rope": heads * model.head_dim / ((model.n_heads + model.n_kv_heads) * model.head_dim),
             "mlp_act": 1 / t, "qk_norm": heads / (model.n_heads + model.n_kv_heads)}
    ops = {name: (fwd * scale.get(name, 1.0), bwd * scale.get(name, 1.0)) for name, (fwd, bwd) in local.items()}
    ops["residual"] = (6 * dtype_bytes * e / t, 6 * dtype_bytes * e / t + 9 * dtype_bytes * e)
    return ops


def loss_bytes_per_token(model: mdl.ModelSpec, dtype_bytes: int, tp_degree: int = 1) -> tuple[float, float]:
    """(forward, backward) HBM bytes per token of the runtime's fp32 cross-entropy over V logits
    (``F.cross_entropy(logits.float())``): forward .float() (e + 4), log-softmax (read 4, write 4)
    = 12 + e per logit; backward the one-hot gradient (write 4), log-softmax backward (read 8,
    write 4), cast back (4 + e) = 20 + e. Under tensor parallel T (loss parallel) over the rank's
    ⌈V/T⌉ logits. Ignores the gather of the target logit."""
    v = -(-model.vocab_size // tp_degree)
    return v * (dtype_bytes + 12.0), v * (dtype_bytes + 20.0)


def optimizer_bytes(local_params: float, master_bytes: int) -> float:
    """HBM bytes of one foreach AdamW step over ``local_params`` master parameters:
    ``ADAMW_FOREACH_BYTES_PER_PARAM`` × master bytes / 4 per parameter."""
    return local_params * ADAMW_FOREACH_BYTES_PER_PARAM * master_bytes / FP32_BYTES
