"""Calibrated memory model: round trips from known parts, θ = 1, stale rows, borrowed and
transferred parts, the planning assumption on P2P buffers, capacity against measured OOM
boundaries, and the committed fit cache."""

import json
import shutil
from dataclasses import replace

import pytest

from ringplan.capacity.attention import CapacityQuery, max_tokens
from ringplan.hardware import load_catalog
from ringplan.memory.calibration import (fit_calibrations, overhead_features, ring_state_bytes, slack_features,
                                         workspace_features)
from ringplan.memory.fit_cache import compute_fit, fresh_calibrations, read_fit, stale_reason, write_fit
from ringplan.memory.attention_model import MEMORY_FIT, PRIOR_RELATIVE_UNCERTAINTY, MemoryModel, measured_rows
from ringplan.memory.attention_fits import row_inputs
from ringplan.memory.attention_terms import TERM_NAMES, memory_terms, terms_at
from ringplan.paths import measured_dir, profiles_dir
from ringplan.profiles.attention import Measurement, load_profile
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload

CATALOG = load_catalog()
#: Noise-free synthetic rows must be fitted back to this relative precision.
ROUND_TRIP_REL_TOL = 1e-6
#: The issue's capacity target: within 3% below the measured OOM boundary, never at an OOM length.
CAPACITY_TOLERANCE = 0.03
#: A committed fit recomputed on another machine may differ in the last bits of the solver.
CACHE_REL_TOL = 1e-6

WORKSPACE = {"constant_bytes": 3e6, "fp32_rows": 1.0, "gqa_fp32_rows": 0.5}
SLACK = {"constant_bytes": 5e6, "allocated": 0.002, "ring_state": 0.3}
OVERHEAD = {"context_bytes": 1.8e9, "projections_bytes": 0.0, "communicator_bytes": 3e8, "p2p_buffers_bytes": 4.5e8}


#: Dilated segments that fit one rank at the lengths used: such a ring exchanges nothing.
LOCAL_SEGMENTS = {"segment_lengths_tokens": (2048, 4096), "dilation_rates": (1, 2)}


def synthetic_row(gpu: str, seq_len: int, ring_size: int, heads: int, kv_heads: int, training: bool,
                  overhead: dict[str, float] = OVERHEAD, tracked_excess: float = 0.0, dilated: bool = False
                  ) -> Measurement:
    """A run whose figures follow known parts exactly: allocated = Σφ + W (+ an older runtime's
    extra tensors), reserved = allocated + R, device used = reserved + O."""
    row = Measurement(gpu=gpu, seq_len_tokens=seq_len, ring_size=ring_size, n_heads=heads, n_kv_heads=kv_heads,
                      head_dim=128, embed_dim=heads * 128, dtype="bf16", backend="cudnn", training=training,
                      **(LOCAL_SEGMENTS if dilated else {}))
    p, phi = row_inputs(row), terms_at(row_inputs(row))
    analytic = sum(phi.values()) * (1 + tracked_excess)
    allocated = analytic + sum(c * workspace_features(p)[k] for k, c in WORKSPACE.items())
    reserved = allocated + sum(c * slack_features(phi, allocated)[k] for k, c in SLACK.items())
    used = reserved + sum(c * overhead_features(p)[k] for k, c in overhead.items())
    return replace(row, tracked_peak_bytes=analytic, peak_allocated_bytes=allocated, peak_reserved_bytes=reserved,
                   device_used_bytes=used)


def synthetic_rows(gpu: str = "h100-80gb-sxm", ring_sizes=(1, 2, 4), **kwargs) -> list[Measurement]:
    """Dense forward and training rows of three shapes, and dilated forward rows whose rings exchange
    nothing (so the NCCL communicator and its P2P buffers are told apart)."""
    return [synthetic_row(gpu, n * p, p, heads, kv, training, dilated=dilated, **kwargs)
            for p in ring_sizes for heads, kv in ((32, 32), (32, 8), (16, 16))
            for training, dilated in ((False, False), (True, False), (False, True)) for n in (8192, 16384, 32768)]


# ----------------------------------------------------------------------------- round trips


