"""Communication model: α–β link times, the least-squares fit, node layouts and hop times."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.time import links as cm

REL_TOL = 1e-9          # exact arithmetic up to float rounding
FIT_REL_TOL = 1e-6      # noiseless round-trip of the fit
NOISY_FIT_REL_TOL = 0.05  # ±2% multiplicative noise on the rows

latencies = st.floats(min_value=1e-6, max_value=1e-3)
bandwidths = st.floats(min_value=1e9, max_value=1e12)


def test_transfer_time_hand_computed():
    """10 µs + 1 MB at 1 GB/s = 1.01 ms; zero bytes cost nothing."""
    link = cm.LinkModel(name="x", latency_s=10e-6, bandwidth_bytes_per_s=1e9)
    assert link.transfer_time_s(1e6) == pytest.approx(1.01e-3, rel=REL_TOL)
    assert link.transfer_time_s(0) == 0.0
    np.testing.assert_allclose(link.transfer_time_s(np.array([1e3, 1e9])), [11e-6, 1.00001], rtol=REL_TOL)


@given(latency=latencies, bandwidth=bandwidths)
def test_fit_recovers_alpha_beta(latency, bandwidth):
    """Rows synthesised from known α, β: the fit recovers them and R² = 1."""
    sizes = np.logspace(12, 30, 10, base=2)
    fit = cm.fit_time_curve(sizes, latency + sizes / bandwidth)
    assert fit.curve.intercept_s == pytest.approx(latency, rel=FIT_REL_TOL)
    assert 1 / fit.curve.seconds_per_unit == pytest.approx(bandwidth, rel=FIT_REL_TOL)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-9)
    assert max(abs(e) for e in fit.relative_errors) < FIT_REL_TOL
    assert fit.n_points == 10 and fit.x_range == (sizes[0], sizes[-1])


@given(latency=latencies, bandwidth=bandwidths, seed=st.integers(0, 2**31))
def test_fit_with_noise_stays_close(latency, bandwidth, seed):
    """±2% noise per row: β within 5%, α within 5% of the smallest message's time (its scale)."""
    rng = np.random.default_rng(seed)
    sizes = np.logspace(12, 30, 19, base=2)
    times = (latency + sizes / bandwidth) * rng.uniform(0.98, 1.02, sizes.size)
    fit = cm.fit_time_curve(sizes, times)
    assert 1 / fit.curve.seconds_per_unit == pytest.approx(bandwidth, rel=NOISY_FIT_REL_TOL)
    assert abs(fit.curve.intercept_s - latency) <= NOISY_FIT_REL_TOL * times[0]
    assert len(fit.residuals_s) == sizes.size


@pytest.mark.parametrize("sizes, times", [
    ([1, 2], [1e-3]),                 # unequal lengths
    ([4096, 4096], [1e-4, 1e-4]),     # one distinct size
    ([4096, 8192], [0.0, 1e-4]),      # non-positive time
    ([-1, 8192], [1e-4, 2e-4]),       # non-positive size
    ([4096, 2**30], [1e-3, 1e-4]),    # time falls with size: slope would be negative
])
def test_fit_rejects_bad_sweeps(sizes, times):
    """A sweep that cannot give latency and bandwidth is a ValueError, not a silent fit."""
    with pytest.raises(ValueError):
        cm.fit_time_curve(sizes, times)


@given(bad=st.floats(max_value=0.0, allow_nan=False))
def test_non_positive_link_numbers_rejected(bad):
    """Zero or negative latency or bandwidth is a ValueError naming the value."""
    with pytest.raises(ValueError, match="latency"):
        cm.LinkModel(name="x", latency_s=bad, bandwidth_bytes_per_s=1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        cm.LinkModel(name="x", latency_s=1e-6, bandwidth_bytes_per_s=bad)


def test_anchor_link_reproduces_anchor_points():
    """The default H100 NVLink model passes through ANCHORS.md's 91/251/335 GB/s and 0.14 ms floor."""
    link = cm.h100_nvlink_anchor_link()
    mib = 2**20
    for size, gb_per_s in ((16 * mib, 91), (256 * mib, 251), (1024 * mib, 335)):
        assert size / link.transfer_time_s(size) == pytest.approx(gb_per_s * 1e9, rel=REL_TOL)
    assert link.transfer_time_s(4096) == pytest.approx(0.14e-3, rel=REL_TOL)
    assert link.transfer_time_s(1024) == pytest.approx(0.14e-3, rel=REL_TOL)  # floor below the range


@given(size=st.floats(min_value=4096, max_value=2**33))
def test_interpolated_time_monotone_and_continuous(size):
    """Measured-curve time never falls with size and is continuous at the top of the range."""
    link = cm.h100_nvlink_anchor_link()
    assert link.transfer_time_s(size * 1.01) >= link.transfer_time_s(size)
    top = 2**30
    assert link.transfer_time_s(top * (1 + 1e-9)) == pytest.approx(link.transfer_time_s(top), rel=1e-6)


def test_link_from_catalog_spec():
    """A LinkSpec-like object becomes a LinkModel with the same α and β."""
    class Spec:
        name, bandwidth_bytes_per_s, latency_s, sources = "nvlink-4", 450e9, 1e-6, {"bandwidth_bytes_per_s": "datasheet"}

    link = cm.link_model_from_spec(Spec())
    assert (link.latency_s, link.bandwidth_bytes_per_s) == (1e-6, 450e9)
    with pytest.raises(ValueError):
        cm.link_model_from_spec(object())


@pytest.mark.parametrize("ring_size, per_node, nodes, expect_nodes", [
    (8, 8, None, 1), (4, 8, None, 1), (16, 8, None, 2), (1024, 8, None, 128), (4, 8, 2, 2), (16, 8, 2, 2),
])
def test_node_layout_valid(ring_size, per_node, nodes, expect_nodes):
    """Rings that fill nodes (or split evenly over given nodes) are placed node by node."""
    layout = cm.node_layout(ring_size, per_node, nodes)
    assert layout.nodes == expect_nodes
    assert layout.ranks_per_node * layout.nodes == ring_size


@pytest.mark.parametrize("ring_size, per_node, nodes, message", [
    (12, 8, None, "do not fill nodes"), (10, 8, 4, "split evenly"), (24, 8, 2, "a node has 8"),
    (0, 8, None, "positive"), (8, 0, None, "positive"), (8, 8, 0, "positive"),
])
def test_node_layout_invalid(ring_size, per_node, nodes, message):
    """A world size that does not fit the node layout is a clear ValueError."""
    with pytest.raises(ValueError, match=message):
        cm.node_layout(ring_size, per_node, nodes)


def test_previous_ranks_groups():
    """Rings of 2 inside 6 ranks: 0←1, 1←0, 2←3, ...; the whole ring: r ← r−1."""
    assert cm.previous_ranks(6, 2).tolist() == [1, 0, 3, 2, 5, 4]
    assert cm.previous_ranks(4, 4).tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError):
        cm.previous_ranks(6, 4)


