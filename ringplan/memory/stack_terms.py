"""Named per-rank byte terms φ_j of a whole transformer stack at its memory peak (θ = 1).

Notation (README, ``docs/STACK.md``): T = B·n local tokens (n = S / P), E width, H / H_kv heads, D head dim,
F FFN width, V vocab, L layers, G sharding group, e bytes of the compute dtype (``param_dtype``), e_m of the
master dtype (parameters, gradients and AdamW states; fp32).

Each function below (and in ``model_states``: parameter shapes, model states, FSDP2 units) is one tensor family
with one formula; they mirror what the runtime (``ringplan_runtime.transformer`` + ``stack_parallel``) keeps alive,
checked against the live-tensor tracker on CPU (``tests/runtime/test_stack_measure_cpu.py``; T > 1: ``tests/memory/
test_tp_terms_tracker.py``).

**Peak instants** (the peak is the largest; terms not alive at an instant are 0):

* training: the loss backward (full logits, or the largest chunk; T > 1: the loss forward too), a chunk's
  head-gradient accumulation, the final norm's backward, the backward of the last block, the one before it and
  the first (each at its MLP, its post-attention norm, (T > 1) its o_proj, its attention and its input norm),
  FSDP2's reduce-scatter of the head, of those blocks and of the table, the embedding's backward, the AdamW step;
* forward only (prefill): inside the last block (input norm, RoPE, attention, output projection and residual,
  MLP norm, MLP; T > 1: down's reduce-scatter) and the final norm, replicated weights, nothing saved.

Not modelled: the forward of the blocks in training (the backward of the same block holds a superset), FSDP2's
all-gather copy-in instants, RoPE and projection backward (after the ring buffers are freed), AdamW's ``step``
counters (CPU tensors) and scalars; kernel workspaces, allocator rounding and memory outside the allocator are
fitted (``stack_model``); CPU-only tensors (gloo's copy of a reduce-scatter input, the CPU kernel's strided LSE).

Tensor parallelism T > 1 and the context-parallel schemes: ``ringplan.memory.tp_terms`` (one TP rank's shapes,
sequence-parallel B·⌈n/T⌉ vs all-gathered B·n rows, each block's attention under ``w.layout.cp_scheme``).
"""

from __future__ import annotations

import functools

from ringplan.units import FP32_BYTES
from ringplan.memory import tp_terms
from ringplan.memory.attention_terms import kv_bytes, output_bytes, q_bytes
from ringplan.memory.tp_terms import (attention_point, embedding_output_copies_bytes, gathered_hidden_bytes,
                                     loss_parallel_forward_bytes)
from ringplan.stack import StackWorkload
from ringplan.memory.offload_terms import OFFLOAD_HOST_TERM_NAMES, device_instants, offload_host_terms
from ringplan.memory.model_states import (
    mlp_tile_rows,
    mlp_tiles,
    fsdp_state_at,
    unit_shapes,
    unit_shapes_upto,
    gathered_unit_bytes,
    gradients_bytes,
    master_params_bytes,
    optimizer_states_bytes,
    optimizer_step_bytes,
    padded_elements,
    param_copy_bytes,
    runs_fsdp,
    shard_elements,
    stack_shape,
    unit_grad_bytes,
)

INDEX_BYTES = 8  # int64 token ids, labels and RoPE positions
#: Every key ``stack_terms`` returns (GPU bytes), in display order.
STACK_TERM_NAMES: tuple[str, ...] = (
    "master_params_bytes", "param_copy_bytes", "optimizer_states_bytes", "gradients_bytes", "optimizer_step_bytes",
    "gathered_params_bytes", "unit_grads_bytes", "batch_bytes", "rope_tables_bytes", "saved_activations_bytes",
    "layer_activations_bytes", "attention_bytes", "norm_bytes", "rope_bytes", "mlp_bytes", "projection_bytes",
    "hidden_bytes", "logits_bytes", "loss_bytes")
