"""Parameter / optimizer-state offload terms, host memory per GPU and node, the host-memory check, and
the offload step time: hand-computed examples, reductions (offload off changes nothing) and bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ringplan.hardware import load_catalog
from ringplan.memory.host_memory import (HOST_SYSTEMS, check_host_memory, host_memory_bytes_per_gpu,
                                         host_memory_bytes_per_node, host_memory_fits, host_system)
from ringplan.memory.model_states import rank_param_elements
from ringplan.memory.offload_terms import (OFFLOADED_TERMS, d2h_bytes_per_step, device_instant, h2d_bytes_per_step,
                                           offload_host_terms)
from ringplan.memory.stack_model import lower_bound_terms
from ringplan.memory.stack_terms import host_terms, stack_instants, stack_terms, training_instants
from ringplan.models import load_model_catalog
from ringplan.stack import StackSettings, StackWorkload
from ringplan.time.offload_time import offload_time
from ringplan.workload import RingLayout

LLAMA = load_model_catalog().model("llama-3-8b")


def workload(*, world=8, seq=131072, **settings) -> StackWorkload:
    return StackWorkload(model=LLAMA, seq_len_tokens=seq, world_size=world, layout=RingLayout(ring_size=world),
                         settings=StackSettings(**settings))


def test_offload_params_implies_optimizer_and_bad_combinations_raise():
    """offload_params sets offload_optimizer (FSDP2 moves both); optimizer alone, ZeRO-1/2, a forward pass
    and a non-bool are refused with a message naming the problem."""
    assert StackSettings(offload_params=True).offload_optimizer is True
    assert StackSettings(offload_params=True) == StackSettings(offload_params=True, offload_optimizer=True)
    with pytest.raises(ValueError, match="optimizer states alone"):
        StackSettings(offload_optimizer=True)
    with pytest.raises(ValueError, match="zero1"):
        StackSettings(offload_params=True, sharding="zero1")
    with pytest.raises(ValueError, match="true or false"):
        StackSettings(offload_params="yes")
    with pytest.raises(ValueError, match="needs training"):
        replace(workload(offload_params=True), training=False)
    StackSettings(offload_params=True, sharding="none")  # FSDP2 over one rank: runs


def test_offload_off_changes_nothing():
    """Reduction: without offload every instant and host term is what it was (the offload host terms are 0)."""
    w = workload(checkpointing="full")
    assert all(v == 0.0 for v in offload_host_terms(w).values())
    assert h2d_bytes_per_step(w) == d2h_bytes_per_step(w) == 0.0
    for name, terms in training_instants(w).items():
        assert device_instant(w, name, terms) == terms


def test_offloaded_states_hand_computed():
    """Llama-3-8B over 8 GPUs: Ψ_G = Ψ/8 (rows padded to 8), host = master 4Ψ_G + m, v 8Ψ_G + grads 4Ψ_G +
    sqrt(v) 4Ψ_G = 20·Ψ_G bytes; the GPU keeps none of them at the optimizer step; H2D 8·Ψ_G, D2H 4·Ψ_G;
    the GPU peak (the loss backward, before any gradient) drops by at least master + m + v = 12·Ψ_G."""
    w = workload(offload_params=True)
    psi_g = rank_param_elements(w)
    assert psi_g == pytest.approx(8.03e9 / 8, rel=0.01)
    assert sum(host_terms(w).values()) == 20 * psi_g == host_memory_bytes_per_gpu(w)
    assert all(stack_instants(w)["optimizer"][key] == 0.0 for key in OFFLOADED_TERMS)
    assert h2d_bytes_per_step(w) == 8 * psi_g and d2h_bytes_per_step(w) == 4 * psi_g
    plain = workload()
    assert sum(stack_terms(w).values()) <= sum(stack_terms(plain).values()) - 12 * psi_g  # peak: the loss, no grads


def test_reduce_output_shard_stays_on_gpu_until_copied():
    """At a unit's reduce-scatter output the GPU holds that unit's gradient shard (before the D2H copy),
    never more than the gradients the plain run holds there."""
    w = workload(offload_params=True)
    device, before = stack_instants(w), training_instants(w)
    name = next(n for n in device if n.startswith("block") and n.endswith("_reduce_output"))
    assert 0.0 < device[name]["gradients_bytes"] <= before[name]["gradients_bytes"]


def test_lower_bound_never_exceeds_the_offloaded_peak():
    """The capacity search's lower bound (the loss instant) goes through the offload split too."""
    w = workload(offload_params=True)
    assert sum(lower_bound_terms(w).values()) <= sum(stack_terms(w).values())


