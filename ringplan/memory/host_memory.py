"""Host memory of a whole-model plan: pinned host RAM per GPU and per node (offloaded checkpoints,
offloaded parameters, gradients and AdamW states: ``stack_terms.host_terms``), the host system
behind each catalog GPU (host RAM per node, the GPU's host link, host DRAM bandwidth), and the check
that makes an offload plan over the node's host memory infeasible.

The table is data with a source beside every number (``HOST_SYSTEMS``). Figures marked "typical"
are ringplan defaults for GPUs sold in many systems, not a datasheet figure: pass the real value
(``host_memory_bytes_per_node``) where it matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ringplan.stack import StackWorkload

GB, GIB, TB = 10**9, 2**30, 10**12


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSystem:
    """The host of one catalog GPU: RAM per node, the GPU's host link (a catalog link name) and the
    node's peak DRAM bandwidth (channels × transfer rate × 8 bytes, both sockets)."""

    system: str
    host_memory_bytes_per_node: int
    host_link: str
    host_memory_bandwidth_bytes_per_s: float
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.host_memory_bytes_per_node <= 0 or self.host_memory_bandwidth_bytes_per_s <= 0:
            raise ValueError(f"host system {self.system!r}: memory and bandwidth must be positive, got "
                             f"{self.host_memory_bytes_per_node!r}, {self.host_memory_bandwidth_bytes_per_s!r}")


