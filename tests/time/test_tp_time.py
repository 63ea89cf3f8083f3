"""Tensor parallelism in the whole-model step time (``ringplan.time.tp_time``): the TP collectives' volumes by
hand, nothing added at T = 1, GEMM shapes and FLOPs per rank divided by T."""

from __future__ import annotations

import pytest

from ringplan.models import ModelSpec, load_model_catalog
from ringplan.stack import StackSettings, StackWorkload
from ringplan.time.gemms import block_gemms, gemm_flops, lm_head_gemm
from ringplan.time.links import LinkModel
from ringplan.time.stack_bytes import block_op_bytes, tp_block_op_bytes
from ringplan.time.stack_time import STEP_PARTS, step_time
from ringplan.time.tp_time import (step_tp_collectives, tp_comm_s, tp_param_count, tp_sent_bytes, tp_unit_params)
from ringplan.workload import RingLayout

TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
LLAMA = load_model_catalog().model("llama-3-8b")
REL = 1e-12


def workload(model=TINY, *, tp=2, ring=1, seq=None, training=True, **settings) -> StackWorkload:
    return StackWorkload(model=model, seq_len_tokens=seq or 256 * ring, world_size=ring * tp, tp_degree=tp,
                         layout=RingLayout(ring_size=ring), training=training, settings=StackSettings(**settings))


CASES = [(True, "none", 2 * 4 + 2 * 4 + 4), (True, "full", 2 * 4 + 2 * 7 + 4), (True, "selective", 2 * 4 + 2 * 7 + 4),
         (False, "none", 2 * 4 + 2)]


@pytest.mark.parametrize(("training", "checkpointing", "collectives"), CASES)
def test_collective_count_and_volume_by_hand(training, checkpointing, collectives):
    """L = 2 blocks: 4 collectives forward and 4 backward per block (+ 3 recomputed under checkpointing),
    embedding and LM head 2 each in training (prefill: the embedding's reduce-scatter and the final hidden
    state's all-gather); each rank sends (T − 1)/T · B·n·E·e = 1/2 · 256·64·2 bytes per collective."""
    w = workload(training=training, checkpointing=checkpointing)
    assert step_tp_collectives(w) == collectives
    assert tp_sent_bytes(w, step_tp_collectives(w)) == collectives * 0.5 * 256 * 64 * 2


def test_tp_comm_seconds_are_alpha_beta_per_collective():
    """Each collective costs α + (T − 1)/T · B·n·E·e / β on the TP link, none hidden."""
    link = LinkModel(name="test", latency_s=1e-5, bandwidth_bytes_per_s=1e11)
    w = workload(tp=4, checkpointing="none")
    per = 1e-5 + 0.75 * 256 * 64 * 2 / 1e11
    assert tp_comm_s(w, link) == pytest.approx(step_tp_collectives(w) * per, rel=REL)


def test_t1_adds_no_tp_communication():
    """T = 1: no TP collective, ``tp_comm_s`` is 0 and the parts still sum to the step."""
    w = workload(LLAMA, tp=1, ring=8, seq=65536)
    assert step_tp_collectives(w) == 0
    step = step_time(w, "h100")
    assert step.tp_comm_s == 0.0 and "tp_comm_s" in STEP_PARTS
    assert sum(step.parts_s.values()) == pytest.approx(step.step_time_s, rel=REL)


def test_tp_step_has_exposed_tp_communication():
    """T = 2 on H100s: ``tp_comm_s`` > 0, a part of the step (the parts sum to it)."""
    step = step_time(workload(LLAMA, tp=2, ring=4, seq=65536), "h100")
    assert step.tp_comm_s > 0
    assert sum(step.parts_s.values()) == pytest.approx(step.step_time_s, rel=REL)


def test_gemm_shapes_split_by_t():
    """Llama-3-8B at T = 4: colwise q 4096/4, k/v 8/4 heads · 128, gate/up 14336/4; rowwise o and down take
    in_features / 4; the LM head 128256/4 vocabulary columns."""
    shapes = {s.name: (s.in_features, s.out_features, s.count) for s in block_gemms(LLAMA, 4)}
    assert shapes == {"q": (4096, 1024, 1), "kv": (4096, 256, 2), "o": (1024, 4096, 1), "gate_up": (4096, 3584, 2),
                      "down": (3584, 4096, 1)}
    assert (lm_head_gemm(LLAMA, 4).in_features, lm_head_gemm(LLAMA, 4).out_features) == (4096, 32064)
    assert block_gemms(LLAMA) == block_gemms(LLAMA, 1) and lm_head_gemm(LLAMA) == lm_head_gemm(LLAMA, 1)


def test_gemm_flops_per_rank_divided_by_t():
    """The step's GEMM FLOPs per rank halve from T = 1 to T = 2 at the same ring (the same local tokens),
    Llama-3-8B (T divides H, H_kv, F and V)."""
    one = step_time(workload(LLAMA, tp=1, ring=4, seq=65536), "h100").gemm_flops
    two = step_time(workload(LLAMA, tp=2, ring=4, seq=65536), "h100").gemm_flops
    assert two == pytest.approx(one / 2, rel=REL)


def test_replicated_kv_heads_keep_their_gemm():
    """T = 16 > H_kv = 8: each rank still computes one KV head's k and v (1/8 of them, not 1/16)."""
    kv = {s.name: s for s in block_gemms(LLAMA, 16)}["kv"]
    assert gemm_flops(1, kv) == gemm_flops(1, {s.name: s for s in block_gemms(LLAMA)}["kv"]) / 8