#: Non-GPU terms (``host_terms``): pinned host memory of offloaded checkpoints and, with
#: ``offload_params``, of the offloaded states (``ringplan.memory.offload_terms``).
HOST_TERM_NAMES: tuple[str, ...] = ("offloaded_checkpoints_bytes",) + OFFLOAD_HOST_TERM_NAMES


# ----------------------------------------------------------------------------- activations of one block


def hidden_state_bytes(w: StackWorkload) -> float:
    """One hidden state of the rank's tokens: T·E·e (a block input or output, a norm's input, the
    residual sum h, a gradient flowing between blocks); with T > 1 a sequence-parallel shard,
    B·⌈n/T⌉·E·e (``tp_terms.sequence_parallel_hidden_bytes``)."""
    s = stack_shape(w)
    return float(s.T_sp * s.E * s.e)


def norm_statistics_bytes(w: StackWorkload, rows_per_token: int = 1) -> float:
    """fp32 RMSNorm statistics saved for backward: rstd, T·4 per norm over E (``rows_per_token``
    = H + H_kv for the per-head qk norms); B·⌈n/T⌉ rows in the sequence-parallel norms."""
    return float(stack_shape(w).T_sp * rows_per_token * FP32_BYTES)


def qk_norm_bytes(w: StackWorkload) -> float:
    """Saved by the Qwen3 qk norms: their inputs (the projected q and k) and statistics,
    T·(H + H_kv)·(D·e + 4); 0 without qk norm."""
    if not w.model.qk_norm:
        return 0.0
    s = stack_shape(w)
    return float(s.T * (s.H + s.H_kv) * (s.D * s.e + FP32_BYTES))


def ffn_bytes(w: StackWorkload) -> float:
    """One FFN-wide activation: T·F·e (gate, up, their product, or a gradient of one)."""
    s = stack_shape(w)
    return float(s.T * s.F * s.e)


def block_tensors(w: StackWorkload, *, upto: str, mode: str | None = None) -> float:
    """Bytes a block holds for backward, beyond its input, once its forward has reached ``upto``: ``attention`` (rstd,
    normed input, qk-norm inputs), ``mlp_input`` (+ ring attention's saved q, k, v, output, LSE; h = x + attention;
    rstd and output of the MLP norm), ``mlp`` (+ gate and up), ``all`` (+ their SwiGLU product). ``selective`` keeps
    only ring attention's tensors (the rest is recomputed segment by segment in backward); ``full`` keeps nothing. A
    tiled MLP saves only its input (the MLP norm's output): ``mlp`` and ``all`` hold what ``mlp_input`` holds. With T >
    1 the norms' outputs the linears save are all-gathered (``gathered_hidden_bytes``), x, h and rstd are sequence
    shards (Korthikanti et al. 2022, Sec. 4.2.2, without their re-gather in backward)."""
    mode = mode or w.settings.checkpointing
    if mode == "full":
        return 0.0
    if mode == "selective":
        return tp_terms.attention_saved_bytes(attention_point(w)) if upto != "attention" else 0.0
    stages = ("attention", "mlp_input", "mlp", "all")
    if upto not in stages:
        raise ValueError(f"upto must be one of {list(stages)}, got {upto!r}")
    total = norm_statistics_bytes(w) + gathered_hidden_bytes(w) + qk_norm_bytes(w)
    if upto != "attention":
        h_and_normed = hidden_state_bytes(w) + gathered_hidden_bytes(w)
        total += tp_terms.attention_saved_bytes(attention_point(w)) + h_and_normed + norm_statistics_bytes(w)
    if upto in ("mlp", "all") and mlp_tile_rows(w) is None:
        total += 2 * ffn_bytes(w)
    if upto == "all" and mlp_tile_rows(w) is None:
        total += ffn_bytes(w)
    return total


def saved_block_bytes(w: StackWorkload) -> float:
    """GPU bytes one finished block keeps until its backward: its input T·E·e (0 when checkpoints
    are offloaded) plus ``block_tensors(upto="all")`` for the checkpointing mode."""
    offloaded = w.settings.offload_checkpoints and w.settings.checkpointing == "full"
    return (0.0 if offloaded else hidden_state_bytes(w)) + block_tensors(w, upto="all")


