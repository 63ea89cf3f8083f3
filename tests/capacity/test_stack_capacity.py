"""Whole-model capacity search checked against brute force on small grids: the fewest GPUs, the
most tokens, the settings chosen, the ranking, and the residual bound in feasibility."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringplan.hardware import GpuSpec, load_catalog
from ringplan.memory.attention_model import MemoryModel
from ringplan.models import ModelSpec
from ringplan.stack import StackSettings
from ringplan.capacity.search import largest_within
from ringplan.capacity.candidates import preference_key, settings_space
from ringplan.capacity.stack import (StackQuery, candidate_rows, max_tokens, memory_row, min_world_size, plan,
                                     token_unit, valid_world_sizes)
from ringplan.memory.stack_model import StackMemoryModel

MIB = 2**20
UNFITTED = StackMemoryModel(attention=MemoryModel())  # terms + catalog overhead + prior: deterministic
TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                 ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
TRAIN_SPACE = settings_space(training=True)


def tiny_gpu(usable_bytes: int) -> GpuSpec:
    """A made-up GPU small enough that brute force over every length is cheap (no runtime overhead)."""
    return GpuSpec(name="tiny", driver_name="Tiny GPU", usable_memory_bytes=usable_bytes,
                   peak_flops_per_s={"bf16": 1e12}, hbm_bandwidth_bytes_per_s=1e12, intra_node_link="nvlink-4",
                   inter_node_link="infiniband-ndr-400", gpus_per_node=8, runtime_overhead_bytes=0)


def query_for(usable, *, training=True, layout="contiguous", max_world_size=16, **kw) -> StackQuery:
    return StackQuery(model=TINY, gpu=tiny_gpu(usable), training=training, layout=layout,
                      max_world_size=max_world_size, memory=UNFITTED, **kw)


def valid_workload(query, seq, world, settings):
    """The candidate's workload, or None where it is not a valid run (e.g. its MLP tile does not divide n)."""
    try:
        return query.workload(seq, world, settings)
    except ValueError:
        return None


def any_fits(query, seq, world) -> bool:
    """Brute force: some candidate (every one, no dedupe) is a valid run there and fits."""
    for s in query.candidates:
        try:
            w = query.workload(seq, world, s)
        except ValueError:
            continue
        if memory_row(query, w).feasible:
            return True
    return False


def test_settings_space():
    """Training: 4 shardings x (none, selective, full, full + offload) x 2 losses, and the 2 FSDP2
    shardings (zero3, none) again with parameters + optimizer states offloaded (+16), less recompute
    first; forward: only the loss varies (a shard group means nothing there); fixed fields stay."""
    assert len(TRAIN_SPACE) == 48 and len(set(TRAIN_SPACE)) == 48
    assert [preference_key(s) for s in TRAIN_SPACE] == sorted(preference_key(s) for s in TRAIN_SPACE)
    assert TRAIN_SPACE[0] == StackSettings(sharding="none", checkpointing="none", loss="full")
    assert all(s.checkpointing == "full" for s in TRAIN_SPACE if s.offload_checkpoints)
    forward = settings_space(training=False)
    assert {(s.sharding, s.checkpointing, s.offload_checkpoints) for s in forward} == {("none", "none", False)}
    assert len(forward) == 2
    pinned = settings_space(training=True, base=StackSettings(sharding="zero2", loss="chunked"),
                            fixed={"sharding", "loss"})
    assert {(s.sharding, s.loss) for s in pinned} == {("zero2", "chunked")} and len(pinned) == 4
    grouped_forward = settings_space(training=False, base=StackSettings(shard_group_size=2), fixed={"shard_group_size"})
    assert {(s.sharding, s.shard_group_size) for s in grouped_forward} == {("zero3", 2)} and len(grouped_forward) == 2
    ungrouped = settings_space(training=False, base=StackSettings(shard_group_size=2))
    assert {s.shard_group_size for s in ungrouped} == {None}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 24), st.integers(2 * MIB, 24 * MIB), st.sampled_from(["contiguous", "zigzag"]),
       st.booleans())
