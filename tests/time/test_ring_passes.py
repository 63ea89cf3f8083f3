"""The passes of one layer step (``ringplan.time.ring_passes``): what each hop carries."""

import numpy as np
import pytest

from ringplan.time import links as cm
from ringplan.time import ring_passes as rp
from ringplan.time.links import LinkModel
from ringplan.time.timing_data import compute_model_for, load_timing_data, resolve_gpu
from timing_cases import attention_workload

EXACT = 1e-12


def _costing(tmp_path, work, ring_size, link):
    spec = resolve_gpu("h100")
    compute = compute_model_for(spec, "bf16", load_timing_data(tmp_path))
    return rp.Costing(workload=work, ring_size=ring_size, backend="cudnn", compute=compute,
                      nodes=cm.node_layout(ring_size, 8), intra=link, inter=None,
                      link_labels={"intra_node": "user", "inter_node": ""})


def test_backward_hops_carry_what_the_runtime_sends(tmp_path):
    """P = 4 backward: K/V alone at step 0, then sharing the link with fp32 dK/dV; the dK/dV hop before the
    last step alone; the return hop in the input dtype (a dilated branch: fp32, and no dq cast)."""
    n, link = 4096, LinkModel(name="user", latency_s=1e-5, bandwidth_bytes_per_s=1e11)
    c = _costing(tmp_path, attention_workload(4 * n, kv_heads=8), 4, link)
    kv, dkv = 2 * n * 8 * 128 * 2, 2 * n * 8 * 128 * 4
    ring, cast = rp.ring_backward_pass(c, "b", n, 4, "contiguous", 2)
    t = link.transfer_time_s
    np.testing.assert_allclose(ring.kv_hop_s[0], [t(kv), t(kv + dkv), t(kv + dkv), 0.0], rtol=EXACT)
    np.testing.assert_allclose(ring.grad_hop_s[0], [t(kv + dkv), t(kv + dkv), t(dkv), t(kv)], rtol=EXACT)
    assert cast.name == "b: cast dq"
    (fp32_ring,) = rp.ring_backward_pass(c, "b", n, 4, "contiguous", 4)
    assert fp32_ring.grad_hop_s[0, -1] == pytest.approx(t(dkv), rel=EXACT)