def rope_tables_bytes(w: StackWorkload) -> float:
    """RoPE cos and sin tables of the rank's positions: 2·n·D·e (shared by every block)."""
    s = stack_shape(w)
    return float(2 * s.n * s.D * s.e)


def batch_bytes(w: StackWorkload) -> float:
    """The rank's token ids (and labels in training) [B, n], RoPE positions [n], int64: (B·(1 + training) + 1)·n·8."""
    s = stack_shape(w)
    return float((s.batch * (2 if w.training else 1) + 1) * s.n * INDEX_BYTES)


def offloaded_checkpoints_bytes(w: StackWorkload) -> float:
    """Pinned host memory of offloaded block inputs (``save_on_cpu``): L·T·E·e; 0 unless full
    checkpointing with offload. Host memory, not GPU (``host_terms``)."""
    if not (w.training and w.settings.offload_checkpoints and w.settings.checkpointing == "full"):
        return 0.0
    return stack_shape(w).L * hidden_state_bytes(w)


def host_terms(w: StackWorkload) -> dict[str, float]:
    """Non-GPU bytes at the peak, keyed by ``HOST_TERM_NAMES``."""
    return {"offloaded_checkpoints_bytes": offloaded_checkpoints_bytes(w), **offload_host_terms(w)}


# ----------------------------------------------------------------------------- transients of one block


def norm_forward_bytes(w: StackWorkload) -> float:
    """RMSNorm forward temporaries at their peak (``_RMSNorm.forward``, at the cast back): x in
    fp32, x·rstd in fp32 and its cast, 2·T·E·4 + T·E·e (the saved rstd is counted apart)."""
    s = stack_shape(w)
    return float(s.T_sp * s.E * (2 * FP32_BYTES + s.e))


def norm_backward_bytes(w: StackWorkload) -> float:
    """RMSNorm backward temporaries at their peak (``_RMSNorm.backward``, at ``g − x̂·mean``): x̂,
    the fp32 gradient, g = grad·w, x̂·mean(g·x̂) and the difference, 5·T·E·4, plus the mean, T·4."""
    s = stack_shape(w)
    return float(5 * s.T_sp * s.E * FP32_BYTES + s.T_sp * FP32_BYTES)


def rope_forward_bytes(w: StackWorkload) -> float:
    """RoPE forward (``_RoPE.forward``) at its peak, beyond q, k, v: for q, x·cos, −x half and the rotated x,
    2.5·T·H·D·e; for k (q's input and result still alive), T·H·D·e + 2.5·T·H_kv·D·e. The larger of the two."""
    s = stack_shape(w)
    q, k = s.T * s.H * s.D * s.e, s.T * s.H_kv * s.D * s.e
    return float(max(2.5 * q, q + 2.5 * k))


def mlp_forward_bytes(w: StackWorkload) -> float:
    """SwiGLU forward at its peak (the product): gate, up, silu(gate) and the product, 4·T·F·e."""
    return 4 * ffn_bytes(w)


def mlp_backward_bytes(w: StackWorkload) -> float:
    """SwiGLU backward at its peak (``silu_backward``): the product's gradient, grad·silu(gate),
    grad·up and the gate's gradient, 4·T·F·e (gate and up are counted as saved)."""
    return 4 * ffn_bytes(w)


def tiled_mlp_forward_bytes(w: StackWorkload) -> float:
    """A tiled MLP's forward at its peak (``ringplan_runtime.tiling.swiglu_rows_into``): the output T·E·e (all B·n rows
    with T > 1: the down projection's partial output), allocated once, and one tile's gate and up 2·B·t·F·e (silu and
    the product are computed in place into the gate; the down projection writes into the output's rows)."""
    s = stack_shape(w)
    return float(s.T * s.E * s.e + 2 * mlp_tile_rows(w) * s.F * s.e)


