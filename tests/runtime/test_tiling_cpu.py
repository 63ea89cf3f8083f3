"""Tiled MLP and tiled (chunked) loss on CPU, gloo, planned and run.

Exactness: the whole stack (FSDP2 + ring attention) with ``mlp_tile_tokens`` set equals the dense
float64 model of ``test_stack_cpu`` — loss, every gathered gradient, the AdamW update and the next
loss — at W = 1 and 2; prefill's hidden states too. The runs and the reference are
``test_stack_cpu``'s (``reference_step``, ``_train``, ``_prefill``), on configurations with the MLP
tiled (``TiledConfig``). Tiling changes only the order in which the weight gradients are summed
over tiles, so the tolerances are the untiled stack's.

Memory: Σ ``stack_terms`` at the largest instant equals the live-tensor tracker's peak within 1%
(``test_stack_measure_cpu``'s method and CPU-only allowance) for a tiled MLP, a tiled loss and both,
at W = P = 1 and 2, measured in the same spawned groups; and one tiled MLP's backward alone equals
its terms exactly (both branches of ``tiled_mlp_backward_bytes``).
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
from tests.runtime.test_stack_measure_cpu import FAST, TRACKER_REL_TOL, analytic_cpu_peak
from tests.runtime.test_stack_cpu import (
    Config,
    DATA_SEED,
    REL_TOL_HIDDEN,
    SPAWN_TIMEOUT_S,
    _dense_initial,
    _prefill,
    _train,
    check_training,
    dense_reference,
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

MEASURED_MODEL = {"name": "tiny", "n_layers": 2, "embed_dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
                  "ffn_dim": 1024, "ffn_type": "swiglu", "vocab_size": 256, "norm": "rmsnorm"}
#: name -> (model overrides, settings, batch, tokens per rank, training); bf16 compute, zero3.
MEASURED = {
    # a wide FFN and 2 × 1,024 tokens: the tiled MLP's backward is the peak
    "mlp_tiled": ({}, {"mlp_tile_tokens": 128, "loss_chunk_tokens": 64}, 2, 1024, True),
    "mlp_tiled_selective": ({}, {"mlp_tile_tokens": 128, "loss_chunk_tokens": 64, "checkpointing": "selective"},
                            2, 1024, True),
    "mlp_small_tiles_full": ({}, {"mlp_tile_tokens": 16, "loss_chunk_tokens": 64, "checkpointing": "full"},
                             2, 1024, True),
    # a large vocabulary: the loss tile's backward is the peak, with and without the MLP tiled
    "loss_tiled": ({"ffn_dim": 128, "vocab_size": 1024}, {"loss_chunk_tokens": 128}, 1, 256, True),
    "loss_and_mlp_tiled": ({"ffn_dim": 128, "vocab_size": 1024}, {"loss_chunk_tokens": 128, "mlp_tile_tokens": 64},
                           1, 256, True),
    "prefill_mlp_tiled": ({}, {"mlp_tile_tokens": 128}, 2, 1024, False),
}


def measured_workload(name: str, world: int) -> StackWorkload:
    model, settings, batch, n, training = MEASURED[name]
    return StackWorkload(model=ModelSpec(**{**MEASURED_MODEL, **model}), seq_len_tokens=n * world, batch=batch,
                         world_size=world, layout=RingLayout(ring_size=world), training=training,
                         settings=StackSettings(**settings))


def _tracked_peak(name: str, world: int) -> int:
    from ringplan_runtime.stack_measure import measure_stack_rank

    result = measure_stack_rank(measured_workload(name, world), settings=FAST)
    assert result.measurement.feasible, name
    return result.measurement.tracked_peak_bytes


def run_world(world: int) -> dict:
    """Spawned body: every tiled configuration of this world size; rank 0 returns everything, the
    other ranks their losses and prefill hidden states."""
    torch.set_num_threads(1)
    results = {c.name: _train(c) for c in CONFIGS if c.world == world}
    results.update({c.name: _prefill(c) for c in PREFILL if c.world == world})
    results["tracked"] = {name: _tracked_peak(name, world) for name in MEASURED}
    if dist.get_rank() != 0:
        return {name: (r["loss"], r["second_loss"]) if isinstance(r, dict) and "loss" in r else r
                for name, r in results.items()}
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
        check_training(config, per_rank, init=False)


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


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MEASURED))
def test_tiled_terms_match_live_tensor_tracker(world_results, case):
    """Σ stack_terms at the largest instant (+ the CPU-only bytes) equals the tracked peak of the real
    stack within 1% (the largest over ranks), for a tiled MLP, a tiled loss and both."""
    world, per_rank = world_results
    tracked = max(rank["tracked"][case] for rank in per_rank)
    predicted, instant = analytic_cpu_peak(measured_workload(case, world))
    error = (predicted - tracked) / tracked
    assert abs(error) <= TRACKER_REL_TOL, (
        f"{case} at W=P={world}: analytic {predicted:,.0f} B ({instant}) vs tracked {tracked:,} B ({error:+.2%})")


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


@pytest.mark.parametrize(("batch", "n", "tile", "ffn"), [(1, 64, 8, 512), (2, 64, 8, 512), (1, 64, 32, 512),
                                                       (1, 64, 64, 512), (1, 64, 16, 256)])
def test_tiled_mlp_backward_equals_its_terms(batch, n, tile, ffn):
    """One tiled MLP's backward (bf16, no FSDP), tracked from the end of its forward: its peak above
    what exists before (weights, input, output, upstream gradient) is the input-gradient buffer
    T·E·e, the weight gradients (all three from the second tile on, down's with one tile) and
    ``tiled_mlp_backward_bytes`` — exactly, for small tiles (the down weight-gradient temporary is
    the peak) and large ones (SwiGLU's backward is)."""
    from ringplan.memory.stack_terms import hidden_state_bytes, mlp_tiles, tiled_mlp_backward_bytes
    from ringplan_runtime.tracker import LiveTensorTracker

    embed = 64
    spec = dataclasses.replace(SMALL, embed_dim=embed, head_dim=embed // 2, ffn_dim=ffn, mlp_bias=False)
    w = StackWorkload(model=spec, seq_len_tokens=n, batch=batch, world_size=1, layout=RingLayout(ring_size=1),
                      settings=StackSettings(mlp_tile_tokens=tile, param_dtype="bf16"))
    torch.manual_seed(0)
    mlp = MLP(spec, tile_tokens=tile).to(torch.bfloat16)
    x = torch.randn(batch, n, embed, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(batch, n, embed, dtype=torch.bfloat16)
    y = mlp(x)
    tracker = LiveTensorTracker()
    tracker.track(*mlp.parameters(), x, upstream, y)
    before = tracker.live_bytes
    with tracker:
        y.backward(upstream)
    weight_grads = (3 if mlp_tiles(w) > 1 else 1) * embed * ffn * 2
    expected = hidden_state_bytes(w) + weight_grads + tiled_mlp_backward_bytes(w)
    assert tracker.peak_bytes - before == expected
