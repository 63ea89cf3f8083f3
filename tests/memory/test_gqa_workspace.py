"""The GQA workspace doubling follows the backend a GPU runs (issue 17, defect 4).

cuDNN's GQA backward held twice the MHA workspace on H100 and H200 (the fitted ``gqa_fp32_rows``
coefficient, 0.99 on both); the runtime's ``auto`` runs cuDNN only on sm90+ GPUs for bf16/fp16 up to
head_dim 128 (``ringplan_runtime.backends``), so the doubling applies there and nowhere else."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.hardware import load_catalog
from ringplan.memory.attention_model import default_memory_model
from ringplan.memory.attention_terms import term_inputs
from ringplan.memory.calibration import auto_backend, fp32_rows_bytes, kernel_backend, workspace_features
from ringplan.time.kernels import ComputeModel
from ringplan.workload import AttentionShape, RingLayout, Workload

CATALOG = load_catalog()
CUDNN_GPUS = ("h100-80gb-sxm", "h200")
#: GPUs whose ``auto`` backend at bf16, head_dim 128 is not cuDNN.
NON_CUDNN = [g for g in CATALOG.gpus if auto_backend(g.name, head_dim=128, half_precision=True) != "cudnn"]
#: The fitted doubling must stay as measured (coefficient 0.99 of one fp32 row block).
FITTED_GQA_COEFFICIENT_MIN = 0.95


def _training(heads: int, kv_heads: int, head_dim: int, tokens: int, dtype: str = "bf16") -> Workload:
    return Workload(seq_len_tokens=tokens, shape=AttentionShape(n_heads=heads, n_kv_heads=kv_heads,
                                                                head_dim=head_dim, dtype=dtype), training=True)


def test_auto_backend_matches_runtime_order():
    """sm90+ GPUs run cuDNN (bf16/fp16, head_dim <= 128); A100, Ada and older run flash; fp32 the
    memory-efficient kernel; and the time model plans the same backend (one rule)."""
    assert {g.name for g in CATALOG.gpus} - {g.name for g in NON_CUDNN} >= set(CUDNN_GPUS)
    assert {"a100-80gb", "a100-40gb", "l40s", "rtx-4090", "mi300x"} <= {g.name for g in NON_CUDNN}
    assert auto_backend("h100-80gb-sxm", head_dim=256, half_precision=True) == "flash"
    assert auto_backend("h200", head_dim=128, half_precision=False) == "efficient"
    for gpu in CATALOG.gpus:
        compute = ComputeModel(gpu_name=gpu.name, peak_flops_per_s=1e12, hbm_bandwidth_bytes_per_s=1e12)
        for head_dim, dtype in ((64, "bf16"), (128, "fp16"), (256, "bf16"), (128, "fp32")):
            assert compute.fastest_backend(head_dim, dtype) == auto_backend(
                gpu.name, head_dim=head_dim, half_precision=dtype != "fp32")


def test_auto_needs_a_gpu_and_forced_backends_decide():
    """``auto`` without a GPU cannot tell its workspace (ValueError); a forced backend decides alone."""
    w = _training(32, 16, 128, 8192)
    p = term_inputs(w, RingLayout(ring_size=1))
    with pytest.raises(ValueError, match="auto"):
        workspace_features(p)
    forced = term_inputs(w, RingLayout(ring_size=1, backend="flash"))
    assert kernel_backend(forced, "h200") == "flash"
    assert workspace_features(forced)["gqa_fp32_rows"] == 0.0
    assert workspace_features(p, "h200")["gqa_fp32_rows"] == fp32_rows_bytes(p)


@given(gpu=st.sampled_from(NON_CUDNN), heads=st.sampled_from([8, 16, 32, 64]), head_dim=st.sampled_from([64, 128]),
       tokens=st.sampled_from([4096, 65536, 262144]), dtype=st.sampled_from(["bf16", "fp16", "fp32"]))
def test_gqa_never_above_mha_without_cudnn(gpu, heads, head_dim, tokens, dtype):
    """At one GPU in training, 2:1 GQA needs no more than MHA (need and upper bound) on a GPU whose
    backend is not cuDNN: fewer K/V bytes and the same workspace."""
    model, layout = default_memory_model(), RingLayout(ring_size=1)
    mha = model.predict(_training(heads, heads, head_dim, tokens, dtype), layout, gpu)
    gqa = model.predict(_training(heads, heads // 2, head_dim, tokens, dtype), layout, gpu)
    assert gqa.total_bytes <= mha.total_bytes
    assert gqa.upper_bytes <= mha.upper_bytes
    assert gqa.terms_bytes["workspace_bytes"] == pytest.approx(mha.terms_bytes["workspace_bytes"], rel=1e-12)


@pytest.mark.parametrize("gpu_name", CUDNN_GPUS)
def test_cudnn_rows_keep_their_fitted_doubling(gpu_name):
    """On H100 and H200 (cuDNN under ``auto``) GQA training still adds the fitted second fp32 row block."""
    gpu, layout = CATALOG.gpu(gpu_name), RingLayout(ring_size=1)
    model = default_memory_model()
    mha = model.predict(_training(32, 32, 128, 65536), layout, gpu)
    gqa = model.predict(_training(32, 8, 128, 65536), layout, gpu)
    rows = fp32_rows_bytes(term_inputs(_training(32, 8, 128, 65536), layout))
    extra = gqa.terms_bytes["workspace_bytes"] - mha.terms_bytes["workspace_bytes"]
    assert extra >= FITTED_GQA_COEFFICIENT_MIN * rows
    flash = model.predict(_training(32, 8, 128, 65536), RingLayout(ring_size=1, backend="flash"), gpu)
    assert flash.terms_bytes["workspace_bytes"] == pytest.approx(mha.terms_bytes["workspace_bytes"], rel=1e-9)
