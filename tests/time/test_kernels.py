"""Compute model: FLOP counts, default kernel rates from ANCHORS.md, kernel fits and their selection."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.time import kernels as cp
from ringplan.profiles.timing import KernelRow

REL_TOL = 1e-12
FIT_REL_TOL = 1e-6
H100_PEAK = cp.H100_BF16_PEAK_FLOPS_PER_S


def _row(n, seconds, *, backend="cudnn", pass_name="forward", causal=False, head_dim=128, heads=32, dtype="bf16"):
    return KernelRow(op="attention", backend=backend, pass_name=pass_name, causal=causal, dtype=dtype, batch=1,
                     n_heads=heads, n_kv_heads=heads, head_dim=head_dim, q_tokens=n, kv_tokens=n,
                     seconds=seconds, repeats=5)


def test_forward_flops_hand_computed():
    """4·B·H·D·n_q·n_k: 32 heads × 128 dims × 8192² tokens = 1.099511627776e12 FLOPs; causal half."""
    full = cp.attention_forward_flops(batch=1, n_heads=32, head_dim=128, q_tokens=8192, kv_tokens=8192)
    assert full == 4 * 32 * 128 * 8192**2 == 1_099_511_627_776
    causal = cp.attention_forward_flops(batch=1, n_heads=32, head_dim=128, q_tokens=8192, kv_tokens=8192, causal=True)
    assert causal == full / 2
    assert cp.attention_pass_flops("backward", batch=2, n_heads=32, head_dim=128, q_tokens=8192,
                                   kv_tokens=4096) == pytest.approx(2.5 * full, rel=REL_TOL)


def test_flops_reject_bad_input():
    """A non-square causal block, a negative size or an unknown pass is a ValueError."""
    with pytest.raises(ValueError, match="square"):
        cp.attention_forward_flops(batch=1, n_heads=1, head_dim=8, q_tokens=4, kv_tokens=8, causal=True)
    with pytest.raises(ValueError, match="q_tokens"):
        cp.attention_forward_flops(batch=1, n_heads=1, head_dim=8, q_tokens=-4, kv_tokens=8)
    with pytest.raises(ValueError, match="pass"):
        cp.attention_pass_flops("sideways", batch=1, n_heads=1, head_dim=8, q_tokens=4, kv_tokens=4)


def test_projection_and_traffic_hand_computed():
    """QKV+out projections of 10 tokens, E=64, H=4, H_kv=2, D=16: 2·10·64·(4+4)·16 + 2·10·64·64 FLOPs."""
    assert cp.projection_forward_flops(batch=1, tokens=10, embed_dim=64, n_heads=4, n_kv_heads=2,
                                       head_dim=16) == 2 * 10 * 64 * 8 * 16 + 2 * 10 * 64 * 64
    assert cp.merge_bytes(batch=1, n_heads=2, head_dim=4, q_tokens=3, dtype_bytes=2) == 6 * 4 * 10 + 6 * 12
    assert cp.gradient_accumulate_bytes(batch=1, n_heads=2, n_kv_heads=1, head_dim=4, q_tokens=3, kv_tokens=5,
                                        dtype_bytes=2) == 4 * (3 * 2 + 2 * 5 * 1) * 10


def test_default_h100_rates_are_the_anchors():
    """On the H100 the default cudnn/flash rates are ANCHORS.md's 598/542/343 TFLOP/s exactly."""
    for (backend, causal), tflops in {("cudnn", False): 598, ("cudnn", True): 542, ("flash", False): 343}.items():
        key = cp.KernelKey(backend=backend, head_dim=128, causal=causal, pass_name="forward")
        model = cp.default_kernel_model(key, gpu_name="h100-80gb-sxm", peak_flops_per_s=H100_PEAK)
        assert model.effective_flops_per_s == pytest.approx(tflops * 1e12, rel=REL_TOL)
        assert model.provenance.startswith("default: ANCHORS.md") and "transferred" not in model.provenance


def test_default_backward_from_sdpa_fwd_bwd_anchor():
    """Backward rate reproduces ANCHORS.md's 589 TFLOP/s fwd+bwd when forward runs at 600 TFLOP/s."""
    fwd_s, bwd_s = 1 / 600e12, cp.BACKWARD_FLOPS_PER_FORWARD / (cp.BACKWARD_RATE_PER_FORWARD_RATE * 600e12)
    assert (1 + cp.BACKWARD_FLOPS_PER_FORWARD) / (fwd_s + bwd_s) == pytest.approx(589e12, rel=1e-9)


