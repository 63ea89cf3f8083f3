"""The attention memory model: fit round trips, provenance and uncertainty, the golden seed."""

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringplan.hardware import load_catalog
from ringplan.memory.attention_model import PRIOR_RELATIVE_UNCERTAINTY, default_memory_model, predict_memory
from ringplan.memory.attention_fits import fit_memory_model, fit_seed_form, row_inputs, runtime_overhead_measured, unfitted_model
from ringplan.memory.attention_terms import TERM_NAMES, memory_terms, terms_at
from ringplan.paths import measured_dir
from ringplan.profiles.attention import Measurement, load_profile
from ringplan.workload import AttentionShape, RingLayout, Workload

MB = 10**6
GOLDEN_TOLERANCE_BYTES = 1 * MB        # the issue: "within 1 MB"
FLOAT_SLACK = 1e-9                     # relative slack for comparisons of sums computed differently
CATALOG = load_catalog()


def total(workload, layout) -> float:
    return sum(memory_terms(workload, layout).values())


# ----------------------------------------------------------------------------- golden: the seed


def seed_rows(series=None):
    rows = load_profile(measured_dir() / "gtx1080-seed.json").rows
    return [r for r in rows if series is None or r.series == series]


def test_seed_golden_595_mb():
    """The seed form fitted on the seed's memory-scaling table gives 200,000 tokens on 4 GPUs →
    595 MB per GPU (within 1 MB), ~0.0089 MB/token and ~150 MB overhead, and reproduces every row."""
    fit = fit_seed_form(seed_rows("memory-scaling"))
    assert abs(fit.predict_bytes(200_000 / 4) - 595 * MB) <= GOLDEN_TOLERANCE_BYTES
    assert fit.mb_per_token == pytest.approx(0.0089, abs=2e-5)
    assert fit.overhead_mb == pytest.approx(150, abs=1.0)
    assert fit.stats.r_squared > 0.9999
    for row in seed_rows("memory-scaling"):
        assert abs(fit.predict_bytes(row.tokens_per_rank) - row.peak_allocated_bytes) <= GOLDEN_TOLERANCE_BYTES


def test_seed_readings_contradict_its_formula():
    """Adding the report's two real-looking readings (1010.3 MB, 459.2 MB) breaks the line: the
    fit's relative uncertainty exceeds 20%, which the prediction then reports."""
    fit = fit_seed_form(seed_rows())
    assert fit.stats.n_points == 8  # OOM and 'estimated' rows excluded
    assert fit.stats.relative_uncertainty > 0.20


# ----------------------------------------------------------------------------- fits: round trips


def synthetic_rows(theta: dict[str, float], constant: float, noise: float, rng: random.Random, count: int = 80,
                   gpu: str = "h100-80gb-sxm") -> list[Measurement]:
    """Rows of varied dense forward shapes whose device-used bytes follow c + Σ θ_j φ_j (× 1 ± noise)."""
    rows = []
    for _ in range(count):
        heads = rng.choice([8, 16, 32])
        row = Measurement(gpu=gpu, seq_len_tokens=rng.choice([4096, 16384, 65536, 262144]) * 8,
                          ring_size=rng.choice([1, 2, 4, 8]), n_heads=heads,
                          n_kv_heads=rng.choice([h for h in (1, 2, 8, heads) if heads % h == 0]),
                          head_dim=rng.choice([64, 128]), embed_dim=4096, dtype=rng.choice(["bf16", "fp32"]),
                          batch=rng.choice([1, 2]))
        phi = terms_at(row_inputs(row))
        exact = constant + sum(theta.get(name, 0.0) * phi[name] for name in TERM_NAMES)
        rows.append(replace(row, device_used_bytes=exact * (1 + rng.uniform(-noise, noise))))
    return rows


#: Separable by the shapes synthesised (q and block_result differ only by the LSE, so not both).
FITTED_TERMS = ("q_bytes", "kv_bytes", "kv_recv_bytes", "accumulator_bytes")


