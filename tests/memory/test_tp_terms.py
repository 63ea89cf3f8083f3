"""Tensor parallelism in the whole-model byte terms (``ringplan.memory.tp_terms``): hand-computed values for a
tiny model at T = 2, the reduction to the single-GPU terms at T = 1, and what is (and is not) monotone in T.
The agreement with the runtime's live tensors is ``tests/memory/test_tp_terms_tracker.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.memory import tp_terms
from ringplan.memory.model_states import (block_param_shapes, master_params_bytes, optimizer_states_bytes,
                                          rank_param_elements, stack_shape, unit_shapes)
from ringplan.memory.stack_terms import (block_tensors, hidden_state_bytes, log_probabilities_bytes,
                                         norm_statistics_bytes, stack_instants, stack_terms)
from ringplan.models import ModelSpec, load_model_catalog, parameter_count
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout

TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
LLAMA = load_model_catalog().model("llama-3-8b")
E, H, H_KV, D, F, V, BF16, FP32 = 64, 4, 2, 16, 128, 256, 2, 4


def workload(model=TINY, *, tp=2, ring=1, dp=1, seq=None, training=True, scheme="ring", **settings) -> StackWorkload:
    seq = seq or 256 * ring
    return StackWorkload(model=model, seq_len_tokens=seq, world_size=dp * ring * tp, tp_degree=tp,
                         layout=RingLayout(ring_size=ring, cp_scheme=scheme), training=training,
                         settings=StackSettings(**settings))


# ----------------------------------------------------------------------------- hand-computed at T = 2


def test_one_tp_rank_holds_half_the_sharded_weights_and_every_norm():
    """T = 2: q (H/2·D, E), k, v (H_kv/2·D, E), o (E, H/2·D), gate/up (F/2, E), down (E, F/2); both norms
    (E, 1) whole; the table and the head (V/2, E); the final norm (E, 1)."""
    w = workload()
    q, kv, f = H // 2 * D, H_KV // 2 * D, F // 2
    assert block_param_shapes(w) == [(q, E), (kv, E), (kv, E), (E, q), (E, 1), (E, 1), (f, E), (f, E), (E, f)]
    units = unit_shapes(w)
    assert units["embed"] == ((V // 2, E),) and units["head"] == ((V // 2, E),) and units["root"] == ((E, 1),)
    block = 2 * q * E + 2 * kv * E + 2 * E + 3 * f * E
    psi = 2 * block + 2 * (V // 2) * E + E
    assert rank_param_elements(w) == psi  # G = W / T = 1
    assert master_params_bytes(w) == psi * FP32 and optimizer_states_bytes(w) == 2 * psi * FP32


def test_sequence_parallel_activations_are_halved_and_the_gathered_inputs_are_not():
    """T = 2, n = 256: a hidden state between blocks holds 128 rows (B·n/T·E·e), rstd 128·4; the normed input
    the colwise linears save holds all 256 rows; the attention part has H/2 heads and H_kv/2 KV heads."""
    w = workload()
    assert hidden_state_bytes(w) == 128 * E * BF16
    assert tp_terms.gathered_hidden_bytes(w) == 256 * E * BF16
    assert norm_statistics_bytes(w) == 128 * FP32
    p = tp_terms.attention_point(w)
    assert (p.n_heads, p.n_kv_heads, p.tokens_per_rank) == (H // 2, H_KV // 2, 256)
    saved = 256 * (H // 2 + 2 * H_KV // 2) * D * BF16 + 256 * H // 2 * D * BF16 + H // 2 * 256 * FP32
    assert tp_terms.attention_saved_bytes(p) == saved
    ffn = 256 * F // 2 * BF16
    # rstd, gathered normed input; attention; h, gathered MLP-norm output, rstd; gate, up, product
    expected = (128 * FP32 + 256 * E * BF16) + saved + (128 * E * BF16 + 256 * E * BF16 + 128 * FP32) + 3 * ffn
    assert block_tensors(w, upto="all", mode="none") == expected


def test_loss_parallel_logits_hold_a_vocabulary_shard():
    """Loss parallel: the fp32 log-probabilities of t rows hold V/T columns, t·V/2·4 at T = 2."""
    assert log_probabilities_bytes(workload(), 256) == 256 * V // 2 * FP32


def test_kv_heads_are_replicated_beyond_h_kv():
    """T = 4 > H_kv = 2: one KV head per rank's activations (each head used by T/H_kv = 2 ranks), H/4 query
    heads; the k and v weights stay whole on every rank, (H_kv·D, E), as the runtime replicates them."""
    w = workload(tp=4)
    assert (stack_shape(w).H, stack_shape(w).H_kv) == (1, 1)
    assert block_param_shapes(w)[1] == block_param_shapes(w)[2] == (H_KV * D, E)
    assert block_param_shapes(workload(tp=2))[1] == (H_KV // 2 * D, E)


# ----------------------------------------------------------------------------- reductions at T = 1


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen3-0.6b", "qwen3-8b", "mistral-7b", "gpt2"])
def test_tp_shapes_at_t1_are_the_model(name):
    """Reduction: ``tp_local_param_shapes`` at T = 1 equals the single-GPU unit shapes and Ψ."""
    model = load_model_catalog().model(name)
    w = workload(model, tp=1, seq=1024)
    assert tp_terms.tp_local_param_shapes(w) == unit_shapes(w)
    assert rank_param_elements(w) == parameter_count(model)


@pytest.mark.parametrize("training", [True, False])
def test_sequence_parallel_and_gathered_coincide_at_t1(training):
    """At T = 1 the sequence shard is the whole sequence: one hidden state, and the attention point is the
    whole layer's (H and H_kv heads)."""
    w = workload(LLAMA, tp=1, ring=2, seq=8192, training=training)
    assert hidden_state_bytes(w) == tp_terms.gathered_hidden_bytes(w) == 4096 * LLAMA.embed_dim * BF16
    p = tp_terms.attention_point(w)
    assert (p.n_heads, p.n_kv_heads) == (LLAMA.n_heads, LLAMA.n_kv_heads)