def test_default_scales_with_peak_and_says_transferred():
    """Another GPU gets the H100 efficiency × its own peak, and the provenance says so; the flash op on
    Ampere/Ada by its share of peak there (FlashAttention-2: 61.5% on A100, 34.7% on H100; issue 17)."""
    key = cp.KernelKey(backend="efficient", head_dim=128, causal=False, pass_name="forward")
    model = cp.default_kernel_model(key, gpu_name="a100-80gb", peak_flops_per_s=312e12)
    assert model.effective_flops_per_s == pytest.approx(177e12 * 312e12 / H100_PEAK, rel=REL_TOL)
    assert "transferred" in model.provenance
    flash = cp.default_kernel_model(cp.KernelKey(backend="flash", head_dim=128, causal=False, pass_name="forward"),
                                    gpu_name="a100-80gb", peak_flops_per_s=312e12)
    assert flash.effective_flops_per_s == pytest.approx(cp.FLASH_PEAK_SHARE["sm8x"] * 312e12, rel=REL_TOL)
    assert "share of peak" in flash.provenance


@pytest.mark.parametrize("key, message", [
    (cp.KernelKey(backend="math", head_dim=128, causal=False, pass_name="forward"), "no default"),
    (cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward", dtype="fp32"), "dtype"),
    (cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="both"), "pass"),
])
def test_default_refuses_what_it_does_not_know(key, message):
    """No anchor for math/cpu kernels or fp32: an error asking for a measurement, not a guess."""
    with pytest.raises(ValueError, match=message):
        cp.default_kernel_model(key, gpu_name="h100", peak_flops_per_s=H100_PEAK)


def test_derived_defaults_are_ordered():
    """Derived combinations keep the anchors' order: causal < non-causal, flash < cudnn, head_dim 64 < 128."""
    rate = lambda b, d, c: cp.default_forward_flops_per_s(b, d, c)[0]  # noqa: E731
    assert rate("efficient", 64, False) < rate("efficient", 128, False)
    assert rate("cudnn", 64, True) < rate("cudnn", 64, False)
    assert rate("flash", 64, True) < rate("cudnn", 64, True)


@given(overhead=st.floats(min_value=0, max_value=1e-4), tflops=st.floats(min_value=50, max_value=1500))
def test_kernel_fit_round_trip(overhead, tflops):
    """Rows synthesised from overhead + FLOPs/F: the fit recovers F (and the overhead) per key."""
    rows = []
    for n in (4096, 8192, 16384, 65536):
        flops = cp.attention_forward_flops(batch=1, n_heads=32, head_dim=128, q_tokens=n, kv_tokens=n)
        rows.append(_row(n, overhead + flops / (tflops * 1e12)))
        rows.append(_row(n, overhead + 2.5 * flops / (tflops * 0.9e12), pass_name="backward"))
    fits = cp.fit_kernel_curves(rows)
    fwd = fits[cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward")]
    bwd = fits[cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="backward")]
    assert 1 / fwd.curve.seconds_per_unit == pytest.approx(tflops * 1e12, rel=FIT_REL_TOL)
    assert 1 / bwd.curve.seconds_per_unit == pytest.approx(tflops * 0.9e12, rel=FIT_REL_TOL)
    assert fwd.curve.intercept_s == pytest.approx(overhead, abs=1e-9)


def test_kernel_fit_skips_single_size_keys():
    """A key measured at one block size is not fitted (no guessing an overhead from one point)."""
    assert cp.fit_kernel_curves([_row(4096, 1e-3)]) == {}
    assert cp.fit_merge_curve([]) is None


def test_merge_fit_round_trip():
    """Merge rows from 10 µs + bytes / 1 TB/s: the fit recovers both."""
    rows = [KernelRow(op="merge", dtype="bf16", batch=1, n_heads=32, head_dim=128, q_tokens=n, repeats=5,
                      seconds=10e-6 + cp.merge_bytes(batch=1, n_heads=32, head_dim=128, q_tokens=n, dtype_bytes=2) / 1e12)
            for n in (4096, 16384, 65536)]
    fit = cp.fit_merge_curve(rows)
    assert fit.curve.intercept_s == pytest.approx(10e-6, rel=1e-6)
    assert 1 / fit.curve.seconds_per_unit == pytest.approx(1e12, rel=1e-6)


