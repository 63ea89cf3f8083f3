"""Memory terms and fits: hand-computed examples, reductions, invariants, fit round trips, golden seed."""

import random
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ringplan.hardware import load_catalog
from ringplan.memory.attention_model import (PRIOR_RELATIVE_UNCERTAINTY, default_memory_model, fit_memory_model, fit_seed_form,
                                   predict_memory, row_inputs, runtime_overhead_measured, unfitted_model)
from ringplan.memory.attention_terms import TERM_NAMES, branches, memory_terms, term_inputs, terms_at
from ringplan.profiles.attention import Measurement, load_profile, measured_dir
from ringplan.workload import DTYPE_BYTES, AttentionShape, RingLayout, Workload
from tests.strategies import planned, workload_templates

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


# ----------------------------------------------------------------------------- hand examples and reductions


def test_dense_terms_hand_computed():
    """1M tokens, 4 ranks, 32×128 heads, bf16: n = 250,000; q 2.048 GB, K+V 4.096 GB, two received
    K/V pairs 8.192 GB, fp32 out+LSE accumulators 250,000·32·129·4 = 4.128 GB, five LSE-sized fp32
    merge temporaries 5·250,000·32·4 = 0.16 GB, block result 250,000·32·(128·2+4) = 2.08 GB; nothing else."""
    workload = Workload(seq_len_tokens=1_000_000, shape=AttentionShape(n_heads=32, head_dim=128))
    terms = memory_terms(workload, RingLayout(ring_size=4))
    expected = {"q_bytes": 2.048e9, "kv_bytes": 4.096e9, "kv_recv_bytes": 8.192e9,
                "accumulator_bytes": 4.128e9, "merge_temporaries_bytes": 0.16e9, "block_result_bytes": 2.08e9}
    assert {k: v for k, v in terms.items() if v} == pytest.approx(expected)
    assert set(terms) == set(TERM_NAMES)


def single_device_bytes(w: Workload, backend: str) -> float:
    """Single-GPU attention layer, written independently of memory_terms: inputs, output + LSE,
    the math backend's scores, projections, and in training the backward's tensors."""
    s, b, h, hkv, d, e, emb = (w.seq_len_tokens, w.shape.batch, w.shape.n_heads, w.shape.n_kv_heads,
                               w.shape.head_dim, DTYPE_BYTES[w.shape.dtype], w.shape.embed_dim)
    weights = ((emb + 1) * (h + 2 * hkv) * d + (h * d + 1) * emb) * e if w.projections else 0  # with biases
    inputs = b * s * (h + 2 * hkv) * d * e + (b * s * emb * e if w.projections else 0) + weights
    out, lse = b * s * h * d * e, b * h * s * 4
    math_backend = backend == "math"
    scores = b * h * s * s * 4 if math_backend else 0  # the math backend computes in fp32
    forward_scores = max(3 * scores - out, 2 * scores) if math_backend else 0
    expand = 2 * b * s * (h - hkv) * d * e if math_backend else 0
    forward = inputs + out + max(lse + forward_scores + expand, b * s * emb * e if w.projections else 0)
    if not w.training:
        return forward
    grads = b * s * (h + 2 * hkv) * d * e
    out_projection_grads = (h * d + 1) * emb * e if w.projections else 0  # formed before the attention backward
    dout_fp32 = b * s * h * d * 4 if math_backend and e < 4 else 0  # the math backward casts dO to fp32
    backward = inputs + out + lse + out + grads + 4 * scores + dout_fp32 + expand + out_projection_grads
    return max(forward, backward)


@given(workload_templates(dilated=False), st.integers(1, 64),
       st.sampled_from(["auto", "cudnn", "flash", "efficient", "math", "cpu"]))
def test_ring_size_one_is_the_single_device_formula(template, n, backend):
    """Reduction: with one rank there are no received buffers or accumulators; the peak equals the
    single-device layer's (checked against an independent formula)."""
    workload = template.with_seq_len(2 * n)
    layout = RingLayout(ring_size=1, backend=backend)
    assert total(workload, layout) == pytest.approx(single_device_bytes(workload, backend), rel=FLOAT_SLACK)


# ----------------------------------------------------------------------------- invariants


@given(planned(), st.integers(1, 3))
def test_memory_never_decreases_with_tokens(plan, doublings):
    """At a fixed ring, a longer sequence (2^k × the tokens) never needs less memory, under the pure
    analytic model and under the default (fitted) model — while every branch keeps its kind: a dilated
    segment that stops spanning ranks once it fits one rank sheds its ring buffers and merge
    temporaries, and the runtime's memory really drops there (live-tensor tracker)."""
    workload, layout = plan
    longer = workload.with_seq_len(workload.seq_len_tokens * 2**doublings)
    assume(local_branches(longer, layout) == local_branches(workload, layout))
    assert total(longer, layout) >= total(workload, layout) * (1 - FLOAT_SLACK)
    gpu = CATALOG.gpu("h100")
    model = default_memory_model()
    assert model.predict(longer, layout, gpu).total_bytes >= model.predict(workload, layout, gpu).total_bytes * (1 - FLOAT_SLACK)


def local_branches(workload, layout) -> tuple[bool, ...]:
    """Which attention branches run without a ring (a single rank, or a whole segment per rank)."""
    return tuple(b.group == 1 for b in branches(term_inputs(workload, layout)))


@given(workload_templates(), st.sampled_from(["contiguous", "zigzag"]), st.integers(1, 4),
       st.sampled_from(["auto", "math"]), st.sampled_from([512, 1024, 2048, 4096, 3 * 1024, 720720 * 1024]))
def test_memory_never_increases_with_ring_size(template, layout_name, m, backend, base):
    """At fixed S, per-rank memory does not grow as the ring grows (every ring size 1..16 over which
    S splits; short dilated sequences make segments span several ranks) — except where a branch
    first becomes a ring (1 → 2+ ranks of the whole sequence or of one segment), which adds
    received buffers and fp32 accumulators: those steps are skipped here, see the next test."""
    if template.pattern.dilated:
        layout_name = "contiguous"
    workload = template.with_seq_len(2 * base * m)
    previous = None
    for p in range(1, 17):
        layout = RingLayout(ring_size=p, layout=layout_name, backend=backend)
        try:
            current = (total(workload, layout), local_branches(workload, layout))
        except ValueError:
            continue
        if previous is not None and previous[1] == current[1]:
            assert current[0] <= previous[0] * (1 + FLOAT_SLACK), f"ring size {p}"
        previous = current


def test_training_can_need_more_memory_on_two_ranks_than_one():
    """Hand example of the exception: training, bf16, 8 heads × 64, S = 65,536. One GPU holds
    q,k,v,out (4·S·512·2) + LSE + grad_out + dq/dk/dv; two ranks add fp32 dQ and travelling fp32
    dK/dV accumulators (plus received K/V) that outweigh halving n: 20 vs 16 bytes per token·H·D."""
    workload = Workload(seq_len_tokens=65_536, shape=AttentionShape(n_heads=8, head_dim=64), training=True)
    one, two = total(workload, RingLayout(ring_size=1)), total(workload, RingLayout(ring_size=2))
    assert two > one
    assert total(workload, RingLayout(ring_size=4)) < one


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