def test_calibration_recovers_known_parts():
    """Rows made from known workspace, slack and outside-allocator coefficients are fitted back
    exactly (relative 1e-6), in every family, and every row is predicted back as it ran."""
    rows = synthetic_rows()
    calibration = fit_calibrations(rows)["h100-80gb-sxm"]
    for fit in calibration.workspace.values():
        assert fit.coefficients == pytest.approx(WORKSPACE, rel=ROUND_TRIP_REL_TOL, abs=1e-3)
    ring = calibration.slack["dense/training/no-projections/tiled/ring"]
    assert ring.coefficients == pytest.approx(SLACK, rel=ROUND_TRIP_REL_TOL, abs=1e-3)
    identified = {k: v for k, v in OVERHEAD.items() if k != "projections_bytes"}
    assert {k: calibration.overhead.coefficients[k] for k in identified} == pytest.approx(identified, rel=1e-9)
    assert "projections_bytes" not in calibration.overhead.identified
    model = MemoryModel(calibrations={"h100-80gb-sxm": calibration})
    for row in rows:
        predicted = model.predict_row(row, CATALOG.gpu("h100"))
        assert predicted.total_bytes == pytest.approx(row.device_used_bytes, rel=ROUND_TRIP_REL_TOL)
        assert predicted.peak_allocated_bytes == pytest.approx(row.peak_allocated_bytes, rel=ROUND_TRIP_REL_TOL)


def test_terms_enter_with_theta_one():
    """θ = 1: a calibrated prediction lists every analytic term exactly as ``memory_terms`` gives it,
    then the three fitted parts; they add up to the total, allocated = Σφ + workspace."""
    model = MemoryModel(rows=tuple((r, "synthetic") for r in synthetic_rows()))
    workload = Workload(seq_len_tokens=2**20, shape=AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128),
                        training=True)
    layout = RingLayout(ring_size=4)
    prediction = model.predict(workload, layout, CATALOG.gpu("h100"))
    terms = memory_terms(workload, layout)
    assert {name: prediction.terms_bytes[name] for name in TERM_NAMES} == terms
    assert sum(prediction.terms_bytes.values()) == pytest.approx(prediction.total_bytes)
    workspace = prediction.terms_bytes["workspace_bytes"]
    assert prediction.peak_allocated_bytes == pytest.approx(sum(terms.values()) + workspace)


def test_rows_of_an_older_runtime():
    """Rows whose tracked peak exceeds Σφ (an older runtime held more tensors) do not enter the
    workspace when current rows exist; alone, they enter as measured (the extra counts as workspace:
    a conservative over-prediction, never an under-prediction)."""
    current = synthetic_rows(ring_sizes=(1,))
    stale = synthetic_rows(ring_sizes=(2,), tracked_excess=0.1)
    mixed = fit_calibrations(current + stale)["h100-80gb-sxm"].workspace["dense/forward/no-projections/tiled"]
    assert mixed.stale_rows == 0 and mixed.coefficients == pytest.approx(WORKSPACE, rel=ROUND_TRIP_REL_TOL, abs=1e-3)
    alone = fit_calibrations(stale)["h100-80gb-sxm"]
    assert alone.workspace["dense/forward/no-projections/tiled"].stale_rows > 0
    model = MemoryModel(calibrations={"h100-80gb-sxm": alone})
    for row in stale:
        assert model.predict_row(row, CATALOG.gpu("h100")).peak_allocated_bytes >= row.peak_allocated_bytes * 0.995


# ----------------------------------------------------------------------------- choosing parts


def test_ring_parts_are_borrowed_from_a_gpu_measured_on_a_ring():
    """A GPU measured at P = 1 only cannot know NCCL's memory: its communicator and P2P coefficients
    come from a GPU measured on a ring, and the label says so; at P = 1 it is 'measured'."""
    single = synthetic_rows("h100-80gb-sxm", ring_sizes=(1,))
    other = {**OVERHEAD, "context_bytes": 1.9e9, "communicator_bytes": 2.9e8, "p2p_buffers_bytes": 4.7e8}
    ring = synthetic_rows("h200", ring_sizes=(1, 2), overhead=other)
    model = MemoryModel(rows=tuple((r, "synthetic") for r in single + ring))
    h100 = CATALOG.gpu("h100")
    workload = Workload(seq_len_tokens=32768, shape=AttentionShape(n_heads=32, head_dim=128))
    one = model.predict(workload, RingLayout(ring_size=1), h100)
    assert one.provenance == "measured on h100-80gb-sxm"
    assert one.terms_bytes["runtime_overhead_bytes"] == pytest.approx(OVERHEAD["context_bytes"])
    two = model.predict(workload, RingLayout(ring_size=2), h100)
    assert two.provenance == "measured on h100-80gb-sxm, partly transferred from h200"
    assert two.terms_bytes["runtime_overhead_bytes"] == pytest.approx(1.8e9 + 2.9e8 + 4.7e8)


