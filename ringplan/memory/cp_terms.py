"""Named byte terms φ_j at the per-rank peak of the all-gather, Ulysses and hybrid context-parallel
schemes (issue 14): what ``attention_terms`` is for the ring, for one attention layer.

Notation as ``attention_terms`` (README): n tokens per rank, S = P·n the sequence, B batch, H query
heads, H_kv KV heads, D head dim, e bytes per element; fp32 accumulators and LSEs are 4 bytes. U is
the Ulysses degree, R = P/U the ring of the hybrid, r the K/V head copies Ulysses makes when U does
not divide H_kv (``kv_replication``). Each term mirrors a runtime file, named in its docstring:

* ``allgather`` — ``ringplan_runtime/allgather_attention.py`` (+ ``cp_collectives.gather_sequence``,
  ``scatter_sequence_sum``). Instants: the forward over the gathered K/V (one fused block, or for
  causal attention fp32 accumulators and two block results alive at once: the previous one is still
  bound while the next is computed), and the backward (K/V gathered again, full-sequence fp32 dK/dV,
  fp32 dQ, one block's gradients).
* ``ulysses`` and ``hybrid`` — ``ulysses_attention.py``, ``hybrid_attention.py`` and
  ``cp_collectives.SequenceToHeads``/``HeadsToSequence``: the inner attention runs on head shards
  ``[B, U·n, H/U, D]``, so its terms are the RING's own (``attention_terms``) at ring size R with
  H/U heads, r·H_kv/U KV heads and U·n tokens (R = 1 for Ulysses: a single kernel call), their Q/K/V
  relabelled ``head_shard_bytes``; around it the caller's inputs, the replicated K/V, and the
  output (forward) or output-gradient (backward) all-to-all's send and receive buffers.

Every instant is evaluated with θ = 1 and the largest one's terms are returned, keyed by
``ALL_TERM_NAMES`` (the ring's names plus ``CP_TERM_NAMES``). At P = 1 every scheme is one local
kernel: the ring's terms (a reduction the tests check). Checked against the runtime's live-tensor
tracker on CPU (gloo, P = 2 and 4): ``tests/memory/test_cp_terms_tracker.py``.
Ignores: dilated patterns, the projection module and the math backend (``workload.check_scheme_fits``
refuses them); the communicators' own buffers (in the fitted runtime overhead, as for the ring).
"""

from __future__ import annotations

from dataclasses import replace

from ringplan.memory import attention_terms as at
from ringplan.memory.attention_terms import TERM_NAMES, TermInputs
from ringplan.units import FP32_BYTES
from ringplan.workload import RingLayout, Workload

#: Terms only the all-gather / Ulysses / hybrid schemes have, in display order.
CP_TERM_NAMES: tuple[str, ...] = ("gathered_kv_bytes", "gathered_dkv_bytes", "lse_copy_bytes", "kv_replica_bytes",
                                  "head_shard_bytes", "all_to_all_buffer_bytes")
#: Every key ``cp_terms_at`` returns (the ring's ``TERM_NAMES`` keep their meaning).
ALL_TERM_NAMES: tuple[str, ...] = TERM_NAMES + CP_TERM_NAMES


def memory_terms(workload: Workload, layout: RingLayout) -> dict[str, float]:
    """Per-rank bytes at the peak (θ = 1) under ``layout.cp_scheme``: the ring's ``attention_terms.memory_terms``
    (keyed by ``TERM_NAMES``, unchanged), or the other schemes' (keyed by ``ALL_TERM_NAMES``). The one entry
    for every scheme: it sits above ``attention_terms`` (which knows the ring only) so the layers stay acyclic."""
    return terms_at(at.term_inputs(workload, layout))


def terms_at(p: TermInputs) -> dict[str, float]:
    """``memory_terms`` for an explicit evaluation point."""
    return at.terms_at(p) if p.cp_scheme == "ring" else cp_terms_at(p)


