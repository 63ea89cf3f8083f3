"""Offload and MLP tiles in the whole-model capacity search: searched (training), pinned when given, the
host memory of every row, and host memory per node as a second budget (an offload plan over it is infeasible)."""

from __future__ import annotations

from dataclasses import replace

from ringplan.capacity.candidates import SEARCHED_FIELDS, settings_space
from ringplan.capacity.stack import StackQuery, max_tokens, memory_row
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


def test_offload_and_tiles_are_searched_in_training_and_pinned_when_given():
    """Training searches parameter offload (FSDP2 shardings only: zero3, none) and the MLP tiles asked for;
    a forward pass never offloads parameters; given, every candidate keeps them; without a time model
    the plain settings come first (offload and tiles last: they cost time)."""
    assert "offload_params" in SEARCHED_FIELDS and "mlp_tile_tokens" in SEARCHED_FIELDS
    space = settings_space(training=True, mlp_tiles=(None, 4096))
    assert {s.sharding for s in space if s.offload_params} == {"zero3", "none"}
    assert {s.mlp_tile_tokens for s in space} == {None, 4096}
    assert not space[0].offload_params and space[0].mlp_tile_tokens is None and space[-1].offload_params
    assert not any(s.offload_params for s in settings_space(training=False, mlp_tiles=(None, 4096)))
    given = query().candidates
    assert given and all(s.offload_params and s.sharding in ("zero3", "none") for s in given)
    pinned = settings_space(training=True, base=StackSettings(mlp_tile_tokens=None), fixed={"mlp_tile_tokens"},
                            mlp_tiles=(None, 4096))
    assert {s.mlp_tile_tokens for s in pinned} == {None}


def test_one_h100_trains_llama_3_8b_longer_with_tiles_and_offload():
    """Issue 15's question: the longest llama-3-8b training sequence on one H100, searched over tiles and
    offload, is longer than without them, and the answer uses them (the same search with both pinned off
    is the baseline)."""
    from ringplan.capacity.candidates import model_mlp_tiles

    searched = StackQuery(model=LLAMA, gpu=H100, candidates=settings_space(training=True,
                                                                           mlp_tiles=model_mlp_tiles(LLAMA)))
    plain = StackQuery(model=LLAMA, gpu=H100, candidates=settings_space(training=True))
    best, base = max_tokens(searched, 1).best, max_tokens(plain, 1).best
    assert best.settings.offload_params and best.settings.mlp_tile_tokens == 4096
    assert base is None or best.seq_len_tokens > base.seq_len_tokens
    assert best.seq_len_tokens % 4096 == 0


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
    assert "of host memory per node" in stack_row_record(row)["why"]
    states_only = 8 * min(host_memory_bytes_per_gpu(q.workload(8, 8, c)) for c in q.candidates)  # 20·Ψ_G, zero3
    assert max_tokens(replace(q, host_memory_bytes_per_node=states_only * 0.9), 8).best is None
    best = max_tokens(small, 8).best
    assert best is not None and best.host_memory_bytes_per_node <= need / 2 < memory_row(q, w).host_memory_bytes_per_node