def _measured(gpu, tflops, peak, head_dim=128):
    rows = [_row(n, n * n * 4 * 32 * head_dim / (tflops * 1e12), head_dim=head_dim) for n in (4096, 16384)]
    return cp.MeasuredKernels(gpu_driver_name=gpu, peak_flops_per_s=peak, fits=cp.fit_kernel_curves(rows))


def test_selection_order():
    """Measured here > same kernel at another head dim here > another GPU scaled by peak > default."""
    key = cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward")
    other = _measured("NVIDIA A100-SXM4-80GB", 200, 312e12)
    model = cp.ComputeModel(gpu_name="h100", peak_flops_per_s=H100_PEAK, hbm_bandwidth_bytes_per_s=3.35e12,
                            this_gpu=_measured("NVIDIA H100 80GB HBM3", 500, H100_PEAK), other_gpus=(other,))
    assert model.kernel(key).provenance == "measured on this GPU"
    assert model.kernel(key).effective_flops_per_s == pytest.approx(500e12, rel=1e-6)
    near = model.kernel(cp.KernelKey(backend="cudnn", head_dim=96, causal=False, pass_name="forward"))
    assert "head_dim 128" in near.provenance and "transferred" in near.provenance
    only_other = cp.ComputeModel(gpu_name="h100", peak_flops_per_s=H100_PEAK, hbm_bandwidth_bytes_per_s=3.35e12,
                                 other_gpus=(other,))
    moved = only_other.kernel(key)
    assert moved.provenance == "fitted on NVIDIA A100-SXM4-80GB and transferred"
    assert moved.effective_flops_per_s == pytest.approx(200e12 * H100_PEAK / 312e12, rel=1e-6)
    fallback = only_other.kernel(cp.KernelKey(backend="flash", head_dim=128, causal=True, pass_name="forward"))
    assert fallback.provenance.startswith("default")


