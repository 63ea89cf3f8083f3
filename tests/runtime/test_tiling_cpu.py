"""Tiled MLP and tiled (chunked) loss on CPU, gloo: the whole stack (FSDP2 + ring attention) with
``mlp_tile_tokens`` set equals the dense float64 model of ``test_stack_cpu`` — loss, every gathered
gradient, the AdamW update and the next loss — at W = 1 and 2; prefill's hidden states too.

The runs and the reference are ``test_stack_cpu``'s (``reference_step``, ``_train``, ``_prefill``),
on configurations with the MLP tiled (``TiledConfig``). Tiling changes only the order in which the
weight gradients are summed over tiles, so the tolerances are the untiled stack's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from ringplan.models import ModelSpec
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout
from ringplan_runtime import shard_sequence, spawn
from ringplan_runtime.reference import relative_error
from ringplan_runtime.tiling import tiled_mlp
from ringplan_runtime.transformer import MLP
from tests.runtime.test_stack_cpu import (
    DATA_SEED,
    FP32_EPS,
    REL_TOL_GRAD,
    REL_TOL_HIDDEN,
    REL_TOL_LOSS,
    REL_TOL_UPDATE,
    SPAWN_TIMEOUT_S,
    Config,
    _dense_initial,
    _prefill,
    _train,
    _worst,
    dense_reference,
    reference_step,
)
from ringplan_runtime.stack_parallel import global_batch


@dataclass(frozen=True, slots=True, kw_only=True)
class TiledConfig:
    """A ``test_stack_cpu.Config`` run with the MLP in tiles of ``mlp_tile_tokens`` per sequence."""

    base: Config
    mlp_tile_tokens: int

    @property
    def name(self) -> str:
        return f"{self.base.name}_mlp_tile{self.mlp_tile_tokens}"

    @property
    def world(self) -> int:
        return self.base.world

    @property
    def ring(self) -> int:
        return self.base.ring

    @property
    def layout(self) -> str:
        return self.base.layout

    def workload(self, *, training: bool = True) -> StackWorkload:
        w = self.base.workload(training=training)
        return dataclasses.replace(w, settings=dataclasses.replace(w.settings, mlp_tile_tokens=self.mlp_tile_tokens))


# SEQ_LEN 32: n = 32 (W = 1) or 16 (W = 2) tokens per rank, batch 2.
CONFIGS = [
    TiledConfig(base=Config(name="w1_none_full_loss", world=1, ring=1), mlp_tile_tokens=8),
    TiledConfig(base=Config(name="w1_selective_chunked_tied", world=1, ring=1, checkpointing="selective",
                            loss="chunked", chunk_tokens=16, tied=True, qkv_bias=True), mlp_tile_tokens=4),
    TiledConfig(base=Config(name="w2_zigzag_chunked_qknorm", world=2, ring=2, layout="zigzag", loss="chunked",
                            qk_norm=True), mlp_tile_tokens=4),
    TiledConfig(base=Config(name="w2_full_offload_chunked", world=2, ring=2, checkpointing="full", offload=True,
                            loss="chunked", chunk_tokens=8), mlp_tile_tokens=8),
    TiledConfig(base=Config(name="w2_replicated_one_tile", world=2, ring=2, sharding="none"), mlp_tile_tokens=16),
]
PREFILL = [TiledConfig(base=Config(name="prefill_w2_zigzag", world=2, ring=2, layout="zigzag"), mlp_tile_tokens=4)]


def run_world(world: int) -> dict:
    """Spawned body: every tiled configuration of this world size; rank 0 returns everything, the
    other ranks their losses and prefill hidden states."""
    torch.set_num_threads(1)
    results = {c.name: _train(c) for c in CONFIGS if c.world == world}
    results.update({c.name: _prefill(c) for c in PREFILL if c.world == world})
    if dist.get_rank() != 0:
        return {name: (r["loss"], r["second_loss"]) if isinstance(r, dict) else r for name, r in results.items()}
    return results


@pytest.fixture(scope="module", params=(1, 2), ids=lambda w: f"W{w}")
def world_results(request):
    return request.param, spawn(run_world, world_size=request.param, backend="gloo", args=(request.param,),
                                timeout_s=SPAWN_TIMEOUT_S)


@pytest.mark.slow
def test_tiled_training_matches_dense_reference(world_results):
    """With the MLP tiled (and the loss in tiles), loss, gradients, AdamW update and next loss equal
    the float64 dense model's within the untiled stack's tolerances."""
    world, per_rank = world_results
    for config in (c for c in CONFIGS if c.world == world):
        got = per_rank[0][config.name]
        initial = _dense_initial(config)
        loss, grads, after, second = reference_step(initial, config)
        assert abs(got["loss"] - loss) <= REL_TOL_LOSS * loss, f"{config.name}: loss {got['loss']} vs {loss}"
        error, name = _worst(got["grads"], grads)
        assert error <= REL_TOL_GRAD, f"{config.name}: gradient of {name} off by {error:.2e}"
        for name in initial:
            update = got["after"][name].double() - initial[name].double()
            reference_update = after[name] - initial[name].double()
            allowed = REL_TOL_UPDATE * reference_update.norm() + FP32_EPS * after[name].norm()
            assert (update - reference_update).norm() <= allowed, f"{config.name}: AdamW update of {name}"
        assert abs(got["second_loss"] - second) <= REL_TOL_LOSS * second, f"{config.name}: loss after the step"
        for rank, losses in enumerate(per_rank[1:], start=1):
            assert losses[config.name] == (got["loss"], got["second_loss"]), f"{config.name}: rank {rank} loss"


@pytest.mark.slow
def test_tiled_prefill_matches_reference(world_results):
    """Forward only (inference mode): tiled MLP hidden rows equal the dense model's rows."""
    world, per_rank = world_results
    for config in (c for c in PREFILL if c.world == world):
        w = config.workload(training=False)
        tokens, labels = global_batch(w, DATA_SEED)
        initial = {n: t.double() for n, t in _dense_initial(config).items()}
        _, hidden = dense_reference(initial, w.model, tokens, labels)
        for rank in range(world):
            local = shard_sequence(hidden, rank=rank, ring_size=config.ring, layout=config.layout)
            error = relative_error(per_rank[rank][config.name], local)
            assert error <= REL_TOL_HIDDEN, f"{config.name}: rank {rank} hidden off by {error:.2e}"


