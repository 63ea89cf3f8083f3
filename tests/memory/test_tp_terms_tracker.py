"""Tensor parallelism on CPU: Σ stack_terms (θ = 1) at T = 2 equals the live-tensor tracker's peak of the real
runtime (``ringplan_runtime.tensor_parallel``: DTensor TP + sequence parallelism, FSDP2 over the dp × cp ranks,
every CP scheme; gloo) within 1%, as ``tests/runtime/test_stack_measure_cpu.py`` checks T = 1.

Worlds: T = 2 alone (W = 2), T = 2 × CP = 2 (W = 4: ring, all-gather, Ulysses; FSDP2 over G = 2) and
T = 2 × hybrid U = 2 × R = 2 (W = 8), T = 4 > H_kv = 2 (W = 4: KV heads replicated, whole k/v weights on every
rank; a prefill whose peak is down's reduce-scatter); plus, for the whole model's scheme terms (issue 14 b), full-checkpointing
runs with a small vocabulary whose peak is (or is near) a block's attention backward: all-gather over
CP = 4 at T = 1, all-gather and Ulysses over CP = 2 at T = 2. Each world is one spawned gloo group measuring all its cases; the
largest peak over ranks is compared with the largest instant of ``stack_instants`` plus what only the CPU
runtime holds (``cpu_only_bytes``). The tracker counts DTensors by their local tensors.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ringplan.models import ModelSpec  # noqa: E402
from ringplan.stack import StackSettings, StackWorkload  # noqa: E402
from ringplan.workload import RingLayout  # noqa: E402
from ringplan_runtime import spawn  # noqa: E402
# Issue 14 (as issue 9 for T = 1): "the byte terms at T = 2 and T = 2 × CP = 2 vs the tracker peak within 1%";
# the CPU-only bytes and the tolerance are T = 1's.
from runtime.test_stack_measure_cpu import FAST, TRACKER_REL_TOL, analytic_cpu_peak  # noqa: E402

SPAWN_TIMEOUT_S = 600.0
TINY = {"name": "tiny", "n_layers": 2, "embed_dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "ffn_dim": 128, "ffn_type": "swiglu", "vocab_size": 256, "norm": "rmsnorm"}
TOKENS_PER_RANK = 256
SMALL_VOCAB, ATTENTION_PEAK = {"vocab_size": 64}, {"checkpointing": "full", "loss_chunk_tokens": 64}
#: name -> (TP degree T, ring size P, scheme, model overrides, settings overrides, training)
CASES = {
    "t2": (2, 1, "ring", {}, {}, True),
    "t2_selective": (2, 1, "ring", {}, {"checkpointing": "selective"}, True),
    "t2_full": (2, 1, "ring", {}, {"checkpointing": "full"}, True),
    "t2_loss_full": (2, 1, "ring", {}, {"loss": "full"}, True),
    "t2_loss_chunks": (2, 1, "ring", {}, {"loss_chunk_tokens": 64}, True),
    "t2_tied": (2, 1, "ring", {"tied_embeddings": True}, {}, True),
    "t2_prefill": (2, 1, "ring", {}, {}, False),
    "t2_cp2_ring": (2, 2, "ring", {}, {}, True),
    "t2_cp2_allgather": (2, 2, "allgather", {}, {}, True),
    "t2_cp2_ulysses": (2, 2, "ulysses", {}, {}, True),
    "t2_cp2_full": (2, 2, "ring", {}, {"checkpointing": "full"}, True),
    "t2_cp2_prefill": (2, 2, "ring", {}, {}, False),
    "t2_cp2_allgather_attention": (2, 2, "allgather", SMALL_VOCAB, ATTENTION_PEAK, True),
    "t2_cp2_ulysses_attention": (2, 2, "ulysses", SMALL_VOCAB, ATTENTION_PEAK, True),
    "t1_cp4_allgather_attention": (1, 4, "allgather", SMALL_VOCAB, ATTENTION_PEAK, True),
    "t2_hybrid_2x2": (2, 4, "hybrid", {}, {}, True),
    "t4_kv_replicated": (4, 1, "ring", {}, {}, True),
    "t4_kv_replicated_full": (4, 1, "ring", {}, {"checkpointing": "full"}, True),
    "t4_prefill": (4, 1, "ring", {}, {}, False),
}


def case_workload(name: str) -> StackWorkload:
    tp, ring, scheme, model, settings, training = CASES[name]
    layout = RingLayout(ring_size=ring, cp_scheme=scheme, ulysses_degree=2 if scheme == "hybrid" else None)
    return StackWorkload(model=ModelSpec(**{**TINY, **model}), seq_len_tokens=TOKENS_PER_RANK * ring,
                         world_size=tp * ring, tp_degree=tp, layout=layout, training=training,
                         settings=StackSettings(**settings))


def world_of(name: str) -> int:
    return case_workload(name).world_size


def _measure_cases(names: list[str]) -> list[dict]:
    from ringplan_runtime.stack_measure import measure_stack_rank

    torch.set_num_threads(1)
    out = []
    for name in names:
        result = measure_stack_rank(case_workload(name), settings=FAST)
        out.append({"tracked": result.measurement.tracked_peak_bytes, "feasible": result.measurement.feasible})
    return out


def _spawn_measure(names: list[str]) -> list[dict]:
    """The largest peak over the ranks of one spawned gloo world, per case."""
    per_rank = spawn(_measure_cases, world_size=world_of(names[0]), backend="gloo", args=(names,),
                     timeout_s=SPAWN_TIMEOUT_S)
    return [max((rank[i] for rank in per_rank), key=lambda r: r["tracked"] or 0) for i in range(len(names))]


@pytest.fixture(scope="module")
def tracked():
    """One spawned gloo world per world size measures every case of that size."""
    results = {}
    for world in sorted({world_of(name) for name in CASES}):
        names = [name for name in CASES if world_of(name) == world]
        results.update(zip(names, _spawn_measure(names)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp_terms_match_live_tensor_tracker(tracked, case):
    """Σ stack_terms at the largest instant equals the tracked peak of the real TP stack within 1%."""
    result = tracked[case]
    assert result["feasible"], f"{case} did not run"
    w = case_workload(case)
    predicted, instant = analytic_cpu_peak(w)
    error = (predicted - result["tracked"]) / result["tracked"]
    if abs(error) > TRACKER_REL_TOL:
        # gloo runs collectives on worker threads: on a loaded CPU one extra copy can still be alive at a peak
        # (as in the T = 1 test). Measure once more, alone; a formula that is wrong misses both times.
        result = _spawn_measure([case])[0]
        error = (predicted - result["tracked"]) / result["tracked"]
    assert abs(error) <= TRACKER_REL_TOL, (
        f"{case}: analytic {predicted:,.0f} B ({instant}) vs tracked {result['tracked']:,} B ({error:+.2%})")


def test_cases_cover_what_the_brief_asks():
    """T = 2 alone and T = 2 × CP > 1 with every scheme (hybrid over CP = 4) are measured, training and prefill,
    and one case peaks at a block's attention backward (the scheme's attention part decides it)."""
    tp_cp = [case_workload(name) for name in CASES if CASES[name][0] == 2 and CASES[name][1] > 1]
    assert {w.layout.cp_scheme for w in tp_cp} == {"ring", "allgather", "ulysses", "hybrid"}
    assert {w.training for w in tp_cp} == {True, False}
    assert analytic_cpu_peak(case_workload("t1_cp4_allgather_attention"))[1].endswith("_backward_attention")