def test_outside_measured_range_flag():
    """A block bigger than any measured one is flagged as extrapolated; inside is not."""
    fit = _measured("x", 500, H100_PEAK).fits[cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward")]
    model = cp.KernelModel(key=cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward"),
                           curve=fit.curve, provenance="measured on this GPU", fit=fit)
    inside = cp.attention_forward_flops(batch=1, n_heads=32, head_dim=128, q_tokens=8192, kv_tokens=8192)
    assert not model.outside_measured_range(inside)
    assert model.outside_measured_range(inside * 100)
    assert np.isfinite(model.time_s(inside * 100))


def test_auto_backend_choice():
    """auto plans with the kernel the runtime's auto runs: cudnn on H100 for bf16/fp16 up to head_dim 128,
    flash at 256 (and on A100), the memory-efficient kernel for fp32, math past 256."""
    here = cp.ComputeModel(gpu_name="h100-80gb-sxm", peak_flops_per_s=H100_PEAK, hbm_bandwidth_bytes_per_s=3.35e12)
    assert here.fastest_backend(128, "bf16") == "cudnn"
    assert here.fastest_backend(64, "fp16") == "cudnn"
    assert here.fastest_backend(256, "bf16") == "flash"
    assert here.fastest_backend(128, "fp32") == "efficient"
    assert here.fastest_backend(512, "bf16") == "math"
    ampere = cp.ComputeModel(gpu_name="a100-80gb", peak_flops_per_s=312e12, hbm_bandwidth_bytes_per_s=2e12)
    assert ampere.fastest_backend(128, "bf16") == "flash"
    with pytest.raises(ValueError, match="step overhead"):
        cp.ComputeModel(gpu_name="x", peak_flops_per_s=1e12, hbm_bandwidth_bytes_per_s=1e12, step_overhead_s=-1.0)


def test_elementwise_traffic_hand_computed():
    """A bf16 → fp32 copy of 10 values moves 60 bytes; fp32 += bf16 of 10 values 100 bytes; negatives refused."""
    assert cp.conversion_bytes(10, from_bytes=2, to_bytes=4) == 60
    assert cp.accumulation_bytes(10, accumulator_bytes=4, addend_bytes=2) == 100
    assert cp.qkv_projection_flops(batch=1, tokens=10, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16) + \
        cp.output_projection_flops(batch=1, tokens=10, embed_dim=64, n_heads=4, head_dim=16) == \
        cp.projection_forward_flops(batch=1, tokens=10, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="element count"):
        cp.conversion_bytes(-1, from_bytes=2, to_bytes=4)
    with pytest.raises(ValueError, match="element count"):
        cp.accumulation_bytes(-1, accumulator_bytes=4, addend_bytes=2)


def test_merge_queued_costs_only_its_traffic():
    """A measured merge queued behind a kernel costs its fitted slope × bytes (the intercept is host time);
    unmeasured: 3× the bytes at the catalog HBM bandwidth. Copies at 90% of HBM, GEMMs at 70% of peak."""
    rows = [KernelRow(op="merge", dtype="bf16", batch=1, n_heads=32, head_dim=128, q_tokens=n, repeats=5,
                      seconds=90e-6 + cp.merge_bytes(batch=1, n_heads=32, head_dim=128, q_tokens=n, dtype_bytes=2) / 1e12)
            for n in (4096, 16384, 65536)]
    measured = cp.MeasuredKernels(gpu_driver_name="x", peak_flops_per_s=H100_PEAK, merge_fit=cp.fit_merge_curve(rows))
    model = cp.ComputeModel(gpu_name="x", peak_flops_per_s=H100_PEAK, hbm_bandwidth_bytes_per_s=4e12, this_gpu=measured)
    seconds, label = model.merge_s(1e9)
    assert seconds == pytest.approx(1e-3, rel=1e-6) and label == "measured on this GPU"
    bare = cp.ComputeModel(gpu_name="x", peak_flops_per_s=H100_PEAK, hbm_bandwidth_bytes_per_s=4e12)
    assert bare.merge_s(1e9)[0] == pytest.approx(3e9 / 4e12, rel=REL_TOL)
    assert bare.elementwise_s(3.6e9) == pytest.approx(1e-3, rel=REL_TOL)
    assert bare.gemm_s(0.7 * H100_PEAK) == pytest.approx(1.0, rel=REL_TOL)


# ---- rate model: rate by tokens per block, per (backend, head_dim, dtype, GQA ratio, causal, pass) --------------

def _gqa_row(n, seconds, *, heads=16, gqa=1, **kw):
    row = _row(n, seconds, heads=heads, **kw)
    return KernelRow(**{**{f: getattr(row, f) for f in row.__slots__}, "n_kv_heads": heads // gqa})


def _synthetic_rows(*, overhead=30e-6, tflops=600.0, per_row_s=2e-12, gqa=1, sizes=(2048, 4096, 16384, 65536),
                    heads=(8, 16), **kw):
    """Calls timed as overhead + a·B·H·D·(n_q+n_k) + FLOPs / F (the fit's own affine family)."""
    rows = []
    for n in sizes:
        for h in heads:
            pass_name = kw.get("pass_name", "forward")
            flops = cp.attention_pass_flops(pass_name, batch=1, n_heads=h, head_dim=kw.get("head_dim", 128),
                                            q_tokens=n, kv_tokens=n, causal=kw.get("causal", False))
            seconds = overhead + per_row_s * h * kw.get("head_dim", 128) * 2 * n + flops / (tflops * 1e12)
            rows.append(_gqa_row(n, seconds, heads=h, gqa=gqa, **kw))
    return rows


def _rated_model(rows, *, gpu="NVIDIA H100 80GB HBM3", peak=H100_PEAK, others=(), dtype_peak=None):
    measured = cp.MeasuredKernels(gpu_driver_name=gpu, peak_flops_per_s=H100_PEAK, rates=cp.fit_kernel_rates(rows),
                                  peaks_flops_per_s={"bf16": H100_PEAK, "fp16": H100_PEAK, "fp32": 67e12})
    return cp.ComputeModel(gpu_name="h100-80gb-sxm", peak_flops_per_s=dtype_peak or peak,
                           hbm_bandwidth_bytes_per_s=3.35e12, this_gpu=measured, other_gpus=others)


def _flops(n, heads=16, head_dim=128, causal=False, pass_name="forward"):
    return cp.attention_pass_flops(pass_name, batch=1, n_heads=heads, head_dim=head_dim, q_tokens=n, kv_tokens=n,
                                   causal=causal)


@given(overhead=st.floats(min_value=0, max_value=5e-5), tflops=st.floats(min_value=50, max_value=900),
       per_row=st.floats(min_value=0, max_value=1e-11))
def test_rate_fit_round_trip(overhead, tflops, per_row):
    """Calls synthesised from overhead + per-row cost + FLOPs/F at 2 head counts: the fit recovers the overhead and
    reproduces every call (the rate curve absorbs the per-row cost as a block-size dependence)."""
    rows = _synthetic_rows(overhead=overhead, tflops=tflops, per_row_s=per_row)
    curve = cp.fit_kernel_rates(rows)[cp.kernel_row_key(rows[0])]
    assert curve.overhead_s == pytest.approx(overhead, rel=1e-6, abs=1e-9)
    for row in rows:
        assert curve.time_s(cp.kernel_row_flops(row), row.q_tokens) == pytest.approx(row.seconds, rel=1e-6)
    assert max(abs(e) for e in curve.relative_errors) < 1e-6


@given(rates=st.lists(st.floats(min_value=1.0, max_value=1000.0), min_size=2, max_size=6),
       overhead=st.floats(min_value=0, max_value=1e-3))
def test_rate_curve_time_is_monotone_in_tokens(rates, overhead):
    """Whatever rates the sweep measured (noise included), a block of more tokens never takes less time."""
    sizes = [2048 * 2**i for i in range(len(rates))]
    rows = [_gqa_row(n, overhead + _flops(n) / (r * 1e12)) for n, r in zip(sizes, rates)]
    curve = cp.fit_kernel_rates(rows)[cp.kernel_row_key(rows[0])]
    grid = np.geomspace(256, 4 * sizes[-1], 200)
    times = [curve.time_s(_flops(n), n) for n in grid]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:]))