def tiled_mlp_backward_bytes(w: StackWorkload) -> float:
    """A tiled MLP's backward at its peak, inside one tile of t_r = B·t rows (the input gradient T·E·e is counted as a
    hidden state): the recomputed output t_r·E·e and the larger of (a) SwiGLU's backward, 6·t_r·F·e (gate and up saved,
    ``mlp_backward_bytes`` on t_r rows) and (b) the down projection's weight gradient, 4·t_r·F·e (gate, up, product,
    the product's gradient) + E·F·e: from the second tile on autograd computes it apart and adds it in place to the
    accumulated one (with one tile it becomes ``.grad``, counted with the unit's gradients). Source: the live-tensor
    tracker on ``ringplan_runtime.tiling._TiledMLP.backward``. Ignores the bias gradients' temporaries (E·e)."""
    s, rows = stack_shape(w), mlp_tile_rows(w)
    weight = s.E * s.F * s.e if mlp_tiles(w) > 1 else 0
    return float(rows * s.E * s.e + max(6 * rows * s.F * s.e, 4 * rows * s.F * s.e + weight))


# ----------------------------------------------------------------------------- instants


def _model_states(w: StackWorkload) -> dict[str, float]:
    return {"master_params_bytes": master_params_bytes(w), "param_copy_bytes": param_copy_bytes(w),
            "optimizer_states_bytes": optimizer_states_bytes(w), "batch_bytes": batch_bytes(w)}


def _plus(terms: dict[str, float], **extra: float) -> dict[str, float]:
    out = dict(terms)
    for key, value in extra.items():
        out[key] = out.get(key, 0.0) + value
    return out


def _saved(w: StackWorkload, blocks: int, *, final_norm: bool) -> float:
    """Saved activations of ``blocks`` finished blocks (with block 0's input copies at T > 1), plus
    (``final_norm``) what the final norm keeps: its input, the last block's output T·E·e, and rstd T·4."""
    extra = hidden_state_bytes(w) + norm_statistics_bytes(w) if final_norm else 0.0
    return blocks * saved_block_bytes(w) + extra + (embedding_output_copies_bytes(w) if blocks else 0.0)


def _loss_rows(w: StackWorkload) -> tuple[int, bool]:
    """(rows of the largest loss chunk, whether there are several chunks)."""
    tokens = stack_shape(w).T
    rows = tokens if w.settings.loss == "full" else min(w.settings.loss_chunk_tokens, tokens)
    return rows, tokens > rows


def head_grad_bytes(w: StackWorkload) -> float:
    """The LM head's unsharded gradient, V·E·e (the table's when tied)."""
    return unit_grad_bytes(w, unit_shapes(w)["embed" if w.model.tied_embeddings else "head"][:1])


def log_probabilities_bytes(w: StackWorkload, rows: int) -> float:
    """fp32 log-softmax of t rows of logits, saved by the NLL for backward: t·V·4 (the logits in the
    compute dtype and their fp32 copy are freed once it exists). Source: ``F.cross_entropy`` on
    ``logits.float()`` (``transformer._token_loss_sum``)."""
    return float(rows * stack_shape(w).V * FP32_BYTES)


def loss_gradients_bytes(w: StackWorkload, rows: int) -> float:
    """The loss's backward at its peak (``_log_softmax_backward_data``): the NLL gradient and the
    log-softmax gradient of t rows, 2·t·V·4. Loss parallel (T > 1): DTensor's fused NLL + log-softmax
    backward makes one fp32 gradient of t·V/T, then its cast to the compute dtype, t·V/T·(4 + e)."""
    s = stack_shape(w)
    return float(2 * rows * s.V * FP32_BYTES) if s.tp == 1 else float(rows * s.V * (FP32_BYTES + s.e))


def loss_backward_instant(w: StackWorkload) -> dict[str, float]:
    """Backward of the loss (full: all logits; chunked: the largest chunk, recomputed): the saved
    fp32 log-probabilities and the two gradients, 3·t·V·4 for t rows, with every block's activations,
    the final norm's and the final hidden state T·E·e. Chunked with several chunks: the head's
    gradient V·E·e and the hidden state's gradient T·E·e accumulate over chunks."""
    rows, several = _loss_rows(w)
    terms = {**_model_states(w), **fsdp_state_at(w, "loss"), "rope_tables_bytes": rope_tables_bytes(w),
             "saved_activations_bytes": _saved(w, stack_shape(w).L, final_norm=True),
             "hidden_bytes": gathered_hidden_bytes(w) * (2 if several else 1),
             "logits_bytes": log_probabilities_bytes(w, rows), "loss_bytes": loss_gradients_bytes(w, rows)}
    return _plus(terms, unit_grads_bytes=head_grad_bytes(w) if several else 0.0)


