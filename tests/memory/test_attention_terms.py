"""The attention layer's byte terms (``ringplan.memory.attention_terms``): hand-computed examples,
the single-device reduction, and invariants in tokens and ring size."""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ringplan.hardware import load_catalog
from ringplan.memory.attention_model import default_memory_model
from ringplan.memory.attention_terms import TERM_NAMES, branches, memory_terms, term_inputs
from ringplan.workload import DTYPE_BYTES, AttentionShape, RingLayout, Workload
from tests.strategies import planned, workload_templates

FLOAT_SLACK = 1e-9                     # relative slack for comparisons of sums computed differently
CATALOG = load_catalog()


def total(workload, layout) -> float:
    return sum(memory_terms(workload, layout).values())


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