def test_rate_model_monotone_in_tokens_on_the_committed_sweeps():
    """Every kernel key of every committed kernel profile: time non-decreasing in tokens, 512 to 1Mi tokens."""
    from ringplan.time.timing_data import load_timing_data

    data = load_timing_data()
    if not any(m.rates for m in data.kernels.values()):
        pytest.skip("no committed kernel profile")
    grid = np.geomspace(512, 2**20, 120)
    for measured in data.kernels.values():
        for key, curve in measured.rates.items():
            times = [curve.time_s(_flops(n, head_dim=key.head_dim, causal=key.causal, pass_name=key.pass_name), n)
                     for n in grid]
            assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:])), key


def test_rate_model_bounded_by_peak():
    """A sweep that reads faster than the catalog peak (noise) is capped at the peak: no call beats FLOPs / peak."""
    model = _rated_model(_synthetic_rows(tflops=2000.0, overhead=0.0, per_row_s=0.0))
    kernel = model.kernel(cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward"))
    for n in (1024, 4096, 65536, 2**20):
        assert kernel.time_s(_flops(n), n) >= _flops(n) / H100_PEAK * (1 - 1e-12)
    assert kernel.effective_flops_per_s <= H100_PEAK


def test_rate_lookup_exact_and_gqa_interpolated():
    """An exact key is 'measured on this GPU' (±5%); a GQA ratio between two swept ones is interpolated between
    their rates and labelled so (±7%); one past the swept ratios is extrapolated (±15%)."""
    rows = _synthetic_rows(tflops=600.0, gqa=4) + _synthetic_rows(tflops=500.0, gqa=8)
    model = _rated_model(rows)
    key = dict(backend="cudnn", head_dim=128, causal=False, pass_name="forward")
    n = 16384
    exact = model.kernel(cp.KernelKey(**key, gqa_ratio=4))
    assert exact.provenance == "measured on this GPU" and exact.uncertainty_at(_flops(n), n) == 0.05
    mid = model.kernel(cp.KernelKey(**key, gqa_ratio=6))
    assert mid.provenance == "measured on this GPU, GQA 6 between 4 and 8"
    t4, t6, t8 = (model.kernel(cp.KernelKey(**key, gqa_ratio=g)).time_s(_flops(n), n) for g in (4, 6, 8))
    assert t4 < t6 < t8
    assert mid.label_at(_flops(n), n).endswith("(±7%)")
    far = model.kernel(cp.KernelKey(**key, gqa_ratio=16))
    assert far.provenance.startswith("extrapolated (GQA 16 as 8") and far.uncertainty_at(_flops(n), n) == 0.15
    assert far.time_s(_flops(n), n) == pytest.approx(t8, rel=1e-12)


def test_rate_lookup_dtype_head_dim_and_other_gpu():
    """fp16 without an fp16 sweep uses bf16 here (transferred); another head dim here is transferred; another
    GPU's curve is scaled by the ratio of that dtype's peaks (fp32 by the fp32 peaks)."""
    rows = _synthetic_rows(tflops=600.0) + _synthetic_rows(tflops=40.0, dtype="fp32", backend="efficient")
    model = _rated_model(rows)
    fp16 = model.kernel(cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward", dtype="fp16"))
    assert fp16.provenance == "measured on this GPU at head_dim 128 bf16 (transferred)"
    wide = model.kernel(cp.KernelKey(backend="cudnn", head_dim=96, causal=False, pass_name="forward"))
    assert "head_dim 128" in wide.provenance and "transferred" in wide.provenance
    rows = _synthetic_rows(tflops=200.0) + _synthetic_rows(tflops=10.0, dtype="fp32", backend="efficient")
    a100 = cp.MeasuredKernels(gpu_driver_name="NVIDIA A100-SXM4-80GB", peak_flops_per_s=312e12,
                              rates=cp.fit_kernel_rates(rows), peaks_flops_per_s={"bf16": 312e12, "fp32": 19.5e12})
    there = cp.ComputeModel(gpu_name="h100-80gb-sxm", peak_flops_per_s=H100_PEAK, hbm_bandwidth_bytes_per_s=3.35e12,
                            other_gpus=(a100,))
    moved = there.kernel(cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward"))
    assert moved.provenance == "fitted on NVIDIA A100-SXM4-80GB and transferred" and moved.uncertainty == 0.25
    own = cp.fit_kernel_rates(rows)[cp.kernel_row_key(rows[0])]
    n = 65536
    scaled = lambda curve, factor: curve.overhead_s + (curve.time_s(_flops(n), n) - curve.overhead_s) * factor  # noqa: E731
    assert moved.time_s(_flops(n), n) == pytest.approx(scaled(own, 312e12 / H100_PEAK), rel=1e-9)  # overhead kept
    fp32_there = cp.ComputeModel(gpu_name="h100-80gb-sxm", peak_flops_per_s=67e12, hbm_bandwidth_bytes_per_s=3.35e12,
                                 other_gpus=(a100,))
    fp32 = fp32_there.kernel(cp.KernelKey(backend="efficient", head_dim=128, causal=False, pass_name="forward",
                                          dtype="fp32"))
    fp32_own = cp.fit_kernel_rates(rows)[cp.kernel_row_key(rows[-1])]
    assert fp32.time_s(_flops(n), n) == pytest.approx(scaled(fp32_own, 19.5e12 / 67e12), rel=1e-9)


def test_long_blocks_follow_the_family_trend_then_extrapolate():
    """A key swept to 64Ki continues along the trend of a GQA ratio swept to 512Ki (±7%); past every swept size the
    rate stays flat, the call is flagged outside the measured range and its ± widens to 15%."""
    short = _synthetic_rows(tflops=600.0, gqa=8)
    rows = short + [_gqa_row(n, _flops(n, heads=1) / (r * 1e12), heads=1, gqa=1)
                    for n, r in ((16384, 600.0), (65536, 600.0), (262144, 540.0), (524288, 480.0))]
    model = _rated_model(rows)
    kernel = model.kernel(cp.KernelKey(backend="cudnn", head_dim=128, causal=False, pass_name="forward", gqa_ratio=8))
    assert kernel.rate.own_max_tokens == 65536 and kernel.rate.measured_range[1] == 524288
    at = lambda n: _flops(n) / (kernel.time_s(_flops(n), n) - kernel.rate.overhead_s)  # noqa: E731
    assert at(262144) / at(65536) == pytest.approx(540 / 600, rel=1e-3)
    assert kernel.uncertainty_at(_flops(262144), 262144) == 0.07 and not kernel.outside_measured_range(1.0, 262144)
    assert kernel.outside_measured_range(1.0, 2**21) and kernel.uncertainty_at(1.0, 2**21) == 0.15
    assert at(2**21) == pytest.approx(at(524288), rel=1e-9)


def test_block_tokens_is_the_geometric_mean():
    """√(n_q·n_k): n for a square block, n/√2 for a half block; a size of 0 is refused."""
    assert cp.block_tokens(4096, 4096) == 4096
    assert cp.block_tokens(4096, 2048) == pytest.approx(4096 / np.sqrt(2), rel=REL_TOL)
    with pytest.raises(ValueError, match="positive"):
        cp.block_tokens(0, 4096)
