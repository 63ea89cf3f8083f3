"""The host launch term of a whole-model step (``ringplan.time.host_launches``, issue 20 item 1):
its structure — monotone in layers and in kernels, zero host cost gives back the device-only step — and
hand-counted kernels of one block."""

from __future__ import annotations

import pytest

from ringplan.models import load_model_catalog
from ringplan.stack import StackSettings, StackWorkload
from ringplan.time.attention_time import DEFAULT_CALL_OVERHEAD_S
from ringplan.time.host_launches import (ALLOCATOR_RETRY_FRACTION, DEFAULT_HOST_S_PER_KERNEL, KERNELS,
                                         allocator_retry_s, block_kernels, host_launch_s, step_kernels)
from ringplan.time.stack_time import step_time
from ringplan.workload import RingLayout

REL = 1e-9


def workload(layers: int = 2, *, model: str = "qwen3-0.6b", training: bool = True, ring: int = 1,
             **settings: object) -> StackWorkload:
    spec = load_model_catalog().model(model).with_layers(layers)
    return StackWorkload(model=spec, seq_len_tokens=8192 * ring, world_size=ring, training=training,
                         layout=RingLayout(ring_size=ring), settings=StackSettings(**settings))


def test_one_block_forward_is_counted_by_hand():
    """Llama (no q/k norms), P = 1, forward: 2 norms × 8 + 7 linears + 2 RoPE × 4 + SwiGLU 2 + 2 adds
    + one ring step 15 = 50 operator calls; full checkpointing recomputes all 50."""
    forward, _, again = block_kernels(workload(model="llama-3-8b", checkpointing="full"))
    assert forward == 2 * 8 + 7 + 2 * 4 + 2 + 2 + KERNELS["attention_step"][0] == 50
    assert again == forward
    assert block_kernels(workload(model="llama-3-8b"))[2] == 0


def test_kernels_grow_with_layers_ring_and_checkpointing():
    """More layers, a longer ring, q/k norms or more recomputation never launch fewer kernels."""
    for layers in range(1, 6):
        assert step_kernels(workload(layers + 1)) > step_kernels(workload(layers))
    assert step_kernels(workload(ring=2)) > step_kernels(workload(ring=1))
    assert step_kernels(workload(model="qwen3-0.6b")) > step_kernels(workload(model="llama-3-8b"))
    counts = [step_kernels(workload(checkpointing=c)) for c in ("none", "selective", "full")]
    assert counts == sorted(counts) and len(set(counts)) == 3
    assert step_kernels(workload(training=False)) < step_kernels(workload())


def test_host_time_is_monotone_in_kernels_and_cost():
    assert host_launch_s(0) == 0.0
    assert host_launch_s(1000) == pytest.approx(1000 * DEFAULT_HOST_S_PER_KERNEL, rel=REL)
    assert host_launch_s(2000, 5e-6) > host_launch_s(1000, 5e-6) > host_launch_s(1000, 1e-6)
    with pytest.raises(ValueError):
        host_launch_s(-1)
    with pytest.raises(ValueError):
        allocator_retry_s(1.0, -0.1)


def test_zero_host_cost_gives_the_device_only_step():
    """host_s_per_kernel = 0: the step is the old prediction (device parts + the call overhead twice);
    the default adds exactly step_kernels × DEFAULT_HOST_S_PER_KERNEL to the host part."""
    w = workload(4)
    old, new = step_time(w, "h100", host_s_per_kernel=0.0), step_time(w, "h100")
    assert old.host_overhead_s == pytest.approx(2 * DEFAULT_CALL_OVERHEAD_S, rel=REL)
    assert new.step_time_s - old.step_time_s == pytest.approx(host_launch_s(step_kernels(w)), rel=1e-6)
    assert new.step_time_s == pytest.approx(sum(new.parts_s.values()), rel=REL)


def test_step_time_is_monotone_in_layers_and_host_cost():
    """More layers or a dearer kernel launch never shorten the predicted step."""
    times = [step_time(workload(layers), "h100").step_time_s for layers in (1, 2, 4)]
    assert times == sorted(times)
    costs = [step_time(workload(2), "h100", host_s_per_kernel=c).step_time_s for c in (0.0, 5e-6, 20e-6)]
    assert costs == sorted(costs) and costs[0] < costs[-1]


def test_allocator_pressure_adds_its_fraction_of_the_device_time():
    w = workload(2)
    calm, pressed = step_time(w, "h100"), step_time(w, "h100", allocator_pressure=True)
    device = calm.step_time_s - calm.host_overhead_s
    assert pressed.step_time_s - calm.step_time_s == pytest.approx(ALLOCATOR_RETRY_FRACTION * device, rel=1e-6)
