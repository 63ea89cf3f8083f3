"""Model FLOPs utilisation (``ringplan.time.mfu``): the FLOP count by hand and the ratio."""

from __future__ import annotations

import pytest

from ringplan.models import load_model_catalog, parameter_count
from ringplan.stack import StackWorkload
from ringplan.time.mfu import matmul_parameters, mfu, model_flops_per_step
from ringplan.workload import RingLayout

LLAMA = load_model_catalog().model("llama-3-8b")


def test_matmul_parameters_are_the_weights_less_norms_and_embedding_table():
    """llama-3-8b: every parameter but the token table (V·E) and the norms (2·L·E + E) is multiplied."""
    e, v, layers = LLAMA.embed_dim, LLAMA.vocab_size, LLAMA.n_layers
    assert matmul_parameters(LLAMA) == parameter_count(LLAMA) - v * e - (2 * layers + 1) * e


def test_training_step_flops_by_hand_and_mfu():
    """Training, S = 8,192 on 8 GPUs (ring 4 x DP 2): 3 x B·S·DP x (2·N + 2·L·S·q_dim); MFU = that / (t·W·peak);
    a forward pass is a third of it; recomputation and TP do not change the model's FLOPs."""
    s = 8192
    w = StackWorkload(model=LLAMA, seq_len_tokens=s, world_size=8, layout=RingLayout(ring_size=4))
    expected = 3 * s * 2 * (2 * matmul_parameters(LLAMA) + 2 * LLAMA.n_layers * s * LLAMA.q_dim)
    assert model_flops_per_step(w) == pytest.approx(expected, rel=1e-12)
    assert mfu(w, 2.0, 1e15) == pytest.approx(expected / (2.0 * 8 * 1e15), rel=1e-12)
    forward = StackWorkload(model=LLAMA, seq_len_tokens=s, world_size=8, layout=RingLayout(ring_size=4), training=False)
    assert model_flops_per_step(forward) == pytest.approx(expected / 3, rel=1e-12)
    tp = StackWorkload(model=LLAMA, seq_len_tokens=s, world_size=8, layout=RingLayout(ring_size=2), tp_degree=2)
    assert model_flops_per_step(tp) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="positive"):
        mfu(w, 0.0, 1e15)
