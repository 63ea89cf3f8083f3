"""Model-state terms of a whole transformer stack (θ = 1): the parameter shapes of each FSDP2 unit,
the ZeRO / FSDP2 model states (master weights, weight copies, AdamW states, gradients, the AdamW
step's temporaries), gathered units and unsharded gradients, and FSDP2's state while a unit runs its
backward. ``ringplan.memory.stack_terms`` combines them with the activations into the peak instants.

Notation as ``ringplan.memory.stack_terms``: G sharding group, Ψ parameters, Ψ_G those one rank holds,
e bytes of the compute dtype, e_m of the master dtype. The runtime runs FSDP2 (``zero3`` over G, or
``none`` as G = 1); ZeRO-1/2 are planned from the ZeRO paper (Rajbhandari et al. 2020), not run.

Tensor parallelism (T = ``tp_degree`` > 1): every shape is one TP rank's (``tp_terms.tp_local_param_shapes``:
H/T heads, max(1, H_kv/T) KV heads, F/T FFN columns, ⌈V/T⌉ vocabulary rows, norms replicated), Ψ is the
TP rank's parameter count, and FSDP2 / ZeRO shard it over G (the ranks of the same TP coordinate).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ringplan.memory.tp_terms import (local_ffn_dim, local_heads, local_kv_heads, local_vocab, sequence_shard_tokens,
                                     tp_local_param_shapes)
from ringplan.stack import StackWorkload, shard_group_size, tokens_per_rank
from ringplan.workload import DTYPE_BYTES

#: ZeRO stages of the ZeRO paper (Rajbhandari et al. 2020, Fig. 1): none, P_os, P_os+g, P_os+g+p.
ZERO_STAGES = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3}


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True, slots=True, kw_only=True)
class StackShape:
    """The evaluation point: every size a formula reads, from a validated ``StackWorkload``. H, H_kv, F and V
    are one tensor-parallel rank's (H/T, max(1, H_kv/T), F/T, ⌈V/T⌉; the model's at ``tp`` = 1); ``n_sp``
    the tokens per sequence in a sequence-parallel region, ⌈n/T⌉."""

    batch: int
    n: int
    E: int
    H: int
    H_kv: int
    D: int
    F: int
    V: int
    L: int
    e: int
    e_m: int
    G: int
    P: int
    tp: int = 1
    n_sp: int = 0

    @property
    def T(self) -> int:
        """Local tokens B·n (all-gathered over the TP group inside its tensor-parallel regions)."""
        return self.batch * self.n

    @property
    def T_sp(self) -> int:
        """Local tokens of a sequence-parallel region: B·⌈n/T⌉ (B·n at T = 1)."""
        return self.batch * self.n_sp


@functools.lru_cache(maxsize=512)
def stack_shape(w: StackWorkload) -> StackShape:
    m, s = w.model, w.settings
    return StackShape(batch=w.batch, n=tokens_per_rank(w), E=m.embed_dim, H=local_heads(w), H_kv=local_kv_heads(w),
                      D=m.head_dim, F=local_ffn_dim(w), V=local_vocab(w), L=m.n_layers, e=DTYPE_BYTES[s.param_dtype],
                      e_m=DTYPE_BYTES[s.master_dtype], G=shard_group_size(w), P=w.layout.ring_size, tp=w.tp_degree,
                      n_sp=sequence_shard_tokens(w))


def mlp_tile_rows(w: StackWorkload) -> int | None:
    """Local tokens in one MLP tile, B·t (t = ``mlp_tile_tokens`` of each sequence), or None when
    the MLP is not tiled."""
    t = w.settings.mlp_tile_tokens
    return None if t is None else w.batch * t


def mlp_tiles(w: StackWorkload) -> int:
    """MLP tiles per block, n / t (``StackWorkload`` checks that t divides n); 1 when not tiled."""
    t = w.settings.mlp_tile_tokens
    return 1 if t is None else tokens_per_rank(w) // t


def block_param_shapes(w: StackWorkload) -> list[tuple[int, int]]:
    """(rows, columns) of every parameter of one block (vectors have 1 column), as FSDP2 shards
    them along rows: q/k/v/o (+ biases), qk norms, two RMSNorms, gate/up/down (+ biases). One TP rank's
    (``tp_terms.tp_local_param_shapes``) at T > 1."""
    if w.tp_degree > 1:
        return list(tp_local_param_shapes(w)["block"])
    m = w.model
    shapes = [(m.q_dim, m.embed_dim), (m.kv_dim, m.embed_dim), (m.kv_dim, m.embed_dim), (m.embed_dim, m.q_dim),
              (m.embed_dim, 1), (m.embed_dim, 1)]
    shapes += [(m.ffn_dim, m.embed_dim)] * (2 if m.ffn_type == "swiglu" else 1) + [(m.embed_dim, m.ffn_dim)]
    if m.qkv_bias:
        shapes += [(m.q_dim, 1), (m.kv_dim, 1), (m.kv_dim, 1)]
    if m.out_bias:
        shapes.append((m.embed_dim, 1))
    if m.qk_norm:
        shapes += [(m.head_dim, 1), (m.head_dim, 1)]
    if m.mlp_bias:
        shapes += [(m.ffn_dim, 1)] * (2 if m.ffn_type == "swiglu" else 1) + [(m.embed_dim, 1)]
    if m.norm == "layernorm":
        shapes += [(m.embed_dim, 1), (m.embed_dim, 1)]
    return shapes


def unit_param_shapes(w: StackWorkload) -> dict[str, list[tuple[int, int]]]:
    """Parameters of each FSDP2 unit of the runtime: ``block`` (one of L), ``embed`` (the token
    table, plus learned positions; the head too when tied), ``head`` (untied LM head), ``root``
    (final norm)."""
    return {name: list(shapes) for name, shapes in unit_shapes(w).items()}


def unit_shapes_upto(w: StackWorkload, stage: str) -> list[tuple[int, int]]:
    """Parameters of one block whose gradients exist once its backward has reached ``stage``
    (backward order: down; gate, up, post-attention norm; output projection; the rest).
    ``mlp_weights``: every MLP weight (a tiled MLP's backward from its second tile on)."""
    m, shapes, f = w.model, block_param_shapes(w), local_ffn_dim(w)
    down = [(m.embed_dim, f)] + ([(m.embed_dim, 1)] if m.mlp_bias else [])
    if stage == "mlp":
        return down
    n_in = 2 if m.ffn_type == "swiglu" else 1
    ffn = down + [(f, m.embed_dim)] * n_in + ([(f, 1)] * n_in if m.mlp_bias else [])
    if stage == "mlp_weights":
        return ffn
    mlp = ffn + [(m.embed_dim, 1)]
    if stage == "norm2":
        return mlp
    if stage == "attention":
        return mlp + [(m.embed_dim, local_heads(w) * m.head_dim)] + ([(m.embed_dim, 1)] if m.out_bias else [])
    return shapes


@functools.lru_cache(maxsize=512)
def unit_shapes(w: StackWorkload) -> dict[str, tuple[tuple[int, int], ...]]:
    """``unit_param_shapes`` as tuples, cached per workload (the terms ask for them at every instant)."""
    if w.tp_degree > 1:
        return tp_local_param_shapes(w)
    m = w.model
    embed = [(m.vocab_size, m.embed_dim)] + ([(m.max_positions, m.embed_dim)] if m.position == "learned" else [])
    root = [(m.embed_dim, 1)] * (2 if m.norm == "layernorm" else 1)
    return {"block": tuple(block_param_shapes(w)), "embed": tuple(embed),
            "head": () if m.tied_embeddings else ((m.vocab_size, m.embed_dim),), "root": tuple(root)}


def shard_elements(shapes, group: int) -> int:
    """Elements of one rank's shards: Σ ⌈rows/G⌉·columns (FSDP2 pads rows to a multiple of G;
    the largest shard, rank 0's, is the one that decides the peak)."""
    return sum(-(-rows // group) * cols for rows, cols in shapes)


def padded_elements(shapes, group: int) -> int:
    """Elements of the unsharded (gathered) unit: Σ ⌈rows/G⌉·G·columns."""
    return shard_elements(shapes, group) * group


@functools.lru_cache(maxsize=512)
def rank_param_elements(w: StackWorkload) -> int:
    """Ψ_G: parameter elements one rank holds, Σ over units of ``shard_elements`` (L blocks)."""
    units, g = unit_shapes(w), stack_shape(w).G
    return w.model.n_layers * shard_elements(units["block"], g) + sum(
        shard_elements(units[name], g) for name in ("embed", "head", "root"))


# ----------------------------------------------------------------------------- model states (ZeRO)


def zero_state_bytes(psi: float, *, stage: int, n_d: int, param_bytes: float, grad_bytes: float,
                     optimizer_bytes: float) -> dict[str, float]:
    """Per-GPU model states of data-parallel mixed-precision training, ZeRO paper (Rajbhandari et
    al. 2020, Sec. 5 and Fig. 1): parameters ``param_bytes``·Ψ, gradients ``grad_bytes``·Ψ and
    optimizer states K·Ψ (``optimizer_bytes`` = K; 12 for mixed-precision Adam: fp32 master, m, v),
    each divided by N_d once partitioned: stage 1 (P_os) the optimizer states, stage 2 (P_os+g) also
    the gradients, stage 3 (P_os+g+p) also the parameters. Ψ = 7.5B, N_d = 64, (2, 2, 12): 120 GB,
    31.4 GB, 16.6 GB, 1.9 GB. Ignores: buffers, activations, fragmentation."""
    if stage not in (0, 1, 2, 3) or n_d < 1:
        raise ValueError(f"ZeRO stage must be 0-3 and N_d >= 1, got stage {stage!r}, N_d {n_d!r}")
    return {"params_bytes": param_bytes * psi / (n_d if stage >= 3 else 1),
            "grads_bytes": grad_bytes * psi / (n_d if stage >= 2 else 1),
            "optimizer_bytes": optimizer_bytes * psi / (n_d if stage >= 1 else 1)}


def runs_fsdp(w: StackWorkload) -> bool:
    """The runtime's own path: FSDP2 (zero3 over G, or none = G of 1), fp32 master = the parameters.
    Every sharding over a group of one GPU is that path too: with nothing to partition, ZeRO-1/2 at
    G = 1 would only add a second copy of the weights and gradients that no one needs (issue 17:
    "define W = 1 consistently" — every sharding at one GPU is one plan)."""
    return w.settings.sharding in ("zero3", "none") or shard_group_size(w) == 1


def master_params_bytes(w: StackWorkload) -> float:
    """Master weights in the master dtype. FSDP2 (zero3; none = G 1): Ψ_G·e_m (the sharded fp32
    parameters are the master; ``rank_param_elements``). ZeRO-1/2 (planned, not run): the fp32 master
    is part of the partitioned optimizer states, e_m·Ψ/G (ZeRO paper, K = 12 = master + m + v).
    Training only (forward-only weights are ``param_copy_bytes``)."""
    if not w.training:
        return 0.0
    if runs_fsdp(w):
        return float(rank_param_elements(w) * stack_shape(w).e_m)
    return zero_state_bytes(_psi(w), stage=1, n_d=shard_group_size(w), param_bytes=0, grad_bytes=0,
                            optimizer_bytes=stack_shape(w).e_m)["optimizer_bytes"]


def param_copy_bytes(w: StackWorkload) -> float:
    """Replicated weights in the compute dtype: forward only Ψ·e (the runtime's replicated weights);
    ZeRO-1/2 training e·Ψ (the paper's fp16 parameters; 0 when e = e_m: the master is used). FSDP2
    training keeps none (gathered per unit: ``gathered_params_bytes``)."""
    s = stack_shape(w)
    if not w.training:
        return float(_psi(w) * s.e)
    if runs_fsdp(w) or s.e == s.e_m:
        return 0.0
    return float(_psi(w) * s.e)


def optimizer_states_bytes(w: StackWorkload) -> float:
    """AdamW m and v in the master dtype: 2·Ψ_G·e_m under FSDP2 (each a zeros_like of the local
    shard), 2·e_m·Ψ/G under ZeRO-1/2 (paper: partitioned from stage 1). Training only."""
    if not w.training:
        return 0.0
    if runs_fsdp(w):
        return float(2 * rank_param_elements(w) * stack_shape(w).e_m)
    return 2.0 * stack_shape(w).e_m * _psi(w) / shard_group_size(w)


def gradients_bytes(w: StackWorkload, *, reduced_elements: int | None = None) -> float:
    """Reduced gradients in the master dtype (FSDP2: reduce-scatter output, fp32 reduce_dtype):
    Ψ_G·e_m once every unit has been reduced (optimizer step), else the units reduced so far
    (``reduced_elements``). ZeRO-1/2 (planned, not run): the gradients of the e-byte weights, in
    e bytes as in the ZeRO paper (2Ψ in fp16/bf16): ZeRO-1 e·Ψ (not partitioned), ZeRO-2 e·Ψ/G.
    Zero in forward (``zero_grad(set_to_none=True)``)."""
    s = stack_shape(w)
    if runs_fsdp(w):
        elements = rank_param_elements(w) if reduced_elements is None else reduced_elements
        return float(elements * s.e_m)
    stage = ZERO_STAGES[w.settings.sharding]
    return zero_state_bytes(_psi(w), stage=stage, n_d=shard_group_size(w), param_bytes=0, grad_bytes=s.e,
                            optimizer_bytes=0)["grads_bytes"]


def optimizer_step_bytes(w: StackWorkload) -> float:
    """Temporaries of one foreach AdamW step: sqrt(v) for every local parameter, Ψ_G·e_m
    (``torch._foreach_sqrt`` over all of them; m, v and the parameters are updated in place).
    Source: torch.optim.adamw ``_multi_tensor_adamw`` (non-capturable) as the tracker sees it."""
    if runs_fsdp(w):
        return float(rank_param_elements(w) * stack_shape(w).e_m)
    return float(stack_shape(w).e_m * _psi(w) / shard_group_size(w))


@functools.lru_cache(maxsize=512)
def _psi(w: StackWorkload) -> int:
    """Ψ: the model's parameters (T = 1), or one TP rank's (Σ of its local shapes, L blocks)."""
    from ringplan.models import parameter_count

    if w.tp_degree == 1:
        return parameter_count(w.model)
    units = tp_local_param_shapes(w)
    return sum((w.model.n_layers if name == "block" else 1) * sum(r * c for r, c in shapes)
               for name, shapes in units.items())


# ----------------------------------------------------------------------------- FSDP2 units


def gathered_unit_bytes(w: StackWorkload, unit: str) -> float:
    """One unit's unsharded parameters in the compute dtype: Σ ⌈rows/G⌉·G·columns·e (FSDP2's
    all-gather outputs, padded rows included). Zero outside FSDP2 training."""
    if not (w.training and runs_fsdp(w)):
        return 0.0
    return float(padded_elements(unit_shapes(w)[unit], stack_shape(w).G) * stack_shape(w).e)


def unit_grad_bytes(w: StackWorkload, shapes) -> float:
    """Unsharded gradients of some of a unit's parameters in the compute dtype (autograd writes them
    into the gathered bf16 parameters' ``.grad`` before FSDP2 reduce-scatters): Σ rows·columns·e."""
    return float(sum(rows * cols for rows, cols in shapes) * stack_shape(w).e)


def fsdp_state_at(w: StackWorkload, position: str, index: int = 0) -> dict[str, float]:
    """FSDP2 state while ``position`` (``loss``, ``final_norm``, ``block`` ``index``, ``embed``) runs
    its backward (backward order: head, final norm, blocks L-1 … 0, embedding):

    * gathered: the running unit in the compute dtype (a tied table stays gathered from the loss to
      the embedding's backward: one FSDP group for the embedding and the head), the final norm's
      unit from the loss on, and, over G > 1 ranks, the all-gather output of the unit prefetched
      next (FSDP2 backward prefetch; over one rank the copy waits for the unit's own turn);
    * reduced gradients of the units done (``gradients_bytes``);
    * the last reduce-scatter's fp32 input, kept until the next unit's reduce-scatter (FSDP2
      ``reduce_scatter_states``), and unsharded gradients still waiting (a tied table's, the final
      norm's until the end of backward): ``unit_grads_bytes``.

    Outside FSDP2 (ZeRO-1/2, planned, not run) every gradient is counted whole, as the ZeRO paper
    does, and nothing is gathered."""
    if not runs_fsdp(w):
        return {"gradients_bytes": gradients_bytes(w)}
    s, units, tied = stack_shape(w), unit_shapes(w), w.model.tied_embeddings
    order = ["loss", "final_norm", "block", "embed"]
    if position not in order:
        raise ValueError(f"position must be one of {order}, got {position!r}")
    after_loss, after_norm = position != "loss", position in ("block", "embed")
    done_blocks = (s.L - 1 - index) if position == "block" else (s.L if position == "embed" else 0)
    running = {"loss": "embed" if tied else "head", "final_norm": "root", "block": "block", "embed": "embed"}[position]
    gathered = [running] + (["root"] if position != "final_norm" and after_loss else [])
    if tied and after_loss and running != "embed":
        gathered.append("embed")
    if position == "embed" and s.G > 1 and not tied:
        gathered.append("embed")  # its all-gather output, held after the copy-out (no unit follows)
    nxt = {"loss": "root", "final_norm": "block", "block": "block" if index > 0 else "embed", "embed": None}[position]
    if tied and nxt in ("root", "embed"):
        nxt = None  # tied: the loss prefetches nothing; the table is already gathered for the embedding
    if s.G > 1:
        # over G > 1 ranks: the prefetched unit's all-gather output, and a tied table's, which stays
        # from the loss's all-gather until the embedding's backward
        gathered += ([nxt] if nxt else []) + (["embed"] if tied else [])
    reduced = done_blocks * shard_elements(units["block"], s.G)
    if after_loss and not tied:
        reduced += shard_elements(units["head"], s.G)
    kept = None
    if done_blocks:
        kept = "block"
    elif after_loss and not tied:
        kept = "head"
    waiting = unit_grad_bytes(w, units["embed"]) if tied and after_loss else 0.0
    if after_norm:
        waiting += unit_grad_bytes(w, units["root"])
    kept_bytes = padded_elements(units[kept], s.G) * s.e_m if kept else 0.0
    return {"gathered_params_bytes": sum(gathered_unit_bytes(w, u) for u in gathered),
            "gradients_bytes": float(reduced * s.e_m), "unit_grads_bytes": waiting + kept_bytes}