def cp_terms_at(p: TermInputs) -> dict[str, float]:
    """Per-rank bytes of each tensor family at the scheme's peak instant (θ = 1), keyed by ``ALL_TERM_NAMES``."""
    if p.ring_size == 1:
        instants = [at.terms_at(replace(p, cp_scheme="ring", ulysses_degree=1))]
    elif p.cp_scheme == "allgather":
        instants = [allgather_forward_instant(p)] + ([allgather_backward_instant(p)] if p.training else [])
    else:
        instants = ulysses_instants(p)
    peak = largest_terms(instants)
    return {name: float(peak.get(name, 0.0)) for name in ALL_TERM_NAMES}


def sequence_tokens(p: TermInputs) -> float:
    """S = P·n: the whole sequence."""
    return p.tokens_per_rank * p.ring_size


def inputs_terms(p: TermInputs) -> dict[str, float]:
    """The caller's local q (B·n·H·D·e) and k, v (2·B·n·H_kv·D·e): ``attention_terms.q_bytes``/``kv_bytes``."""
    return {"q_bytes": at.q_bytes(p), "kv_bytes": at.kv_bytes(p)}


def largest_terms(candidates) -> dict[str, float]:
    """The candidate instant (a dict of terms) with the largest sum."""
    return max(candidates, key=lambda terms: sum(terms.values()))


# ----------------------------------------------------------------------------- all-gather


def gathered_kv_bytes(p: TermInputs) -> float:
    """K and V of the whole sequence, all-gathered in the input dtype: 2·B·S·H_kv·D·e. Alive during the
    forward, and again during the backward (gathered a second time, not saved). Source:
    ``allgather_attention.allgather_forward``/``allgather_backward`` (``gather_sequence``)."""
    return 2 * p.batch * sequence_tokens(p) * p.n_kv_heads * p.head_dim * p.dtype_bytes


def gathered_dkv_bytes(p: TermInputs) -> float:
    """dK and dV of the whole sequence, accumulated in fp32 before the reduce-scatter: 2·B·S·H_kv·D·4.
    Source: ``allgather_backward`` (``sequence_major_zeros`` in the accumulator dtype)."""
    return 2 * p.batch * sequence_tokens(p) * p.n_kv_heads * p.head_dim * FP32_BYTES


def allgather_blocks(p: TermInputs) -> list[tuple[float, float, bool]]:
    """(query rows, key rows, LSE copied) of the kernel calls that bound the all-gather backward, over
    all ranks (``allgather_attention.gathered_blocks``). Non-causal: one fused block n × S. Causal
    contiguous: rank 0's diagonal n × n alone; the last rank's fused n × (P−1)·n and its diagonal.
    Causal zigzag: every rank's diagonal n × n; rank 0's fused second half n/2 × (P−1)·n. The block's
    LSE rows are copied contiguous for the kernel when they are a strided slice (half the rows) or
    the kernel's own LSE (one block; CPU kernels return it strided)."""
    n = p.tokens_per_rank
    if not p.causal:
        return [(n, sequence_tokens(p), True)]
    if p.layout == "zigzag":
        return [(n, n, False), (n / 2, (p.ring_size - 1) * n, True)]
    return [(n, n, True), (n, (p.ring_size - 1) * n, False)]


def allgather_block_results(p: TermInputs) -> int:
    """Block results alive at once in the forward: 1 (non-causal: one fused block, returned as is)
    or 2 (causal on P ≥ 2: the previous block's out and LSE are still bound while the next is made)."""
    return 2 if p.causal else 1


def allgather_accumulator_bytes(p: TermInputs) -> float:
    """fp32 out and LSE accumulators of a causal forward (several blocks): B·n·H·(D + 1)·4 (0 for one
    block). Source: ``merge.start_accumulator`` in ``allgather_forward``."""
    return p.batch * p.tokens_per_rank * p.n_heads * (p.head_dim + 1) * FP32_BYTES if p.causal else 0.0