def loss_forward_instant(w: StackWorkload) -> dict[str, float]:
    """T > 1 only: the loss forward of the largest chunk under loss parallel (``tp_terms.loss_parallel_forward_bytes``:
    logits and fp32 copy as ``logits_bytes``, the log-softmax as ``loss_bytes``), every block's activations, the final
    norm's, the gathered head input and the caller's sequence-parallel ``hidden`` (deleted before the backward)."""
    if w.tp_degree == 1:
        return {}
    rows, fp32 = _loss_rows(w)[0], float(_loss_rows(w)[0] * stack_shape(w).V * FP32_BYTES)
    state = fsdp_state_at(w, "loss")  # over G > 1 the head's all-gather output too (freed at the next all-gather)
    state["gathered_params_bytes"] = state.get("gathered_params_bytes", 0.0) + (  # ZeRO-1/2: no FSDP state
        gathered_unit_bytes(w, "embed" if w.model.tied_embeddings else "head") if stack_shape(w).G > 1 and runs_fsdp(w)
        else 0.0)
    return {**_model_states(w), **state, "rope_tables_bytes": rope_tables_bytes(w),
            "saved_activations_bytes": _saved(w, stack_shape(w).L, final_norm=True),
            "hidden_bytes": gathered_hidden_bytes(w) + hidden_state_bytes(w),
            "logits_bytes": loss_parallel_forward_bytes(w, rows) - fp32,
            "loss_bytes": fp32}


def loss_head_grad_instant(w: StackWorkload) -> dict[str, float]:
    """Chunked loss with several chunks, when a chunk's head gradient is added to the accumulated one
    (out of place): 3·V·E·e, with the chunk's hidden gradient t·E·e and the accumulated T·E·e."""
    rows, several = _loss_rows(w)
    if not several:
        return {}
    s = stack_shape(w)
    terms = {**_model_states(w), **fsdp_state_at(w, "loss"), "rope_tables_bytes": rope_tables_bytes(w),
             "saved_activations_bytes": _saved(w, s.L, final_norm=True),
             "hidden_bytes": gathered_hidden_bytes(w) * (2 + rows / s.T)}
    return _plus(terms, unit_grads_bytes=3 * head_grad_bytes(w))


def final_norm_backward_instant(w: StackWorkload) -> dict[str, float]:
    """Backward of the final norm: every block's activations and the final norm's, the gradient of
    the hidden state T·E·e and the norm's backward temporaries."""
    return {**_model_states(w), **fsdp_state_at(w, "final_norm"), "rope_tables_bytes": rope_tables_bytes(w),
            "saved_activations_bytes": _saved(w, stack_shape(w).L, final_norm=True),
            "hidden_bytes": hidden_state_bytes(w), "norm_bytes": norm_backward_bytes(w)}


def _backward_block_tensors(w: StackWorkload, stage: str) -> float:
    """A block's own tensors during its backward at ``stage`` (recomputed under checkpointing): mlp: all but the
    SwiGLU product; norm2: up to the MLP norm's rstd; o_proj (T > 1): up to the attention's saved tensors; attention:
    the input norm's (the attention's own are its part); norm1: its rstd. Selective recomputes the input norm and
    q/k/v only after the attention's backward."""
    saved = tp_terms.attention_saved_bytes(attention_point(w))
    none = {"mlp": block_tensors(w, upto="mlp", mode="none"),
            "o_proj": block_tensors(w, upto="attention", mode="none") + saved,  # T > 1 only
            "norm2": block_tensors(w, upto="mlp_input", mode="none") - gathered_hidden_bytes(w),
            "attention": block_tensors(w, upto="attention", mode="none"),
            "norm1": norm_statistics_bytes(w)}[stage]
    if w.settings.checkpointing == "selective" and stage != "norm1":
        none -= block_tensors(w, upto="attention", mode="none")
    return none