@settings(max_examples=15)
@given(st.lists(st.floats(0.3, 2.0), min_size=4, max_size=4), st.floats(0.2e9, 2e9), st.integers(0, 2**31))
def test_fit_recovers_known_coefficients(thetas, constant, seed):
    """Synthesise rows from known θ (0.3-2) and overhead with ±0.3% noise; the bounded fit recovers
    every θ within 5% and the overhead within 10%."""
    theta = dict(zip(FITTED_TERMS, thetas))
    rows = synthetic_rows(theta, constant, 0.003, random.Random(seed))
    fit = fit_memory_model(rows, terms=FITTED_TERMS, prior_weight=1e-8)
    for name in FITTED_TERMS:
        assert fit.coefficients[name] == pytest.approx(theta[name], rel=0.05), name
    assert fit.constant_bytes == pytest.approx(constant, rel=0.10)
    assert fit.stats.r_squared > 0.999


@given(st.floats(1e3, 1e5), st.floats(1e6, 1e9), st.integers(0, 2**31))
def test_seed_form_recovers_slope_and_intercept(per_token, overhead, seed):
    """Rows y = overhead + per_token · n (±0.1%): the closed-form fit recovers both within 2%."""
    rng = random.Random(seed)
    base = replace(seed_rows()[0], peak_allocated_bytes=None, kind="measured", series=None)
    rows = []
    for s in (50_000, 100_000, 200_000, 400_000, 800_000):
        for p in (1, 2, 4):
            n = s / p
            rows.append(replace(base, seq_len_tokens=s, ring_size=p,
                                peak_allocated_bytes=(overhead + per_token * n) * (1 + rng.uniform(-1e-3, 1e-3))))
    fit = fit_seed_form(rows)
    assert fit.bytes_per_token == pytest.approx(per_token, rel=0.02)
    assert fit.overhead_bytes == pytest.approx(overhead, rel=0.02, abs=0.002 * per_token * 800_000)


def test_fit_rejects_bad_requests():
    """Unknown term names, no usable rows and mixed GPUs are ValueErrors."""
    rows = synthetic_rows({"q_bytes": 1.0}, 1e9, 0.0, random.Random(0), count=5)
    with pytest.raises(ValueError, match="unknown memory terms"):
        fit_memory_model(rows, terms=["q_bytes", "flux_bytes"])
    with pytest.raises(ValueError, match="no rows to fit"):
        fit_memory_model([replace(r, oom=True) for r in rows])
    mixed = rows + [replace(rows[0], gpu="a100-40gb")]
    with pytest.raises(ValueError, match="one GPU"):
        fit_memory_model(mixed)


# ----------------------------------------------------------------------------- predictions


WORKLOAD = Workload(seq_len_tokens=262_144 * 8, shape=AttentionShape(n_heads=32, head_dim=128))


def test_provenance_labels_and_uncertainty():
    """Same GPU inside the measured range: 'measured on'; another GPU: 'transferred from'; outside
    the range: 'extrapolated'; no fit: 'analytic (unfitted)'. Non-measured predictions carry at least
    the prior uncertainty."""
    rows = synthetic_rows(dict.fromkeys(FITTED_TERMS, 1.0), 1e9, 0.002, random.Random(1))
    fit = fit_memory_model(rows, terms=FITTED_TERMS)
    h100, a100 = CATALOG.gpu("h100"), CATALOG.gpu("a100-80gb")
    inside = predict_memory(fit, WORKLOAD, RingLayout(ring_size=8), h100)
    assert inside.provenance == "measured on h100-80gb-sxm" and inside.provenance_kind == "measured"
    assert inside.relative_uncertainty < PRIOR_RELATIVE_UNCERTAINTY
    other = predict_memory(fit, WORKLOAD, RingLayout(ring_size=8), a100)
    assert other.provenance == "transferred from h100-80gb-sxm"
    assert other.relative_uncertainty >= PRIOR_RELATIVE_UNCERTAINTY
    far = predict_memory(fit, WORKLOAD.with_seq_len(2**26), RingLayout(ring_size=1), h100)
    assert far.provenance_kind == "extrapolated" and "outside measured" in far.provenance
    bare = predict_memory(unfitted_model(), WORKLOAD, RingLayout(ring_size=8), h100)
    assert bare.provenance == "analytic (unfitted)"
    for prediction in (inside, other, far, bare):
        assert prediction.total_bytes == pytest.approx(sum(prediction.terms_bytes.values()))


