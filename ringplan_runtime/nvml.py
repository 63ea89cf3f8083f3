"""Device memory, driver version and GPU name as the NVIDIA driver reports them (nvidia-ml-py).

The torch allocator sees only its own blocks; NVML sees the whole device: CUDA context, NCCL
buffers, cuBLAS/cuDNN workspaces, the allocator's cache, and other processes. The difference is
the "non-allocator overhead" the planner's fixed term stands for and that ``--emulate-gpu`` must
subtract from the emulated card's usable memory.

Every function degrades cleanly: without the NVML library (CPU machines, CI), or when a query is
not supported, it returns None instead of raising. Devices are named by UUID (``GPU-…``, what
``torch.cuda.get_device_properties(i).uuid`` gives, robust to ``CUDA_VISIBLE_DEVICES``), by PCI bus
id (``"pci:00000000:1B:00.0"``) or by NVML index. This module does not import torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceMemory:
    """One NVML reading of a device's memory, in bytes.

    ``used_bytes`` is what nvidia-smi shows as used (all processes, plus what the driver keeps);
    ``process_used_bytes`` is this process's share when the driver exposes per-process accounting
    (often not inside containers: None then).
    """

    total_bytes: int
    used_bytes: int
    free_bytes: int
    process_used_bytes: int | None = None


@functools.cache
def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None when NVML is absent (imported and initialised once)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None
    return pynvml


def nvml_available() -> bool:
    """True when the NVML library loads and initialises on this machine."""
    return _nvml() is not None


def _handle(device: str | int) -> Any | None:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        if isinstance(device, str) and device.startswith("pci:"):
            return nvml.nvmlDeviceGetHandleByPciBusId(device.removeprefix("pci:"))
        if isinstance(device, str):
            uuid = device if device.startswith(("GPU-", "MIG-")) else f"GPU-{device}"
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        return nvml.nvmlDeviceGetHandleByIndex(device)
    except nvml.NVMLError:
        return None


def first_visible_device() -> str | int:
    """NVML name of CUDA device 0 without creating a CUDA context: the first ``CUDA_VISIBLE_DEVICES``
    entry (an index or a UUID), else NVML index 0."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else first or 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def driver_version() -> str | None:
    """NVIDIA driver version string (e.g. ``"570.124.06"``), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return _text(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError:
        return None


def gpu_name(device: str | int) -> str | None:
    """The GPU's name exactly as the driver reports it (``"NVIDIA H100 80GB HBM3"``), or None."""
    handle = _handle(device)
    if handle is None:
        return None
    try:
        return _text(_nvml().nvmlDeviceGetName(handle))
    except _nvml().NVMLError:
        return None


def device_memory(device: str | int, *, pid: int | None = None) -> DeviceMemory | None:
    """Total/used/free bytes of the device now, plus this process's use if exposed; None without NVML.

    NVML reports the current use, not a peak: read it after the step, while the caching
    allocator still holds its peak reservation, to get the device-used figure at the peak.
    """
    handle = _handle(device)
    if handle is None:
        return None
    nvml = _nvml()
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError:
        return None
    return DeviceMemory(total_bytes=int(info.total), used_bytes=int(info.used), free_bytes=int(info.free),
                        process_used_bytes=_process_used_bytes(handle, os.getpid() if pid is None else pid))


def _process_used_bytes(handle: Any, pid: int) -> int | None:
    nvml = _nvml()
    try:
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return None
    for process in processes:
        used = getattr(process, "usedGpuMemory", None)
        if process.pid == pid and isinstance(used, int):
            return used
    return None
