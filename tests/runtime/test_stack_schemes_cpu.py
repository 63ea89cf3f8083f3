"""Every context-parallel scheme in the whole stack (T = 1) on CPU, gloo, against ``test_stack_cpu``'s
dense float64 reference: loss, every gathered gradient, the AdamW update and the next loss.

The stack's attention is ``context_parallel_attention`` with ``w.layout.cp_scheme``: Ulysses over the
CP group (all-gather runs in ``test_stack_tp_cpu`` with T = 2 × CP = 2), hybrid (U = 2 Ulysses × R = 2
ring) over the stack's hybrid groups, the batch and RoPE positions sharded by ``hybrid_shard_sequence``.
One spawned group per world size.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ringplan_runtime import spawn
from ringplan_runtime.stack_parallel import cp_chunk
from runtime.test_stack_cpu import Config, check_training
from runtime.test_stack_tp_cpu import ParallelConfig, run_world

SPAWN_TIMEOUT_S = 240.0
CONFIGS = [
    ParallelConfig(base=Config(name="ulysses_zigzag_qknorm", world=2, ring=2, layout="zigzag", qk_norm=True),
                   scheme="ulysses"),
    ParallelConfig(base=Config(name="ulysses_mqa_full_chunked", world=2, ring=2, checkpointing="full",
                               loss="chunked"), scheme="ulysses", kv_heads=1),
    ParallelConfig(base=Config(name="hybrid_u2_r2_zigzag_tied_chunked", world=4, ring=4, layout="zigzag", tied=True,
                               loss="chunked"), scheme="hybrid", ulysses=2),
]


@pytest.fixture(scope="module", params=(2, 4), ids=lambda w: f"W{w}")
def world_results(request):
    """(world size, per-rank results) of one spawned gloo group running that world's configurations."""
    return request.param, spawn(run_world, world_size=request.param, backend="gloo",
                                args=(request.param, CONFIGS, [], []), timeout_s=SPAWN_TIMEOUT_S)


def test_schemes_match_dense_reference(world_results):
    """Ulysses (W = 2, GQA and MQA with replicated KV heads) and hybrid U = 2 × R = 2
    (W = 4) stacks: loss, every gradient, the AdamW update and the next loss equal the float64 dense model's."""
    world, per_rank = world_results
    for config in (c for c in CONFIGS if c.world == world):
        check_training(config, per_rank)


def test_hybrid_positions_cover_the_sequence():
    """Hybrid U = 2 × R = 2, zigzag, S = 32: CP index j·U + u holds piece u of ring chunk j (ring chunk j =
    the zigzag chunks j and 2R − 1 − j); the four ranks cover 0..S−1 exactly once."""
    w = next(c for c in CONFIGS if c.scheme == "hybrid").workload()
    got = [cp_chunk(torch.arange(32), w, cp_index, dim=0).tolist() for cp_index in range(4)]
    assert got[0] == list(range(0, 8)) and got[1] == list(range(24, 32))
    assert got[2] == list(range(8, 16)) and got[3] == list(range(16, 24))
    assert sorted(sum(got, [])) == list(range(32))
