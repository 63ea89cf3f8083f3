"""Byte terms of a tiled MLP (``StackSettings.mlp_tile_tokens``): hand-computed examples, reductions
(an untiled setting is today's terms; selective and full checkpointing save the same), invariants
(tiling never saves more; with two or more tiles a smaller tile never needs more), the settings'
checks, and the capacity search with a fixed tile. The agreement with the runtime's live tensors
is in ``tests/runtime/test_tiling_cpu.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ringplan.capacity.stack import StackQuery, max_tokens, token_unit
from ringplan.hardware import load_catalog
from ringplan.models import ModelSpec, load_model_catalog
from ringplan.memory.model_states import unit_shapes_upto
from ringplan.memory.stack_terms import (
    block_backward_terms,
    mlp_tile_rows,
    mlp_tiles,
    saved_block_bytes,
    stack_instants,
    stack_terms,
    tiled_mlp_backward_bytes,
    tiled_mlp_forward_bytes,
)
from ringplan.stack import StackSettings, StackWorkload, nearest_divisors
from ringplan.workload import RingLayout

TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
LLAMA = load_model_catalog().model("llama-3-8b")


def workload(model=TINY, seq=512, world=1, ring=1, training=True, batch=1, **settings) -> StackWorkload:
    return StackWorkload(model=model, seq_len_tokens=seq, world_size=world, layout=RingLayout(ring_size=ring),
                         training=training, batch=batch, settings=StackSettings(**settings))


def total(w: StackWorkload) -> float:
    return sum(stack_terms(w).values())


def test_tiles_by_hand():
    """B = 2 sequences of n = 512, t = 64: tiles of B·t = 128 rows, n / t = 8 tiles; untiled: 1."""
    w = workload(seq=512, batch=2, mlp_tile_tokens=64)
    assert (mlp_tile_rows(w), mlp_tiles(w)) == (128, 8)
    assert (mlp_tile_rows(workload()), mlp_tiles(workload())) == (None, 1)


def test_tiled_mlp_bytes_by_hand():
    """E 64, F 128, bf16, T = 512. Forward: output T·E·2 + gate and up 2·t·F·2. Backward: output tile
    t·E·2 + max(6·t·F·2, 4·t·F·2 + E·F·2); with one tile no weight temporary."""
    t = 64
    assert tiled_mlp_forward_bytes(workload(mlp_tile_tokens=t)) == 512 * 64 * 2 + 2 * t * 128 * 2
    assert tiled_mlp_backward_bytes(workload(mlp_tile_tokens=t)) == t * 64 * 2 + 6 * t * 128 * 2  # 98,304 > 81,920
    t = 16
    assert tiled_mlp_backward_bytes(workload(mlp_tile_tokens=t)) == t * 64 * 2 + 4 * t * 128 * 2 + 64 * 128 * 2
    t = 512
    assert tiled_mlp_backward_bytes(workload(mlp_tile_tokens=t)) == t * 64 * 2 + 6 * t * 128 * 2


def test_tiled_block_saves_no_ffn_activations():
    """checkpointing none: a tiled block keeps 3·T·F·e less (gate, up, product); selective and full
    save no MLP activation anyway, so tiling leaves them unchanged."""
    T, F = 512, 128
    assert saved_block_bytes(workload()) - saved_block_bytes(workload(mlp_tile_tokens=64)) == 3 * T * F * 2
    for mode in ("selective", "full"):
        assert saved_block_bytes(workload(checkpointing=mode)) == \
            saved_block_bytes(workload(checkpointing=mode, mlp_tile_tokens=64))


def test_tiled_mlp_backward_instant_by_hand():
    """Last block's MLP backward, several tiles: every MLP weight's gradient (not down's only), the
    input-gradient buffer T·E·e on top of the flowing gradient, the tile's bytes, and no gate/up."""
    untiled, tiled = workload(), workload(mlp_tile_tokens=64)
    a, b = block_backward_terms(untiled, 1, "mlp"), block_backward_terms(tiled, 1, "mlp")
    assert b["unit_grads_bytes"] - a["unit_grads_bytes"] == 2 * 128 * 64 * 2
    assert b["hidden_bytes"] == 2 * a["hidden_bytes"] == 2 * 512 * 64 * 2
    assert b["mlp_bytes"] == tiled_mlp_backward_bytes(tiled)
    assert a["layer_activations_bytes"] - b["layer_activations_bytes"] == 2 * 512 * 128 * 2
    one_tile = block_backward_terms(workload(mlp_tile_tokens=512), 1, "mlp")
    assert one_tile["unit_grads_bytes"] == a["unit_grads_bytes"]  # down's gradient only, as untiled
    assert unit_shapes_upto(tiled, "mlp_weights") == [(64, 128), (128, 64), (128, 64)]


def test_untiled_setting_is_todays_terms():
    """Reduction: ``mlp_tile_tokens=None`` (the default) is exactly the untiled plan at every instant."""
    for training in (True, False):
        for mode in ("none", "selective", "full"):
            base = workload(LLAMA.with_layers(4), seq=8192, world=2, ring=2, training=training, checkpointing=mode)
            explicit = replace(base, settings=replace(base.settings, mlp_tile_tokens=None))
            assert stack_instants(explicit) == stack_instants(base)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("training", [True, False])
def test_smaller_tiles_never_need_more(mode, training):
    """Llama-3-8B, 64K tokens per rank: over tiles 16K … 512 (two or more per rank) the peak never
    grows as the tile shrinks, and every tiled block saves no more than an untiled one."""
    peaks = []
    for t in (16384, 8192, 4096, 2048, 1024, 512):
        w = workload(LLAMA, seq=131072, world=2, ring=2, training=training, checkpointing=mode, mlp_tile_tokens=t)
        peaks.append(total(w))
        assert saved_block_bytes(w) <= saved_block_bytes(replace(w, settings=replace(w.settings, mlp_tile_tokens=None)))
    assert peaks == sorted(peaks, reverse=True)


def test_llama_long_context_gains():
    """Llama-3-8B, 1M tokens on 8 GPUs, full checkpointing: the last block's MLP backward is the
    untiled peak (its 6·T·F·e); 4K-token tiles move the peak elsewhere and lower it by more than 10 GiB.
    Without checkpointing (128K tokens) tiling drops 3·T·F·e per block: > 40 GiB over 32 blocks."""
    gib = 2 ** 30
    full = workload(LLAMA, seq=1 << 20, world=8, ring=8, checkpointing="full")
    tiled = replace(full, settings=replace(full.settings, mlp_tile_tokens=4096))
    assert total(full) - total(tiled) > 10 * gib
    none = workload(LLAMA, seq=131072, world=8, ring=8)
    assert total(none) - total(replace(none, settings=replace(none.settings, mlp_tile_tokens=4096))) > 40 * gib


def test_tile_checks():
    """The tile is a positive integer that divides the tokens per rank; the error names the nearest
    divisors."""
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="mlp_tile_tokens"):
            StackSettings(mlp_tile_tokens=bad)
    with pytest.raises(ValueError, match="nearest valid tiles: 96 or 128"):
        workload(seq=384, mlp_tile_tokens=100)
    assert nearest_divisors(4096, 1000) == [512, 1024]
    assert nearest_divisors(12, 5) == [4, 6]


def test_max_tokens_with_a_fixed_tile():
    """The max-tokens search with a tiled candidate probes only lengths the tile divides (unit =
    P·lcm(chunks, t)); it answers, and beats the untiled candidate without checkpointing."""
    gpu = load_catalog().gpu("h100")
    tiled = StackQuery(model=LLAMA, gpu=gpu, layout="zigzag",
                       candidates=(StackSettings(mlp_tile_tokens=4096, sharding="zero3"),))
    untiled = StackQuery(model=LLAMA, gpu=gpu, layout="zigzag", candidates=(StackSettings(sharding="zero3"),))
    assert token_unit(tiled, 8, tiled.candidates[0]) == 8 * 4096
    assert token_unit(untiled, 8, untiled.candidates[0]) == 8 * 2
    best = max_tokens(tiled, 8).best
    assert best.seq_len_tokens % (8 * 4096) == 0
    assert best.seq_len_tokens > max_tokens(untiled, 8).best.seq_len_tokens