def test_min_world_size_matches_brute_force(m, usable, layout, training):
    """The answer fits, no smaller valid W has any setting that fits (one fewer GPU does not), and
    without a time model the setting chosen is the first feasible one in preference order."""
    query = query_for(usable, training=training, layout=layout, max_world_size=12)
    seq = m * 2 * 3 * 4 * 5 * 7
    result = min_world_size(query, seq)
    sizes = valid_world_sizes(query, seq)
    feasible = [w for w in sizes if any_fits(query, seq, w)]
    assert (result.minimum.world_size if result.minimum else None) == (feasible[0] if feasible else None)
    if result.minimum:
        assert result.minimum.feasible and result.minimum.seq_len_tokens == seq
        valid = [w for w in (valid_workload(query, seq, result.minimum.world_size, s) for s in query.candidates) if w]
        first = min((w.settings for w in valid if memory_row(query, w).feasible), key=preference_key)
        assert preference_key(result.minimum.settings) == preference_key(first)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1 * MIB, 12 * MIB), st.sampled_from(["contiguous", "zigzag"]),
       st.booleans(), st.randoms(use_true_random=False))
def test_max_tokens_matches_brute_force(world, usable, layout, training, rng):
    """The answer fits, no setting fits the next valid length (nor the one after), and shorter
    valid lengths fit (every one up to 64 units, else a sample and the last two). Candidates with an
    MLP tile run on a coarser unit (a tile divides n); the untiled ones' unit is the finest."""
    query = query_for(usable, training=training, layout=layout)
    result = max_tokens(query, world)
    unit = min(token_unit(query, world, s) for s in query.candidates)
    assert all(token_unit(query, world, s) % unit == 0 for s in query.candidates)
    best = result.best.seq_len_tokens // unit if result.best else 0
    if result.best:
        assert result.best.feasible and result.best.world_size == world and result.best.seq_len_tokens % unit == 0
        chosen_unit = token_unit(query, world, result.best.settings)
        assert result.next_infeasible.seq_len_tokens == best * unit + chosen_unit
        assert not result.next_infeasible.feasible
    assert not any_fits(query, (best + 1) * unit, world) and not any_fits(query, (best + 2) * unit, world)
    # shorter lengths on the chosen setting's unit fit (between them a tiled answer's tile does not divide n)
    step = token_unit(query, world, result.best.settings) // unit if result.best else 1
    top = best // step
    checked = range(1, top + 1) if top <= 64 else (*rng.sample(range(1, top), 6), top - 1, top)
    assert all(any_fits(query, m * step * unit, world) for m in checked if m >= 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 3), st.booleans())