def test_sequence_parallel_elementwise_bytes():
    """T = 2: the norms' bytes per local token halve (sequence-parallel rows), the MLP activation's too (F/2);
    T = 1 is ``block_op_bytes``."""
    e = 2
    full, half = block_op_bytes(LLAMA, e), tp_block_op_bytes(LLAMA, e, 2)
    assert tp_block_op_bytes(LLAMA, e, 1) == full
    assert half["norms"] == (full["norms"][0] / 2, full["norms"][1] / 2)
    assert half["mlp_act"] == (full["mlp_act"][0] / 2, full["mlp_act"][1] / 2)
    assert half["residual"] == (6 * e * 4096 / 2, 6 * e * 4096 / 2 + 9 * e * 4096)


def test_fsdp_moves_the_tp_local_parameters():
    """FSDP2's units hold one TP rank's parameters: a block's sharded weights halve at T = 2, its two norms
    stay whole (E each)."""
    block = tp_unit_params(workload(LLAMA, tp=2, seq=4096))["block"]
    from ringplan.models import layer_parameter_count

    assert block == (layer_parameter_count(LLAMA) - 2 * 4096) // 2 + 2 * 4096
    assert tp_param_count(workload(LLAMA, tp=2, seq=4096)) < tp_param_count(workload(LLAMA, tp=1, seq=4096))


def _runtime_tp_collectives(training: bool, checkpointing: str) -> tuple[int, set[int]]:
    """(all-gathers + reduce-scatters DTensor issues in one step of the runtime, their buffers' bytes)."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ringplan_runtime.stack_measure import rank_batch, run_one_step
    from ringplan_runtime.stack_parallel import build_stack

    torch.set_num_threads(1)
    w = workload(training=training, checkpointing=checkpointing)
    run = build_stack(w, device=torch.device("cpu"), seed=0)
    batch = rank_batch(w, run, 0)
    if training:
        run_one_step(run, batch)  # warm-up: AdamW's states, FSDP2's buffers
    seen = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith("_c10d_functional.") and ("all_gather" in name or "reduce_scatter" in name):
                gathered = "all_gather" in name
                seen[args[0].numel() * args[0].element_size() * (w.tp_degree if gathered else 1)] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run_one_step(run, batch)
    return sum(seen.values()), set(seen)


@pytest.mark.slow
@pytest.mark.parametrize(("training", "checkpointing", "collectives"), CASES)
def test_collective_count_is_the_runtimes(training, checkpointing, collectives):
    """The TP runtime (DTensor on a gloo pair, T = 2) issues exactly ``step_tp_collectives`` all-gathers and
    reduce-scatters per step, each over a B·n·E·e buffer."""
    pytest.importorskip("torch")
    from ringplan_runtime import spawn

    count, sizes = spawn(_runtime_tp_collectives, world_size=2, backend="gloo", args=(training, checkpointing),
                         timeout_s=300)[0]
    assert count == collectives == step_tp_collectives(workload(training=training, checkpointing=checkpointing))
    assert sizes == {256 * 64 * 2}


def test_tp_places_the_cp_ring_across_nodes():
    """TP ranks are innermost, so a CP ring's neighbours are T GPUs apart: at T = 8 on 8-GPU nodes every
    ring hop crosses nodes and the attention is slower than on one big node (same workload, 64 GPUs a node);
    at T = 1 with a ring inside one node the two agree."""
    from dataclasses import replace as replaced

    from ringplan.hardware import load_catalog
    from ringplan.models import load_model_catalog
    from ringplan.stack import StackSettings, StackWorkload
    from ringplan.time.stack_time import step_time
    from ringplan.workload import RingLayout

    h100 = load_catalog().gpu("h100")
    big_node = replaced(h100, gpus_per_node=64)
    model = load_model_catalog().model("llama-3-8b").with_layers(2)
    settings = StackSettings(checkpointing="full")
    tp8 = StackWorkload(model=model, seq_len_tokens=262144, world_size=16, layout=RingLayout(ring_size=2),
                        tp_degree=8, settings=settings)
    assert step_time(tp8, h100).attention_s > step_time(tp8, big_node).attention_s
    tp1 = StackWorkload(model=model, seq_len_tokens=262144, world_size=8, layout=RingLayout(ring_size=8),
                        settings=settings)
    assert step_time(tp1, h100).attention_s == step_time(tp1, big_node).attention_s


def test_a_ring_that_does_not_fill_nodes_is_spread_evenly_and_timed():
    """20 ranks on nodes of 8 sit 5 on each of 4 nodes (the largest divisor of P that fits), 5 ranks on
    nodes of 2 (T = 4 on 8-GPU nodes) one per node; a ring inside a node keeps the node; every such
    whole-model plan gets a step time."""
    from ringplan.hardware import load_catalog
    from ringplan.models import load_model_catalog
    from ringplan.stack import StackSettings, StackWorkload
    from ringplan.time.stack_time import ranks_per_node, step_time
    from ringplan.workload import RingLayout

    assert (ranks_per_node(20, 8), ranks_per_node(5, 2), ranks_per_node(4, 8), ranks_per_node(16, 8)) == (5, 1, 8, 8)
    model = load_model_catalog().model("llama-3-8b").with_layers(2)
    w = StackWorkload(model=model, seq_len_tokens=20 * 4096, world_size=20, layout=RingLayout(ring_size=20),
                      settings=StackSettings(checkpointing="full"))
    assert step_time(w, load_catalog().gpu("h100")).step_time_s > 0