_XEON_8480C = "Intel Xeon Platinum 8480C: 8 channels DDR5-4800 = 307.2 GB/s per socket (Intel ARK), two sockets"
HOST_SYSTEMS: dict[str, HostSystem] = {
    "h100-80gb-sxm": HostSystem(system="DGX H100", host_memory_bytes_per_node=2 * TB, host_link="pcie-gen5-x16",
                                host_memory_bandwidth_bytes_per_s=614.4 * GB, sources={
        "host_memory_bytes_per_node": "NVIDIA DGX H100 datasheet: system memory 2 TB",
        "host_link": "NVIDIA H100 datasheet (SXM): PCIe Gen5 128 GB/s (bidirectional)",
        "host_memory_bandwidth_bytes_per_s": "DGX H100 datasheet: dual Xeon Platinum 8480C; " + _XEON_8480C}),
    "h200": HostSystem(system="DGX H200", host_memory_bytes_per_node=2 * TB, host_link="pcie-gen5-x16",
                       host_memory_bandwidth_bytes_per_s=614.4 * GB, sources={
        "host_memory_bytes_per_node": "NVIDIA DGX H200 datasheet: system memory 2 TB",
        "host_link": "NVIDIA H200 datasheet (SXM): PCIe Gen5 128 GB/s (bidirectional)",
        "host_memory_bandwidth_bytes_per_s": "DGX H200 datasheet: dual Xeon Platinum 8480C; " + _XEON_8480C}),
    "b200": HostSystem(system="DGX B200", host_memory_bytes_per_node=2 * TB, host_link="pcie-gen5-x16",
                       host_memory_bandwidth_bytes_per_s=716.8 * GB, sources={
        "host_memory_bytes_per_node": "NVIDIA DGX B200 datasheet: system memory 2 TB, configurable to 4 TB",
        "host_link": "DGX B200's host CPUs (Xeon Platinum 8570) are PCIe Gen5: the GPU-host path runs at Gen5 x16",
        "host_memory_bandwidth_bytes_per_s": "DGX B200 datasheet: dual Xeon Platinum 8570, 8 channels DDR5-5600 = "
                                             "358.4 GB/s per socket (Intel ARK), two sockets"}),
    "h100-80gb-pcie": HostSystem(system="8-GPU PCIe server", host_memory_bytes_per_node=1 * TB,
                                 host_link="pcie-gen5-x16", host_memory_bandwidth_bytes_per_s=614.4 * GB, sources={
        "host_memory_bytes_per_node": "typical 8-GPU PCIe server; ringplan default, not a datasheet figure",
        "host_link": "NVIDIA H100 datasheet (PCIe): PCIe Gen5 128 GB/s (bidirectional)",
        "host_memory_bandwidth_bytes_per_s": "typical: two 4th-gen Xeon sockets; " + _XEON_8480C}),
    "a100-80gb": HostSystem(system="DGX A100 640GB", host_memory_bytes_per_node=2 * TB, host_link="pcie-gen4-x16",
                            host_memory_bandwidth_bytes_per_s=409.6 * GB, sources={
        "host_memory_bytes_per_node": "NVIDIA DGX A100 datasheet: 640 GB system, 2 TB system memory",
        "host_link": "NVIDIA A100 datasheet: PCIe Gen4 64 GB/s (bidirectional)",
        "host_memory_bandwidth_bytes_per_s": "DGX A100 datasheet: dual AMD EPYC 7742, 8 channels DDR4-3200 = "
                                             "204.8 GB/s per socket (AMD specifications), two sockets"}),
    "a100-40gb": HostSystem(system="DGX A100 320GB", host_memory_bytes_per_node=1 * TB, host_link="pcie-gen4-x16",
                            host_memory_bandwidth_bytes_per_s=409.6 * GB, sources={
        "host_memory_bytes_per_node": "NVIDIA DGX A100 datasheet: 320 GB system, 1 TB system memory",
        "host_link": "NVIDIA A100 datasheet: PCIe Gen4 64 GB/s (bidirectional)",
        "host_memory_bandwidth_bytes_per_s": "DGX A100 datasheet: dual AMD EPYC 7742, 8 channels DDR4-3200 = "
                                             "204.8 GB/s per socket, two sockets"}),
    "mi300x": HostSystem(system="Azure ND MI300X v5", host_memory_bytes_per_node=1850 * GIB,
                         host_link="pcie-gen5-x16", host_memory_bandwidth_bytes_per_s=614.4 * GB, sources={
        "host_memory_bytes_per_node": "Microsoft Azure ND MI300X v5 size table: 1,850 GiB memory per VM (8 GPUs)",
        "host_link": "AMD Instinct MI300X data sheet: PCIe Gen5 x16",
        "host_memory_bandwidth_bytes_per_s": "Azure ND MI300X v5: 4th-gen Xeon hosts; " + _XEON_8480C}),
}
for _name, _memory, _link, _bandwidth, _system in (
        ("v100-16gb", 512 * GB, "pcie-gen3-x16", 136.5 * GB, "DGX-1: 512 GB DDR4-2133; dual Xeon E5-2698 v4, 4 channels "
                                                             "x 17.06 GB/s per socket"),
        ("v100-32gb", 512 * GB, "pcie-gen3-x16", 136.5 * GB, "DGX-1: 512 GB DDR4-2133; dual Xeon E5-2698 v4, 4 channels "
                                                             "x 17.06 GB/s per socket"),
        ("a10-24gb", 768 * GIB, "pcie-gen4-x16", 409.6 * GB, "AWS g5.48xlarge: 768 GiB; AMD EPYC 7R32, 2 x 8 channels "
                                                             "DDR4-3200 (typical cloud node, not a datasheet figure)"),
        ("l4", 384 * GB, "pcie-gen4-x16", 281.6 * GB, "Google Cloud g2-standard-96: 384 GB; Cascade Lake, 2 x 6 channels "
                                                      "DDR4-2933 (typical cloud node, not a datasheet figure)"),
        ("l40s", 1536 * GIB, "pcie-gen4-x16", 409.6 * GB, "AWS g6e.48xlarge: 1,536 GiB; AMD EPYC 7R13, 2 x 8 channels "
                                                          "DDR4-3200 (typical cloud node, not a datasheet figure)"),
        ("rtx-4090", 128 * GIB, "pcie-gen4-x16", 153.6 * GB, "typical workstation: 128 GiB, 4 channels DDR5-4800; "
                                                             "ringplan default, not a datasheet figure"),
        ("gtx-1080", 32 * GIB, "pcie-gen3-x16", 38.4 * GB, "typical desktop: 32 GiB, 2 channels DDR4-2400; ringplan "
                                                           "default, not a datasheet figure")):
    HOST_SYSTEMS[_name] = HostSystem(system=_system.split(":")[0], host_memory_bytes_per_node=int(_memory),
                                     host_link=_link, host_memory_bandwidth_bytes_per_s=_bandwidth,
                                     sources={"host_memory_bytes_per_node": _system, "host_link": "the GPU's catalog "
                                              "intra_node_link (a PCIe card) or its datasheet host interface",
                                              "host_memory_bandwidth_bytes_per_s": _system})