def test_largest_within_matches_a_scan(answer, shape, known):
    """The search returns the last m whose non-decreasing value fits, for linear, convex, concave
    and step-shaped curves, starting from nothing known or from a known feasible m."""
    curves = [lambda m: 3.0 * m, lambda m: m * m / 40.0, lambda m: 60.0 * m ** 0.5, lambda m: float(m // 7 * 7)]
    curve = curves[shape]
    budget = curve(answer) + 1e-9 * (1 + curve(answer))
    expected = max(m for m in range(0, answer + 50) if curve(m) <= budget)
    calls = []

    def value(m):
        calls.append(m)
        return curve(m)

    lo = max(expected // 2, 1) if known and expected else 0
    assert largest_within(value, budget, lo=lo) == expected
    assert len(calls) <= 4 * (expected + 2).bit_length() + 4
    with pytest.raises(ValueError, match="no memory limit"):
        largest_within(lambda m: 0.0, 1.0, limit=100)


def test_feasibility_includes_the_residual_bound():
    """A plan whose point prediction fits but whose prediction + residual bound does not is
    infeasible: capacity is never over-predicted by the fits' worst residual."""
    probe = query_for(64 * MIB)
    w = probe.workload(4096, 2, TRAIN_SPACE[-1])
    p = UNFITTED.predict(w, probe.gpu)
    assert p.residual_bound_bytes > 0
    usable = int((p.total_bytes + p.residual_bound_bytes / 2) / (1 - probe.safety_margin))
    row = memory_row(query_for(usable), w)
    assert row.prediction.total_bytes <= row.budget_bytes and not row.feasible and row.headroom_bytes < 0


def test_step_time_hook_ranks_the_feasible_settings():
    """With a time model the fastest feasible setting is chosen and a plan lists the feasible
    settings by step time (here zero3 is made fastest, against the preference order; on one GPU
    every sharding is the same run, listed once)."""
    speed = {"zero3": 1.0, "zero2": 2.0, "zero1": 3.0, "none": 4.0}

    def hook(w, gpu):
        return speed[w.settings.sharding] + 0.1 * preference_key(w.settings)[0]

    query = query_for(64 * MIB, step_time=hook)
    result = plan(query, 4096, 4)
    times = [r.step_time_s for r in result.feasible]
    assert times == sorted(times) and result.feasible[0].settings.sharding == "zero3"
    answer = min_world_size(query, 4096)
    assert answer.minimum == answer.choices[0]
    assert [r.step_time_s for r in answer.choices] == sorted(r.step_time_s for r in answer.choices)


def test_identical_candidates_count_once():
    """On one GPU shardings coincide (a group of one shards nothing): each prediction is listed
    once, as the most preferred candidate that gives it."""
    query = query_for(64 * MIB)
    rows, rejected = candidate_rows(query, 4096, 1)

    def key(prediction):
        return tuple(sorted(prediction.terms_bytes.items()))

    kept = {key(r.prediction): r.settings for r in rows}
    assert len(kept) == len(rows) < len(TRAIN_SPACE) and not rejected
    for candidate in TRAIN_SPACE:
        chosen = kept[key(UNFITTED.predict(query.workload(4096, 1, candidate), query.gpu))]
        assert preference_key(chosen) <= preference_key(candidate)


def test_plan_reports_invalid_candidates():
    """A shard group larger than W makes the candidates that use it invalid runs (listed with the
    reason); when every candidate is invalid the query is bad input (ValueError)."""
    grouped = tuple(StackSettings(sharding=s, shard_group_size=4, checkpointing="full") for s in ("zero1", "zero3"))
    query = query_for(64 * MIB, candidates=grouped + (StackSettings(sharding="none", checkpointing="full"),))
    result = plan(query, 4096, 2)
    assert len(result.rejected) == 2 and "larger than the world size" in result.rejected[0].reason
    with pytest.raises(ValueError, match="larger than the world size"):
        plan(query_for(64 * MIB, candidates=grouped), 4096, 2)
    assert plan(query_for(64 * MIB, candidates=grouped), 4096, 4).feasible


def test_fixed_ring_varies_data_parallel():
    """With the ring size fixed the search adds data-parallel replicas (W = P x DP); a W that P
    does not divide is refused."""
    query = query_for(64 * MIB, ring_size=2, data_parallel=None)
    assert valid_world_sizes(query, 4096)[:3] == [2, 4, 6]
    assert all(r.ring_size == 2 for r in min_world_size(query, 4096).rows)
    with pytest.raises(ValueError, match="cannot be split"):
        query.ring_for(5)


def test_layout_that_does_not_split_is_bad_input():
    """S that no ring splits (odd S, zigzag) raises the layout's own message."""
    with pytest.raises(ValueError, match="does not split"):
        min_world_size(query_for(64 * MIB, layout="zigzag"), 4097)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"safety_margin": 1.0}, "safety margin"), ({"max_world_size": 0}, "max world size"),
    ({"ring_size": 0}, "ring size"), ({"ring_size": None, "data_parallel": None}, "fix the ring size"),
    ({"layout": "spiral"}, "layout")])
def test_query_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        query_for(64 * MIB, **kwargs)


def test_real_model_answer():
    """Llama-3-8B, 1Mi tokens of training on H100s: some W fits, and the table's row at the answer
    is the answer (the committed fits, no time model)."""
    from ringplan.models import load_model_catalog

    query = StackQuery(model=load_model_catalog().model("llama-3-8b"), gpu=load_catalog().gpu("h100"))
    result = min_world_size(query, 2**20)
    assert result.minimum is not None and result.minimum in result.rows
    assert result.minimum.tokens_per_rank * result.minimum.ring_size == 2**20