# ----------------------------------------------------------------------------- monotonicity in T


TP_SETTINGS = st.fixed_dictionaries({
    "checkpointing": st.sampled_from(["none", "selective", "full"]), "loss": st.sampled_from(["full", "chunked"]),
    "sharding": st.sampled_from(["none", "zero3"])})


@given(settings=TP_SETTINGS, ring=st.sampled_from([1, 2, 4]), dp=st.sampled_from([1, 2]),
       training=st.booleans(), tied=st.booleans())
def test_more_tensor_parallel_never_more_memory_per_rank(settings, ring, dp, training, tied):
    """At a fixed ring P, data-parallel DP and sequence, T = 2 → 4 (the FSDP group G = P·DP fixed) never adds
    per-rank bytes: every term is a TP shard (non-increasing in T), a replicated norm or weight, a gathered input
    or one of DTensor's copies (constant for T ≥ 2). T = 1 → 2 trades those copies (absent at T = 1) for halved
    states and activations: no more memory for these tiny models (not a theorem: a model whose activations
    are all in gathered inputs could need more at T = 2)."""
    model = replace(TINY, n_kv_heads=4, tied_embeddings=tied)
    totals = [sum(stack_terms(workload(model, tp=t, ring=ring, dp=dp, training=training, **settings)).values())
              for t in (1, 2, 4)]
    assert totals[0] >= totals[1] >= totals[2]


def test_trading_context_for_tensor_parallel_at_fixed_world_can_cost_memory():
    """What is NOT monotone: at a fixed W, T = 8 × P = 1 needs more per rank than T = 2 × P = 4 for Llama-3-8B
    at 128K (full checkpointing): the gathered inputs and the attention over the whole sequence do not shrink
    with T, the KV heads stop shrinking at T = H_kv."""
    def need(t: int, p: int) -> float:
        return sum(stack_terms(workload(LLAMA, tp=t, ring=p, seq=131072, checkpointing="full")).values())

    assert need(8, 1) > need(2, 4)


def test_every_instant_has_every_term():
    """The TP instants are keyed like the single-GPU ones (no term family is dropped at T = 2)."""
    for name, terms in stack_instants(workload()).items():
        assert set(terms) == set(stack_instants(workload(tp=1))["loss_backward"]), name


@pytest.mark.parametrize("settings", [{}, {"checkpointing": "full"}, {"loss_chunk_tokens": 64}, {"loss": "full"}])
def test_lower_bound_never_exceeds_the_prediction_at_t2(settings):
    """The capacity search's cheap bound (``stack_model.lower_bound_terms``: the loss-parallel forward at
    T > 1) never exceeds the terms, nor ``lower_bound_bytes`` the predicted need + bound."""
    from ringplan.hardware import load_catalog
    from ringplan.memory.stack_model import default_stack_memory_model, lower_bound_terms

    w = workload(LLAMA, tp=2, ring=4, seq=65536, **settings)
    assert sum(lower_bound_terms(w).values()) <= sum(stack_terms(w).values())
    model, gpu = default_stack_memory_model(), load_catalog().gpu("h100")
    bound = model.lower_bound_bytes(w, gpu)
    assert 0 < bound <= model.predict(w, gpu).upper_bytes


def test_loss_parallel_bound_under_zero1_and_zero2():
    """The loss-parallel lower bound at T > 1 holds for ZeRO-1/2 too (no FSDP state at the loss: no gathered
    head), and never exceeds the prediction (regression: a KeyError stopped the whole-model search)."""
    from ringplan.hardware import load_catalog
    from ringplan.memory.stack_model import default_stack_memory_model, lower_bound_terms
    from ringplan.models import load_model_catalog
    from ringplan.stack import StackSettings, StackWorkload
    from ringplan.workload import RingLayout

    model, gpu = load_model_catalog().model("llama-3-70b"), load_catalog().gpu("h100")
    for sharding in ("zero1", "zero2"):
        w = StackWorkload(model=model, seq_len_tokens=131072, world_size=16, layout=RingLayout(ring_size=8),
                          tp_degree=2, settings=StackSettings(sharding=sharding, checkpointing="full"))
        assert lower_bound_terms(w)["gathered_params_bytes"] == 0.0
        memory = default_stack_memory_model()
        assert memory.lower_bound_bytes(w, gpu) <= memory.predict(w, gpu).upper_bytes
