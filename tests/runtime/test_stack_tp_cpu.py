"""Tensor parallelism (Megatron TP + sequence parallelism, DTensor) in the whole stack on CPU, gloo,
against ``test_stack_cpu``'s dense float64 reference: loss, every gathered gradient
(``DTensor.full_tensor()`` over the (dp·cp, tp) mesh), the AdamW update and the next loss.

Ranks: W = DP × CP × T, TP innermost. One spawned group per world size (2, 4) runs every configuration
of that size (W = 8 — hybrid U = 2 × R = 2 × T = 2, DP 2 × CP 2 × T 2 with HSDP G = 2 — only with
RINGPLAN_TEST_W8=1). T = 2 on TINY (H = 4, H_kv = 2: GQA with one KV head per TP rank); T > H_kv (MQA at T = 2,
GQA H_kv = 2 at T = 4) replicates the KV heads (``tensor_parallel.KVHeadLinear``). A setting the runtime
does not run with T > 1 (the tiled MLP) is refused with the same ``ValueError`` on every rank before any
communication.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist

from ringplan.stack import kv_heads_per_tp_rank
from ringplan_runtime import shard_sequence, spawn
from ringplan_runtime.reference import relative_error
from ringplan_runtime.stack_measure import tracked_stack_peak
from ringplan_runtime.stack_parallel import build_stack, global_batch, local_batch, placement
from ringplan_runtime.tensor_parallel import check_tensor_parallel
from runtime.test_stack_cpu import (DATA_SEED, REL_TOL_HIDDEN, SEED, Config, _dense_initial, _train, check_training,
                                    dense_reference)

SPAWN_TIMEOUT_S = 240.0
#: W = 8 (hybrid x TP, DP x CP x TP with HSDP) takes ~50 s on 2 cores: run with RINGPLAN_TEST_W8=1.
WORLDS = (2, 4, 8) if os.environ.get("RINGPLAN_TEST_W8") else (2, 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelConfig:
    """A ``test_stack_cpu.Config`` run with tensor parallel ``tp``, CP scheme ``scheme`` (Ulysses degree
    ``ulysses``) and optionally ``kv_heads`` KV heads."""

    base: Config
    tp: int = 1
    scheme: str = "ring"
    ulysses: int | None = None
    kv_heads: int | None = None
    mlp_tile: int | None = None

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def world(self) -> int:
        return self.base.world

    def workload(self, *, training: bool = True):
        w = self.base.workload(training=training)
        layout = dataclasses.replace(w.layout, cp_scheme=self.scheme, ulysses_degree=self.ulysses)
        model = w.model if self.kv_heads is None else dataclasses.replace(w.model, n_kv_heads=self.kv_heads)
        settings = dataclasses.replace(w.settings, mlp_tile_tokens=self.mlp_tile)
        return dataclasses.replace(w, layout=layout, tp_degree=self.tp, model=model, settings=settings)


CONFIGS = [
    ParallelConfig(base=Config(name="t2_full_offloaded_checkpoints", world=2, ring=1, checkpointing="full",
                               offload=True), tp=2),
    ParallelConfig(base=Config(name="t2_tied_qknorm_selective_chunked", world=2, ring=1, tied=True, qk_norm=True,
                               checkpointing="selective", loss="chunked", chunk_tokens=20), tp=2),
    ParallelConfig(base=Config(name="t2_cp2_ring_zigzag_biases", world=4, ring=2, layout="zigzag", qkv_bias=True),
                   tp=2),
    ParallelConfig(base=Config(name="t2_cp2_allgather_qknorm", world=4, ring=2, layout="zigzag", qk_norm=True), tp=2,
                   scheme="allgather"),
    ParallelConfig(base=Config(name="t2_cp2_ulysses_tied", world=4, ring=2, tied=True), tp=2, scheme="ulysses"),
    ParallelConfig(base=Config(name="t2_dp2_replicated_full_chunked", world=4, ring=1, sharding="none", batch=1,
                               checkpointing="full", loss="chunked"), tp=2),
    ParallelConfig(base=Config(name="t2_mqa_replicated_kv_biases", world=2, ring=1, qkv_bias=True), tp=2, kv_heads=1),
    ParallelConfig(base=Config(name="t4_gqa_replicated_kv_qknorm_selective", world=4, ring=1, qk_norm=True,
                               checkpointing="selective"), tp=4),
    ParallelConfig(base=Config(name="t2_hybrid_u2_r2_zigzag_qknorm", world=8, ring=4, layout="zigzag", qk_norm=True),
                   tp=2, scheme="hybrid", ulysses=2),
    ParallelConfig(base=Config(name="t2_cp2_dp2_hsdp_g2", world=8, ring=2, layout="zigzag", batch=1,
                               shard_group_size=2), tp=2),
]
PREFILL = [ParallelConfig(base=Config(name="prefill_t2_cp2_zigzag", world=4, ring=2, layout="zigzag"), tp=2)]
TILED = ParallelConfig(base=Config(name="t2_tiled_mlp", world=2, ring=1), tp=2, mlp_tile=8)
#: Tracker runs (bf16, the default settings: chunked loss in one chunk): the peak and what is live at it.
MEASURED = [ParallelConfig(base=Config(name="peak_t2", world=2, ring=1), tp=2),
            ParallelConfig(base=Config(name="peak_t2_cp2_ulysses", world=4, ring=2), tp=2, scheme="ulysses")]


def _prefill(config: ParallelConfig) -> torch.Tensor:
    w = config.workload(training=False)
    run = build_stack(w, device="cpu", seed=SEED)
    tokens, _ = local_batch(*global_batch(w, DATA_SEED), dist.get_rank(), w)
    return run.hidden(tokens).clone()


def _refusal(config: ParallelConfig) -> str:
    try:
        build_stack(config.workload(), device="cpu", seed=SEED)
    except ValueError as error:
        return str(error)
    return ""


def _peak(config: ParallelConfig):
    w = config.workload()
    return tracked_stack_peak(dataclasses.replace(w, settings=dataclasses.replace(w.settings, param_dtype="bf16")))


def run_world(world: int, configs: list, prefill: list, refused: list, measured: list = ()) -> dict:
    """Spawned body: every configuration of this world size; rank 0 returns everything, the others
    their losses and prefill hidden states; ``refused`` configurations return their ValueError text,
    ``measured`` ones the tracker's ``StackPeak``."""
    torch.set_num_threads(1)
    results = {c.name: _train(c) for c in configs if c.world == world}
    results |= {c.name: _prefill(c) for c in prefill if c.world == world}
    results |= {c.name: _refusal(c) for c in refused if c.world == world}
    results |= {c.name: _peak(c) for c in measured if c.world == world}
    if dist.get_rank() != 0:
        return {name: (r["loss"], r["second_loss"]) if isinstance(r, dict) else r for name, r in results.items()}
    return results


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"W{w}")
def world_results(request):
    """(world size, per-rank results) of one spawned gloo group running that world's configurations."""
    return request.param, spawn(run_world, world_size=request.param, backend="gloo",
                                args=(request.param, CONFIGS, PREFILL, [TILED], MEASURED), timeout_s=SPAWN_TIMEOUT_S)


