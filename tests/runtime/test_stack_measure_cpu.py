"""Whole-model measurement on CPU: Σ stack_terms (θ = 1) equals the live-tensor tracker's peak of the
real runtime (FSDP2 + ring attention, gloo), and sweeps record out-of-memory points and keep going.

Every case runs ``measure_stack_rank`` on spawned gloo rings of 1 and 2 ranks (one ring per world
size for all cases). The tracker counts the sharded parameters, AdamW's states and the batch alive
before the step, FSDP2's resized all-gather storages and DTensor ops by their local tensors. The
analytic peak is the largest instant of ``stack_instants`` plus what only the CPU runtime holds
(``cpu_only_bytes``).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from ringplan.models import ModelSpec
from ringplan.stack import StackSettings, StackWorkload
from ringplan.profiles.stack import load_stack_profile
from ringplan.memory.model_states import unit_param_shapes
from ringplan.memory.stack_terms import stack_instants, stack_shape
from ringplan.workload import RingLayout
from ringplan_runtime import spawn
from ringplan_runtime.measure import MeasureSettings
from ringplan_runtime.stack_measure import StackTracker, local_tensor
from ringplan_runtime.stack_sweep import (
    run_stack_points,
    workload_from_json,
    workload_to_json,
    write_stack_results,
)

#: Issue 9: "the analytic Σφ (θ = 1) equals the tracker's peak within 1%".
TRACKER_REL_TOL = 0.01
FAST = MeasureSettings(warmup_steps=1, timed_steps=1, count_sent_bytes=False)
SPAWN_TIMEOUT_S = 300.0
TINY = {"name": "tiny", "n_layers": 2, "embed_dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "ffn_dim": 128, "ffn_type": "swiglu", "vocab_size": 256, "norm": "rmsnorm"}
TOKENS_PER_RANK = 256
#: name -> (model overrides, settings overrides, training)
CASES = {
    "none": ({}, {}, True),
    "selective": ({}, {"checkpointing": "selective"}, True),
    "full": ({}, {"checkpointing": "full"}, True),
    "full_offload": ({}, {"checkpointing": "full", "offload_checkpoints": True}, True),
    "full_3_layers": ({"n_layers": 3}, {"checkpointing": "full"}, True),
    "loss_full": ({}, {"loss": "full"}, True),
    "loss_chunks": ({}, {"loss_chunk_tokens": 64}, True),
    "loss_chunks_big_vocab": ({"vocab_size": 1024}, {"loss_chunk_tokens": 128}, True),
    "tied": ({"tied_embeddings": True}, {}, True),
    "tied_full": ({"tied_embeddings": True}, {"checkpointing": "full"}, True),
    "mha_qk_norm": ({"n_kv_heads": 4, "qk_norm": True}, {}, True),
    "fp32": ({}, {"param_dtype": "fp32"}, True),
    "no_sharding": ({}, {"sharding": "none"}, True),
    "forward": ({}, {}, False),
    "forward_tied_qk_norm": ({"tied_embeddings": True, "qk_norm": True}, {}, False),
}
WORLD_SIZES = (1, 2)


def case_workload(name: str, world_size: int) -> StackWorkload:
    model, settings, training = CASES[name]
    return StackWorkload(model=ModelSpec(**{**TINY, **model}), seq_len_tokens=TOKENS_PER_RANK * world_size,
                         world_size=world_size, layout=RingLayout(ring_size=world_size), training=training,
                         settings=StackSettings(**settings))


def cpu_only_bytes(w: StackWorkload, instant: str) -> float:
    """Bytes the CPU runtime holds at ``instant`` that a CUDA run does not (so not in the terms):
    AdamW's ``step`` counters (fp32 scalars, CPU tensors on GPU runs too); at P = 1 the attention
    backward's LSE copy (B·H·n·4; the CPU kernel returns it strided, ``kernels.block_backward``);
    gloo's copy of a reduce-scatter input (NCCL reduces in place)."""
    s, units = stack_shape(w), unit_param_shapes(w)
    extra = 0.0
    if w.training:
        extra += 4 * (s.L * len(units["block"]) + len(units["embed"]) + len(units["head"]) + len(units["root"]))
    if s.P == 1 and instant.endswith("_backward_attention"):
        extra += s.batch * s.H * s.n * 4
    if instant.endswith("_reduce_output") and s.G > 1:
        from ringplan.memory.stack_terms import padded_elements

        unit = "block" if instant.startswith("block") else instant.split("_")[0]
        extra += padded_elements(units[unit], s.G) * s.e_m
    return extra