def block_backward_terms(w: StackWorkload, index: int, stage: str) -> dict[str, float]:
    """Backward of block ``index`` at ``stage`` (``mlp``: SwiGLU backward; ``norm2``: the MLP norm's;
    ``attention``: ring attention's (``memory_terms``); ``norm1``: the input norm's): the blocks
    before it saved, its input and own tensors, the gradient flowing back T·E·e (and the norm's
    incoming gradient T·E·e), its unsharded gradients so far."""
    terms = {**_model_states(w), **fsdp_state_at(w, "block", index), "rope_tables_bytes": rope_tables_bytes(w),
             "saved_activations_bytes": _saved(w, index, final_norm=False),
             "layer_activations_bytes": hidden_state_bytes(w) + _backward_block_tensors(w, stage)
             + (embedding_output_copies_bytes(w, in_backward=True) if index == 0 else 0.0),
             "hidden_bytes": hidden_state_bytes(w)}
    tiled = stage == "mlp" and mlp_tile_rows(w) is not None
    if tiled:  # the input gradient, allocated once; every MLP weight's gradient from the second tile on
        terms["hidden_bytes"] += gathered_hidden_bytes(w)
        terms["mlp_bytes"] = tiled_mlp_backward_bytes(w)
        if mlp_tiles(w) > 1:
            stage = "mlp_weights"
    elif stage == "mlp":  # T > 1: down's backward (the product, the gathered gradient) may hold more
        row = ffn_bytes(w) + tp_terms.row_parallel_backward_bytes(w) if w.tp_degree > 1 else 0.0
        terms["mlp_bytes"] = max(mlp_backward_bytes(w), row)
    elif stage == "o_proj":  # T > 1: o_proj's backward over the gathered gradient
        terms["projection_bytes"] = tp_terms.row_parallel_backward_bytes(w)
        stage = "attention"
    elif stage == "attention":
        terms["attention_bytes"] = sum(tp_terms.attention_backward_terms(attention_point(w)).values())
    else:
        terms["norm_bytes"] = norm_backward_bytes(w)
        terms["projection_bytes"] = hidden_state_bytes(w)
    return _plus(terms, unit_grads_bytes=unit_grad_bytes(w, unit_shapes_upto(w, stage)))


def block_backward_instants(w: StackWorkload) -> dict[str, dict[str, float]]:
    """``block_backward_terms`` of the last block, the one before it and the first: the saved
    activations fall and the reduced gradients grow linearly from block L-2 down to block 0, so
    those three blocks hold the largest of every block's instants."""
    last = stack_shape(w).L - 1
    return {f"block{index}_backward_{stage}": block_backward_terms(w, index, stage)
            for index in sorted({last, max(last - 1, 0), 0})
            for stage in ("mlp", "norm2") + (("o_proj",) if w.tp_degree > 1 else ()) + ("attention", "norm1")}


def embedding_backward_instant(w: StackWorkload) -> dict[str, float]:
    """The embedding's backward (the last): every other gradient reduced, block 0's reduce-scatter input kept, the
    table gathered, its dense gradient V·E·e and the embedding output's gradient T·E·e."""
    table = unit_grad_bytes(w, unit_shapes(w)["embed"])
    return _plus({**_model_states(w), **fsdp_state_at(w, "embed"), "hidden_bytes": gathered_hidden_bytes(w)},
                 unit_grads_bytes=table)


