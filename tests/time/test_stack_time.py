"""Whole-stack step time (``ringplan.time.stack_time``): FLOP counts, the overlap schedule, the GEMM
profile format and model, and invariants of ``step_time``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringplan.profiles.gemm import GEMM_FORMAT, gemm_profiles_in, load_gemm_profile, write_gemm_profile
from ringplan.time.gemms import GemmModel, GemmShape, block_gemms, gemm_flops, gemm_model_for, lm_head_gemm
from ringplan.hardware import load_catalog
from ringplan.models import ModelSpec, layer_parameter_count, load_model_catalog, parameter_count
from ringplan.stack import StackSettings, StackWorkload
from ringplan.time.fsdp_schedule import StreamUnit, collective_s, overlapped_end_s
from ringplan.time.stack_time import STEP_PARTS, step_time
from ringplan.workload import RingLayout

REPO = Path(__file__).resolve().parents[2]
REL = 1e-9  # float round-off of sums of the same terms
H100_DRIVER = "NVIDIA H100 80GB HBM3"
PROVENANCE = {"gpu_driver_name": H100_DRIVER, "driver_version": "x", "torch_version": "x", "nccl_version": None,
              "cuda_version": None, "git_sha": "test", "date": "2026-11-26T00:00:00+00:00", "command": "test",
              "method": "synthetic"}


def small_model(layers: int = 2) -> ModelSpec:
    return load_model_catalog().model("qwen3-0.6b").with_layers(layers)


def workload(tokens: int = 8192, *, world: int = 2, ring: int | None = None, training: bool = True,
             model: ModelSpec | None = None, **settings: object) -> StackWorkload:
    return StackWorkload(model=model or small_model(), seq_len_tokens=tokens, world_size=world, training=training,
                         layout=RingLayout(ring_size=ring or world, layout="zigzag"),
                         settings=StackSettings(**settings))


# ----------------------------------------------------------------------------- hand-computed counts


def test_block_gemm_flops_are_twice_the_weights():
    """Forward GEMM FLOPs of one block over m tokens = 2·m·(its weight parameters) (no biases/norms
    in Llama-3-8B besides the two norms of E)."""
    model = load_model_catalog().model("llama-3-8b")
    weights = layer_parameter_count(model) - 2 * model.embed_dim
    flops = sum(gemm_flops(1000, s) for s in block_gemms(model))
    assert flops == pytest.approx(2 * 1000 * weights, rel=REL)
    assert gemm_flops(10, lm_head_gemm(model)) == 2 * 10 * 4096 * 128256


def test_training_flops_are_three_forwards_without_recompute():
    """With no checkpointing and the full loss, a training step's GEMM FLOPs are 3× the forward
    (forward + input and weight gradients) = 6·m·(L·block weights + E·V)."""
    model = small_model()
    w = workload(4096, world=1, checkpointing="none", loss="full", model=model)
    weights = model.n_layers * (layer_parameter_count(model) - 2 * model.embed_dim - 2 * model.head_dim)
    expected = 6 * 4096 * (weights + model.embed_dim * model.vocab_size)
    assert step_time(w, "h100").gemm_flops == pytest.approx(expected, rel=REL)


def test_full_checkpointing_adds_one_block_forward():
    """Full checkpointing adds exactly one forward of every block's GEMMs (2·m·L·block weights)."""
    model = small_model()
    none = step_time(workload(4096, world=1, model=model), "h100")
    full = step_time(workload(4096, world=1, model=model, checkpointing="full"), "h100")
    block = sum(gemm_flops(4096, s) for s in block_gemms(model))
    assert full.gemm_flops - none.gemm_flops == pytest.approx(model.n_layers * block, rel=REL)
    assert full.recompute_s > none.recompute_s > 0  # the chunked loss recomputes its logits either way


def test_tiled_mlp_adds_one_mlp_forward_unless_checkpointing_recomputes_it():
    """A tiled MLP recomputes its tile's MLP in backward: one more forward of the MLP GEMMs
    (2·m·(2·E·F + F·E) for SwiGLU), counted as recompute; under full checkpointing (which recomputes
    the MLP already) the FLOPs do not change; the tiles' GEMMs are n/t calls of B·t rows."""
    model = small_model()
    plain = step_time(workload(8192, world=1, model=model), "h100")
    tiled = step_time(workload(8192, world=1, model=model, mlp_tile_tokens=2048), "h100")
    mlp = sum(gemm_flops(8192, s) for s in block_gemms(model) if s.name in ("gate_up", "down"))
    assert tiled.gemm_flops - plain.gemm_flops == pytest.approx(model.n_layers * mlp, rel=REL)
    assert tiled.recompute_s > plain.recompute_s
    full = step_time(workload(8192, world=1, model=model, checkpointing="full"), "h100")
    full_tiled = step_time(workload(8192, world=1, model=model, checkpointing="full", mlp_tile_tokens=2048), "h100")
    assert full_tiled.gemm_flops == pytest.approx(full.gemm_flops, rel=REL)


