"""Every context-parallel scheme in the whole model: each block's attention part is the attention-layer
terms of ``ringplan.memory.cp_terms`` (at the rank's H/T heads), and at P = 1 every scheme is the ring."""

from __future__ import annotations

import pytest

from ringplan.memory import cp_terms
from ringplan.memory.stack_terms import stack_instants
from ringplan.memory.tp_terms import attention_point, attention_saved_bytes, tp_attention_workload
from ringplan.models import ModelSpec
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout

TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=8, n_kv_heads=4, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
SCHEMES = ("ring", "allgather", "ulysses", "hybrid")
BF16, FP32 = 2, 4


def layout(scheme: str, ring: int) -> RingLayout:
    ulysses = {"hybrid": 2, "ulysses": ring}.get(scheme)
    return RingLayout(ring_size=ring, cp_scheme=scheme, ulysses_degree=ulysses)


def workload(scheme: str, *, ring=4, tp=1, training=True, **settings) -> StackWorkload:
    return StackWorkload(model=TINY, seq_len_tokens=256 * ring, world_size=ring * tp, tp_degree=tp,
                         layout=layout(scheme, ring), training=training, settings=StackSettings(**settings))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_prefill_attention_part_is_the_layer_peak(scheme, tp):
    """Prefill: the whole model's attention instant holds the scheme's one-layer peak (``cp_terms.memory_terms``
    of a forward layer at H/T heads) beside the block input."""
    w = workload(scheme, tp=tp, training=False)
    layer = cp_terms.memory_terms(tp_attention_workload(w), w.layout)
    assert stack_instants(w)["attention"]["attention_bytes"] == pytest.approx(sum(layer.values()), rel=1e-12)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_attention_part_is_the_layer_backward_peak(scheme, tp):
    """Training: each block's attention backward holds the scheme's one-layer training peak (here a backward
    instant, as for every scheme with the tiny model's shapes)."""
    w = workload(scheme, tp=tp)
    layer = cp_terms.memory_terms(tp_attention_workload(w), w.layout)
    instants = stack_instants(w)
    for name in ("block0_backward_attention", "block1_backward_attention"):
        assert instants[name]["attention_bytes"] == pytest.approx(sum(layer.values()), rel=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scheme", ["allgather", "ulysses"])
def test_every_scheme_is_the_ring_on_one_rank(scheme, training):
    """Reduction: at P = 1 every scheme runs one local kernel, so the whole model's instants are the ring's
    (hybrid needs U > 1 and R > 1: no P = 1 hybrid exists)."""
    ring = workload("ring", ring=1, training=training)
    other = StackWorkload(model=TINY, seq_len_tokens=256, world_size=1, training=training,
                          layout=RingLayout(ring_size=1, cp_scheme=scheme))
    assert stack_instants(other) == stack_instants(ring)


def test_schemes_differ_beyond_one_rank():
    """Beyond P = 1 the schemes hold different attention parts (the all-gather's whole-sequence K/V and fp32
    dK/dV, Ulysses' head shards and all-to-all buffers): the test above could fail."""
    parts = {s: stack_instants(workload(s))["block1_backward_attention"]["attention_bytes"] for s in SCHEMES}
    assert len(set(parts.values())) == len(SCHEMES)


def test_ulysses_saves_head_shards_and_the_output_copy():
    """Ulysses over P = 4 (H = 8, H_kv = 4, no K/V replication) saves per block the inner kernel's q, k, v,
    out and LSE on head shards (the same bytes as the caller's) and the all-to-all's output that o_proj
    saves: B·n·(H + 2·H_kv)·D·e + 2·B·n·H·D·e + B·H·n·4, with n = 256."""
    p = attention_point(workload("ulysses"))
    n = 256
    expected = n * (8 + 2 * 4) * 16 * BF16 + 2 * n * 8 * 16 * BF16 + 8 * n * FP32
    assert attention_saved_bytes(p) == expected
    ring = attention_point(workload("ring"))
    assert attention_saved_bytes(ring) == expected - n * 8 * 16 * BF16