def lse_copy_bytes(p: TermInputs, rows: float, *, heads: int | None = None) -> float:
    """One block's LSE rows made contiguous for the backward kernel: B·h·rows·4 (``kernels.block_backward``),
    h = ``heads`` (default H). A strided slice (half the rows) is copied on every device; the kernel's
    own LSE [B, h, rows] is strided on CPU when h > 1 (counted then: on GPUs, where it is contiguous,
    this overcounts by ≤ 4/(D·e) of one q)."""
    heads = p.n_heads if heads is None else heads
    return p.batch * heads * rows * FP32_BYTES


def allgather_forward_instant(p: TermInputs) -> dict[str, float]:
    """Inputs + gathered K/V + accumulators + block results, or (causal) the merge of the last block:
    accumulators + one block result + the merge's LSE-sized temporaries, whichever is larger."""
    n = p.tokens_per_rank
    one = at.Branch(n_b=n, dilation=1, kv_heads=p.n_kv_heads, key_tokens=n, group=p.ring_size)
    held = {**inputs_terms(p), "gathered_kv_bytes": gathered_kv_bytes(p),
            "accumulator_bytes": allgather_accumulator_bytes(p)}
    blocks = {**held, "block_result_bytes": allgather_block_results(p) * at.block_result_bytes(p, one)}
    if not p.causal:
        return blocks
    merge = {**held, "block_result_bytes": at.block_result_bytes(p, one),
             "merge_temporaries_bytes": at.merge_temporaries_bytes(p, one)}
    return largest_terms([blocks, merge])


def allgather_backward_instant(p: TermInputs) -> dict[str, float]:
    """Inputs, saved output and LSE, the output's gradient, K/V gathered again, fp32 dQ accumulator
    (B·n·H·D·4), full-sequence fp32 dK/dV, and the largest block's gradients (B·(rows·H +
    2·keys·H_kv)·D·e) with its LSE copy. Ignores: the reduce-scatter's own-chunk result and the final
    casts, made after the gathered K/V are freed (smaller)."""
    def block(rows: float, keys: float, copied: bool) -> dict[str, float]:
        grads = p.batch * (rows * p.n_heads + 2 * keys * p.n_kv_heads) * p.head_dim * p.dtype_bytes
        whole_kernel_lse = copied and rows == p.tokens_per_rank
        copy = copied and (p.n_heads > 1 or not whole_kernel_lse)
        return {"block_grad_bytes": grads, "lse_copy_bytes": lse_copy_bytes(p, rows) if copy else 0.0}

    largest = largest_terms(block(*b) for b in allgather_blocks(p))
    return {**inputs_terms(p), "output_bytes": at.output_bytes(p), "saved_lse_bytes": at.saved_lse_bytes(p),
            "grad_output_bytes": at.grad_output_bytes(p), "gathered_kv_bytes": gathered_kv_bytes(p),
            "dq_accumulator_bytes": p.batch * p.tokens_per_rank * p.n_heads * p.head_dim * FP32_BYTES,
            "gathered_dkv_bytes": gathered_dkv_bytes(p), **largest}


# ----------------------------------------------------------------------------- Ulysses and hybrid


def kv_replication(n_heads: int, n_kv_heads: int, ulysses_degree: int) -> int:
    """r: the smallest number of copies of each KV head with U | r·H_kv and r | H/H_kv (1: none).
    DeepSpeed-Ulysses' rule (r = U/H_kv when H_kv divides U). Source: ``cp_collectives.kv_replication``."""
    group = n_heads // n_kv_heads
    return next(r for r in range(1, group + 1) if group % r == 0 and (n_kv_heads * r) % ulysses_degree == 0)


