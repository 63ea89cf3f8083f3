"""Offload in the whole-model capacity search: given-only (never a searched field), the host memory of
every row, and host memory per node as a second budget (an offload plan over it is infeasible)."""

from __future__ import annotations

from dataclasses import replace

from ringplan.capacity.stack import SEARCHED_FIELDS, StackQuery, max_tokens, memory_row, settings_space
from ringplan.cli.stack_output import stack_row_record
from ringplan.hardware import load_catalog
from ringplan.memory.host_memory import host_memory_bytes_per_gpu
from ringplan.models import load_model_catalog
from ringplan.stack import StackSettings

LLAMA = load_model_catalog().model("llama-3-8b")
H100 = load_catalog().gpu("h100")


def query(**kw) -> StackQuery:
    candidates = settings_space(training=True, base=StackSettings(offload_params=True, loss="chunked"),
                                fixed=frozenset({"loss"}))
    return StackQuery(model=LLAMA, gpu=H100, candidates=candidates, **kw)


def test_offload_is_given_only():
    """The search never adds offload; given, every candidate keeps it and only FSDP2 shardings remain."""
    assert "offload_params" not in SEARCHED_FIELDS and "offload_optimizer" not in SEARCHED_FIELDS
    assert not any(s.offload_params for s in settings_space(training=True))
    given = query().candidates
    assert given and all(s.offload_params and s.sharding in ("zero3", "none") for s in given)


def test_rows_carry_host_memory_and_the_default_host_budget():
    """A row reports its pinned host memory per GPU and per node (8 GPUs of a DGX H100) and the node's 2 TB."""
    q = query()
    w = q.workload(65536, 8, q.candidates[0])
    row = memory_row(q, w)
    assert row.host_memory_bytes_per_gpu == host_memory_bytes_per_gpu(w) > 0
    assert row.host_memory_bytes_per_node == 8 * row.host_memory_bytes_per_gpu
    assert row.host_budget_bytes_per_node == 2 * 10**12
    record = stack_row_record(row)
    assert record["host_memory_bytes_per_node"] == round(row.host_memory_bytes_per_node)
    assert record["offload_params"] is True


def test_host_memory_too_small_makes_offload_infeasible():
    """With less host memory per node than a row needs it is infeasible and says why; the longest length
    found respects the host budget; below the offloaded states alone (20·Ψ_G per GPU) no length fits."""
    q = query()
    w = q.workload(65536, 8, q.candidates[0])
    need = memory_row(q, w).host_memory_bytes_per_node
    small = replace(q, host_memory_bytes_per_node=need / 2)
    row = memory_row(small, w)
    assert memory_row(q, w).feasible and not row.feasible
    assert "pinned host memory per node" in stack_row_record(row)["why"]
    states_only = 8 * min(host_memory_bytes_per_gpu(q.workload(8, 8, c)) for c in q.candidates)  # 20·Ψ_G, zero3
    assert max_tokens(replace(q, host_memory_bytes_per_node=states_only * 0.9), 8).best is None
    best = max_tokens(small, 8).best
    assert best is not None and best.host_memory_bytes_per_node <= need / 2 < memory_row(q, w).host_memory_bytes_per_node