def reduce_scatter_instants(w: StackWorkload, unit: str, index: int = 0) -> dict[str, dict[str, float]]:
    """FSDP2's reduce-scatter of ``unit`` (``head``, ``block`` ``index``, ``embed``) once its backward is done
    (``foreach_reduce``): the unit resharded, the previous reduce-scatter's input released; its unsharded gradients
    (compute dtype) copied into the padded flat input in the reduce dtype (``copy_in``), then the output shard
    allocated (``output``; the unit's reduced gradients). Alive meanwhile: the activations of the blocks not yet
    back-propagated, the gradient flowing back (T·E·e). A tied table is reduced once, after the embedding's backward."""
    if not runs_fsdp(w) or (unit == "head" and w.model.tied_embeddings):
        return {}
    s, units = stack_shape(w), unit_shapes(w)
    if unit == "head":
        state = {**fsdp_state_at(w, "final_norm"), "saved_activations_bytes": _saved(w, s.L, final_norm=True),
                 "rope_tables_bytes": rope_tables_bytes(w), "hidden_bytes": hidden_state_bytes(w)}
        state["gathered_params_bytes"] = gathered_unit_bytes(w, "root") if s.G > 1 else 0.0
        state["gradients_bytes"] = 0.0
    elif unit == "block":
        # the next unit's backward hook has already waited for its prefetched all-gather (copied out)
        state = {**fsdp_state_at(w, "block", index), "saved_activations_bytes": _saved(w, index, final_norm=False),
                 "rope_tables_bytes": rope_tables_bytes(w) if index > 0 else 0.0, "hidden_bytes": hidden_state_bytes(w)}
        nxt = "block" if index > 0 else "embed"
        already = w.model.tied_embeddings and nxt == "embed"
        state["gathered_params_bytes"] += (0.0 if already else gathered_unit_bytes(w, nxt)) - gathered_unit_bytes(w, "block")
    else:
        state = {**fsdp_state_at(w, "embed")}
        state["gathered_params_bytes"] -= gathered_unit_bytes(w, "embed")
    # released: the previous reduce-scatter's input; still waiting: the final norm's and a tied table's gradients
    waiting = unit_grad_bytes(w, units["root"]) if unit != "head" else 0.0
    if unit == "block" and w.model.tied_embeddings:
        waiting += unit_grad_bytes(w, units["embed"])
    state["unit_grads_bytes"] = waiting
    padded = padded_elements(units[unit], s.G) * s.e_m
    shard = shard_elements(units[unit], s.G) * s.e_m
    copy_in = _plus({**_model_states(w), **state}, unit_grads_bytes=unit_grad_bytes(w, units[unit]) + padded)
    output = _plus({**_model_states(w), **state}, unit_grads_bytes=padded, gradients_bytes=shard)
    name = f"{unit}{index}" if unit == "block" else unit
    return {f"{name}_reduce_copy_in": copy_in, f"{name}_reduce_output": output}


def optimizer_instant(w: StackWorkload) -> dict[str, float]:
    """The AdamW step: master parameters, m, v, every reduced gradient and sqrt(v); over G > 1
    ranks a tied table's last all-gather output is still held (FSDP2 frees it at the next one)."""
    tied_flat = gathered_unit_bytes(w, "embed") if w.model.tied_embeddings and stack_shape(w).G > 1 else 0.0
    return {**_model_states(w), "gradients_bytes": gradients_bytes(w), "optimizer_step_bytes": optimizer_step_bytes(w),
            "gathered_params_bytes": tied_flat}


def training_instants(w: StackWorkload) -> dict[str, dict[str, float]]:
    instants = {"loss_forward": loss_forward_instant(w), "loss_backward": loss_backward_instant(w),
                "loss_head_grad": loss_head_grad_instant(w),
                "final_norm_backward": final_norm_backward_instant(w), **block_backward_instants(w),
                "embedding_backward": embedding_backward_instant(w), "optimizer": optimizer_instant(w),
                **reduce_scatter_instants(w, "head"), **reduce_scatter_instants(w, "embed")}
    last = stack_shape(w).L - 1
    for index in sorted({last, max(last - 1, 0), 0}):
        instants.update(reduce_scatter_instants(w, "block", index))
    return {name: terms for name, terms in instants.items() if terms}


# ----------------------------------------------------------------------------- forward only (prefill)


