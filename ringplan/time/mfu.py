"""Model FLOPs utilisation (MFU) of a whole-model step: the FLOPs the model needs, not what a plan
runs (recomputation, offload and communication are not counted), over the GPUs' dense peak.

model FLOPs per step = passes × tokens × (2·N_matmul + 2·L·S·q_dim)

with tokens = B·S·DP per step, N_matmul the weights every token multiplies (the blocks' projections and
MLP, and the LM head E·V; norms, biases and the embedding lookup excluded), 2·L·S·q_dim the attention
scores and weighted sum of one token against the S/2 keys a causal query sees on average (2 GEMMs of
2·(S/2)·q_dim FLOPs each per layer), and passes 3 for training (forward + two backward GEMMs) or 1 for
a forward. The convention of PaLM (Chowdhery et al. 2022, appendix B: 6N + 12·L·H·Q·T per token,
halved here for causal attention) and Megatron-LM's MFU.

MFU = model FLOPs / (step seconds × W × peak dense FLOP/s of the compute dtype).
"""

from __future__ import annotations

from ringplan import models as mdl
from ringplan.stack import StackWorkload, data_parallel_size


def matmul_parameters(model: mdl.ModelSpec) -> int:
    """Weights every token multiplies: L × (q, k, v, o and the MLP projections) + the LM head E·V."""
    e, f = model.embed_dim, model.ffn_dim
    mlp = (3 if model.ffn_type == "swiglu" else 2) * e * f
    attention = e * model.q_dim + 2 * e * model.kv_dim + model.q_dim * e
    return model.n_layers * (attention + mlp) + e * model.vocab_size


def model_flops_per_step(w: StackWorkload) -> float:
    """FLOPs the model needs for one step of ``w`` (module docstring), over all W GPUs."""
    m, s = w.model, w.seq_len_tokens
    tokens = w.batch * s * data_parallel_size(w)
    per_token = 2.0 * matmul_parameters(m) + 2.0 * m.n_layers * s * m.q_dim
    return (3.0 if w.training else 1.0) * tokens * per_token


def mfu(w: StackWorkload, step_time_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation of a step of ``step_time_s`` on W GPUs of ``peak_flops_per_s`` each."""
    if not step_time_s > 0 or not peak_flops_per_s > 0:
        raise ValueError(f"step time and peak must be positive, got {step_time_s!r} s and {peak_flops_per_s!r} FLOP/s")
    return model_flops_per_step(w) / (step_time_s * w.world_size * peak_flops_per_s)
