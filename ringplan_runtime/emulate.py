"""Emulate a smaller GPU on a bigger one by capping what the torch allocator may reserve.

The emulated card's usable memory U (catalog ``usable_memory_bytes``) must hold everything the
process puts on the device, not only the allocator's blocks. So the cap given to the allocator is

    cap = U - non_allocator_bytes,   non_allocator_bytes = NVML used - torch reserved

where ``non_allocator_bytes`` (CUDA context, loaded kernels, NCCL buffers, cuBLAS/cuDNN handles)
is measured on this process after a small calibration step of the same workload has loaded the
kernels and set up the communicators. ``torch.cuda.set_per_process_memory_fraction(cap / total)``
then makes the allocator raise ``OutOfMemoryError`` once its reservation would exceed ``cap``.

Ignored: the emulated card's own context size (taken equal to this card's), and the speed of
the emulated card (only its memory is emulated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringplan_runtime.measure import device_used_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryCap:
    """The allocator cap applied on one device, and the figures it was derived from (bytes)."""

    usable_memory_bytes: int
    non_allocator_bytes: int
    allocator_cap_bytes: int
    device_total_bytes: int

    @property
    def fraction(self) -> float:
        return self.allocator_cap_bytes / self.device_total_bytes


def allocator_cap_bytes(usable_memory_bytes: int, non_allocator_bytes: int) -> int:
    """Bytes the allocator may reserve so the device total stays within the emulated usable memory.

    Formula: U - non_allocator_bytes. Raises when the overhead alone exceeds U.
    """
    cap = usable_memory_bytes - non_allocator_bytes
    if cap <= 0:
        raise ValueError(f"emulated usable memory {usable_memory_bytes:,} B is smaller than the non-allocator "
                         f"overhead {non_allocator_bytes:,} B measured on this device")
    return cap


def non_allocator_bytes(device: torch.device) -> int | None:
    """NVML used bytes minus what the torch allocator reserves, after releasing its free cache."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    used = device_used_bytes(device)
    if used is None:
        return None
    return max(0, used - torch.cuda.memory_reserved(device))


def apply_memory_cap(device: torch.device, usable_memory_bytes: int) -> MemoryCap:
    """Cap this process's allocator on ``device`` so the device total fits ``usable_memory_bytes``.

    Call after a calibration step (kernels loaded, NCCL communicators up). Without NVML the
    overhead cannot be measured: that is an error, not a silent uncapped run.
    """
    overhead = non_allocator_bytes(device)
    if overhead is None:
        raise ValueError("--emulate-gpu needs NVML (nvidia-ml-py and the NVIDIA driver) to measure the "
                         "non-allocator overhead")
    total = torch.cuda.get_device_properties(device).total_memory
    cap = MemoryCap(usable_memory_bytes=usable_memory_bytes, non_allocator_bytes=overhead,
                    allocator_cap_bytes=allocator_cap_bytes(usable_memory_bytes, overhead), device_total_bytes=total)
    if cap.fraction > 1:
        raise ValueError(f"emulated usable memory {usable_memory_bytes:,} B exceeds this device's "
                         f"{total:,} B")
    torch.cuda.set_per_process_memory_fraction(cap.fraction, device)
    return cap