def test_unmeasured_gpu_takes_the_largest_context_and_the_prior():
    """A GPU with no rows takes every part from measured GPUs ('transferred'); its outside-allocator
    memory from the GPU with the largest context (a plan must not count on a smaller one); its
    uncertainty covers the prior on the fitted parts."""
    small = synthetic_rows("h100-80gb-sxm")
    large = synthetic_rows("h200", overhead={**OVERHEAD, "context_bytes": 2.0e9})
    model = MemoryModel(rows=tuple((r, "synthetic") for r in small + large))
    workload = Workload(seq_len_tokens=32768, shape=AttentionShape(n_heads=32, head_dim=128))
    prediction = model.predict(workload, RingLayout(ring_size=1), CATALOG.gpu("a100-40gb"))
    assert prediction.provenance_kind == "transferred" and prediction.provenance.startswith("transferred from")
    assert prediction.terms_bytes["runtime_overhead_bytes"] == pytest.approx(2.0e9)
    parts = ("workspace_bytes", "allocator_slack_bytes", "runtime_overhead_bytes")
    fitted = sum(prediction.terms_bytes[k] for k in parts)
    assert prediction.uncertainty_bytes >= PRIOR_RELATIVE_UNCERTAINTY * fitted


def test_plans_count_p2p_buffers_on_every_ring():
    """A dilated ring whose segments fit one rank exchanges nothing and makes no NCCL P2P buffers;
    a recorded run is predicted so, but a plan counts them (once made, NCCL keeps them)."""
    rows = synthetic_rows(ring_sizes=(1, 2))
    model = MemoryModel(rows=tuple((r, "synthetic") for r in rows))
    pattern = AttentionPattern(segment_lengths_tokens=(2048, 4096), dilation_rates=(1, 2))
    workload = Workload(seq_len_tokens=65536, shape=AttentionShape(n_heads=16, head_dim=128), pattern=pattern)
    row = Measurement(gpu="h100-80gb-sxm", seq_len_tokens=65536, ring_size=2, n_heads=16, n_kv_heads=16,
                      head_dim=128, embed_dim=2048, dtype="bf16", backend="cudnn", segment_lengths_tokens=(2048, 4096),
                      dilation_rates=(1, 2))
    h100 = CATALOG.gpu("h100")
    as_run = model.predict_row(row, h100).terms_bytes["runtime_overhead_bytes"]
    plan = model.predict(workload, RingLayout(ring_size=2, backend="cudnn"), h100)
    planned = plan.terms_bytes["runtime_overhead_bytes"]
    assert as_run == pytest.approx(OVERHEAD["context_bytes"] + OVERHEAD["communicator_bytes"])
    assert planned == pytest.approx(as_run + OVERHEAD["p2p_buffers_bytes"])
    one_run = model.predict(workload, RingLayout(ring_size=2, backend="cudnn"), h100, plan=False)
    assert one_run.terms_bytes["runtime_overhead_bytes"] == pytest.approx(as_run)


def test_ring_state_is_zero_on_one_gpu():
    """The slack's ring-state feature holds only ring machinery: zero for dense attention at P = 1."""
    row = synthetic_row("h100-80gb-sxm", 8192, 1, 32, 32, True)
    assert ring_state_bytes(terms_at(row_inputs(row))) == 0.0
    assert ring_state_bytes(terms_at(row_inputs(synthetic_row("h100-80gb-sxm", 16384, 2, 32, 32, True)))) > 0


# ----------------------------------------------------------------------------- measured data


