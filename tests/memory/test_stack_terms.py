"""Whole-stack byte terms: the ZeRO paper's numbers, hand-computed activations, reductions to the
parameter count, and invariants over workloads (more tokens never less memory, a larger ring never
more per rank, more checkpointing never more). The agreement with the real runtime's live tensors
is in ``tests/test_stack_measure_cpu.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.models import ModelSpec, load_model_catalog, parameter_count
from ringplan.stack import StackSettings, StackWorkload
from ringplan.memory.model_states import rank_param_elements, shard_elements, zero_state_bytes
from ringplan.memory.stack_terms import (
    HOST_TERM_NAMES,
    STACK_TERM_NAMES,
    block_tensors,
    host_terms,
    peak_instant,
    saved_block_bytes,
    stack_instants,
    stack_terms,
)
from ringplan.workload import RingLayout

GB = 1e9
#: The ZeRO paper rounds its per-GPU figures to 0.1 GB.
PAPER_ROUNDING_BYTES = 0.05 * GB
TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
LLAMA = load_model_catalog().model("llama-3-8b")


def workload(model=TINY, seq=512, world=1, ring=1, training=True, **settings) -> StackWorkload:
    return StackWorkload(model=model, seq_len_tokens=seq, world_size=world, layout=RingLayout(ring_size=ring),
                         training=training, settings=StackSettings(**settings))


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_table(stage, expected_gb):
    """Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5B, N_d = 64, mixed-precision Adam (2 + 2 + K, K = 12)."""
    parts = zero_state_bytes(7.5e9, stage=stage, n_d=64, param_bytes=2, grad_bytes=2, optimizer_bytes=12)
    assert sum(parts.values()) == pytest.approx(expected_gb * GB, abs=PAPER_ROUNDING_BYTES)


def test_zero_stage_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="stage"):
        zero_state_bytes(1e9, stage=4, n_d=8, param_bytes=2, grad_bytes=2, optimizer_bytes=12)


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen3-0.6b", "qwen3-8b", "mistral-7b"])
def test_unsharded_rank_holds_every_parameter(name):
    """Reduction: over one rank the FSDP2 shards are the whole model, Ψ of ``models.parameter_count``."""
    model = load_model_catalog().model(name)
    assert rank_param_elements(workload(model, seq=4096)) == parameter_count(model)


def test_fsdp_shards_pad_rows_to_the_group():
    """FSDP2 pads each parameter's rows to a multiple of G: rank 0 holds ⌈rows/G⌉ rows."""
    assert shard_elements([(10, 3), (7, 1)], 4) == 3 * 3 + 2 * 1


def test_model_states_of_the_runtime_at_the_optimizer_step():
    """zero3 over G = 8 (Llama-3-8B, no padding): fp32 master 4Ψ/G, m and v 8Ψ/G, gradients 4Ψ/G,
    sqrt(v) 4Ψ/G: 20Ψ/G at the AdamW step, the paper's 16Ψ/N_d plus the step's temporary."""
    w = workload(LLAMA, seq=8192, world=8, ring=8)
    psi = parameter_count(LLAMA) / 8
    terms = stack_instants(w)["optimizer"]
    assert terms["master_params_bytes"] == 4 * psi
    assert terms["optimizer_states_bytes"] == 8 * psi
    assert terms["gradients_bytes"] == 4 * psi
    assert terms["optimizer_step_bytes"] == 4 * psi


def test_planned_zero_stages_shrink_model_states():
    """ZeRO-1/2 (planned) follow the paper (2Ψ + 2Ψ + 12Ψ/N_d with bf16): bf16 copy e·Ψ, bf16
    gradients 2Ψ (÷G from stage 2), master + m + v 12Ψ/G; stage by stage the states never grow."""
    states = ("master_params_bytes", "param_copy_bytes", "optimizer_states_bytes", "gradients_bytes")
    totals = []
    for sharding in ("none", "zero1", "zero2", "zero3"):
        w = workload(LLAMA, seq=8192, world=8, ring=8, sharding=sharding)
        totals.append(sum(stack_instants(w)["optimizer"][k] for k in states))
    psi = parameter_count(LLAMA)
    assert totals[1] == pytest.approx(2 * psi + 2 * psi + 12 * psi / 8)
    assert totals[2] == pytest.approx(2 * psi + 2 * psi / 8 + 12 * psi / 8)
    assert totals == sorted(totals, reverse=True)


def test_saved_activations_of_one_block_by_hand():
    """T = 512 tokens, E 64, H 4 / H_kv 2 × D 16, F 128, bf16. none: 4 hidden states (x, normed x, h,
    normed h) 4·T·E·2, two rstd 2·T·4, q k v T·128·2, output T·64·2, LSE 4·T·4, gate up product
    3·T·F·2; selective: x + q k v + output + LSE; full: x."""
    T = 512
    none = 4 * T * 64 * 2 + 2 * T * 4 + T * 128 * 2 + T * 64 * 2 + 4 * T * 4 + 3 * T * 128 * 2
    assert saved_block_bytes(workload(seq=T)) == none
    assert saved_block_bytes(workload(seq=T, checkpointing="selective")) == T * 64 * 2 + T * 128 * 2 + T * 64 * 2 + \
        4 * T * 4
    assert saved_block_bytes(workload(seq=T, checkpointing="full")) == T * 64 * 2
    assert saved_block_bytes(workload(seq=T, checkpointing="full", offload_checkpoints=True)) == 0
    assert block_tensors(workload(seq=T), upto="attention") == T * 4 + T * 64 * 2