def head_shard_inputs(p: TermInputs) -> TermInputs:
    """The inner ring's evaluation point: ring size R = P/U over head shards of U·n tokens, H/U query
    heads and r·H_kv/U KV heads (R = 1 for Ulysses: one local kernel). Source: ``ulysses_around``."""
    u = p.ulysses_degree
    r = kv_replication(p.n_heads, p.n_kv_heads, u)
    return replace(p, n_heads=p.n_heads // u, n_kv_heads=p.n_kv_heads * r // u, tokens_per_rank=p.tokens_per_rank * u,
                   ring_size=p.ring_size // u, embed_dim=p.n_heads * p.head_dim, cp_scheme="ring", ulysses_degree=1)


def kv_replica_bytes(p: TermInputs) -> float:
    """K and V with every KV head repeated r times before the all-to-all: 2·B·n·r·H_kv·D·e (0 when r = 1).
    Alive through the forward only (not saved). Source: ``ulysses_around`` (``repeat_interleave``)."""
    r = kv_replication(p.n_heads, p.n_kv_heads, p.ulysses_degree)
    return 2 * p.batch * p.tokens_per_rank * r * p.n_kv_heads * p.head_dim * p.dtype_bytes if r > 1 else 0.0


def all_to_all_buffer_bytes(p: TermInputs, *, output: bool = True) -> float:
    """Buffers of the output's (forward, ``output``) or the output gradient's (backward) all-to-all beside
    its input: 2·B·n·H·D·e (send and receive, or receive and the result copied out of it). The output's
    needs only the receive buffer, B·n·H·D·e, when each member holds one head (H/U = 1), B = 1 and no
    zigzag reordering (plain Ulysses, causal, zigzag): the send buffer and the result are then views.
    Source: ``cp_collectives.heads_to_sequence``/``sequence_to_heads`` (as the tracker sees them)."""
    one = p.batch * p.tokens_per_rank * p.n_heads * p.head_dim * p.dtype_bytes
    reordered = p.causal and p.layout == "zigzag" and p.ring_size == p.ulysses_degree
    views = output and p.batch == 1 and p.n_heads == p.ulysses_degree and not reordered
    return one if views else 2 * one


def relabelled(inner: dict[str, float], p: TermInputs) -> dict[str, float]:
    """The inner ring's terms with its Q/K/V as ``head_shard_bytes`` and the caller's inputs as q/kv."""
    terms = dict(inner)
    terms["head_shard_bytes"] = terms.pop("q_bytes", 0.0) + terms.pop("kv_bytes", 0.0)
    return {**terms, **inputs_terms(p)}


def ulysses_instants(p: TermInputs) -> list[dict[str, float]]:
    """Peak candidates of Ulysses (R = 1) and hybrid (R > 1):

    * inside the forward: inputs + K/V replicas + the inner ring's forward instant on head shards;
    * the output all-to-all: inputs + replicas + head shards + inner output (B·n·H·D·e) + send/receive
      (+ the saved LSE in training);
    * (training) the output gradient's all-to-all: inputs + saved head shards, output and LSE + the
      gradient + send/receive;
    * (training) inside the backward: inputs + the inner ring's backward instant (+ the LSE copy of a
      single kernel, R = 1).
    Ignores: the gradients' all-to-alls back to sequence shards (after the saved tensors are freed: smaller).
    """
    h = head_shard_inputs(p)
    replicas = {"kv_replica_bytes": kv_replica_bytes(p)}
    shards = {"head_shard_bytes": at.q_bytes(h) + at.kv_bytes(h)}
    saved_lse = {"saved_lse_bytes": at.saved_lse_bytes(p)} if p.training else {}
    buffers = {"all_to_all_buffer_bytes": all_to_all_buffer_bytes(p)}
    grad_buffers = {"all_to_all_buffer_bytes": all_to_all_buffer_bytes(p, output=False)}
    instants = [{**relabelled(at.attention_instant(h), p), **replicas},
                {**inputs_terms(p), **replicas, **shards, "block_result_bytes": at.output_bytes(p), **saved_lse,
                 **buffers}]
    if p.training:
        instants.append({**inputs_terms(p), **shards, "output_bytes": at.output_bytes(p), **saved_lse,
                         "grad_output_bytes": at.grad_output_bytes(p), **grad_buffers})
        copied = h.ring_size == 1 and h.n_heads > 1  # a single kernel's own LSE, strided on CPU
        copy = {"lse_copy_bytes": lse_copy_bytes(h, h.tokens_per_rank)} if copied else {}
        instants.append({**relabelled(at.backward_instant(h), p), **copy})
    return instants
