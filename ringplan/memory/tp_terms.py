"""Tensor parallelism (T = ``StackWorkload.tp_degree``) in a whole model's byte terms: what one rank of a
tensor-parallel group holds, as torchtitan's ``parallelize_module`` plan runs Megatron-style TP with
sequence parallelism (SP).

The plan (torchtitan ``parallelize_llama`` / ``apply_tp``; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Sec. 4.2.2, for the sequence-parallel regions):

* attention norm, MLP norm and final norm ``SequenceParallel``: their inputs, outputs and rstd hold
  ⌈n/T⌉ of the rank's n tokens per sequence (``sequence_shard_tokens``), and so do the block inputs,
  h = x + attention and every gradient flowing between blocks;
* q, k, v ``ColwiseParallel`` with the norm output all-gathered to [B, n, E] (``gathered_rows``; DTensor
  saves that gathered input for the weight gradients — Megatron would re-gather it in backward, the
  plan does not), H/T local query heads and max(1, H_kv/T) KV heads (``stack.kv_heads_per_tp_rank``:
  each KV head replicated T/H_kv times when T > H_kv);
* o_proj ``RowwiseParallel``: a partial [B, n, E] reduce-scattered back to sequence shards;
* MLP gate/up ``ColwiseParallel`` (F/T columns), down ``RowwiseParallel`` reduce-scattered;
* embedding vocab-parallel (⌈V/T⌉ rows, partial output reduce-scattered), LM head ``ColwiseParallel``
  over the gathered final-norm output with loss parallel (⌈V/T⌉ logits per row).

Weights, gradients and AdamW states of the TP-sharded layers are the local shapes (``local_*``), then
sharded by FSDP2 over G (the ranks of the same TP coordinate); norms are replicated over T. At T = 1
every function here returns the single-GPU value (the reduction the tests check).

What DTensor adds beyond the plan's tensors, as the runtime (``ringplan_runtime.tensor_parallel``) runs it and the
live-tensor tracker sees it (CPU/gloo, torch 2.13): copies of block 0's input (``EMBEDDING_OUTPUT_COPIES``), five
copies of a row-parallel backward's gathered gradient (``ROW_PARALLEL_GRAD_COPIES``), and a loss-parallel loss whose
forward holds the most (``loss_parallel_forward_bytes``). With them Σ terms is within 0.01% of the tracked peak in
every case of ``tests/memory/test_tp_terms_tracker.py`` (T = 2; T = 2 × CP = 2, each scheme; hybrid 2 × 2).
Not validated: T > H_kv (replicated KV heads: planned, the runtime refuses it), the tiled MLP and parameter offload
with T > 1 (refused by the runtime), ZeRO-1/2 with T > 1 (planned from the same local Ψ).

Also here, because every scheme's attention is evaluated on one TP rank's heads: ``attention_point`` and the
attention part of a block under ``w.layout.cp_scheme`` (``attention_saved_bytes``, ``attention_backward_terms``,
``attention_forward_bytes``; ``cp_terms`` for the all-gather, Ulysses and hybrid schemes).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from ringplan.memory import attention_terms as at
from ringplan.memory import cp_terms as cp
from ringplan.memory.attention_terms import TermInputs, term_inputs
from ringplan.stack import StackWorkload, attention_workload, kv_heads_per_tp_rank, tokens_per_rank
from ringplan.workload import Workload


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for positive integers."""
    return -(-a // b)


def sequence_shard_tokens(w: StackWorkload) -> int:
    """Tokens per sequence in a sequence-parallel region: ⌈n/T⌉ (torch.chunk along the sequence; rank 0's,
    the largest shard). n at T = 1."""
    return ceil_div(tokens_per_rank(w), w.tp_degree)


def sequence_shard_rows(w: StackWorkload) -> int:
    """Rows of a sequence-parallel activation: B·⌈n/T⌉ (Korthikanti et al. 2022: the norm and dropout
    regions' activations divided by t)."""
    return w.batch * sequence_shard_tokens(w)


def gathered_rows(w: StackWorkload) -> int:
    """Rows of a tensor-parallel region's input, all-gathered over the T ranks: B·n (the q/k/v, gate/up
    and LM-head input; also the partial output of o_proj and down before their reduce-scatter)."""
    return w.batch * tokens_per_rank(w)


def local_heads(w: StackWorkload) -> int:
    """Query heads per TP rank: H/T (``ColwiseParallel`` q; ``stack.check_tp_degree`` makes T divide H)."""
    return w.model.n_heads // w.tp_degree


def local_kv_heads(w: StackWorkload) -> int:
    """KV heads per TP rank: max(1, H_kv/T) (``stack.kv_heads_per_tp_rank``)."""
    return kv_heads_per_tp_rank(w)


def local_ffn_dim(w: StackWorkload) -> int:
    """FFN columns per TP rank: F/T (gate/up ``ColwiseParallel``, down ``RowwiseParallel``)."""
    return w.model.ffn_dim // w.tp_degree


def local_vocab(w: StackWorkload) -> int:
    """Vocabulary rows per TP rank: ⌈V/T⌉ (vocab-parallel embedding, ``ColwiseParallel`` LM head;
    rank 0's shard when T does not divide V)."""
    return ceil_div(w.model.vocab_size, w.tp_degree)


@functools.lru_cache(maxsize=512)
def tp_attention_workload(w: StackWorkload) -> Workload:
    """One layer's attention as one TP rank runs it: ``stack.attention_workload`` with H/T query heads and
    max(1, H_kv/T) KV heads (``embed_dim`` H/T·D: projections are excluded, so it counts nothing). The
    workload itself at T = 1."""
    work = attention_workload(w)
    if w.tp_degree == 1:
        return work
    h = local_heads(w)
    shape = replace(work.shape, n_heads=h, n_kv_heads=local_kv_heads(w), embed_dim=h * w.model.head_dim)
    return replace(work, shape=shape)


def sequence_parallel_hidden_bytes(w: StackWorkload) -> float:
    """One hidden state in a sequence-parallel region: B·⌈n/T⌉·E·e (a block input or output, h, a norm's
    input or output, the gradient flowing between blocks). B·n·E·e at T = 1."""
    return float(sequence_shard_rows(w) * w.model.embed_dim * w.settings.param_dtype_bytes)


def gathered_hidden_bytes(w: StackWorkload) -> float:
    """One all-gathered hidden state: B·n·E·e (the input a ``ColwiseParallel`` linear saves, or a
    ``RowwiseParallel`` partial output before its reduce-scatter). The hidden state itself at T = 1."""
    return float(gathered_rows(w) * w.model.embed_dim * w.settings.param_dtype_bytes)


#: Copies of block 0's input (the embedding's reduce-scattered output) a T > 1 step keeps beyond the input
#: itself, by checkpointing mode: funcol's reduce-scatter output, its autograd wrapper and DTensor views of it
#: (``ringplan_runtime.tensor_parallel``, FSDP2's hooks on the embedding's output). Measured with the
#: live-tensor tracker on CPU/gloo (torch 2.13, T = 2): 5 under ``none``, 3 under ``full``; ``selective``
#: assumed as ``full`` (not measured).
EMBEDDING_OUTPUT_COPIES: dict[str, int] = {"none": 5, "selective": 3, "full": 3}


def embedding_output_copies_bytes(w: StackWorkload, *, in_backward: bool = False) -> float:
    """Extra copies of block 0's input alive until block 0's backward: ``EMBEDDING_OUTPUT_COPIES`` ×
    B·⌈n/T⌉·E·e at T > 1, one more inside block 0's backward under full checkpointing (the recomputation's
    detached input), one in prefill (held through block 0, the largest block then); 0 at T = 1 (the embedding's
    output is the block input itself)."""
    if w.tp_degree == 1:
        return 0.0
    if not w.training:  # prefill: the reduce-scatter output and its wrapper, until block 0 ends
        return sequence_parallel_hidden_bytes(w)
    copies = EMBEDDING_OUTPUT_COPIES[w.settings.checkpointing] + (in_backward and w.settings.checkpointing == "full")
    return copies * sequence_parallel_hidden_bytes(w)


#: Copies of B·n·E·e alive in a ``RowwiseParallel`` backward (o_proj, down) at T > 1: the incoming sequence-parallel
#: gradient's all-gather output, its autograd wrapper, its [B, n, E] and [B·n, E] views made contiguous and the
#: transpose for the weight gradient (DTensor on CPU/gloo, torch 2.13; the live-tensor tracker).
ROW_PARALLEL_GRAD_COPIES = 5


def row_parallel_backward_bytes(w: StackWorkload) -> float:
    """The gathered gradient of a row-parallel linear's backward: ``ROW_PARALLEL_GRAD_COPIES`` × B·n·E·e at
    T > 1 (Korthikanti et al. 2022, Fig. 5: the backward's all-gather ḡ before the row-parallel GEMMs); 0 at T = 1."""
    return 0.0 if w.tp_degree == 1 else ROW_PARALLEL_GRAD_COPIES * gathered_hidden_bytes(w)


def row_parallel_forward_bytes(w: StackWorkload) -> float:
    """A row-parallel linear's forward (o_proj, down) at its reduce-scatter, T > 1: the partial output B·n·E·e,
    its copy chunked along the sequence for the collective (funcol's scatter along dim 1), the reduce-scattered
    output and its autograd wrapper, 2·B·n·E·e + 2·B·⌈n/T⌉·E·e (the tracker on CPU/gloo); 0 at T = 1."""
    if w.tp_degree == 1:
        return 0.0
    return 2 * gathered_hidden_bytes(w) + 2 * sequence_parallel_hidden_bytes(w)


def loss_parallel_forward_bytes(w: StackWorkload, rows: int) -> float:
    """The loss forward of ``rows`` rows under loss parallel (T > 1), at the NLL: the chunk's logits in the
    compute dtype, their fp32 copy and the fp32 log-softmax, rows·⌈V/T⌉·(e + 2·4) (``transformer._token_loss_sum``
    on ``Shard(-1)`` logits; DTensor's ``loss_parallel`` ``_log_softmax`` returns a new tensor). At T = 1 the
    loss backward (3·rows·V·4) holds more; with T > 1 the backward's extra gathered tensors are not modelled."""
    return float(rows * local_vocab(w) * (w.settings.param_dtype_bytes + 2 * 4))


def tp_local_param_shapes(w: StackWorkload) -> dict[str, tuple[tuple[int, int], ...]]:
    """(rows, columns) of one TP rank's parameters per FSDP2 unit (``block``, ``embed``, ``head``, ``root``),
    in the runtime's order (``model_states.block_param_shapes``): q (H/T·D, E), k, v (H_kv/T·D, E) — or, when
    T > H_kv, the whole (H_kv·D, E), replicated over the TP group as the runtime does (``tensor_parallel.
    KVHeadLinear``: each rank computes only its KV head from a view of the whole weight) —,
    o (E, H/T·D), the two norms (E, 1) replicated, gate/up (F/T, E), down (E, F/T); biases of colwise
    layers split, of rowwise layers (o, down) replicated; qk norms (D, 1) replicated; the table and the
    untied head (⌈V/T⌉, E); learned positions (P_max, E) replicated; the final norm replicated."""
    m = w.model
    e, d, f = m.embed_dim, m.head_dim, local_ffn_dim(w)
    q = local_heads(w) * d
    kv = m.n_kv_heads * d if w.tp_degree > m.n_kv_heads else local_kv_heads(w) * d  # replicated whole beyond H_kv
    n_in = 2 if m.ffn_type == "swiglu" else 1
    block = [(q, e), (kv, e), (kv, e), (e, q), (e, 1), (e, 1)] + [(f, e)] * n_in + [(e, f)]
    block += [(q, 1), (kv, 1), (kv, 1)] if m.qkv_bias else []
    block += [(e, 1)] if m.out_bias else []
    block += [(d, 1), (d, 1)] if m.qk_norm else []
    block += ([(f, 1)] * n_in + [(e, 1)]) if m.mlp_bias else []
    block += [(e, 1), (e, 1)] if m.norm == "layernorm" else []
    vocab = local_vocab(w)
    embed = [(vocab, e)] + ([(m.max_positions, e)] if m.position == "learned" else [])
    root = [(e, 1)] * (2 if m.norm == "layernorm" else 1)
    return {"block": tuple(block), "embed": tuple(embed), "head": () if m.tied_embeddings else ((vocab, e),),
            "root": tuple(root)}


# ----------------------------------------------------------------------------- one TP rank's attention, every scheme


@functools.lru_cache(maxsize=512)
def attention_point(w: StackWorkload) -> TermInputs:
    """One layer's attention on one TP rank as the attention-layer terms evaluate it: H/T query heads,
    max(1, H_kv/T) KV heads, n tokens per CP rank, under ``w.layout.cp_scheme`` (q, k, v after RoPE)."""
    return term_inputs(tp_attention_workload(w), w.layout)


def splits_heads(p: TermInputs) -> bool:
    """Whether the scheme moves the attention onto head shards (Ulysses or hybrid over P > 1 ranks)."""
    return p.cp_scheme in ("ulysses", "hybrid") and p.ring_size > 1


def attention_saved_bytes(p: TermInputs) -> float:
    """What one block's attention keeps for backward. Ring and all-gather (``_RingAttention``,
    ``_AllGatherAttention``: q, k, v, out, LSE): B·n·(H + 2·H_kv)·D·e + B·n·H·D·e + B·H·n·4. Ulysses and
    hybrid (P > 1): the inner attention's saved head shards, output and LSE (``cp_terms.head_shard_inputs``:
    H/U heads, r·H_kv/U KV heads, U·n tokens; ``cp_collectives.LocalAttention`` or the inner ring) plus the
    output all-to-all's result B·n·H·D·e, a new tensor that o_proj saves (the ring's output is shared)."""
    if not splits_heads(p):
        return at.q_bytes(p) + at.kv_bytes(p) + at.output_bytes(p) + at.saved_lse_bytes(p)
    h = cp.head_shard_inputs(p)
    return at.q_bytes(h) + at.kv_bytes(h) + at.output_bytes(h) + at.saved_lse_bytes(h) + at.output_bytes(p)


def attention_backward_terms(p: TermInputs) -> dict[str, float]:
    """The attention part of a block's backward: the scheme's largest backward instant of the attention-layer
    terms — the ring's ``attention_terms.backward_instant`` (every scheme at P = 1), the all-gather's
    ``cp_terms.allgather_backward_instant``, Ulysses' / hybrid's output-gradient all-to-all or inner backward
    (``cp_terms.ulysses_instants``). Ignores (Ulysses/hybrid): the caller's q, k, v in those instants are
    not alive in a whole model's backward (nothing saves them) while o_proj's saved output is; equal
    bytes for MHA without K/V replication."""
    if p.ring_size == 1 or p.cp_scheme == "ring":
        return at.backward_instant(replace(p, cp_scheme="ring", ulysses_degree=1) if p.cp_scheme != "ring" else p)
    if p.cp_scheme == "allgather":
        return cp.allgather_backward_instant(p)
    return cp.largest_terms(cp.ulysses_instants(p)[2:])


def attention_forward_bytes(p: TermInputs) -> float:
    """The attention part of a prefill block at its largest forward instant: the ring's attention or
    output instant (every scheme at P = 1), the all-gather's forward, Ulysses' / hybrid's inner forward or
    output all-to-all (``cp_terms``)."""
    if p.ring_size == 1 or p.cp_scheme == "ring":
        ring = replace(p, cp_scheme="ring", ulysses_degree=1) if p.cp_scheme != "ring" else p
        return max(sum(at.attention_instant(ring).values()), sum(at.output_instant(ring).values()))
    if p.cp_scheme == "allgather":
        return sum(cp.allgather_forward_instant(p).values())
    return max(sum(terms.values()) for terms in cp.ulysses_instants(p))
