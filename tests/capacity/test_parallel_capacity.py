"""Tensor parallelism and the context-parallel schemes in the whole-model search (issue 14): the
(T, scheme) space, node placement, W = DP x CP x TP, and the answers `capacity --model` and `plan` give."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ringplan.capacity.parallelism import Parallelism, check_placement, parallelism_space, tp_degrees
from ringplan.capacity.candidates import settings_space
from ringplan.capacity.stack import StackQuery, max_tokens, min_world_size
from ringplan.cli import main
from ringplan.hardware import load_catalog
from ringplan.models import load_model_catalog
from ringplan.stack import StackSettings

MODELS = load_model_catalog()
H100 = load_catalog().gpu("h100")
LLAMA_70B, LLAMA_8B = MODELS.model("llama-3-70b"), MODELS.model("llama-3-8b")


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_parallelism_space_is_tp_inside_a_node_times_the_schemes():
    """llama-3-70b (64 heads, 8 KV heads, F 28,672) on 8-GPU nodes: T in 1, 2, 4, 8, times ring, all-gather
    and Ulysses, T = 1 ring first; given values are checked against the model."""
    assert tp_degrees(LLAMA_70B, 8) == (1, 2, 4, 8)
    space = parallelism_space(LLAMA_70B, 8)
    assert len(space) == 12 and space[0] == Parallelism()
    assert {p.cp_scheme for p in space} == {"ring", "allgather", "ulysses"}
    with pytest.raises(ValueError, match="nearest valid degrees: 2 or 4"):
        parallelism_space(LLAMA_70B, 8, tp=(3,))
    hybrid = parallelism_space(LLAMA_70B, 8, tp=(2,), schemes=("hybrid",), ulysses_degree=2)
    assert hybrid == (Parallelism(tp_degree=2, cp_scheme="hybrid", ulysses_degree=2),)


def test_placement_keeps_tp_and_ulysses_inside_a_node():
    """T = 16 spans two 8-GPU nodes: refused unless allowed; Ulysses over P needs P | H/T and T x P <= a node."""
    with pytest.raises(ValueError, match="exceeds one node of 8"):
        check_placement(Parallelism(tp_degree=16), ring_size=1, model=LLAMA_70B, gpus_per_node=8,
                        allow_cross_node=False)
    check_placement(Parallelism(tp_degree=16), ring_size=1, model=LLAMA_70B, gpus_per_node=8, allow_cross_node=True)
    with pytest.raises(ValueError, match="exceeds one node"):
        check_placement(Parallelism(tp_degree=4, cp_scheme="ulysses"), ring_size=4, model=LLAMA_70B,
                        gpus_per_node=8, allow_cross_node=False)
    with pytest.raises(ValueError, match="divide the 4 heads"):
        check_placement(Parallelism(tp_degree=8, cp_scheme="ulysses"), ring_size=16, model=LLAMA_8B,
                        gpus_per_node=8, allow_cross_node=True)


def test_world_size_is_dp_times_cp_times_tp():
    """A workload of the query on 16 GPUs with T = 4 has a ring of 4 (DP = 1); the sequence-parallel split
    of each rank's tokens over T must be even."""
    query = StackQuery(model=LLAMA_70B, gpu=H100, candidates=settings_space(training=True),
                       parallelisms=(Parallelism(tp_degree=4),))
    w = query.workload(131072, 16, query.candidates[0], query.parallelisms[0])
    assert (w.tp_degree, w.layout.ring_size, w.world_size) == (4, 4, 16)
    with pytest.raises(ValueError, match="does not divide"):
        query.workload(4 * 1001, 16, query.candidates[0], query.parallelisms[0])


def test_tensor_parallelism_lowers_the_fewest_gpus_and_raises_the_longest():
    """Searching T and the schemes never needs more GPUs, nor holds fewer tokens, than the ring alone
    (the ring alone is one of the candidates)."""
    space = settings_space(training=True)
    ring = StackQuery(model=LLAMA_70B, gpu=H100, candidates=space)
    every = StackQuery(model=LLAMA_70B, gpu=H100, candidates=space, parallelisms=parallelism_space(LLAMA_70B, 8))
    assert min_world_size(every, 131072).minimum.world_size <= min_world_size(ring, 131072).minimum.world_size
    ring_best, every_best = max_tokens(ring, 16).best, max_tokens(every, 16).best
    assert every_best.seq_len_tokens >= (ring_best.seq_len_tokens if ring_best else 0)