def host_system(gpu_name: str) -> HostSystem:
    """The host system of a catalog GPU; ``ValueError`` naming the known GPUs for another name."""
    if gpu_name not in HOST_SYSTEMS:
        raise ValueError(f"no host system is recorded for GPU {gpu_name!r}; known: {sorted(HOST_SYSTEMS)} "
                         f"(pass the host memory per node explicitly)")
    return HOST_SYSTEMS[gpu_name]


def default_host_memory_bytes_per_node(gpu_name: str) -> int | None:
    """The host RAM per node of the GPU's host system (``HOST_SYSTEMS``), None for a GPU without one."""
    host = HOST_SYSTEMS.get(gpu_name)
    return None if host is None else host.host_memory_bytes_per_node


#: The host terms that live in page-locked (pinned) memory: ``save_on_cpu``'s checkpoints and FSDP2
#: ``CPUOffloadPolicy(pin_memory=True)``'s master parameters and the gradients copied to them. AdamW's m and
#: v (``zeros_like`` of the parameters) and its step temporaries are pageable. Measured on one H200
#: (``benchmarks/pinned_host_check.sh``, 2026-12-06): the pinned parameter and gradient storages and the
#: (unpinned) m + v equal these terms exactly, the checkpoints the runtime's host tracker.
PINNED_HOST_TERMS: tuple[str, ...] = ("offloaded_checkpoints_bytes", "offloaded_params_bytes",
                                      "offloaded_gradients_bytes")


def host_memory_bytes_per_gpu(w: StackWorkload) -> float:
    """Host memory (pinned and pageable) one GPU's process needs at the host's peak for what the plan
    offloads: Σ ``stack_terms.host_terms`` (offloaded checkpoints L·T·E·e; offloaded master, gradients,
    m, v and the CPU step's sqrt(v)). The two peaks are taken together (conservative: the checkpoints
    are freed in backward, before the step). 0 for a plan that offloads nothing. Ignores the process's
    own host memory (CUDA context, libraries, Python: ~3 GiB measured on H200)."""
    from ringplan.memory.stack_terms import host_terms

    return float(sum(host_terms(w).values()))


def pinned_host_bytes_per_gpu(w: StackWorkload) -> float:
    """The page-locked part of ``host_memory_bytes_per_gpu``: the ``PINNED_HOST_TERMS``."""
    from ringplan.memory.stack_terms import host_terms

    terms = host_terms(w)
    return float(sum(terms.get(name, 0.0) for name in PINNED_HOST_TERMS))


def gpus_on_a_node(w: StackWorkload, gpus_per_node: int) -> int:
    """GPUs of the job on one (full) node: min(W, GPUs per node)."""
    return min(w.world_size, gpus_per_node)


def host_memory_bytes_per_node(w: StackWorkload, gpus_per_node: int) -> float:
    """Host memory a node needs: ``host_memory_bytes_per_gpu`` × the job's GPUs on that node."""
    return host_memory_bytes_per_gpu(w) * gpus_on_a_node(w, gpus_per_node)


def check_host_memory(w: StackWorkload, *, gpus_per_node: int, host_memory_bytes_per_node_available: float) -> None:
    """``ValueError`` when the plan's pinned host memory per node exceeds the node's host memory."""
    need = host_memory_bytes_per_node(w, gpus_per_node)
    if need > host_memory_bytes_per_node_available:
        per_gpu, gpus = host_memory_bytes_per_gpu(w), gpus_on_a_node(w, gpus_per_node)
        raise ValueError(f"the plan needs {need / GIB:,.1f} GiB of pinned host memory per node ({per_gpu / GIB:,.1f} "
                         f"GiB per GPU x {gpus} GPUs) but the node has {host_memory_bytes_per_node_available / GIB:,.1f}"
                         f" GiB (--host-memory)")


def host_memory_fits(w: StackWorkload, *, gpus_per_node: int, host_memory_bytes_per_node_available: float) -> bool:
    """Whether the plan's host memory per node fits the node's (``check_host_memory`` without raising)."""
    return host_memory_bytes_per_node(w, gpus_per_node) <= host_memory_bytes_per_node_available
