"""Parameter + optimizer-state offload (FSDP2 ``CPUOffloadPolicy``) on CPU, gloo, W = 1, 2.

1. Exactness: loss, every gradient, the AdamW update and the next loss equal the dense float64 model's
   (``test_stack_cpu``'s reference and tolerances), with the policy really applied to every FSDP2 unit.
2. Memory: on CPU the "device" and the "host" are the same memory and FSDP2's copies are no-ops, so the
   live-tensor tracker cannot tell them apart: the check is that the GPU terms plus the host bytes of the
   offloaded states, instant by instant (``offload_terms.device_instants`` + ``host_instant_bytes``),
   equal the tracker's peak within 1%. Telling device from host apart needs a GPU run (not done here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from ringplan.memory.offload_terms import host_instant_bytes, offloads_states
from ringplan.memory.stack_terms import training_instants, stack_instants
from ringplan_runtime import spawn
from runtime.test_stack_cpu import Config, _train, check_training
from runtime.test_stack_measure_cpu import FAST, TRACKER_REL_TOL, case_workload, cpu_only_bytes

SPAWN_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadConfig:
    """A ``test_stack_cpu.Config`` run with ``offload_params`` on."""

    base: Config

    @property
    def name(self) -> str:
        return self.base.name + "_offload_params"

    @property
    def world(self) -> int:
        return self.base.world

    def workload(self, *, training: bool = True):
        w = self.base.workload(training=training)
        return dataclasses.replace(w, settings=dataclasses.replace(w.settings, offload_params=True))


CONFIGS = [
    OffloadConfig(base=Config(name="w1", world=1, ring=1, loss="chunked")),
    OffloadConfig(base=Config(name="w1_none_tied", world=1, ring=1, sharding="none", tied=True)),
    OffloadConfig(base=Config(name="w2_zigzag_full_ckpt_offload", world=2, ring=2, layout="zigzag",
                              checkpointing="full", offload=True, loss="chunked")),
    OffloadConfig(base=Config(name="w2_contiguous_qknorm_tied", world=2, ring=2, qk_norm=True, tied=True)),
]


def _policies_applied(run) -> bool:
    """Every FSDP2 parameter of the run has ``offload_to_cpu`` set (the policy reached every unit)."""
    params = [p for module in run.model.modules() if hasattr(module, "_get_fsdp_state")
              for group in [module._get_fsdp_state()._fsdp_param_group] if group is not None
              for p in group.fsdp_params]
    return bool(params) and all(p.offload_to_cpu for p in params)


def _run_world(world: int) -> dict:
    from ringplan_runtime.stack_parallel import build_stack

    torch.set_num_threads(1)
    results = {}
    for config in (c for c in CONFIGS if c.world == world):
        results[config.name] = _train(config)
        results[config.name]["offloaded"] = _policies_applied(build_stack(config.workload(), device="cpu"))
    return results


@pytest.fixture(scope="module", params=(1, 2), ids=lambda w: f"W{w}")
def world_results(request):
    return request.param, spawn(_run_world, world_size=request.param, backend="gloo", args=(request.param,),
                                timeout_s=SPAWN_TIMEOUT_S)


@pytest.mark.slow
def test_offloaded_training_matches_dense_reference(world_results):
    """With parameters, gradients and AdamW states offloaded (AdamW stepping on the host tensors), the loss,
    every gradient, the update and the next loss equal the dense float64 model's; every unit is offloaded."""
    world, per_rank = world_results
    for config in (c for c in CONFIGS if c.world == world):
        assert per_rank[0][config.name]["offloaded"], f"{config.name}: CPUOffloadPolicy not applied"
        check_training(config, per_rank, init=False, ranks=False)


# ----------------------------------------------------------------------------- tracker


#: (settings overrides, model overrides) of the measured offload cases (``test_stack_measure_cpu``'s tiny model).
TRACKER_CASES = {
    "offload": ({"offload_params": True}, {}),
    "offload_full_ckpt": ({"offload_params": True, "checkpointing": "full"}, {}),
    "offload_tied_fp32": ({"offload_params": True, "param_dtype": "fp32"}, {"tied_embeddings": True}),
    "offload_no_sharding": ({"offload_params": True, "sharding": "none"}, {}),
}


def offload_workload(name: str, world_size: int):
    settings, model = TRACKER_CASES[name]
    w = case_workload("none", world_size)
    return dataclasses.replace(w, model=dataclasses.replace(w.model, **model),
                               settings=dataclasses.replace(w.settings, **settings))


def analytic_sum_peak(w) -> tuple[float, str]:
    """The largest instant of GPU terms + host bytes of the offloaded states + CPU-only bytes."""
    device, before = stack_instants(w), training_instants(w)
    totals = {name: sum(device[name].values()) + host_instant_bytes(w, name, before[name]) + cpu_only_bytes(w, name)
              for name in device}
    best = max(totals, key=totals.get)
    return totals[best], best


def _measure(world_size: int) -> list[int]:
    from ringplan_runtime.stack_measure import measure_stack_rank

    torch.set_num_threads(1)
    return [measure_stack_rank(offload_workload(name, world_size), settings=FAST).measurement.tracked_peak_bytes
            for name in TRACKER_CASES]


@pytest.fixture(scope="module")
def tracked():
    out = {}
    for world_size in (1, 2):
        per_rank = spawn(_measure, world_size=world_size, backend="gloo", args=(world_size,),
                         timeout_s=SPAWN_TIMEOUT_S)
        for i, name in enumerate(TRACKER_CASES):
            out[(world_size, name)] = max(rank[i] for rank in per_rank)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", (1, 2))
@pytest.mark.parametrize("case", list(TRACKER_CASES))
def test_device_plus_host_terms_match_tracker(tracked, world_size, case):
    """Σ (GPU terms + host bytes of the offloaded states) at the largest instant equals the tracked peak
    within 1% (on CPU both are one memory; see the module docstring)."""
    w = offload_workload(case, world_size)
    assert offloads_states(w)
    predicted, instant = analytic_sum_peak(w)
    error = (predicted - tracked[(world_size, case)]) / tracked[(world_size, case)]
    print(f"{case} W={world_size}: terms {predicted:,.0f} B ({instant}) vs tracked "
          f"{tracked[(world_size, case)]:,} B ({error:+.3%})")
    assert abs(error) <= TRACKER_REL_TOL, f"{case} W={world_size}: {error:+.2%} at {instant}"


def test_offload_moves_states_off_the_gpu():
    """Hand-checked reduction: with offload the GPU terms lose exactly the master, m, v, reduced gradients
    and sqrt(v) at the optimizer step, and the host gains them; the sum at every instant is unchanged."""
    w = offload_workload("offload", 2)
    plain = dataclasses.replace(w, settings=dataclasses.replace(w.settings, offload_params=False,
                                                                offload_optimizer=False))
    device, before, base = stack_instants(w), training_instants(w), stack_instants(plain)
    for name in device:
        assert sum(device[name].values()) + host_instant_bytes(w, name, before[name]) == pytest.approx(
            sum(base[name].values())), name
    opt = device["optimizer"]
    assert opt["master_params_bytes"] == opt["optimizer_states_bytes"] == opt["gradients_bytes"] == 0.0
    assert opt["optimizer_step_bytes"] == 0.0