def test_device_used_adds_runtime_overhead_for_allocator_fits():
    """An allocator-figure fit predicts device memory as fitted bytes + the non-allocator overhead:
    the measured median (NVML used − torch reserved) on the same GPU, else the catalog default."""
    rows = synthetic_rows({"q_bytes": 1.0, "kv_bytes": 1.0}, 1e9, 0.0, random.Random(2), count=10)
    rows = [replace(r, peak_allocated_bytes=r.device_used_bytes, device_used_bytes=None) for r in rows]
    fit = fit_memory_model(rows, terms=["q_bytes", "kv_bytes"])
    a100 = CATALOG.gpu("a100-80gb")
    prediction = predict_memory(fit, WORKLOAD, RingLayout(ring_size=8), a100)
    assert prediction.terms_bytes["runtime_overhead_bytes"] == a100.runtime_overhead_bytes
    assert prediction.peak_allocated_bytes == pytest.approx(prediction.total_bytes - a100.runtime_overhead_bytes)
    measured = [replace(r, peak_reserved_bytes=r.peak_allocated_bytes + 1e8,
                        device_used_bytes=r.peak_allocated_bytes + 1e8 + 7e8) for r in rows]
    assert runtime_overhead_measured(measured) == pytest.approx(7e8)


def test_default_model_choices():
    """The bundled profiles, calibrated form: the default 32×128 dense forward workload on an A100
    (never measured) takes every part from a measured GPU ("transferred", beyond the measured n:
    "extrapolated"); on the H200 inside its measured range it is "measured on h200". The analytic
    terms enter with θ = 1. The seed form stays available and says so."""
    model = default_memory_model()
    a100 = model.predict(WORKLOAD, RingLayout(ring_size=8), CATALOG.gpu("a100-40gb"))
    assert a100.provenance_kind == "extrapolated" and "transferred from h200" in a100.provenance
    inside = WORKLOAD.with_seq_len(32768 * 2)
    h200 = model.predict(inside, RingLayout(ring_size=2), CATALOG.gpu("h200"))
    assert h200.provenance == "measured on h200" and h200.provenance_kind == "measured"
    terms = memory_terms(inside, RingLayout(ring_size=2))
    assert all(h200.terms_bytes[name] == terms[name] for name in TERM_NAMES)
    assert h200.relative_uncertainty < PRIOR_RELATIVE_UNCERTAINTY
    seed_model = default_memory_model("seed")
    assert "seed form" in seed_model.predict(WORKLOAD, RingLayout(ring_size=8), CATALOG.gpu("a100-40gb")).provenance


def test_profiles_without_fittable_rows_are_refused(tmp_path):
    """``capacity --profile`` with a file of zero rows (or only OOM rows) is bad input, as for
    ``ringplan fit``: a ValueError naming the file, never an "analytic (unfitted)" answer."""
    from ringplan.memory.attention_model import memory_model_from_profiles
    from ringplan.profiles.attention import Profile, Provenance

    empty = Profile(provenance=Provenance(source="test"), rows=(), path=str(tmp_path / "empty.json"))
    with pytest.raises(ValueError, match="empty.json: no rows to fit"):
        memory_model_from_profiles([empty])
    seed = load_profile(measured_dir() / "gtx1080-seed.json")
    assert memory_model_from_profiles([seed]).rows