def analytic_cpu_peak(w: StackWorkload) -> tuple[float, str]:
    """The largest instant with the CPU-only bytes added. Offload is a no-op on CPU (``save_on_cpu``
    keeps CPU tensors as they are), so an offloading run is predicted as the same run without it."""
    if w.settings.offload_checkpoints:
        from dataclasses import replace

        w = replace(w, settings=replace(w.settings, offload_checkpoints=False))
    totals = {name: sum(terms.values()) + cpu_only_bytes(w, name) for name, terms in stack_instants(w).items()}
    best = max(totals, key=totals.get)
    return totals[best], best


def _measure_cases(names: list[str], world_size: int) -> list[dict]:
    from ringplan_runtime.stack_measure import measure_stack_rank

    torch.set_num_threads(1)
    out = []
    for name in names:
        result = measure_stack_rank(case_workload(name, world_size), settings=FAST)
        out.append({"tracked": result.measurement.tracked_peak_bytes, "resident": result.resident_bytes,
                    "feasible": result.measurement.feasible})
    return out


@pytest.fixture(scope="module")
def tracked():
    """One spawned gloo ring per world size measures every case; the largest peak over ranks."""
    results = {}
    for world_size in WORLD_SIZES:
        names = list(CASES)
        per_rank = spawn(_measure_cases, world_size=world_size, backend="gloo", args=(names, world_size),
                         timeout_s=SPAWN_TIMEOUT_S)
        for i, name in enumerate(names):
            results[(world_size, name)] = max((rank[i] for rank in per_rank), key=lambda r: r["tracked"] or 0)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_stack_terms_match_live_tensor_tracker(tracked, world_size, case):
    """Σ stack_terms at the largest instant equals the tracked peak of the real stack within 1%."""
    result = tracked[(world_size, case)]
    assert result["feasible"], f"{case} at W=P={world_size} did not run"
    w = case_workload(case, world_size)
    predicted, instant = analytic_cpu_peak(w)
    error = (predicted - result["tracked"]) / result["tracked"]
    if abs(error) > TRACKER_REL_TOL and world_size > 1:
        # gloo runs the reduce-scatter on a worker thread: on a loaded CPU one extra copy can still be
        # alive at a peak (seen once: -1.8 % on a 2-core box under load). Measure once more, alone; a
        # formula that is wrong misses both times.
        per_rank = spawn(_measure_cases, world_size=world_size, backend="gloo", args=([case], world_size),
                         timeout_s=SPAWN_TIMEOUT_S)
        result = max((rank[0] for rank in per_rank), key=lambda r: r["tracked"] or 0)
        error = (predicted - result["tracked"]) / result["tracked"]
    assert abs(error) <= TRACKER_REL_TOL, (
        f"{case} at W=P={world_size}: analytic {predicted:,.0f} B ({instant}) vs tracked {result['tracked']:,} B "
        f"({error:+.2%})")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_resident_bytes_are_the_model_states(tracked, world_size):
    """Before the step a training rank holds its master shards, AdamW's m and v (and step counters)
    and the batch: Σ of those terms (the forward-only rank: the replicated weights and the batch)."""
    for case in ("none", "tied", "fp32", "forward"):
        w = case_workload(case, world_size)
        terms = stack_instants(w)["optimizer" if w.training else "mlp"]
        expected = sum(terms[k] for k in ("master_params_bytes", "optimizer_states_bytes", "param_copy_bytes",
                                          "batch_bytes"))
        expected += cpu_only_bytes(w, "resident")
        assert tracked[(world_size, case)]["resident"] == expected, case


# ----------------------------------------------------------------------------- the tracker's extensions


def test_watched_storage_follows_resize():
    """A storage freed and re-allocated by ``resize_`` (as FSDP2 does) is followed at op boundaries."""
    x = torch.zeros(256)
    tracker = StackTracker()
    tracker.watch(x)
    with tracker:
        x.untyped_storage().resize_(0)
        one = torch.ones(1)  # any op: an op boundary
        assert tracker.live_bytes == 4
        x.untyped_storage().resize_(256 * 4)
        two = torch.ones(1)
    assert tracker.peak_bytes == 256 * 4 + 4 + 4
    del one, two


def _dtensor_peak() -> tuple[int, int]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(torch.ones(64, 16), mesh, [Shard(0)])
    tracker = StackTracker()
    with tracker:
        y = torch._foreach_sqrt([x])
    return tracker.peak_bytes, local_tensor(y[0]).untyped_storage().nbytes()


