"""Live-tensor-bytes tracker and sent-bytes counter: two ``TorchDispatchMode`` s for measurement.

``LiveTensorTracker`` records the peak total bytes of live tensor storages while code runs
under it. Every op's outputs are registered; each storage is counted once (views and in-place
results share a storage) and uncounted when its Python storage object is finalised, i.e. when
the last tensor that uses it dies. On CPU, where there is no caching allocator to ask, this is
how CI checks the planner's analytic byte terms (``ringplan.memory.attention_terms``) exactly.

What it cannot see, by construction: workspace allocated and freed *inside* one aten kernel
(e.g. the blocks of ``_scaled_dot_product_flash_attention_for_cpu``), tensors created before the
mode started unless passed to ``track``, and allocator rounding/caching (use the CUDA allocator's
own peaks for that). Peaks are taken at op boundaries.

``SentBytesCounter`` counts the bytes of every point-to-point send (``c10d.send``) issued under
it, which is how the runtime's ring traffic per rank is measured without touching ``RingComm``.

Usage::

    with LiveTensorTracker() as tracker:
        q = torch.randn(...)           # created under the mode: counted
        out = ring_attention(q, k, v)
    tracker.peak_bytes
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SEND_OPS = ("c10d.send.default",)


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveStorage:
    """One live storage as seen at the peak: its size and the first tensor that showed it."""

    n_bytes: int
    shape: tuple[int, ...]
    dtype: str
    op: str


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def storage_or_none(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The tensor's storage, or None for tensors without one (sparse, nested, meta, subclasses)."""
    if tensor.is_sparse or tensor.device.type == "meta":
        return None
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages at op boundaries (see the module docstring).

    ``device``: count only storages on this device type (``"cpu"``, ``"cuda"``), or all when None.
    ``keep_peak_tensors``: remember which storages were live at the peak (for diagnosing a
    mismatch with the analytic terms; costs O(live storages) per new peak).
    """

    def __init__(self, *, device: str | None = None, keep_peak_tensors: bool = False) -> None:
        super().__init__()
        self._device = device
        self._keep = keep_peak_tensors
        self._live: dict[int, tuple[weakref.ref, LiveStorage]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_op = ""
        self.peak_tensors: tuple[LiveStorage, ...] = ()

    def track(self, *tensors: torch.Tensor, op: str = "track") -> None:
        """Count tensors created outside the mode (caller's inputs, module parameters)."""
        for tensor in tensors:
            self._register(tensor, op)
        self._update_peak(op)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (like ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak_bytes = self.live_bytes
        self.peak_op = "reset"
        self.peak_tensors = self._snapshot() if self._keep else ()

    def _register(self, tensor: torch.Tensor, op: str) -> None:
        if self._device is not None and tensor.device.type != self._device:
            return
        storage = storage_or_none(tensor)
        if storage is None:
            return
        key = id(storage)
        n_bytes = storage.nbytes()
        known = self._live.get(key)
        if known is not None:
            if known[1].n_bytes != n_bytes:  # resized in place (out= ops, resize_)
                self.live_bytes += n_bytes - known[1].n_bytes
                self._live[key] = (known[0], live_storage(tensor, n_bytes, op))
            return
        if n_bytes == 0:
            return
        ref = weakref.ref(storage, lambda _ref, key=key: self._forget(key))
        self._live[key] = (ref, live_storage(tensor, n_bytes, op))
        self.live_bytes += n_bytes

    def _forget(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[1].n_bytes

    def _update_peak(self, op: str) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_op = op
            if self._keep:
                self.peak_tensors = self._snapshot()

    def _snapshot(self) -> tuple[LiveStorage, ...]:
        return tuple(sorted((entry[1] for entry in self._live.values()), key=lambda s: -s.n_bytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        for tensor in _tensors(out):
            self._register(tensor, name)
        self._update_peak(name)
        return out


def live_storage(tensor: torch.Tensor, n_bytes: int, op: str) -> LiveStorage:
    """The tracker's record of a storage of ``n_bytes`` first seen as ``tensor`` in op ``op``."""
    return LiveStorage(n_bytes=n_bytes, shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
                       op=op)


class SentBytesCounter(TorchDispatchMode):
    """Bytes this rank sends point-to-point (``c10d.send``) while the mode is active.

    Counts the payload only (``numel · element size`` of each sent tensor); ignores collectives
    (all-reduce of a status flag, barriers) and any protocol overhead of the transport.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent_bytes = 0
        self.sends = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in _SEND_OPS:
            for tensor in _tensors(args[0] if args else kwargs.get("tensors")):
                self.sent_bytes += tensor.numel() * tensor.element_size()
                self.sends += 1
        return func(*args, **(kwargs or {}))