def test_hop_times_mark_node_crossings():
    """16 ranks on 2 nodes of 8: the hops into rank 8 and rank 0 cross nodes, the rest do not."""
    intra = cm.LinkModel(name="nv", latency_s=1e-5, bandwidth_bytes_per_s=1e11)
    inter = cm.LinkModel(name="ib", latency_s=1e-5, bandwidth_bytes_per_s=1e10)
    hops = cm.hop_times_s(1e8, cm.node_layout(16, 8), 16, intra=intra, inter=inter)
    slow = np.flatnonzero(np.isclose(hops, inter.transfer_time_s(1e8), rtol=REL_TOL))
    assert slow.tolist() == [0, 8]
    assert np.allclose(np.delete(hops, [0, 8]), intra.transfer_time_s(1e8))
    # groups of 4 never cross a node boundary of 8
    assert np.allclose(cm.hop_times_s(1e8, cm.node_layout(16, 8), 4, intra=intra, inter=inter), intra.transfer_time_s(1e8))
    with pytest.raises(ValueError, match="inter-node"):
        cm.hop_times_s(1e8, cm.node_layout(16, 8), 16, intra=intra, inter=None)


def test_kernel_curve_extrapolation_hand_computed():
    """Kernel curves: above the range the last segment's power law (t ∝ x² here, 4× per 2× size), clipped to
    at least linear; below it the fitted slope through the first point, never under the intercept."""
    curve = cm.TimeCurve(intercept_s=0.2, seconds_per_unit=0.1, points=((1.0, 1.0), (2.0, 2.0), (4.0, 8.0)),
                         extrapolation="kernel")
    assert curve.time_s(8.0) == pytest.approx(32.0, rel=REL_TOL)
    assert curve.time_s(3.0) == pytest.approx(np.exp(np.interp(np.log(3), np.log([2, 4]), np.log([2, 8]))), rel=REL_TOL)
    assert curve.time_s(0.5) == pytest.approx(0.95, rel=REL_TOL)
    assert curve.time_s(1e-6) == pytest.approx(0.9000001, rel=REL_TOL)
    flat_top = cm.TimeCurve(intercept_s=0.0, seconds_per_unit=0.1, points=((1.0, 1.0), (2.0, 1.5)),
                            extrapolation="kernel")
    assert flat_top.time_s(4.0) == pytest.approx(3.0, rel=REL_TOL)  # exponent 0.58 clipped to 1
    with pytest.raises(ValueError, match="extrapolation"):
        cm.TimeCurve(intercept_s=0.0, seconds_per_unit=1.0, extrapolation="spline")


def test_link_curve_keeps_its_latency_floor():
    """Link curves (the default) floor at the smallest measured time below the range, unlike kernels."""
    points = ((1e3, 1e-4), (1e6, 2e-4))
    link = cm.TimeCurve(intercept_s=1e-4, seconds_per_unit=1e-10, points=points)
    kernel = cm.TimeCurve(intercept_s=0.0, seconds_per_unit=1e-10, points=points, extrapolation="kernel")
    assert link.time_s(10.0) == pytest.approx(1e-4, rel=REL_TOL)
    assert kernel.time_s(10.0) < link.time_s(10.0)


@given(st.integers(0, 10_000), st.integers(2, 3), st.integers(3, 12))
def test_nonnegative_least_squares_matches_scipy(seed, columns, rows):
    """The face-by-face solver (no scipy import on a planner command's path) reaches scipy's bounded
    optimum (``lsq_linear``, BVLS): same residual, every coefficient non-negative."""
    from scipy.optimize import lsq_linear

    rng = np.random.default_rng(seed)
    design, target = rng.random((rows, columns)), rng.normal(size=rows)
    ours = cm.nonnegative_least_squares(design, target)
    theirs = lsq_linear(design, target, bounds=(np.zeros(columns), np.full(columns, np.inf)), method="bvls").x
    assert np.all(ours >= 0)
    residual = lambda c: float(np.sum((design @ c - target) ** 2))  # noqa: E731
    assert residual(ours) == pytest.approx(residual(theirs), rel=1e-9, abs=1e-12)
