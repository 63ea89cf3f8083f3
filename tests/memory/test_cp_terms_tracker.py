"""All-gather, Ulysses and hybrid byte terms (``ringplan.memory.cp_terms``): by hand, reductions, and
against the runtime's live-tensor tracker on CPU (issue 14).

The tracker test spawns one gloo group per world size W = 2 and 4 and runs every scheme that fits
W (all-gather and Ulysses over the whole group, hybrid U 2 × R 2 at W = 4) on dense and causal
(contiguous and zigzag) attention, GQA and MQA (K/V heads replicated for Ulysses), batch 1 and 2,
fp32 and bf16, forward-only and training, measured as ``ringplan_runtime.measure`` measures the ring
(``cp_tracker_helpers``). ``sum(memory_terms)`` must match the peak (the largest rank's) within
``TRACKER_REL_TOL`` (1%, issue 4's target for the ring). gloo sometimes keeps a collective's send
buffer alive a moment after the call returns, so each rank's peak is the smallest of ``REPEATS`` runs.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from ringplan.memory.attention_terms import TERM_NAMES
from ringplan.memory.cp_terms import ALL_TERM_NAMES, CP_TERM_NAMES, kv_replication, memory_terms
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload, check_layout_fits

TRACKER_REL_TOL = 0.01
TOKENS_PER_RANK, HEADS, HEAD_DIM = 64, 4, 32
SPAWN_TIMEOUT_S = 300.0
REPEATS = 3  # the smallest of three runs per rank (cp_tracker_helpers.run_peaks: gloo may hold a send buffer)

#: name → (KV heads, batch, causal, layout, dtype)
CASES = {
    "dense_gqa": (2, 1, False, "contiguous", "fp32"),
    "causal_zigzag_gqa": (2, 1, True, "zigzag", "fp32"),
    "dense_mqa": (1, 1, False, "contiguous", "fp32"),
    "causal_contiguous_mqa": (1, 1, True, "contiguous", "fp32"),
    "causal_zigzag_gqa_batch2": (2, 2, True, "zigzag", "fp32"),
    "causal_zigzag_gqa_bf16": (2, 1, True, "zigzag", "bf16"),
}


def planned(scheme: str, ulysses: int, name: str, world: int, training: bool) -> tuple[Workload, RingLayout]:
    kv_heads, batch, causal, layout, dtype = CASES[name]
    shape = AttentionShape(n_heads=HEADS, n_kv_heads=kv_heads, head_dim=HEAD_DIM, batch=batch, dtype=dtype)
    workload = Workload(seq_len_tokens=TOKENS_PER_RANK * world, shape=shape, pattern=AttentionPattern(causal=causal),
                        training=training)
    return workload, RingLayout(ring_size=world, layout=layout, cp_scheme=scheme, ulysses_degree=ulysses or None)


def runs_for(world: int) -> list[tuple[str, int]]:
    """(scheme, Ulysses degree of the hybrid (0: not hybrid)) run at ``world``."""
    return [("allgather", 0), ("ulysses", 0)] + ([("hybrid", 2)] if world == 4 else [])


@functools.cache
def tracked(world: int) -> dict:
    """The peak of every (scheme, U, case, training) at ``world`` ranks (one spawn)."""
    from ringplan_runtime import spawn
    from memory.cp_tracker_helpers import run_peaks
    from runtime.helpers import Case

    runs = []
    for scheme, u in runs_for(world):
        for name, (kv_heads, batch, causal, layout, dtype) in CASES.items():
            case = Case(name=name, seq_len_tokens=TOKENS_PER_RANK * world, heads=HEADS, kv_heads=kv_heads,
                        head_dim=HEAD_DIM, batch=batch, causal=causal, layout=layout, extra={"dtype": dtype})
            runs += [(scheme, u, replace(case, seed=3), training) for training in (False, True)]
    per_rank = spawn(run_peaks, world_size=world, backend="gloo", timeout_s=SPAWN_TIMEOUT_S,
                     args=(runs, False, REPEATS))
    # All-gather and hybrid ranks hold different blocks (causal): the largest rank. Ulysses ranks hold the same
    # tensors (every member S tokens × H/U heads): the smallest rank, so a send buffer gloo kept a moment
    # longer on one rank in every repeat does not count.
    return {key: (min if key[0] == "ulysses" else max)(rank[key] for rank in per_rank) for key in per_rank[0]}


TRACKER_CASES = [(world, scheme, u, name, training) for world in (2, 4) for scheme, u in runs_for(world)
                 for name in CASES for training in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("world, scheme, u, name, training", TRACKER_CASES,
                         ids=lambda v: str(v) if not isinstance(v, bool) else ("training" if v else "forward"))
def test_terms_match_live_tensor_tracker(world, scheme, u, name, training):
    """Σ memory_terms equals the tracker's peak within 1% (CPU, gloo)."""
    pytest.importorskip("torch")
    measured = tracked(world)[(scheme, u, name, training)]
    predicted = sum(memory_terms(*planned(scheme, u, name, world, training)).values())
    error = (predicted - measured) / measured
    assert abs(error) <= TRACKER_REL_TOL, (f"{scheme} U={u} {name} W={world} {'training' if training else 'forward'}: "
                                           f"analytic {predicted:,.0f} B vs tracked {measured:,} B ({error:+.2%})")