def test_offloaded_checkpoints_are_host_memory():
    """Offloading moves the L block inputs off the GPU (L·T·E·e of pinned host memory, reported
    apart): the loss instant holds L·T·E·e less; the peak never grows (at block 0's backward, the
    peak here, no block input is saved anyway)."""
    w = workload(LLAMA.with_layers(8), seq=65536, world=2, ring=2, checkpointing="full", offload_checkpoints=True)
    kept = replace(w, settings=replace(w.settings, offload_checkpoints=False))
    t, e = 65536 // 2, 2
    assert host_terms(w) == {name: 8 * t * 4096 * e if name == "offloaded_checkpoints_bytes" else 0.0
                             for name in HOST_TERM_NAMES}
    assert set(host_terms(w)) == set(HOST_TERM_NAMES)
    saved = [stack_instants(x)["loss_backward"]["saved_activations_bytes"] for x in (kept, w)]
    assert saved[0] - saved[1] == 8 * t * 4096 * e
    assert sum(stack_terms(w).values()) <= sum(stack_terms(kept).values())


def test_forward_only_holds_weights_and_one_block():
    """Prefill: replicated bf16 weights 2Ψ, no gradients or optimizer states, nothing saved."""
    w = workload(LLAMA.with_layers(4), seq=32768, training=False)
    terms = stack_terms(w)
    assert terms["param_copy_bytes"] == 2 * parameter_count(LLAMA.with_layers(4))
    for name in ("master_params_bytes", "optimizer_states_bytes", "gradients_bytes", "saved_activations_bytes"):
        assert terms[name] == 0


def test_full_logits_dominate_long_sequences():
    """Full loss at 64K tokens per GPU of a 128K vocabulary: T·V·4 bytes of fp32 log-probabilities
    and 2·T·V·4 of their gradients; a 4,096-token chunk holds 3·4096·V·4 instead."""
    w = workload(LLAMA.with_layers(4), seq=131072, world=2, ring=2, loss="full", checkpointing="full")
    assert peak_instant(w) == "loss_backward"
    terms = stack_terms(w)
    assert (terms["logits_bytes"], terms["loss_bytes"]) == (65536 * LLAMA.vocab_size * 4, 2 * 65536 * LLAMA.vocab_size * 4)
    chunked = stack_instants(replace(w, settings=replace(w.settings, loss="chunked")))["loss_backward"]
    assert chunked["logits_bytes"] + chunked["loss_bytes"] == 3 * 4096 * LLAMA.vocab_size * 4


# ----------------------------------------------------------------------------- invariants

shapes = st.sampled_from([TINY, TINY.with_layers(3), replace(TINY, name="t2", tied_embeddings=True, qk_norm=True),
                          LLAMA.with_layers(2)])
modes = st.sampled_from(["none", "selective", "full"])


@given(model=shapes, mode=modes, chunks=st.integers(1, 8), loss=st.sampled_from(["full", "chunked"]),
       training=st.booleans())
def test_memory_never_decreases_with_tokens(model, mode, chunks, loss, training):
    """Per-rank peak bytes are non-decreasing in the sequence length (W = P = 2)."""
    small = workload(model, seq=1024 * chunks, world=2, ring=2, training=training, checkpointing=mode, loss=loss,
                     loss_chunk_tokens=512)
    large = replace(small, seq_len_tokens=2 * small.seq_len_tokens)
    assert sum(stack_terms(large).values()) >= sum(stack_terms(small).values())


@given(model=shapes, mode=modes, ring=st.sampled_from([2, 4]), training=st.booleans())
def test_larger_ring_never_more_per_rank(model, mode, ring, training):
    """Doubling the ring (W = P, zero3 over all) never raises the per-rank peak."""
    w = workload(model, seq=16384, world=ring, ring=ring, training=training, checkpointing=mode)
    wider = replace(w, world_size=2 * ring, layout=RingLayout(ring_size=2 * ring))
    assert sum(stack_terms(wider).values()) <= sum(stack_terms(w).values())


@given(model=shapes, seq=st.sampled_from([2048, 16384, 65536]))
def test_more_checkpointing_never_more_memory(model, seq):
    """full ≤ selective ≤ none at the same workload."""
    peaks = [sum(stack_terms(workload(model, seq=seq, world=2, ring=2, checkpointing=m)).values())
             for m in ("full", "selective", "none")]
    assert peaks == sorted(peaks)


@given(model=shapes, mode=modes, training=st.booleans(), sharding=st.sampled_from(["none", "zero1", "zero2", "zero3"]))
def test_terms_are_named_and_non_negative(model, mode, training, sharding):
    """Every instant has every name of ``STACK_TERM_NAMES``, none negative; the reported terms are
    the largest instant's."""
    w = workload(model, seq=4096, world=2, ring=2, training=training, checkpointing=mode, sharding=sharding)
    instants = stack_instants(w)
    for terms in instants.values():
        assert tuple(terms) == STACK_TERM_NAMES and min(terms.values()) >= 0
    assert sum(stack_terms(w).values()) == max(sum(t.values()) for t in instants.values())