def test_collective_is_one_transfer_of_the_non_local_share():
    """A ring collective over G ranks moves (G − 1)/G of the buffer through one link; a group of one is free."""
    from ringplan.time.links import LinkModel

    link = LinkModel(name="t", latency_s=1e-5, bandwidth_bytes_per_s=1e11)
    assert collective_s(link, 8e9, 1) == 0.0
    assert collective_s(link, 8e9, 8) == pytest.approx(1e-5 + 7e9 / 1e11, rel=REL)


# ----------------------------------------------------------------------------- overlap schedule


def test_overlap_hides_prefetched_transfers_behind_compute():
    """Transfers shorter than the compute they overlap cost only the first one; longer ones cost their excess."""
    hidden = [StreamUnit(before_s=1.0, compute_s=5.0)] * 4
    assert overlapped_end_s(hidden) == pytest.approx(1.0 + 20.0)
    bound = [StreamUnit(before_s=3.0, compute_s=1.0)] * 4  # link-bound: 4 transfers back to back + last compute
    assert overlapped_end_s(bound) == pytest.approx(4 * 3.0 + 1.0)
    trailing = [StreamUnit(compute_s=2.0, after_s=0.5), StreamUnit(compute_s=2.0, after_s=0.5)]
    assert overlapped_end_s(trailing) == pytest.approx(4.0 + 0.5)  # the first is hidden, the last is not
    assert overlapped_end_s([]) == 0.0


@given(st.lists(st.tuples(st.floats(0, 5), st.floats(0, 5), st.floats(0, 5)), min_size=1, max_size=12))
def test_overlap_bounds(items):
    """The schedule ends no earlier than all compute, nor all transfers, and no later than their serial sum."""
    units = [StreamUnit(before_s=b, compute_s=c, after_s=a) for b, c, a in items]
    end = overlapped_end_s(units)
    compute = sum(c for _, c, _ in items)
    transfers = sum(b + a for b, _, a in items)
    assert max(compute, transfers) - 1e-9 <= end <= compute + transfers + 1e-9


# ----------------------------------------------------------------------------- GEMM profiles


def gemm_rows(shape: tuple[int, int], rate_flops_per_s: float, tokens=(2048, 8192, 32768), name="q"):
    rows = []
    for pass_name in ("forward", "backward_input", "backward_weight"):
        for t in tokens:
            rows.append({"op": "gemm", "name": name, "pass": pass_name, "dtype": "bf16", "tokens": t,
                         "in_features": shape[0], "out_features": shape[1],
                         "seconds_median": 2.0 * t * shape[0] * shape[1] / rate_flops_per_s, "repeats": 5})
    return rows


def write_profile(directory: Path, rows, driver: str = H100_DRIVER, name: str = "gemm.json") -> Path:
    path = directory / name
    write_gemm_profile(path, {"schema": GEMM_FORMAT, "provenance": {**PROVENANCE, "gpu_driver_name": driver},
                              "rows": rows})
    return path


def test_gemm_profile_round_trip(tmp_path):
    """A written profile loads back row for row; other JSON in the directory is skipped."""
    rows = gemm_rows((1024, 2048), 5e14)
    path = write_profile(tmp_path, rows)
    (tmp_path / "other.json").write_text(json.dumps({"schema": "ringplan.kernels/1"}))
    (tmp_path / "broken.json").write_text("{not json")
    profiles = gemm_profiles_in(tmp_path)
    assert [p.path for p in profiles] == [str(path)]
    loaded = load_gemm_profile(path)
    assert len(loaded.rows) == len(rows) and loaded.gpu_driver_name == H100_DRIVER
    assert loaded.rows[0].flops == 2.0 * 2048 * 1024 * 2048


@pytest.mark.parametrize("broken, message", [
    ({"pass": "sideways"}, "pass one of"), ({"tokens": 0}, "must be positive"),
    ({"in_features": "wide"}, "is not int"), ({"seconds_median": -1.0}, "must be positive")])
def test_gemm_profile_rejects_bad_rows(tmp_path, broken, message):
    """A malformed row is a ValueError naming the file and the row; nothing is written."""
    rows = gemm_rows((64, 64), 1e12)
    rows[1] = {**rows[1], **broken}
    with pytest.raises(ValueError, match=message):
        write_profile(tmp_path, rows)
    assert not (tmp_path / "gemm.json").exists()


