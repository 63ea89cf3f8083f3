"""The built-in spawner and the ring exchange: results, failures, timeouts (gloo, CPU)."""

from __future__ import annotations

import time

import pytest

from ringplan_runtime import RankFailure, init_from_env, spawn
from runtime.helpers import (exit_on_last_rank, raise_on_rank_one_else_block, rank_and_args,
                             ring_exchange_roundtrip, sleep_forever)

PROMPT_FAILURE_S = 30.0  # start-up of the ranks included; the process group's own timeout is 300 s


def test_spawn_returns_results_in_rank_order():
    """Each rank's return value comes back, in rank order, with the args passed through."""
    results = spawn(rank_and_args, world_size=3, backend="gloo", args=("a", 2))
    assert results == [(0, 3, ("a", 2)), (1, 3, ("a", 2)), (2, 3, ("a", 2))]


def test_rank_raising_fails_promptly():
    """A rank that raises makes spawn raise RankFailure(rank=1) well before any timeout; no hang."""
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn(raise_on_rank_one_else_block, world_size=2, backend="gloo", timeout_s=300)
    assert info.value.rank == 1
    assert "injected failure on rank 1" in info.value.traceback_text
    assert time.monotonic() - start < PROMPT_FAILURE_S


def test_rank_dying_fails_promptly():
    """A rank that exits without a Python exception is reported as failed, with its exit code."""
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn(exit_on_last_rank, world_size=2, backend="gloo", timeout_s=300)
    assert info.value.rank == 1
    assert "code 3" in info.value.traceback_text
    assert time.monotonic() - start < PROMPT_FAILURE_S


def test_hung_ranks_time_out():
    """Ranks that never return are terminated and TimeoutError is raised after timeout_s."""
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        spawn(sleep_forever, world_size=2, backend="gloo", timeout_s=4)
    assert time.monotonic() - start < PROMPT_FAILURE_S


def test_ring_exchange_visits_every_rank():
    """RingComm passes blocks one hop per step: after P-1 steps each rank has seen every rank, in ring order."""
    results = spawn(ring_exchange_roundtrip, world_size=3, backend="gloo")
    for rank, seen in enumerate(results):
        assert seen == [float((rank - step) % 3) for step in range(3)]


@pytest.mark.parametrize("bad", [dict(world_size=0), dict(world_size=2, backend="mpi")])
def test_spawn_rejects_bad_arguments(bad):
    """Bad world sizes or backends raise ValueError before any process starts."""
    with pytest.raises(ValueError):
        spawn(rank_and_args, **{"backend": "gloo", **bad})


def test_init_from_env_explains_torchrun(monkeypatch):
    """Without torchrun's variables, init_from_env says how to launch instead of hanging."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_from_env()