@pytest.mark.slow
def test_dtensor_ops_count_their_local_tensors():
    """An op on a DTensor sharded over 2 ranks holds its local half, not the global size its wrapper
    reports."""
    peak, local = spawn(_dtensor_peak, world_size=2, backend="gloo", timeout_s=120)[0]
    assert local == 32 * 16 * 4 and peak == local


# ----------------------------------------------------------------------------- sweeps


def test_points_round_trip_through_json():
    """A point written as JSON reads back as the same workload (model by shape or catalog name)."""
    w = case_workload("tied_full", 2)
    assert workload_from_json(json.loads(json.dumps(workload_to_json(w)))) == w
    named = workload_from_json({"model": "qwen3-0.6b", "layers": 2, "seq_len_tokens": 4096, "world_size": 2,
                                "ring_size": 2})
    assert named.model.n_layers == 2 and named.model.name.startswith("qwen3-0.6b")


@pytest.mark.slow
def test_sweep_records_oom_and_goes_on(tmp_path):
    """A ring of 2 where rank 1 reports point 0 out of memory: the ring is torn down, point 0 is an
    ``oom`` row, point 1 is measured on a fresh ring; both rows land in the stack profile, which loads."""
    points = [case_workload("none", 2), case_workload("full", 2)]
    path = tmp_path / "stack.json"
    results = run_stack_points(points, settings=FAST, point_timeout_s=SPAWN_TIMEOUT_S, device="cpu",
                               fault={"rank": 1, "index": 0},
                               on_result=lambda r: write_stack_results(path, [r], record_as="h100", series="test"))
    assert [(r.feasible, r.failure) for r in results] == [(False, "oom"), (True, None)]
    rows = load_stack_profile(path).rows
    assert [row.oom for row in rows] == [True, False]
    assert rows[1].tracked_peak_bytes and rows[1].resident_bytes and rows[1].step_time_s
    assert rows[1].workload() == points[1]


def test_no_budget_skips_every_point():
    """With no time left no ring starts: every point reads ``skipped (budget)``."""
    results = run_stack_points([case_workload("none", 1)], settings=FAST, budget_s=0.0, device="cpu")
    assert [r.failure for r in results] == ["skipped (budget)"]


def _benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    if "stack_sweep_benchmark" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "stack_sweep.py"
        spec = importlib.util.spec_from_file_location("stack_sweep_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["stack_sweep_benchmark"]


def test_benchmark_boundary_points_straddle_the_gpu():
    """Capacity-boundary points: Σφ + the outside-allocator allowance just under (fill 0.97) and just
    over (fill 1.03) the GPU, whatever the time cap."""
    from ringplan.hardware import load_catalog

    bench = _benchmark()
    total = 75 * bench.GIB
    for entry in bench.BOUNDARY_GRID:
        points = bench.build_grid(total_bytes=total, world_size=2, gpu=load_catalog().gpu("h100"), point_cap_s=1.0,
                                  grid=(entry,))
        assert len(points) == 1
        need = sum(bench.stack_terms(points[0]).values()) + bench.OUTSIDE_ALLOCATOR_BYTES
        assert need <= entry.fill * total < need * 1.10  # a 1,024-token step is up to ~5 % here


def test_benchmark_grid_fits_the_gpu_and_the_time_cap():
    """The device grid (75 GiB H100): every point's budgeted memory within its fill of the GPU and its
    predicted time within the cap, both Llama-3-8B-shaped depths and the full Qwen3-0.6B present."""
    from ringplan.hardware import load_catalog

    bench = _benchmark()
    gpu = load_catalog().gpu("h100")
    grid = tuple(e for e in bench.DEFAULT_GRID if not e.boundary)
    points = bench.build_grid(total_bytes=75 * bench.GIB, world_size=2, gpu=gpu, point_cap_s=30.0, grid=grid)
    assert {p.model.n_layers for p in points} >= {4, 8, 16, 28}
    assert any(not p.training for p in points) and any(p.settings.loss == "full" for p in points)
    for p in points:
        assert bench.predicted_bytes(p) <= 0.85 * 75 * bench.GIB
        assert bench.predicted_point_s(p, gpu) <= 30.0


@pytest.mark.slow
def test_benchmark_cpu_smoke_writes_a_stack_profile(tmp_path):
    """``benchmarks/stack_sweep.py --cpu-smoke``: two tiny points on a gloo ring of 2, measured and
    written to a loadable stack profile with provenance."""
    assert _benchmark().main([str(tmp_path), "--cpu-smoke"]) == 0
    profile = load_stack_profile(tmp_path / "stack-h100.json")
    assert len(profile.rows) == 2 and not any(r.oom for r in profile.rows)
    assert profile.provenance.git_sha and "warm-up" in profile.provenance.method