def test_tensor_parallel_training_matches_dense_reference(world_results):
    """T = 2 alone (also with offloaded checkpoints), with CP = 2 (ring, all-gather, Ulysses; FSDP2 over the CP ranks), with DP = 2 (replicated
    weights: HSDP mesh of one shard), and
    T > H_kv (MQA T = 2, GQA T = 4: replicated KV heads): loss, every gathered gradient, the AdamW update
    and the next loss equal the float64 dense model's (1e-5)."""
    world, per_rank = world_results
    for config in (c for c in CONFIGS if c.world == world):
        check_training(config, per_rank)


def test_tensor_parallel_prefill_matches_reference(world_results):
    """Forward-only T = 2 × CP = 2: every rank's final hidden rows (all-gathered over TP) equal the dense
    model's rows of its CP chunk; both TP ranks of a group return the same rows."""
    world, per_rank = world_results
    for config in (c for c in PREFILL if c.world == world):
        w = config.workload(training=False)
        tokens, labels = global_batch(w, DATA_SEED)
        _, hidden = dense_reference({n: t.double() for n, t in _dense_initial(config).items()}, w.model, tokens,
                                    labels)
        for rank in range(world):
            cp_index = placement(w, rank).ring_index
            local = shard_sequence(hidden, rank=cp_index, ring_size=config.base.ring, layout=config.base.layout)
            error = relative_error(per_rank[rank][config.name], local)
            assert error <= REL_TOL_HIDDEN, f"{config.name}: rank {rank} hidden off by {error:.2e}"