def test_capacity_70b_answers_with_a_tp_cp_dp_choice_and_why():
    """Issue 14's first question: `capacity --model llama-3-70b --gpu h100 --tokens 128K --train` names the
    tensor-parallel x context-parallel x data-parallel split it chose among several, and why (fewest GPUs,
    then fastest, with the runner-up); --tp pins T."""
    result = run("capacity", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "128K", "--train")
    assert result.exit_code == 0, result.output
    assert "x data-parallel" in result.output and "(chosen)" in result.output
    assert "why: the fewest GPUs that hold it; fastest of" in result.output and "; next split: " in result.output
    record = json.loads(run("capacity", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "128K", "--train",
                            "--format", "json").output)
    assert all(r["tp_degree"] * r["ring_size"] * r["data_parallel"] == r["world_size"] for r in record["rows"])
    pinned = run("capacity", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "128K", "--train", "--tp", "4")
    assert pinned.exit_code == 0 and "tensor parallel 4 x" in pinned.output, pinned.output


def test_plan_ranks_tp_cp_and_scheme_alternatives():
    """`plan --model llama-3-70b --gpu h100 --gpus 64 --tokens 1M` ranks plans of several T and schemes by
    step time, fastest first."""
    result = run("plan", "--model", "llama-3-70b", "--gpu", "h100", "--gpus", "64", "--tokens", "1M",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    splits = {(r["tp_degree"], r["cp_scheme"]) for r in rows}
    assert len({t for t, _ in splits}) >= 2 and len({s for _, s in splits}) >= 2
    times = [r["step_time_s"] for r in rows]
    assert times == sorted(times)


@pytest.mark.parametrize("args, message", [
    (["--tp", "3"], "nearest valid degrees: 2 or 4"),
    (["--tp", "16", "--gpus", "64"], "exceeds one node of 8"),
    (["--tp", "16", "--gpus", "64", "--cp", "hybrid"], "Ulysses degree"),
])
def test_bad_parallel_input_is_one_error_line(args, message):
    """Bad T or scheme input with --model: exit 2, one `Error:` line naming the problem."""
    result = run("capacity", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "1M", "--train", *args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert message in lines[0]


def test_tiles_and_parameter_offload_with_tp_are_not_planned():
    """The runtime refuses a tiled MLP or parameter offload at T > 1, so the planner does too (a named error,
    and the search never answers with one)."""
    from ringplan.stack import StackWorkload
    from ringplan.workload import RingLayout

    for settings in (StackSettings(mlp_tile_tokens=4096), StackSettings(offload_params=True)):
        with pytest.raises(ValueError, match="with tensor parallelism is not run"):
            StackWorkload(model=LLAMA_8B, seq_len_tokens=65536, world_size=2, layout=RingLayout(ring_size=1),
                          tp_degree=2, settings=settings)
    query = StackQuery(model=LLAMA_8B, gpu=H100, candidates=settings_space(training=True, mlp_tiles=(None, 4096)),
                       parallelisms=parallelism_space(LLAMA_8B, 8))
    best = max_tokens(query, 8).best
    assert best.tp_degree == 1 or not (best.settings.mlp_tile_tokens or best.settings.offload_params)


def test_one_cp_rank_plans_every_scheme_once_as_the_ring():
    """With P = 1 every scheme is the ring's single kernel: searched once (as the ring); pinned, it still answers."""
    query = StackQuery(model=LLAMA_8B, gpu=H100, candidates=(StackSettings(checkpointing="full"),),
                       parallelisms=parallelism_space(LLAMA_8B, 8))
    with pytest.raises(ValueError, match="planned once, as the ring"):
        query.workload(65536, 2, query.candidates[0], Parallelism(tp_degree=2, cp_scheme="ulysses"))
    pinned = StackQuery(model=LLAMA_8B, gpu=H100, candidates=(StackSettings(checkpointing="full"),),
                        parallelisms=(Parallelism(cp_scheme="ulysses"),))
    assert pinned.workload(65536, 1, pinned.candidates[0], pinned.parallelisms[0]).layout.ring_size == 1