# ----------------------------------------------------------------------------- by hand, reductions

SHAPE = AttentionShape(n_heads=4, n_kv_heads=2, head_dim=32, dtype="fp32")


def test_allgather_forward_by_hand():
    """Non-causal all-gather forward at P = 2, S = 256: inputs + 2·B·S·H_kv·D·e + out + LSE (the runtime
    author's breakdown: 395,264 tracked with grad on, less the caller's dout of 65,536)."""
    terms = memory_terms(Workload(seq_len_tokens=256, shape=SHAPE), RingLayout(ring_size=2, cp_scheme="allgather"))
    assert terms["gathered_kv_bytes"] == 2 * 256 * 2 * 32 * 4
    assert sum(terms.values()) == 65_536 + 65_536 + 131_072 + 65_536 + 2_048 == 395_264 - 65_536


def test_ulysses_forward_by_hand():
    """Ulysses forward at U = P = 2, S = 256: inputs + head shards + kernel output + the output
    all-to-all's send and receive buffers (each B·n·H·D·e) = 458,752 (the runtime author's 526,336
    with grad on, less dout 65,536 and the saved LSE 2,048)."""
    terms = memory_terms(Workload(seq_len_tokens=256, shape=SHAPE), RingLayout(ring_size=2, cp_scheme="ulysses"))
    assert terms["head_shard_bytes"] == 131_072 and terms["all_to_all_buffer_bytes"] == 2 * 65_536
    assert sum(terms.values()) == 526_336 - 65_536 - 2_048


def test_kv_replication_rule():
    """r = U / H_kv when H_kv divides U (DeepSpeed-Ulysses), 1 when U divides H_kv."""
    assert kv_replication(32, 8, 8) == 1 and kv_replication(32, 8, 16) == 2 and kv_replication(32, 1, 8) == 8
    assert kv_replication(12, 4, 6) == 3


@pytest.mark.parametrize("scheme", ["allgather", "ulysses"])
@pytest.mark.parametrize("training", [False, True])
def test_one_rank_is_the_ring(scheme, training):
    """At P = 1 every scheme is one local kernel: the ring's terms, keyed by ALL_TERM_NAMES."""
    workload = Workload(seq_len_tokens=512, shape=SHAPE, training=training)
    terms = memory_terms(workload, RingLayout(ring_size=1, cp_scheme=scheme))
    ring = memory_terms(workload, RingLayout(ring_size=1))
    assert tuple(terms) == ALL_TERM_NAMES and all(terms[name] == 0 for name in CP_TERM_NAMES)
    assert {name: terms[name] for name in TERM_NAMES} == ring


def test_ring_keys_unchanged():
    """The ring keeps exactly TERM_NAMES (golden JSON rows list them) and the ring-only module refuses
    the other schemes rather than answer for the ring."""
    from ringplan.memory import attention_terms

    workload = Workload(seq_len_tokens=512, shape=SHAPE)
    ring = RingLayout(ring_size=2)
    assert memory_terms(workload, ring) == attention_terms.memory_terms(workload, ring)
    assert tuple(memory_terms(workload, RingLayout(ring_size=2))) == TERM_NAMES
    with pytest.raises(ValueError, match="cp_terms.memory_terms"):
        attention_terms.memory_terms(workload, RingLayout(ring_size=2, cp_scheme="ulysses"))