def test_unrunnable_setting_is_refused_on_every_rank(world_results):
    """The tiled MLP with T = 2: every rank raises the same ValueError before any collective (the spawned
    group ran the tracker configurations afterwards, so no rank hung)."""
    world, per_rank = world_results
    if world != TILED.world:
        return
    assert "tiled MLP" in per_rank[0][TILED.name]
    assert all(results[TILED.name] == per_rank[0][TILED.name] for results in per_rank)


def test_tracker_measures_tensor_parallel_stack(world_results):
    """``tracked_stack_peak`` runs a T = 2 stack (alone and × CP = 2 Ulysses): a peak above the resident
    bytes on every rank, and the logits it holds are vocabulary-parallel ``[rows, V/T]`` (loss_parallel),
    never the full ``[rows, V]``."""
    world, per_rank = world_results
    for config in (c for c in MEASURED if c.world == world):
        w = config.workload()
        rows, vocab = w.batch * w.seq_len_tokens // w.layout.ring_size, w.model.vocab_size
        for results in per_rank:
            peak = results[config.name]
            assert peak.peak_bytes > peak.resident_bytes > 0, config.name
        shapes = {t.shape for t in per_rank[0][config.name].peak_tensors}
        assert (rows, vocab // config.tp) in shapes and (rows, vocab) not in shapes, f"{config.name}: {shapes}"


def test_placement_puts_tensor_parallel_ranks_innermost():
    """W = 8 = DP 2 × CP 2 × T 2: rank r is TP index r mod 2, CP index (r // 2) mod 2, replica r // 4;
    with T = 1 the placement is the former ring placement (ring r // P, index r mod P)."""
    w = ParallelConfig(base=Config(name="w8", world=8, ring=2, batch=1), tp=2).workload()
    got = [(p.replica, p.ring_index, p.tp_index) for p in (placement(w, r) for r in range(8))]
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    w1 = Config(name="w4", world=4, ring=2, batch=1).workload()
    assert [(placement(w1, r).replica, placement(w1, r).ring_index) for r in range(4)] == [(0, 0), (0, 1), (1, 0),
                                                                                          (1, 1)]


def test_unrunnable_tensor_parallel_settings_raise():
    """The runtime's own refusals, named: the tiled MLP with T > 1, T not dividing the n tokens per rank
    (sequence parallelism), Ulysses degree not dividing H / T. MQA at T = 2 runs (one replicated KV head
    per rank, as the planner's ``kv_heads_per_tp_rank``)."""
    mqa = next(c for c in CONFIGS if c.kv_heads == 1).workload()
    assert kv_heads_per_tp_rank(mqa) == 1
    check_tensor_parallel(mqa)
    with pytest.raises(ValueError, match="tiled MLP"):
        check_tensor_parallel(TILED.workload())
    with pytest.raises(ValueError, match="sequence parallelism"):  # the core may refuse it first
        check_tensor_parallel(dataclasses.replace(CONFIGS[0].workload(), seq_len_tokens=31))
    wide = ParallelConfig(base=Config(name="u4", world=8, ring=4, batch=1), tp=2, scheme="ulysses").workload()
    with pytest.raises(ValueError, match="Ulysses"):
        check_tensor_parallel(wide)
