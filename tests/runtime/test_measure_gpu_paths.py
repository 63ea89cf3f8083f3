"""The GPU-only arithmetic of measurement, checked on CPU with stand-ins for CUDA and NVML:
device used at the peak, the emulation cap, and NVML lookups (and their clean absence)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from ringplan_runtime import emulate, measure, nvml  # noqa: E402

GB = 10**9
CUDA0 = torch.device("cuda", 0)


def test_device_used_at_the_peak_adds_outside_memory_to_the_peak_reservation(monkeypatch):
    """NVML 10 GB now, allocator 6 GB reserved now, 8 GB at the peak: 4 GB outside → 12 GB at the peak."""
    monkeypatch.setattr(measure, "device_used_bytes", lambda device: 10 * GB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * GB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 8 * GB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * GB)
    peaks = measure.allocator_and_device_peaks(CUDA0)
    assert peaks == {"peak_allocated_bytes": 7 * GB, "peak_reserved_bytes": 8 * GB, "device_used_bytes": 12 * GB,
                     "non_allocator_bytes": 4 * GB}


def test_without_nvml_device_used_is_unknown(monkeypatch):
    """No NVML: device used and the outside memory are None, allocator peaks still read."""
    monkeypatch.setattr(measure, "device_used_bytes", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * GB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 8 * GB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * GB)
    peaks = measure.allocator_and_device_peaks(CUDA0)
    assert peaks["device_used_bytes"] is None and peaks["non_allocator_bytes"] is None
    assert peaks["peak_reserved_bytes"] == 8 * GB


def _fake_device(monkeypatch, *, total_bytes: int, outside_bytes: int | None) -> list[tuple[float, object]]:
    fractions: list[tuple[float, object]] = []
    monkeypatch.setattr(emulate, "non_allocator_bytes", lambda device: outside_bytes)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total_bytes))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: fractions.append((fraction, device)))
    return fractions


def test_emulation_cap_is_usable_memory_minus_what_the_allocator_does_not_see(monkeypatch):
    """A 40 GB card on an 80 GB one with 1 GB of context + NCCL: the allocator may reserve 39 GB."""
    fractions = _fake_device(monkeypatch, total_bytes=80 * GB, outside_bytes=1 * GB)
    cap = emulate.apply_memory_cap(CUDA0, 40 * GB)
    assert cap.allocator_cap_bytes == 39 * GB
    assert fractions == [(pytest.approx(39 / 80), CUDA0)]


@pytest.mark.parametrize("usable, outside, message", [
    (40 * GB, None, "needs NVML"),
    (40 * GB, 41 * GB, "smaller than the non-allocator overhead"),
    (90 * GB, 1 * GB, "exceeds this device"),
])
def test_emulation_refuses_what_it_cannot_honour(monkeypatch, usable, outside, message):
    """No NVML, overhead above the emulated memory, or an emulated card above the real one: ValueError."""
    fractions = _fake_device(monkeypatch, total_bytes=80 * GB, outside_bytes=outside)
    with pytest.raises(ValueError, match=message):
        emulate.apply_memory_cap(CUDA0, usable)
    assert fractions == []


class FakeNvml:
    """The few pynvml calls ringplan makes, for one device (index 0, one UUID, one PCI bus id)."""

    class NVMLError(Exception):
        pass

    UUID, PCI = "GPU-1234", "00000000:1b:00.0"

    def _check(self, ok: bool):
        if not ok:
            raise self.NVMLError("not found")
        return "handle"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self._check(uuid == self.UUID)

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        return self._check(bus == self.PCI)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._check(index == 0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * GB, used=3 * GB, free=77 * GB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=42, usedGpuMemory=2 * GB)]

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"


@pytest.mark.parametrize("ref", ["1234", "GPU-1234", "pci:00000000:1b:00.0", 0])
def test_nvml_finds_a_device_by_uuid_pci_or_index(monkeypatch, ref):
    """UUID with or without 'GPU-', PCI bus id, or index: same device, same reading."""
    monkeypatch.setattr(nvml, "_nvml", lambda: FakeNvml())
    reading = nvml.device_memory(ref, pid=42)
    assert (reading.total_bytes, reading.used_bytes, reading.process_used_bytes) == (80 * GB, 3 * GB, 2 * GB)
    assert nvml.gpu_name(ref) == "NVIDIA H100 80GB HBM3" and nvml.driver_version() == "580.159.04"


def test_nvml_absent_or_unknown_device_degrades_to_none(monkeypatch):
    """Without the library every query is None; an unknown device is None, not an exception."""
    monkeypatch.setattr(nvml, "_nvml", lambda: None)
    assert (nvml.device_memory(0), nvml.gpu_name(0), nvml.driver_version(), nvml.nvml_available()) == \
        (None, None, None, False)
    monkeypatch.setattr(nvml, "_nvml", lambda: FakeNvml())
    assert nvml.device_memory("GPU-9999") is None and nvml.gpu_name(3) is None


@pytest.mark.parametrize("visible, expected", [(None, 0), ("1,0", 1), ("GPU-abcd,GPU-ef01", "GPU-abcd")])
def test_first_visible_device_follows_cuda_visible_devices(monkeypatch, visible, expected):
    """CUDA device 0 is the first CUDA_VISIBLE_DEVICES entry (index or UUID), else NVML index 0."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml.first_visible_device() == expected
