"""The built-in spawner on one machine: its store listens on the loopback interface only, and its
ranks never outlive a launcher that is killed (SIGKILL) or terminated (SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ringplan_runtime import spawn
from ringplan_runtime.launch import LOCALHOST
from runtime.helpers import store_listen_addresses

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
#: How long the ranks may live on once their launcher is gone (issue 18: "no rank alive 5 s later").
RANK_GRACE_S = 5.0
START_TIMEOUT_S = 60.0

LAUNCHER = textwrap.dedent("""
    import sys
    from ringplan_runtime import spawn
    from runtime.helpers import sleep_after_writing_pid

    spawn(sleep_after_writing_pid, world_size=2, backend="gloo", args=(sys.argv[1],), timeout_s=300)
""")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "X")
    return state not in ("Z", "X")


def _start_launcher(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A launcher process spawning 2 sleeping ranks; returns it and its ranks' pids once both run."""
    path = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    paths = [tmp_path / f"rank{rank}.pid" for rank in range(2)]
    while not all(path.exists() for path in paths):
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            raise AssertionError(f"ranks did not start: {launcher.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    return launcher, [int(path.read_text()) for path in paths]


def _ranks_alive_after_grace(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + RANK_GRACE_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    alive = [pid for pid in pids if _alive(pid)]
    for pid in alive:  # leave nothing behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_ranks_die_with_their_launcher(tmp_path, signum):
    """A launcher killed (SIGKILL: no clean-up runs) or terminated (SIGTERM: handled as SIGINT)
    while its ranks run leaves no rank alive RANK_GRACE_S later."""
    launcher, pids = _start_launcher(tmp_path)
    assert all(_alive(pid) for pid in pids)
    launcher.send_signal(signum)
    launcher.wait(timeout=30)
    assert _ranks_alive_after_grace(pids) == []
    if signum == signal.SIGTERM:
        assert "KeyboardInterrupt" in launcher.stderr.read().decode()  # reported, as Ctrl-C would be


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp")
def test_spawner_store_listens_on_loopback_only():
    """The spawner's TCP store (MASTER_PORT) listens on 127.0.0.1, not on every interface, the
    ranks rendezvous at MASTER_ADDR=127.0.0.1, and gloo's own listening sockets are on loopback."""
    for seen in spawn(store_listen_addresses, world_size=2, backend="gloo"):
        assert seen == {"master_addr": LOCALHOST, "listening": [LOCALHOST], "rank_listening": [LOCALHOST]}