def forward_instants(w: StackWorkload) -> dict[str, dict[str, float]]:
    """Prefill: replicated weights, the batch, the RoPE tables and, inside the last block, its input x with: the input
    norm's temporaries; RoPE (the normed input, the projected q, k, v); ring attention (``memory_terms``: q, k, v, its
    buffers and output); the output projection and residual (attention output, projection, h); the MLP norm; the MLP
    (h, its normed input, 4·T·F·e); then the final norm. Nothing is saved (``inference_mode``). With T > 1: x, h and
    the norms in sequence shards, the normed input gathered (B·n rows) for q/k/v and the MLP, the output projection's
    partial B·n·E·e beside its reduce-scattered result; the attention part is the scheme's
    (``tp_terms.attention_forward_bytes``)."""
    s, x, g = stack_shape(w), hidden_state_bytes(w), gathered_hidden_bytes(w)
    x_in = x + embedding_output_copies_bytes(w)  # T > 1: block 0's input and its copy (block 0 holds the most)
    base = {"param_copy_bytes": param_copy_bytes(w), "batch_bytes": batch_bytes(w),
            "rope_tables_bytes": rope_tables_bytes(w)}
    p = attention_point(w)
    qkv = q_bytes(p) + kv_bytes(p)
    qk_inputs = float(s.T * (s.H + s.H_kv) * s.D * s.e) if w.model.qk_norm else 0.0
    attn_out = output_bytes(p)
    ring = tp_terms.attention_forward_bytes(p)
    row = g + x if s.tp == 1 else tp_terms.row_parallel_forward_bytes(w)  # projection output (+ its reduce-scatter)
    norm = norm_forward_bytes(w)
    instants = {
        "norm1": {**base, "layer_activations_bytes": x_in + norm_statistics_bytes(w), "norm_bytes": norm},
        "rope": {**base, "layer_activations_bytes": (x_in + g) + qkv + qk_inputs, "rope_bytes": rope_forward_bytes(w)},
        "attention": {**base, "layer_activations_bytes": x_in, "attention_bytes": ring},
        "residual": {**base, "layer_activations_bytes": x_in + attn_out, "projection_bytes": row},
        "norm2": {**base, "layer_activations_bytes": (x_in + x) + attn_out + norm_statistics_bytes(w),
                  "norm_bytes": norm_forward_bytes(w)},
        "mlp": {**base, "layer_activations_bytes": (x_in + x + g) + attn_out,
                "mlp_bytes": mlp_forward_bytes(w) if mlp_tile_rows(w) is None else tiled_mlp_forward_bytes(w)},
        "final_norm": {**base, "hidden_bytes": x + norm_statistics_bytes(w), "norm_bytes": norm_forward_bytes(w)},
    }
    if s.tp > 1 and mlp_tile_rows(w) is None:  # down's reduce-scatter: the product, the partial and scattered outputs
        instants["mlp_reduce_scatter"] = {**instants["mlp"], "mlp_bytes": ffn_bytes(w), "projection_bytes": row}
    return instants


def stack_instants(w: StackWorkload) -> dict[str, dict[str, float]]:
    """Every modelled peak instant (name → terms), each keyed by ``STACK_TERM_NAMES``."""
    return {name: dict(terms) for name, terms in _instants(w).items()}


@functools.lru_cache(maxsize=256)
def _instants(w: StackWorkload) -> dict[str, dict[str, float]]:
    instants = device_instants(w, training_instants(w) if w.training else forward_instants(w))  # offload: to host
    return {name: {key: float(terms.get(key, 0.0)) for key in STACK_TERM_NAMES} for name, terms in instants.items()}


def peak_instant(w: StackWorkload) -> str:
    """Name of the instant ``stack_terms`` reports (the largest)."""
    instants = stack_instants(w)
    return max(instants, key=lambda name: sum(instants[name].values()))


def stack_terms(w: StackWorkload) -> dict[str, float]:
    """Per-rank GPU bytes of each tensor family at the peak instant (θ = 1), keyed by
    ``STACK_TERM_NAMES``; fixed overhead, kernel workspaces and allocator slack excluded."""
    return stack_instants(w)[peak_instant(w)]
