"""Whole-model memory model: θ = 1, round trips of known parts, transfer and fallback provenance,
the committed stack fit (fresh, refused when stale, read without numpy), and per-GPU memory that
never grows with more GPUs under zero3 + full checkpointing."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringplan.hardware import load_catalog
from ringplan.memory.attention_model import PRIOR_RELATIVE_UNCERTAINTY, MemoryModel
from ringplan.models import ModelSpec, load_model_catalog
from ringplan.profiles.envelope import Provenance
from ringplan.stack import StackSettings, StackWorkload
from ringplan.memory.fit_cache import compute_fit, fresh_calibrations, read_fit, stale_reason, write_fit
from ringplan.memory.stack_model import (STACK_FIT, StackMemoryModel, StackPoint, communicator_count,
                                         fit_stack_calibrations, gathered_block_feature_bytes)
from ringplan.profiles.stack import StackProfile, measurement_from_workload, write_stack_profile
from ringplan.memory.stack_terms import stack_terms
from ringplan.workload import RingLayout
from tests.strategies import stack_workloads

CATALOG = load_catalog()
H100, H200 = CATALOG.gpu("h100"), CATALOG.gpu("h200")
MIB = 2**20
#: Coefficients a noiseless fit must recover (relative; bytes are exact up to least-squares rounding).
ROUND_TRIP_REL_TOL = 1e-6
CACHE_REL_TOL = 1e-9
TINY = ModelSpec(name="tiny", n_layers=4, embed_dim=512, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1536,
                 ffn_type="swiglu", vocab_size=32_000, norm="rmsnorm")
WORKSPACE = {"constant_bytes": 48 * MIB, "gathered_unit": 1.5, "hidden": 3.0}
SLACK = {"constant_bytes": 20 * MIB, "stashed_q": 1.3, "full_logits": 0.5, "gathered_unit": 0.75}
OUTSIDE = {"context_bytes": 1.6e9, "communicator_bytes": 2.5e8, "p2p_buffers_bytes": 4.5e8}
UNFITTED = StackMemoryModel(attention=MemoryModel())  # no stack fit, no attention fit: terms + catalog overhead


def workload(seq=8192, world=1, ring=1, training=True, **settings) -> StackWorkload:
    return StackWorkload(model=TINY, seq_len_tokens=seq, training=training, world_size=world,
                         layout=RingLayout(ring_size=ring), settings=StackSettings(**settings))


def synthetic_points(gpu="h100-80gb-sxm") -> list[StackPoint]:
    """Runs whose figures are the terms plus known parts (features identifiable: W and P vary,
    parameters gathered or not, n spans 4x)."""
    def dot(coefficients, features):
        return sum(coefficients[k] * features[k] for k in coefficients)

    from ringplan.memory.stack_model import outside_features, slack_features, workspace_features

    points = []
    for training in (True, False):
        for seq, world, ring, sharding, loss in ((4096, 1, 1, "zero3", "full"), (16384, 2, 2, "zero3", "chunked"),
                                                 (8192, 2, 1, "zero3", "full"), (16384, 4, 2, "zero2", "chunked"),
                                                 (32768, 4, 4, "none", "chunked"), (8192, 4, 4, "zero3", "full")):
            w = workload(seq, world, ring, training, sharding=sharding, loss=loss)
            allocated = sum(stack_terms(w).values()) + dot(WORKSPACE, workspace_features(w))
            reserved = allocated + dot(SLACK, slack_features(w))
            points.append(StackPoint(gpu=gpu, workload=w, peak_allocated_bytes=allocated, peak_reserved_bytes=reserved,
                                     device_used_bytes=reserved + dot(OUTSIDE, outside_features(w))))
    return points


def test_terms_enter_with_theta_one():
    """Every stack term appears in the prediction unchanged; without any fit the total is Σφ plus
    the catalog overhead, and the bound is the prior on Σφ and on that overhead."""
    w = workload(16384, 2, 2)
    p = UNFITTED.predict(w, H100)
    phi = stack_terms(w)
    assert {k: p.terms_bytes[k] for k in phi} == phi
    assert p.total_bytes == pytest.approx(sum(phi.values()) + H100.runtime_overhead_bytes)
    expected_bound = PRIOR_RELATIVE_UNCERTAINTY * (sum(phi.values()) + H100.runtime_overhead_bytes)
    assert p.residual_bound_bytes == pytest.approx(expected_bound)
    assert p.provenance_kind == "analytic" and "10% of the terms" in p.provenance


def test_calibration_recovers_known_parts():
    """A fit of runs made from known workspace / slack / outside coefficients recovers them, and
    predicts every run exactly with a zero residual bound, labelled measured."""
    calibrations = fit_stack_calibrations(synthetic_points())
    c = calibrations["h100-80gb-sxm"]
    assert c.workspace["training"].coefficients == pytest.approx(WORKSPACE, rel=ROUND_TRIP_REL_TOL)
    assert c.slack["at_rest"].coefficients == pytest.approx(SLACK, rel=ROUND_TRIP_REL_TOL)
    assert "pressure" not in c.slack  # no GPU memory given: no pressure rows
    assert c.overhead.coefficients == pytest.approx(OUTSIDE, rel=ROUND_TRIP_REL_TOL)
    model = StackMemoryModel(calibrations=calibrations)
    for point in synthetic_points():
        p = model.predict(point.workload, H100)
        assert p.total_bytes == pytest.approx(point.device_used_bytes, rel=ROUND_TRIP_REL_TOL)
        assert p.peak_allocated_bytes == pytest.approx(point.peak_allocated_bytes, rel=ROUND_TRIP_REL_TOL)
        assert p.residual_bound_bytes <= ROUND_TRIP_REL_TOL * p.total_bytes
        assert p.provenance_kind == "measured", p.provenance


def test_pressure_rows_set_the_reserve_not_the_slack_at_rest():
    """Rows above PRESSURE_FRACTION of usable memory, whose allocator gave cached blocks back, do
    not enter the slack-at-rest fit; the largest slack among them is the reserve. The need is
    allocated + min(reserve, slack at rest) + outside; device used at rest keeps the full slack."""
    from dataclasses import replace

    from ringplan.memory.stack_model import PRESSURE_FRACTION, outside_features, slack_features

    calm = synthetic_points()
    usable = max(p.peak_allocated_bytes for p in calm) / PRESSURE_FRACTION * 1.01  # every calm row below the line
    calm = [replace(p, usable_memory_bytes=usable) for p in calm]
    big, reserves = workload(65536, 2, 2, True, sharding="zero3"), (30 * MIB, 70 * MIB)
    pressure = []
    for extra, reserve in zip((0.0, 1.0), reserves):  # pressure rows: allocated > the line
        allocated = PRESSURE_FRACTION * usable * 1.02 + extra * MIB
        pressure.append(StackPoint(gpu=calm[0].gpu, workload=big, peak_allocated_bytes=allocated,
                                   peak_reserved_bytes=allocated + reserve,
                                   device_used_bytes=allocated + reserve + 2e9, usable_memory_bytes=usable))
    assert all(p.pressure for p in pressure) and not any(p.pressure for p in calm)
    c = fit_stack_calibrations(calm + pressure)[calm[0].gpu]
    assert c.slack["at_rest"].coefficients == pytest.approx(SLACK, rel=ROUND_TRIP_REL_TOL)
    assert c.slack["pressure"].coefficients["constant_bytes"] == pytest.approx(max(reserves))
    model = StackMemoryModel(calibrations={c.gpu: c})
    for w in (big, workload(4096, 1, 1, False)):
        p = model.predict(w, H100)
        slack = sum(SLACK[k] * v for k, v in slack_features(w).items())
        outside = c.overhead.bytes(outside_features(w))
        assert p.terms_bytes["fragmentation_reserve_bytes"] == pytest.approx(min(slack, max(reserves)))
        assert p.total_bytes == pytest.approx(p.peak_allocated_bytes + min(slack, max(reserves)) + outside)
        assert p.device_used_at_rest_bytes == pytest.approx(p.peak_allocated_bytes + slack + outside)
        assert p.device_used_at_rest_bytes >= p.total_bytes


def test_measured_ooms_are_judged_infeasible():
    """The committed H200 runs: every OOM row's need + bound exceeds the usable memory (capacity is
    never over-predicted on them), and every row that ran needs no more than it used at rest + bound."""
    from ringplan.memory.stack_model import default_stack_memory_model
    from ringplan.profiles.stack import load_stack_profiles

    model = default_stack_memory_model()
    rows = [r for prof in load_stack_profiles() for r in prof.rows if r.kind == "measured"]
    assert any(r.oom for r in rows)
    for row in rows:
        gpu = CATALOG.gpu(row.gpu)
        p = model.predict(row.workload(), gpu)
        if row.oom:
            assert p.upper_bytes > gpu.usable_memory_bytes, (row.seq_len_tokens, p.upper_bytes)
        else:
            assert p.total_bytes <= p.device_used_at_rest_bytes


def test_other_gpu_fit_is_transferred_with_the_prior():
    """A GPU without whole-model runs takes another GPU's fit, labelled transferred, with the
    prior added to its uncertainty (not to the residual bound)."""
    model = StackMemoryModel(calibrations=fit_stack_calibrations(synthetic_points("h200")))
    w = workload(16384, 2, 2)
    p = model.predict(w, H100)
    assert p.provenance_kind == "transferred" and "h200" in p.provenance
    assert p.uncertainty_bytes > p.residual_bound_bytes


def test_without_stack_runs_the_attention_fit_is_lent():
    """No stack fit: the outside-allocator memory comes from the attention-level calibration of
    that GPU (context, GEMM libraries, one communicator, P2P buffers on a ring), labelled
    transferred and naming the attention-level fit."""
    from ringplan.memory.attention_model import default_memory_model
    from ringplan.memory.stack_model import attention_outside_features

    model = StackMemoryModel(attention=default_memory_model())
    w = workload(16384, 2, 2)
    p = model.predict(w, CATALOG.gpu("h200"))
    overhead = default_memory_model().calibrations_in_use()["h200"].overhead
    assert p.terms_bytes["runtime_overhead_bytes"] == pytest.approx(overhead.bytes(attention_outside_features(w)))
    assert p.provenance_kind == "transferred" and "attention-level" in p.provenance


def test_gathered_unit_and_communicators():
    """Parameters are gathered only in training with zero3 over more than one rank; a rank holds
    one communicator for the world and one more for a ring smaller than it."""
    assert gathered_block_feature_bytes(workload(8192, 2, 2, sharding="zero3")) > 0
    assert gathered_block_feature_bytes(workload(8192, 1, 1, sharding="zero3")) == 0
    assert gathered_block_feature_bytes(workload(8192, 2, 2, sharding="zero2")) == 0
    assert gathered_block_feature_bytes(workload(8192, 2, 2, training=False)) == 0
    assert [communicator_count(workload(8192, w, p)) for w, p in ((1, 1), (2, 2), (2, 1), (4, 2))] == [0, 1, 1, 2]


# ----------------------------------------------------------------------------- the committed fit


def write_synthetic_profile(directory, points):
    rows = tuple(measurement_from_workload(p.workload, gpu=p.gpu, peak_allocated_bytes=p.peak_allocated_bytes,
                                           peak_reserved_bytes=p.peak_reserved_bytes,
                                           device_used_bytes=p.device_used_bytes) for p in points)
    profile = StackProfile(provenance=Provenance(source="synthetic"), rows=rows)
    write_stack_profile(directory / "synthetic.json", profile)


def test_stack_fit_round_trip_and_staleness(tmp_path):
    """The fit written for some stack profiles is read back equal while they are unchanged, and
    refused (naming the file) once one changes."""
    stack_dir = tmp_path / "stack"
    write_synthetic_profile(stack_dir, synthetic_points())
    path = tmp_path / "stack-fit.json"
    write_fit(STACK_FIT, path, stack_dir)
    cached = fresh_calibrations(STACK_FIT, path, stack_dir)
    fitted = fit_stack_calibrations(synthetic_points())
    assert cached["h100-80gb-sxm"].overhead.coefficients == pytest.approx(fitted["h100-80gb-sxm"].overhead.coefficients,
                                                                          rel=CACHE_REL_TOL)
    profile = stack_dir / "synthetic.json"
    profile.write_text(profile.read_text() + "\n")
    assert fresh_calibrations(STACK_FIT, path, stack_dir) is None
    assert "synthetic.json" in stale_reason(STACK_FIT, json.loads(path.read_text()), stack_dir)


def test_stack_fit_hashes_the_profile_readers_dir():
    """The fit hashes the directory the stack profile reader reads."""
    from ringplan.paths import stack_profiles_dir

    assert STACK_FIT.profiles_dir() == stack_profiles_dir()


def test_committed_stack_fit_is_fresh():
    """profiles/fitted/stack-fit.json matches its inputs (every stack profile, the term and fit
    sources) and equals a fit computed now: run `ringplan fit --write` after adding a stack
    profile or changing a term formula."""
    committed = read_fit(STACK_FIT)
    assert stale_reason(STACK_FIT, committed) is None, stale_reason(STACK_FIT, committed)
    now = compute_fit(STACK_FIT)
    assert now["inputs"] == committed["inputs"]
    assert json.dumps(now["calibrations"], sort_keys=True) == json.dumps(committed["calibrations"], sort_keys=True) \
        or now["calibrations"] == pytest.approx(committed["calibrations"], rel=CACHE_REL_TOL)


def test_default_model_needs_no_numpy():
    """The default whole-model prediction reads the committed fits with json alone: no numpy,
    scipy or torch is imported (a stale fit fails here)."""
    code = ("import sys; from ringplan.memory.stack_model import default_stack_memory_model; "
            "from ringplan.hardware import load_catalog; from ringplan.stack import StackWorkload; "
            "from ringplan.models import load_model_catalog; from ringplan.workload import RingLayout; "
            "w = StackWorkload(model=load_model_catalog().model('llama-3-8b'), seq_len_tokens=2**20, world_size=8, "
            "layout=RingLayout(ring_size=8)); default_stack_memory_model().predict(w, load_catalog().gpu('h100')); "
            "bad = [m for m in ('numpy', 'scipy', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=60, deadline=None)
@given(stack_workloads(max_units=512), st.booleans())
def test_lower_bound_never_exceeds_the_prediction(w, fitted):
    """The cheap bound the searches prune with is below memory + bound, with the default model
    (attention-level parts lent) and with whole-model fits: pruning never drops a feasible plan."""
    model = StackMemoryModel(calibrations=fit_stack_calibrations(synthetic_points())) if fitted else \
        StackMemoryModel()
    assert model.lower_bound_bytes(w, H100) <= model.predict(w, H100).upper_bytes * (1 + 1e-12)


# ----------------------------------------------------------------------------- more GPUs


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["llama-3-8b", "qwen3-0.6b", "mistral-7b", "gpt2"]), st.integers(1, 16),
       st.sampled_from([2, 4, 8, 16, 32]), st.sampled_from([2, 4, 8, 16, 32]), st.booleans())
def test_more_gpus_never_need_more_memory(name, units, w1, w2, zigzag):
    """zero3 + full checkpointing at fixed S: per-GPU memory (and memory + bound) on more GPUs of
    one ring is never larger than on fewer (from two GPUs on: one GPU needs no ring buffers)."""
    from ringplan.memory.stack_model import default_stack_memory_model

    small, large = sorted((w1, w2))
    layout = "zigzag" if zigzag else "contiguous"
    seq = 2 * 32 * 1024 * units
    model = load_model_catalog().model(name)

    def predict(world):
        w = StackWorkload(model=model, seq_len_tokens=seq, world_size=world, layout=RingLayout(ring_size=world,
                          layout=layout), settings=StackSettings(sharding="zero3", checkpointing="full"))
        return default_stack_memory_model().predict(w, H100)

    a, b = predict(small), predict(large)
    assert b.total_bytes <= a.total_bytes * (1 + 1e-12)
    assert b.upper_bytes <= a.upper_bytes * (1 + 1e-12)
