"""``--offload-params`` and ``--host-memory`` on the whole-model commands: bad input is one ``Error:`` line and
exit 2; a plan over the node's host memory is infeasible and the answer says why; JSON rows carry host memory."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ringplan.cli import main

BASE = ["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "64K", "--train"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_bad_offload_input_is_one_error_line():
    """ZeRO-1/2, a forward pass, a non-positive host memory, or no model: exit 2, one ``Error:`` line."""
    cases = {("--offload-params", "--sharding", "zero1"): "sharding zero3 or none",
             ("--offload-params", "--forward"): "needs training",
             ("--offload-params", "--host-memory", "0"): "--host-memory"}
    for extra, message in cases.items():
        result = run(*BASE[:-1], *extra)
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (extra, result.output)
    result = run("capacity", "--gpu", "h100", "--tokens", "64K", "--offload-params")
    assert result.exit_code == 2 and "--model" in result.output


def test_host_memory_over_the_node_is_infeasible():
    """8 GPUs with 100 GB of host RAM per node cannot hold the offloaded states (20·Ψ_G per GPU): exit 1, the
    row says it needs more pinned host memory; the default (DGX H100, 2 TB) fits."""
    result = run(*BASE, "--gpus", "8", "--offload-params", "--host-memory", "100GB", "--format", "json")
    assert result.exit_code == 1
    row = json.loads(result.output)["rows"][0]
    assert not row["feasible"] and "of host memory per node" in row["why"]
    assert row["host_memory_bytes_per_node"] == 8 * row["host_memory_bytes_per_gpu"] > 100 * 10**9
    text = run(*BASE, "--gpus", "8", "--offload-params", "--host-memory", "100GB").output
    assert "over the node's host RAM" in text and "short by" not in text  # the GPU memory itself fits
    fits = run(*BASE, "--gpus", "8", "--offload-params", "--format", "json")
    assert fits.exit_code == 0
    best = json.loads(fits.output)["rows"][0]
    assert best["offload_params"] and best["host_memory_budget_bytes_per_node"] == 2 * 10**12


def test_mlp_tile_is_a_given_setting():
    """``--mlp-tile`` reaches the plan as the tiled MLP (JSON settings), lets one H100 hold a longer
    sequence than without, and a tile that does not divide the tokens per GPU is bad input."""
    import json

    from click.testing import CliRunner

    from ringplan.cli import main

    base = ["capacity", "--model", "llama-3-8b", "--layers", "4", "--gpu", "h100", "--gpus", "1", "--train",
            "--sharding", "zero3", "--checkpointing", "none", "--format", "json"]
    plain = json.loads(CliRunner().invoke(main, base).output)
    tiled = json.loads(CliRunner().invoke(main, base + ["--mlp-tile", "1024"]).output)
    assert tiled["answer"]["max_tokens"] > plain["answer"]["max_tokens"]
    bad = CliRunner().invoke(main, base[:-2] + ["--tokens", "3000", "--mlp-tile", "1024"])
    assert bad.exit_code == 2 and bad.output.count("Error:") == 1 and "tile" in bad.output