def test_host_memory_per_node_and_check():
    """Per node = per GPU × GPUs of the job on the node; over the node's host memory is an error naming both."""
    w = workload(world=16, checkpointing="full", offload_checkpoints=True, offload_params=True)
    per_gpu = host_memory_bytes_per_gpu(w)
    assert host_memory_bytes_per_node(w, 8) == 8 * per_gpu
    assert host_memory_bytes_per_node(workload(world=2, offload_params=True), 8) == 2 * host_memory_bytes_per_gpu(
        workload(world=2, offload_params=True))
    assert host_memory_fits(w, gpus_per_node=8, host_memory_bytes_per_node_available=2 * 10**12)
    with pytest.raises(ValueError, match="pinned host memory per node"):
        check_host_memory(w, gpus_per_node=8, host_memory_bytes_per_node_available=per_gpu * 8 - 1)
    assert host_memory_bytes_per_gpu(workload()) == 0.0


def test_every_catalog_gpu_has_a_host_system_with_sources():
    """Every catalog GPU names a host system whose link is a catalog link; every number has a source."""
    catalog = load_catalog()
    for gpu in catalog.gpus:
        host = host_system(gpu.name)
        assert catalog.link(host.host_link).name.startswith("pcie")
        assert set(host.sources) == {"host_memory_bytes_per_node", "host_link", "host_memory_bandwidth_bytes_per_s"}
    assert HOST_SYSTEMS["h100-80gb-sxm"].host_memory_bytes_per_node == 2 * 10**12  # DGX H100 datasheet
    with pytest.raises(ValueError, match="no host system"):
        host_system("tpu-v5")


def test_offload_time_hand_computed():
    """H100 (DGX H100): PCIe Gen5 63 GB/s; 12·Ψ_G bytes over the link; CPU AdamW 80·Ψ_G bytes at 614.4/8 GB/s."""
    catalog = load_catalog()
    w = workload(offload_params=True)
    psi_g = rank_param_elements(w)
    t = offload_time(w, catalog.gpu("h100"), catalog)
    assert t.pcie_time_s == pytest.approx(12 * psi_g / 63e9)
    assert t.cpu_optimizer_step_time_s == pytest.approx(80 * psi_g / (614.4e9 / 8))
    assert 0 < t.exposed_pcie_time_s < t.pcie_time_s
    assert t.exposed_time_s == t.exposed_pcie_time_s + t.cpu_optimizer_step_time_s
    assert offload_time(workload(), catalog.gpu("h100"), catalog).exposed_time_s == 0.0


def test_host_links_agree_with_the_step_time_model():
    """One host link per GPU: ``HOST_SYSTEMS`` names the same PCIe link as the checkpoint-offload time model."""
    from ringplan.time.stack_time import HOST_LINK

    assert {name: host.host_link for name, host in HOST_SYSTEMS.items()} == HOST_LINK


def test_step_time_swaps_the_gpu_optimizer_for_the_cpu_step():
    """With offload the step's optimizer part is the CPU AdamW step and the exposed PCIe copies join the
    offload part; every other part is unchanged."""
    from ringplan.time.stack_time import step_time

    catalog = load_catalog()
    plain, offloaded = workload(world=8, checkpointing="full"), workload(world=8, checkpointing="full",
                                                                         offload_params=True)
    a, b = step_time(plain, "h100").parts_s, step_time(offloaded, "h100").parts_s
    extra = offload_time(offloaded, catalog.gpu("h100"), catalog)
    assert b["optimizer_s"] == pytest.approx(extra.cpu_optimizer_step_time_s)
    assert b["offload_s"] == pytest.approx(a["offload_s"] + extra.exposed_pcie_time_s)
    assert all(a[k] == b[k] for k in a if k not in ("optimizer_s", "offload_s"))