@pytest.mark.parametrize("scheme, u", [("allgather", None), ("ulysses", None), ("hybrid", 2)])
def test_memory_grows_with_tokens(scheme, u):
    """Per-rank bytes never decrease with S at a fixed group size (what the max-tokens search needs)."""
    totals = [sum(memory_terms(Workload(seq_len_tokens=s, shape=SHAPE, training=True,
                                        pattern=AttentionPattern(causal=True)),
                               RingLayout(ring_size=4, layout="zigzag", cp_scheme=scheme, ulysses_degree=u)).values())
              for s in (64, 128, 1024, 4096)]
    assert totals == sorted(totals)


@pytest.mark.parametrize("layout_kwargs, workload_kwargs, message", [
    (dict(ring_size=8, cp_scheme="ulysses"), {}, "nearest valid degrees for 4 heads: [4]"),
    (dict(ring_size=6, cp_scheme="hybrid", ulysses_degree=3), {}, "nearest valid degrees for 4 heads: [2, 4]"),
    (dict(ring_size=2, cp_scheme="allgather"), dict(projections=True), "ring scheme only"),
    (dict(ring_size=2, cp_scheme="allgather", backend="math"), {}, "math backend"),
    (dict(ring_size=2, cp_scheme="ulysses"),
     dict(pattern=AttentionPattern(segment_lengths_tokens=(256,), dilation_rates=(2,))), "dilated"),
])
def test_scheme_refusals(layout_kwargs, workload_kwargs, message):
    """What the schemes cannot run raises ValueError naming the values (and valid Ulysses degrees)."""
    workload = Workload(seq_len_tokens=4608, shape=SHAPE, **workload_kwargs)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_layout_fits(workload, RingLayout(**layout_kwargs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ring_size=4, cp_scheme="hybrid"), "hybrid needs a Ulysses degree U > 1"),
    (dict(ring_size=4, cp_scheme="hybrid", ulysses_degree=4), r"R = P/U > 1.*\[8\]"),
    (dict(ring_size=6, cp_scheme="hybrid", ulysses_degree=4), r"U=4 to divide the group size P=6"),
    (dict(ring_size=4, cp_scheme="ulysses", ulysses_degree=2), "must equal the group size P=4"),
    (dict(ring_size=4, ulysses_degree=2), "not to ring"),
    (dict(ring_size=4, cp_scheme="tree"), "'tree' is not one of"),
])
def test_layout_refusals(kwargs, message):
    """RingLayout refuses a bad scheme / Ulysses degree with the offending values."""
    with pytest.raises(ValueError, match=message):
        RingLayout(**kwargs)


@pytest.mark.slow
def test_measure_path_runs_the_schemes():
    """``ringplan_runtime.measure`` (what profile/validate run) measures all-gather and Ulysses plans too;
    its tracked peak matches Σ memory_terms within 1% (all-gather; Ulysses: never below the terms, as gloo
    may hold one send buffer longer in a single run)."""
    pytest.importorskip("torch")
    from ringplan_runtime.measure import MeasureSettings
    from ringplan_runtime.points import SweepPoint, run_points

    points = [SweepPoint(workload=w, layout=lay) for scheme in ("allgather", "ulysses") for training in (False, True)
              for w, lay in [planned(scheme, 0, "causal_zigzag_gqa", 2, training)]]
    results = run_points(points, settings=MeasureSettings(warmup_steps=0, timed_steps=1), timeout_s=SPAWN_TIMEOUT_S)
    for point, result in zip(points, results):
        assert result.feasible, result.failure
        predicted = sum(memory_terms(point.workload, point.layout).values())
        error = (predicted - result.tracked_peak_bytes) / result.tracked_peak_bytes
        label = f"{point.layout.cp_scheme} training={point.workload.training}: {error:+.2%}"
        if point.layout.cp_scheme == "allgather":
            assert abs(error) <= TRACKER_REL_TOL, label
        else:
            assert error <= TRACKER_REL_TOL, label
