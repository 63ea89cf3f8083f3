"""Parameter and optimizer-state offload (``StackSettings.offload_params``): what moves from the GPU
to pinned host memory, what the host link carries per step and how long the CPU AdamW step takes;
and the host memory of every plan (offloaded states and offloaded checkpoints) per GPU and per node.

The runtime runs FSDP2 ``fully_shard(..., offload_policy=CPUOffloadPolicy())`` (torch
``distributed/fsdp/_fully_shard``): the sharded fp32 master parameters live in pinned host memory;
before each all-gather ``FSDPParam.all_gather_inputs`` copies a unit's shard to the GPU
(``.to(device, non_blocking=True)``) and casts it to the compute dtype; after each reduce-scatter
``foreach_reduce`` copies the unit's reduced gradient shard to the host (``.to("cpu")``) and the GPU
output is freed; AdamW's m and v are ``zeros_like`` of the (host) parameters, so the whole step runs
on the CPU. FSDP2 offloads the three together: there is no optimizer-only offload to run, so
``offload_params`` implies ``offload_optimizer`` (``ringplan.stack.check_offload``).

Notation as ``ringplan.memory.stack_terms``: Ψ_G parameters one rank holds, e_m bytes of the master
dtype. Not modelled: the H2D staging copy of one parameter shard (fp32, freed by the cast, during a
unit's all-gather copy-in, which the stack terms do not model either) and FSDP2's per-parameter
bookkeeping; pinned host memory is counted at its tensor size (the CUDA host allocator rounds each
block up to a power of two: ignored).
"""

from __future__ import annotations

from ringplan.memory.model_states import (gradients_bytes, master_params_bytes, optimizer_states_bytes,
                                          optimizer_step_bytes, rank_param_elements, shard_elements, stack_shape,
                                          unit_shapes)
from ringplan.stack import StackWorkload

#: Device terms that move to the host with ``offload_params`` (``ringplan.memory.stack_terms`` keys).
OFFLOADED_TERMS: tuple[str, ...] = ("master_params_bytes", "optimizer_states_bytes", "gradients_bytes",
                                    "optimizer_step_bytes")
#: Host terms of an offloaded plan at the host's peak (the AdamW step on the CPU).
OFFLOAD_HOST_TERM_NAMES: tuple[str, ...] = ("offloaded_params_bytes", "offloaded_optimizer_states_bytes",
                                            "offloaded_gradients_bytes", "offloaded_optimizer_step_bytes")
#: Host-memory traffic of one element in torch's foreach AdamW (``_multi_tensor_adamw``, weight decay, not
#: capturable), in units of e_m: decay p (r+w), lerp m (r g, r+w m), v·β2 (r+w), addcmul v (r g, r+w v),
#: sqrt(v) (r v, w t), t / bias (r+w), t + eps (r+w), addcdiv p (r p, m, t, w p) = 2+3+2+3+2+2+2+4 = 20.
ADAMW_TRAFFIC_ELEMENTS = 20


def offloads_states(w: StackWorkload) -> bool:
    """Whether the master parameters, gradients and AdamW states live on the host."""
    return w.training and w.settings.offload_params


# ----------------------------------------------------------------------------- device and host bytes


def _unit_of(instant: str) -> str | None:
    """The unit whose reduce-scatter output is alive at ``instant`` (``block3_reduce_output`` → block)."""
    if not instant.endswith("_reduce_output"):
        return None
    return "block" if instant.startswith("block") else instant.split("_")[0]


def reduce_output_device_bytes(w: StackWorkload, instant: str) -> float:
    """The reduced gradient shard still on the GPU at ``instant``: one unit's Σ⌈rows/G⌉·cols·e_m
    at its ``*_reduce_output`` instant (before ``foreach_reduce`` copies it to the host and frees it),
    else 0. Source: torch ``_fsdp_collectives.foreach_reduce`` (``new_sharded_grad.to("cpu")``)."""
    unit = _unit_of(instant)
    if unit is None or not offloads_states(w):
        return 0.0
    s = stack_shape(w)
    return float(shard_elements(unit_shapes(w)[unit], s.G) * s.e_m)


def device_instant(w: StackWorkload, instant: str, terms: dict[str, float]) -> dict[str, float]:
    """``terms`` of one instant as the GPU holds them under offload: ``OFFLOADED_TERMS`` removed (on
    the host), except a reduce-scatter output shard still on the GPU (``reduce_output_device_bytes``).
    Unchanged without offload."""
    if not offloads_states(w):
        return terms
    out = dict(terms)
    for key in OFFLOADED_TERMS:
        if key in out:
            out[key] = 0.0
    if "gradients_bytes" in out:
        out["gradients_bytes"] = min(float(terms["gradients_bytes"]), reduce_output_device_bytes(w, instant))
    return out


