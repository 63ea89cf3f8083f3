"""Every recorded planner answer is unchanged (tests/golden/queries.py lists them and rewrites them)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import queries  # noqa: E402

RECORDED = json.loads(queries.ANSWERS.read_text())


def test_golden_set_is_large():
    """The golden set covers at least 200 CLI queries and both accuracy reports."""
    assert sum(1 for key in RECORDED if key.split()[0] in {"capacity", "plan", "simulate", "overlap", "fit"}) >= 200
    assert all(any(key.startswith(script) for key in RECORDED) for script in queries.REPORTS)


@pytest.mark.parametrize("query", queries.all_queries())
def test_cli_answer_unchanged(query):
    """The query's exit code and output are byte-identical to the recorded answer."""
    assert queries.run_query(query) == RECORDED[query]


@pytest.mark.parametrize("script", queries.REPORTS)
def test_report_unchanged(script):
    """The accuracy report writes byte-identical tables."""
    outputs = queries.report_outputs(script)
    assert outputs == {key: value for key, value in RECORDED.items() if key.startswith(script)}
