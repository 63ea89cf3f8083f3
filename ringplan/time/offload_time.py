"""Step time that parameter / optimizer-state offload adds (``StackSettings.offload_params``): the host
link's traffic (PCIe, from the catalog link the GPU's host system names) and the AdamW step on the CPU
(from the host's DRAM bandwidth). Byte counts and formulas: ``ringplan.memory.offload_terms``; host
systems: ``ringplan.memory.host_memory.HOST_SYSTEMS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringplan.hardware import Catalog, GpuSpec
from ringplan.memory.host_memory import host_system
from ringplan.memory.offload_terms import (cpu_optimizer_step_time_s, d2h_bytes_per_step, exposed_pcie_time_s,
                                           h2d_bytes_per_step, offloads_states, pcie_time_s)
from ringplan.stack import StackWorkload


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadTime:
    """Per step: host-link bytes each way, the link's busy time, the part of it not hidden under compute,
    the CPU AdamW step (exposed: it runs after the backward, before the next step), and their exposed sum."""

    h2d_bytes: float
    d2h_bytes: float
    pcie_time_s: float
    exposed_pcie_time_s: float
    cpu_optimizer_step_time_s: float

    @property
    def exposed_time_s(self) -> float:
        """Time offload adds to a step: the exposed copies plus the CPU AdamW step. (The GPU AdamW step it
        replaces, Ψ_G·20·e_m bytes at HBM bandwidth, is about 40x shorter and not subtracted.)"""
        return self.exposed_pcie_time_s + self.cpu_optimizer_step_time_s


def offload_time(w: StackWorkload, gpu: GpuSpec, catalog: Catalog) -> OffloadTime:
    """``OffloadTime`` of ``w`` on ``gpu``: the host link of its host system (``host_system(gpu.name)``),
    the node's DRAM bandwidth shared by its GPUs (one process per GPU steps at once). All 0 without offload
    (no host system looked up: a GPU outside the catalog has none)."""
    if not offloads_states(w):
        return OffloadTime(h2d_bytes=0.0, d2h_bytes=0.0, pcie_time_s=0.0, exposed_pcie_time_s=0.0,
                           cpu_optimizer_step_time_s=0.0)
    host = host_system(gpu.name)
    link = catalog.link(host.host_link).bandwidth_bytes_per_s
    per_gpu_dram = host.host_memory_bandwidth_bytes_per_s / gpu.gpus_per_node
    return OffloadTime(h2d_bytes=h2d_bytes_per_step(w), d2h_bytes=d2h_bytes_per_step(w),
                       pcie_time_s=pcie_time_s(w, link), exposed_pcie_time_s=exposed_pcie_time_s(w, link),
                       cpu_optimizer_step_time_s=cpu_optimizer_step_time_s(w, per_gpu_dram))
