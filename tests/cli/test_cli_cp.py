"""``ringplan capacity --cp …``: answers for every context-parallel scheme, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ringplan.cli import main


def run(*args: str):
    return CliRunner().invoke(main, ["capacity", "--gpu", "h100", *args], catch_exceptions=False)


@pytest.mark.parametrize("scheme", [["--cp", "allgather"], ["--cp", "ulysses"],
                                    ["--cp", "hybrid", "--ulysses-degree", "4"]])
def test_every_scheme_answers(scheme):
    """`capacity --tokens 1M --cp …` answers with a minimum world size and names the scheme."""
    result = run("--tokens", "1M", *scheme)
    assert result.exit_code == 0, result.output
    assert "context parallel:" in result.output and "tokens need" in result.output


def test_json_lists_the_scheme_terms():
    """JSON carries the scheme and its terms (head shards, all-to-all buffers)."""
    result = run("--tokens", "4M", "--cp", "ulysses", "--train", "--format", "json")
    record = json.loads(result.output)
    assert record["query"]["cp_scheme"] == "ulysses"
    assert any(row["head_shard_bytes"] > 0 for row in record["rows"])


def test_step_time_for_a_scheme():
    """--step-time fills the step time of a non-ring scheme."""
    result = run("--tokens", "1M", "--world-size", "8", "--cp", "allgather", "--step-time", "--format", "json")
    assert json.loads(result.output)["rows"][0]["step_time_ms"] > 0


@pytest.mark.parametrize("args, message", [
    (["--cp", "hybrid"], "U > 1"),
    (["--cp", "hybrid", "--ulysses-degree", "3"], "nearest valid degrees for 32 heads: [2, 4]"),
    (["--cp", "ulysses", "--ulysses-degree", "4"], "--cp hybrid"),
    (["--cp", "ulysses", "--model", "llama-3-8b", "--tp", "3"], "nearest valid degrees: 2 or 4"),
    (["--cp", "allgather", "--model-form", "seed"], "analytic"),
    (["--cp", "ulysses", "--projections"], "ring scheme only"),
    (["--tokens", "3M", "--cp", "ulysses", "--world-size", "3"], "nearest valid degrees for 32 heads: [2, 4]"),
])
def test_bad_input_is_one_error_line(args, message):
    """Bad scheme input: exit 2 and one `Error:` line naming the problem."""
    result = run("--tokens", "1M", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