def test_gemm_profile_needs_provenance_and_schema(tmp_path):
    """Missing provenance keys and a wrong schema are errors."""
    with pytest.raises(ValueError, match="provenance lacks"):
        write_gemm_profile(tmp_path / "a.json", {"schema": GEMM_FORMAT, "provenance": {"gpu_driver_name": "x"},
                                                 "rows": gemm_rows((64, 64), 1e12)})
    with pytest.raises(ValueError, match="is not"):
        write_gemm_profile(tmp_path / "b.json", {"schema": "ringplan.kernels/1", "provenance": PROVENANCE, "rows": []})


def test_gemm_model_measured_nearest_extrapolated_and_prior(tmp_path):
    """Measured shape: the measured rate; another shape: the nearest measured one at equal FLOPs
    (transferred); outside the measured tokens: extrapolated; no profile: the prior efficiency."""
    from ringplan.time.kernels import GEMM_EFFICIENCY

    write_profile(tmp_path, gemm_rows((1024, 2048), 5e14) + gemm_rows((4096, 4096), 6e14, name="o"))
    h100 = load_catalog().gpu("h100")
    model = gemm_model_for(h100, "bf16", tmp_path)
    exact = GemmShape(name="q", in_features=1024, out_features=2048, count=2)
    seconds, label = model.time_s("forward", 8192, exact)
    assert seconds == pytest.approx(2 * gemm_flops(8192, replace(exact, count=1)) / 5e14, rel=1e-6)
    assert label == "measured on this GPU"
    _, label = model.time_s("backward_weight", 8192, GemmShape(name="x", in_features=4000, out_features=4100))
    assert "4096x4096" in label and "transferred" in label
    _, label = model.time_s("forward", 512, exact)
    assert label.startswith("extrapolated")
    prior = gemm_model_for(h100, "bf16", tmp_path / "empty")
    seconds, label = prior.time_s("forward", 8192, exact)
    assert seconds == pytest.approx(2 * gemm_flops(8192, replace(exact, count=1)) / (GEMM_EFFICIENCY * 989.5e12))
    assert label.startswith("default")


def test_gemm_model_transfers_another_gpu_by_peak_ratio(tmp_path):
    """An H100 profile predicts an A100 by the bf16 peak ratio (same shape, same FLOPs)."""
    write_profile(tmp_path, gemm_rows((1024, 2048), 5e14))
    catalog = load_catalog()
    a100, h100 = catalog.gpu("a100-80gb"), catalog.gpu("h100")
    shape = GemmShape(name="q", in_features=1024, out_features=2048)
    on_h100, _ = gemm_model_for(h100, "bf16", tmp_path).time_s("forward", 8192, shape)
    on_a100, label = gemm_model_for(a100, "bf16", tmp_path).time_s("forward", 8192, shape)
    ratio = h100.peak_flops_per_s["bf16"] / a100.peak_flops_per_s["bf16"]
    assert on_a100 == pytest.approx(on_h100 * ratio, rel=1e-9) and "transferred" in label


def test_step_time_uses_a_measured_gemm_profile(tmp_path):
    """With a profile of every GEMM shape of the model, GEMMs are 'measured on this GPU' and scale with the rate."""
    model = small_model()
    shapes = {(s.in_features, s.out_features) for s in (*block_gemms(model), lm_head_gemm(model))}
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    for directory, rate in ((slow, 2e14), (fast, 4e14)):
        directory.mkdir()
        write_profile(directory, [r for shape in shapes for r in gemm_rows(shape, rate, tokens=(1024, 4096, 16384))])
    w = workload(8192, world=2, model=model)
    a, b = step_time(w, "h100", timing_dir=slow), step_time(w, "h100", timing_dir=fast)
    assert dict(a.provenance_details)["gemm"] == "measured on this GPU"
    assert a.gemm_s == pytest.approx(2 * b.gemm_s, rel=1e-6)
    assert a.relative_uncertainty == 0.0


# ----------------------------------------------------------------------------- step_time invariants

SMALL_TOKENS = st.sampled_from([2048, 4096, 8192, 16384, 32768, 65536])


@settings(max_examples=15)
@given(tokens=SMALL_TOKENS, checkpointing=st.sampled_from(["none", "selective", "full"]),
       world=st.sampled_from([1, 2, 4, 8]))
def test_more_tokens_take_longer(tokens, checkpointing, world):
    """Doubling S never makes a step faster (training and prefill)."""
    for training in (True, False):
        short = step_time(workload(tokens * world, world=world, training=training, checkpointing=checkpointing), "h100")
        long = step_time(workload(2 * tokens * world, world=world, training=training, checkpointing=checkpointing),
                         "h100")
        assert long.step_time_s > short.step_time_s