def bisection_series() -> list[list[Measurement]]:
    """OOM-boundary probes of every bisection file (measured and emulated), one list per series."""
    paths = sorted(measured_dir().glob("*bisect*.json")) + sorted((profiles_dir() / "emulated").glob("*bisect*.json"))
    series: dict[tuple, list[Measurement]] = {}
    for path in paths:
        for row in load_profile(path).rows:
            key = (path.name, row.gpu, row.series, row.ring_size, row.n_heads, row.head_dim, row.segment_lengths_tokens)
            series.setdefault(key, []).append(row)
    return list(series.values())


@pytest.mark.parametrize("probes", bisection_series(), ids=lambda probes: f"{probes[0].gpu}-P{probes[0].ring_size}")
def test_capacity_never_reaches_a_measured_oom(probes):
    """The planner's model (every measured profile) predicts a maximum length at margin 0 that is
    below the first length that ran out of memory and within 3% of the last length that ran —
    emulated GPUs (a100-40gb, gtx-1080) from transferred parts."""
    first_oom = min(r.seq_len_tokens for r in probes if r.oom)
    boundary = max(r.seq_len_tokens for r in probes if not r.oom and r.seq_len_tokens < first_oom)
    row = probes[0]
    workload, _ = row.workload_and_layout()
    query = CapacityQuery(workload=workload, layout=row.layout, backend=row.backend, gpu=CATALOG.gpu(row.gpu),
                          safety_margin=0.0, model=MemoryModel(rows=measured_rows()))
    predicted = max_tokens(query, row.ring_size).best.seq_len_tokens
    assert predicted < first_oom
    assert predicted >= boundary * (1 - CAPACITY_TOLERANCE)


# ----------------------------------------------------------------------------- the committed fit


def test_committed_fit_is_fresh():
    """profiles/fitted/memory-fit.json matches its inputs (every measured profile and the fit's
    sources) and equals a fit computed now: run `ringplan fit --write` after adding a profile or
    changing a term formula."""
    committed = read_fit(MEMORY_FIT)
    assert stale_reason(MEMORY_FIT, committed) is None, stale_reason(MEMORY_FIT, committed)
    now = compute_fit(MEMORY_FIT)
    assert now["inputs"] == committed["inputs"]
    assert_close(now["calibrations"], committed["calibrations"])


def assert_close(a, b, path="calibrations"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=CACHE_REL_TOL, abs=1e-6), path
    else:
        assert a == b, path


def test_stale_fit_is_refused(tmp_path):
    """A fit written for some profiles is used while they are unchanged and refused (the planner
    then fits again) once a profile changes or is added."""
    measured = tmp_path / "measured"
    shutil.copytree(measured_dir(), measured, ignore=shutil.ignore_patterns("timing"))
    path = tmp_path / "fit.json"
    write_fit(MEMORY_FIT, path, measured)
    cached = fresh_calibrations(MEMORY_FIT, path, measured)
    assert cached is not None and set(cached) >= {"h200"}
    profile = min(measured.glob("*.json"))
    profile.write_text(profile.read_text() + "\n")
    assert fresh_calibrations(MEMORY_FIT, path, measured) is None
    assert profile.name in stale_reason(MEMORY_FIT, json.loads(path.read_text()), measured)


def test_cached_and_fitted_models_agree():
    """The model read from the committed fit predicts exactly what fitting the profiles predicts."""
    cached = MemoryModel(calibrations=fresh_calibrations(MEMORY_FIT))
    fitted = MemoryModel(rows=measured_rows())
    h200, a100 = CATALOG.gpu("h200"), CATALOG.gpu("a100-40gb")
    shapes = [Workload(seq_len_tokens=2**20, shape=AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128), training=t)
              for t in (False, True)]
    for workload in shapes:
        for gpu in (h200, a100):
            for p in (1, 2, 8):
                a, b = (m.predict(workload, RingLayout(ring_size=p), gpu) for m in (cached, fitted))
                assert a.total_bytes == pytest.approx(b.total_bytes, rel=CACHE_REL_TOL)
                assert a.provenance == b.provenance


def test_default_model_reads_the_committed_fit(monkeypatch):
    """With a fresh committed fit, the default model is built from it (no rows loaded, nothing fitted)."""
    from ringplan.memory import attention_model as memory_model

    memory_model.default_memory_model.cache_clear()
    try:
        model = memory_model.default_memory_model()
        assert model.calibrations is not None and model.rows == ()
    finally:
        memory_model.default_memory_model.cache_clear()