SMALL = ModelSpec(name="small", n_layers=1, embed_dim=16, n_heads=2, n_kv_heads=2, head_dim=8, ffn_dim=24,
                  ffn_type="swiglu", vocab_size=32, norm="rmsnorm", mlp_bias=True)


def test_tiled_mlp_equals_untiled_module():
    """One MLP with biases, a short last tile (10 rows in tiles of 4): output, input gradient and every
    weight gradient equal the untiled module's (fp32, rel ≤ 1e-5); without grad the output too."""
    torch.manual_seed(0)
    dense, tiled = MLP(SMALL), MLP(SMALL, tile_tokens=2)
    tiled.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, SMALL.embed_dim, requires_grad=True)
    upstream = torch.randn(2, 5, SMALL.embed_dim)
    expected = dense(x)
    expected.backward(upstream)
    expected_grad, x.grad = x.grad, None
    got = tiled(x)
    got.backward(upstream)
    assert relative_error(got, expected) <= 1e-5 and relative_error(x.grad, expected_grad) <= 1e-5
    for (name, a), (_, b) in zip(dense.named_parameters(), tiled.named_parameters()):
        assert relative_error(b.grad, a.grad) <= 1e-5, name
    with torch.no_grad():
        assert relative_error(tiled_mlp(x, tiled, 4), expected) <= 1e-5


def test_tile_settings_are_checked():
    """A tile must be a positive integer (runtime and settings) and divide the tokens per rank
    (workload), with the nearest valid tiles in the message."""
    with pytest.raises(ValueError, match="positive"):
        MLP(SMALL, tile_tokens=0)
    with pytest.raises(ValueError, match="mlp_tile_tokens"):
        StackSettings(mlp_tile_tokens=-4)
    with pytest.raises(ValueError, match="nearest valid tiles: 512 or 1,024"):
        StackWorkload(model=SMALL, seq_len_tokens=8192, world_size=2, layout=RingLayout(ring_size=2),
                      settings=StackSettings(mlp_tile_tokens=1000))
    w = StackWorkload(model=SMALL, seq_len_tokens=8192, world_size=2, layout=RingLayout(ring_size=2),
                      settings=StackSettings(mlp_tile_tokens=4096))
    assert w.settings.mlp_tile_tokens == 4096
    x = torch.randn(1, 3, SMALL.embed_dim)
    with pytest.raises(ValueError, match="require grad"):
        tiled_mlp(x, MLP(SMALL), 2)
