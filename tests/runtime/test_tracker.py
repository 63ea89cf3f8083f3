"""The live-tensor tracker counts each storage once, frees it when the last tensor dies, and peaks right.

Hand-computed examples on CPU (fp32 = 4 bytes). The cross-check of the tracker against the
planner's analytic byte terms for every runtime path lives in ``tests/test_measure_cpu.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ringplan_runtime.tracker import LiveTensorTracker, SentBytesCounter  # noqa: E402

FP32 = 4


def test_views_share_one_storage():
    """A view and its base are one storage: counted once, freed when both are gone."""
    with LiveTensorTracker() as tracker:
        x = torch.zeros(1000)
        v = x.view(10, 100)[2:5]
        assert tracker.live_bytes == 1000 * FP32
        del x
        assert tracker.live_bytes == 1000 * FP32
        del v
    assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 1000 * FP32


def test_peak_includes_temporaries_freed_later():
    """``(a + b) * c`` holds a temporary of the result size until the multiply returns."""
    with LiveTensorTracker() as tracker:
        a, b, c = torch.ones(256), torch.ones(256), torch.ones(256)
        d = (a + b) * c
        assert tracker.live_bytes == 4 * 256 * FP32
    assert tracker.peak_bytes == 5 * 256 * FP32
    del d


def test_in_place_ops_add_nothing():
    """``x.add_(1)`` returns x's storage: no new bytes."""
    with LiveTensorTracker() as tracker:
        x = torch.zeros(128)
        x.add_(1).mul_(2)
    assert tracker.peak_bytes == 128 * FP32
    del x


def test_track_counts_tensors_made_outside():
    """Tensors created before the mode are invisible unless registered with ``track``."""
    outside = torch.zeros(64)
    with LiveTensorTracker() as tracker:
        tracker.track(outside)
        y = outside + 1
    assert tracker.peak_bytes == 2 * 64 * FP32
    del y


def test_reset_peak_starts_from_live_bytes():
    """After ``reset_peak`` the peak is what is live, not the earlier maximum."""
    with LiveTensorTracker() as tracker:
        big = torch.zeros(4096)
        del big
        small = torch.zeros(16)
        tracker.reset_peak()
        assert tracker.peak_bytes == 16 * FP32
    del small


def test_backward_saved_tensors_and_grads_counted():
    """Training: the saved activation lives until backward; the leaf's grad is a new storage."""
    with LiveTensorTracker(keep_peak_tensors=True) as tracker:
        a = torch.ones(100, requires_grad=True)
        loss = (a * 2).sin().sum()
        assert tracker.live_bytes == (100 + 100 + 1) * FP32   # a, a*2 saved by sin, loss
        loss.backward()
        del loss
        assert tracker.live_bytes == 2 * 100 * FP32           # a and a.grad
    assert tracker.peak_tensors, "keep_peak_tensors must record the storages live at the peak"
    assert sum(s.n_bytes for s in tracker.peak_tensors) == tracker.peak_bytes


def test_device_filter_ignores_other_devices():
    """``device="cuda"`` ignores CPU tensors."""
    with LiveTensorTracker(device="cuda") as tracker:
        x = torch.zeros(1000)
    assert tracker.peak_bytes == 0
    del x


def test_sent_bytes_counter_ignores_local_ops():
    """No point-to-point send, no bytes: local compute is not traffic."""
    with SentBytesCounter() as counter:
        torch.ones(10) + 1
    assert counter.sent_bytes == 0 and counter.sends == 0