def test_synthetic_profile_dir_without_fit(tmp_path, monkeypatch):
    """Under another profiles directory with no fitted/ file, the default model fits its profiles."""
    from ringplan.memory import attention_model as memory_model

    shutil.copytree(measured_dir(), tmp_path / "measured", ignore=shutil.ignore_patterns("timing"))
    shutil.copy(profiles_dir() / "gpus.json", tmp_path / "gpus.json")
    monkeypatch.setenv("RINGPLAN_PROFILES_DIR", str(tmp_path))
    memory_model.default_memory_model.cache_clear()
    try:
        model = memory_model.default_memory_model()
        assert model.calibrations is None and model.rows
        assert "h200" in model.calibrations_in_use()
    finally:
        memory_model.default_memory_model.cache_clear()


def test_fit_write_cli(tmp_path, monkeypatch):
    """`ringplan fit --write` writes profiles/fitted/memory-fit.json for the measured profiles; a
    PROFILE argument with --write is a one-line error, exit 2."""
    from click.testing import CliRunner

    from ringplan.cli import main

    shutil.copytree(measured_dir(), tmp_path / "measured", ignore=shutil.ignore_patterns("timing"))
    shutil.copy(profiles_dir() / "gpus.json", tmp_path / "gpus.json")
    monkeypatch.setenv("RINGPLAN_PROFILES_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["fit", "--write"])
    assert result.exit_code == 0, result.output
    written = tmp_path / "fitted" / "memory-fit.json"
    assert "wrote" in result.output and stale_reason(MEMORY_FIT, json.loads(written.read_text()), tmp_path / "measured") is None
    bad = CliRunner().invoke(main, ["fit", "--write", str(next((tmp_path / "measured").glob("*.json")))])
    assert bad.exit_code == 2 and bad.output.startswith("Error: --write fits every profile")



def fresh_fit_in(tmp_path, monkeypatch) -> dict:
    """A profiles tree in ``tmp_path`` (the measured profiles) with a fit written for it, in use."""
    from ringplan.memory.fit_cache import write_fit

    shutil.copytree(measured_dir(), tmp_path / "measured")
    monkeypatch.setenv("RINGPLAN_PROFILES_DIR", str(tmp_path))
    return write_fit(MEMORY_FIT)


@pytest.mark.parametrize("corruption, said", [
    (lambda text: text.replace('"schema"', '"schema": "ringplan.memory-fit/1", "schema"', 1), "appears twice"),
    (lambda text: text.replace('"constant_bytes": ', '"constant_bytes": -5e10 + 0 * ', 1), "cannot be read"),
])
def test_corrupt_committed_fit_is_refit_with_a_notice(tmp_path, monkeypatch, capsys, corruption, said):
    """A committed fit with a duplicate key or an unparseable number is not used: the planner says
    why on stderr (one line) and fits from the profiles."""
    from ringplan.memory.fit_cache import usable_calibrations

    fresh_fit_in(tmp_path, monkeypatch)
    assert usable_calibrations(MEMORY_FIT) is not None and capsys.readouterr().err == ""
    MEMORY_FIT.path().write_text(corruption(MEMORY_FIT.path().read_text()))
    assert usable_calibrations(MEMORY_FIT) is None
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and said in notice[0] and "fitting from the profiles now" in notice[0], notice


def test_negative_fitted_coefficient_is_refused(tmp_path, monkeypatch, capsys):
    """A committed fit whose coefficient is negative (−5e10 bytes: "−15.76 GiB … feasible") is
    corrupt: not used, refit with a notice naming the part and the field."""
    from ringplan.memory.fit_cache import usable_calibrations

    payload = fresh_fit_in(tmp_path, monkeypatch)
    gpu = next(iter(payload["calibrations"]))
    payload["calibrations"][gpu]["overhead"]["coefficients"]["context_bytes"] = -5e10
    MEMORY_FIT.path().write_text(json.dumps(payload))
    assert usable_calibrations(MEMORY_FIT) is None
    notice = capsys.readouterr().err
    assert "corrupt" in notice and "coefficients" in notice and f"{gpu}/overhead" in notice, notice