def device_instants(w: StackWorkload, instants: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``device_instant`` of every instant (the same dict without offload)."""
    if not offloads_states(w):
        return instants
    return {name: device_instant(w, name, terms) for name, terms in instants.items()}


def host_instant_bytes(w: StackWorkload, instant: str, terms: dict[str, float]) -> float:
    """Host bytes of the offloaded states at one instant: what ``device_instant`` removed from the
    GPU terms (master, m, v, the reduced gradients so far, AdamW's sqrt(v) during the CPU step).
    0 without offload."""
    if not offloads_states(w):
        return 0.0
    moved = device_instant(w, instant, terms)
    return float(sum(terms.get(key, 0.0) - moved.get(key, 0.0) for key in OFFLOADED_TERMS))


def offload_host_terms(w: StackWorkload) -> dict[str, float]:
    """Host bytes of the offloaded states at the host's peak, the CPU AdamW step, keyed by
    ``OFFLOAD_HOST_TERM_NAMES``: master Ψ_G·e_m, m and v 2·Ψ_G·e_m, reduced gradients Ψ_G·e_m and
    sqrt(v) Ψ_G·e_m (``ringplan.memory.model_states``; the same tensors the GPU holds without offload).
    All 0 without offload."""
    on = offloads_states(w)
    return {"offloaded_params_bytes": master_params_bytes(w) if on else 0.0,
            "offloaded_optimizer_states_bytes": optimizer_states_bytes(w) if on else 0.0,
            "offloaded_gradients_bytes": gradients_bytes(w) if on else 0.0,
            "offloaded_optimizer_step_bytes": optimizer_step_bytes(w) if on else 0.0}


# ----------------------------------------------------------------------------- host link and CPU step


def h2d_bytes_per_step(w: StackWorkload) -> float:
    """Bytes copied host → GPU per step: every unit's master shard before its forward all-gather and
    again before its backward all-gather (``reshard_after_forward=True``), 2·Ψ_G·e_m. Ignores that the
    root unit (the final norm, E elements) is gathered once. 0 without offload."""
    if not offloads_states(w):
        return 0.0
    return float(2 * rank_param_elements(w) * stack_shape(w).e_m)


def d2h_bytes_per_step(w: StackWorkload) -> float:
    """Bytes copied GPU → host per step: every reduced gradient shard once, Ψ_G·e_m (reduce dtype =
    master dtype). 0 without offload."""
    if not offloads_states(w):
        return 0.0
    return float(rank_param_elements(w) * stack_shape(w).e_m)


def pcie_time_s(w: StackWorkload, host_link_bytes_per_s: float) -> float:
    """Host-link busy time per step: (H2D + D2H) / bandwidth, counting the two directions as if they
    shared the link (conservative: PCIe is full duplex). Source of the bandwidth: the catalog's PCIe
    link of the GPU's host system (``host_link_name``)."""
    if host_link_bytes_per_s <= 0:
        raise ValueError(f"host link bandwidth must be positive, got {host_link_bytes_per_s!r}")
    return (h2d_bytes_per_step(w) + d2h_bytes_per_step(w)) / host_link_bytes_per_s


def exposed_pcie_time_s(w: StackWorkload, host_link_bytes_per_s: float) -> float:
    """The part of ``pcie_time_s`` no compute hides: the first unit's H2D copy of the step (the
    embedding, before anything runs) and the last D2H copy (the embedding's gradient, after the
    backward ends, before the CPU step). The rest runs on FSDP2's copy streams under the prefetched
    units' compute (assumed hidden: a unit's copy is far shorter than its compute at long context)."""
    if not offloads_states(w):
        return 0.0
    s = stack_shape(w)
    embed = shard_elements(unit_shapes(w)["embed"], s.G) * s.e_m
    return 2 * embed / host_link_bytes_per_s


def cpu_optimizer_step_time_s(w: StackWorkload, host_memory_bytes_per_s_per_gpu: float) -> float:
    """Time of AdamW on the CPU: Ψ_G elements × ``ADAMW_TRAFFIC_ELEMENTS``·e_m bytes of host memory
    traffic / the host memory bandwidth one GPU's process gets (memory-bound: ~1 FLOP per byte).
    The bandwidth is the node's DRAM peak / GPUs per node (``HOST_SYSTEMS``), so this is a lower
    bound: STREAM typically reaches 70-80 % of the DRAM peak, and on the 2-core CPU sandbox (loaded,
    torch 2.13, one thread, 2·10^7 elements) foreach AdamW ran at 1.2 GB/s of this traffic against 2.2 GB/s
    for a plain copy (55 %). 0 without offload."""
    if not offloads_states(w):
        return 0.0
    if host_memory_bytes_per_s_per_gpu <= 0:
        raise ValueError(f"host memory bandwidth must be positive, got {host_memory_bytes_per_s_per_gpu!r}")
    traffic = rank_param_elements(w) * ADAMW_TRAFFIC_ELEMENTS * stack_shape(w).e_m
    return traffic / host_memory_bytes_per_s_per_gpu