@settings(max_examples=10)
@given(tokens=SMALL_TOKENS, world=st.sampled_from([1, 2, 8]), gpu=st.sampled_from(["h100", "h200", "a100-80gb"]))
def test_checkpointing_order_and_prefill_below_training(tokens, world, gpu):
    """none ≤ selective ≤ full ≤ full + offload, and a prefill forward is cheaper than a training step."""
    times = [step_time(workload(tokens * world, world=world, checkpointing=c), gpu).step_time_s
             for c in ("none", "selective", "full")]
    offload = step_time(workload(tokens * world, world=world, checkpointing="full", offload_checkpoints=True), gpu)
    assert times[0] <= times[1] <= times[2] <= offload.step_time_s
    assert step_time(workload(tokens * world, world=world, training=False), gpu).step_time_s < times[0]


def test_parts_sum_to_the_step_and_prefill_has_no_backward_parts():
    """The named parts add up to the step; prefill has no optimizer, loss or collectives."""
    train = step_time(workload(16384, world=4, checkpointing="full", offload_checkpoints=True), "h100")
    assert sum(train.parts_s.values()) == pytest.approx(train.step_time_s, rel=REL)
    assert set(train.parts_s) == set(STEP_PARTS)
    assert train.fsdp_comm_total_s >= train.fsdp_comm_s > 0 and train.offload_total_s >= train.offload_s >= 0
    prefill = step_time(workload(16384, world=4, training=False), "h100")
    assert prefill.optimizer_s == prefill.loss_s == prefill.fsdp_comm_s == prefill.fsdp_comm_total_s == 0.0
    assert prefill.recompute_s == 0.0


def test_sharding_moves_optimizer_time_into_communication():
    """ZeRO-3 over 8 GPUs spends 1/8 of the unsharded optimizer time; a single GPU has no collectives."""
    none = step_time(workload(16384, world=8, sharding="none"), "h100")
    zero3 = step_time(workload(16384, world=8, sharding="zero3"), "h100")
    assert zero3.optimizer_s == pytest.approx(none.optimizer_s / 8, rel=REL)
    assert step_time(workload(16384, world=1), "h100").fsdp_comm_total_s == 0.0


def test_bad_input_is_a_value_error():
    """Unknown GPU, and a dtype the GPU has no peak for, are ValueErrors."""
    with pytest.raises(ValueError, match="unknown GPU"):
        step_time(workload(), "h1000")
    with pytest.raises(ValueError, match="no peak FLOP/s for bf16"):
        step_time(workload(), "gtx-1080")


def test_llama_8b_step_is_in_the_expected_range():
    """Llama-3-8B, 8K tokens, one H100, no checkpointing: the GEMMs alone are 6·Ψ_matmul·S FLOPs at
    most peak; the whole step lies between that at peak and 3× that at the prior efficiency."""
    model = load_model_catalog().model("llama-3-8b")
    st_ = step_time(workload(8192, world=1, model=model), "h100")
    lower = 6 * 8192 * (parameter_count(model) - model.vocab_size * model.embed_dim) / 989.5e12
    assert lower < st_.gemm_s < st_.step_time_s < 3 * lower / 0.7
    assert math.isclose(st_.tokens_per_rank, 8192)


def test_planner_module_loads_without_numpy_or_torch():
    """Importing ringplan.time.stack_time pulls neither numpy, scipy nor torch (capacity's cold start)."""
    code = ("import sys, ringplan.time.stack_time; "
            "sys.exit(1 if {'numpy', 'scipy', 'torch'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_measure_gemm_cpu_smoke(tmp_path):
    """benchmarks/measure_gemm.py --cpu-smoke writes a loadable profile with all three passes."""
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "measure_gemm.py"), "--cpu-smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "RINGPLAN_GIT_SHA": "test"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (profile,) = gemm_profiles_in(tmp_path)
    assert {r.pass_name for r in profile.rows} == {"forward", "backward_input", "backward_weight"}
    assert {r.tokens for r in profile.rows} == {32, 64}
    assert profile.provenance["command"].startswith("python")
    # the smoke profile feeds a GemmModel (fp32 on a GPU type that is not in the catalog: own curves only)
    assert isinstance(GemmModel(gpu_name="cpu", peak_flops_per_s=1e12).time_s("forward", 32, block_gemms(
        small_model())[0])[0], float)


def test_selective_recomputes_every_block_gemm_but_not_attention():
    """The runtime's selective checkpointing re-runs the block's GEMMs and elementwise ops, not the
    ring attention: its GEMM FLOPs equal full checkpointing's and its attention time equals none's."""
    args = dict(tokens=16384, world=2)
    none, selective, full = (step_time(workload(**args, checkpointing=c), "h100") for c in ("none", "selective", "full"))
    assert selective.gemm_flops == pytest.approx(full.gemm_flops, rel=REL)
    assert selective.attention_s == pytest.approx(none.attention_s, rel=REL)
    assert selective.attention_s < full.attention_s
