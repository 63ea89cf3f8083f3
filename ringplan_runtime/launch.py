"""Launching ranks: under torchrun (``init_from_env``) or with the built-in one-machine spawner (``spawn``).

torchrun, one node with 2 GPUs (NCCL; gloo on a CPU-only machine)::

    torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.check --tokens 16Ki --dtype bf16

several nodes (run on each node, with its own --node_rank)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m ringplan_runtime.check --tokens 1Mi --dtype bf16

Inside your own entry point: ``ctx = init_from_env()`` then use ``ring_attention(..., group=None)``.

``spawn(fn, world_size=K, backend=..., args=...)`` starts K processes ('spawn' context), each
with an initialised process group (a TCP store hosted by the parent, so no port race), runs
``fn(*args)`` on every rank (``dist.get_rank()`` tells which), and returns the ranks' results in
rank order. If a rank raises or dies, the others are terminated at once and ``RankFailure``
(rank, traceback text) is raised in the parent; past ``timeout_s`` every rank is terminated and
``TimeoutError`` is raised. The process group itself also times out after ``timeout_s``.

The spawner is one machine's: its store listens on 127.0.0.1 only (``loopback_listener``; the ranks
get ``MASTER_ADDR=127.0.0.1``), and gloo ranks use the loopback interface (``GLOO_SOCKET_IFNAME=lo``
on Linux, unless the environment names another). Ranks die with the parent: SIGKILL on its death (Linux
``prctl(PR_SET_PDEATHSIG)``) and a watchdog thread that polls the parent's pid (``die_with_parent``).
While the parent waits, SIGTERM is handled as SIGINT: ``KeyboardInterrupt`` is raised, every rank
is terminated, and the interrupt goes on to the caller. torchrun (``init_from_env``) keeps the
rendezvous settings its own command line gives.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue as queue_module
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOCALHOST = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"  # Linux's name for the loopback interface
POLL_S = 0.05
DEAD_RANK_GRACE_S = 1.0
JOIN_TIMEOUT_S = 10.0
PARENT_POLL_S = 0.5  # the watchdog's poll of the parent's pid (where prctl is missing, or raced)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RankFailure(RuntimeError):
    """A rank raised or died; ``rank`` and the rank's ``traceback_text`` tell which and why."""

    def __init__(self, rank: int, traceback_text: str) -> None:
        super().__init__(f"rank {rank} failed:\n{traceback_text}")
        self.rank = rank
        self.traceback_text = traceback_text


@dataclass(frozen=True, slots=True, kw_only=True)
class RankContext:
    """Where this process sits: global rank, world size, local rank, its device and the PG backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _init_group(backend: str, rank: int, world_size: int, local_rank: int, timeout_s: float,
                **init_kwargs) -> RankContext:
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        init_kwargs["device_id"] = device  # eager NCCL init: the first P2P batch need not involve every rank
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            **init_kwargs)
    return RankContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def init_from_env(*, backend: str | None = None, timeout_s: float = 600.0) -> RankContext:
    """Initialise the default process group from torchrun's environment (env://).

    NCCL on the LOCAL_RANK GPU when CUDA is present, gloo on CPU (or ``backend`` if given).
    Raises ``ValueError`` when the torchrun variables are missing.
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"environment variables {missing} are not set: launch with torchrun "
                         f"(e.g. torchrun --standalone --nproc_per_node=2 -m ringplan_runtime.check)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        return RankContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)
    return _init_group(backend, rank, world_size, local_rank, timeout_s, init_method="env://")


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when ``parent_pid`` (its parent) does, however the parent ends.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the kernel kills it when the parent thread exits);
    everywhere: a daemon thread polls ``os.getppid()`` every ``PARENT_POLL_S`` and exits the
    process once the parent is gone (re-parented), which also covers a parent that died before
    the prctl call.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="ringplan-parent-watchdog", daemon=True).start()


def loopback_listener() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a free port, for the spawner's store to adopt
    (``TCPStore(master_listen_fd=...)``: the store would otherwise listen on every interface)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOCALHOST, 0))
    listener.listen(128)
    return listener


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside: SIGTERM raises ``KeyboardInterrupt`` as SIGINT does (main thread only; elsewhere
    a no-op), so the caller's clean-up runs; the previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the clean-up (ranks die too)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker(fn, rank: int, world_size: int, backend: str, port: int, args: tuple, timeout_s: float,
            results, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR=LOCALHOST, MASTER_PORT=str(port))
    if backend == "gloo" and os.path.exists(f"/sys/class/net/{LOOPBACK_INTERFACE}"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)  # gloo's pairs listen on loopback too
    try:
        store = dist.TCPStore(LOCALHOST, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        _init_group(backend, rank, world_size, rank, timeout_s, store=store)
        dist.barrier()  # every rank connected before any rank's fn can finish and leave
        value = fn(*args)
        dist.barrier()  # nobody tears down while a peer may still talk to it
        results.put(("ok", rank, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 -- every failure must reach the parent
        results.put(("error", rank, traceback.format_exc()))
        return
    dist.destroy_process_group()


def _check_spawn_args(world_size: int, backend: str) -> None:
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(f"nccl with {world_size} ranks needs {world_size} GPUs, found {torch.cuda.device_count()}")


def _stop(processes, *, graceful: bool) -> None:
    """Terminate (then kill) every rank still running; ``graceful`` first lets them finish tearing down."""
    for process in processes:
        if graceful:
            process.join(JOIN_TIMEOUT_S)
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()


def _dead_without_result(processes, done: set[int]) -> int | None:
    for rank, process in enumerate(processes):
        if rank not in done and process.exitcode is not None:
            return rank
    return None


def _collect(processes, results, world_size: int, timeout_s: float) -> list:
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    dead_since: float | None = None
    while len(values) < world_size:
        try:
            kind, rank, payload = results.get(timeout=POLL_S)
        except queue_module.Empty:
            dead = _dead_without_result(processes, set(values))
            now = time.monotonic()
            if dead is not None:
                dead_since = dead_since or now
                if now - dead_since > DEAD_RANK_GRACE_S:  # its last message may still be in the pipe
                    raise RankFailure(dead, f"exited with code {processes[dead].exitcode} without a result")
            if now > deadline:
                raise TimeoutError(f"spawned ranks did not finish within {timeout_s:.0f} s "
                                   f"(finished: {sorted(values)})")
            continue
        if kind == "error":
            raise _root_cause(processes, set(values) | {rank}, rank, payload)
        values[rank] = pickle.loads(payload)
    return [values[rank] for rank in range(world_size)]


def _root_cause(processes, reported: set[int], rank: int, payload: str) -> RankFailure:
    """The failure to report: a rank that DIED (no message) outranks peers that raised because it died."""
    deadline = time.monotonic() + DEAD_RANK_GRACE_S
    while time.monotonic() < deadline:
        dead = _dead_without_result(processes, reported)
        if dead is not None and processes[dead].exitcode != 0:
            last_line = payload.strip().splitlines()[-1] if payload.strip() else ""
            return RankFailure(dead, f"exited with code {processes[dead].exitcode} without a result "
                                     f"(rank {rank} then failed: {last_line})")
        time.sleep(POLL_S)
    return RankFailure(rank, payload)


def spawn(fn, *, world_size: int, backend: str = "gloo", args: tuple = (), timeout_s: float = 300.0) -> list:
    """Run ``fn(*args)`` on ``world_size`` fresh processes with a process group; results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function); results travel pickled, so
    return CPU tensors or plain data. Raises ``RankFailure`` (the first rank that raised or died,
    others terminated) or ``TimeoutError`` (after ``timeout_s``); ``ValueError`` on bad arguments.
    """
    _check_spawn_args(world_size, backend)
    listener = loopback_listener()
    port = listener.getsockname()[1]
    store = dist.TCPStore(LOCALHOST, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.detach())  # the store owns the socket from here
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(fn, rank, world_size, backend, port, tuple(args),
                                                       timeout_s, results, os.getpid()), daemon=True)
                 for rank in range(world_size)]
    started: list = []
    with sigterm_as_interrupt():
        try:
            for process in processes:
                process.start()
                started.append(process)
            values = _collect(processes, results, world_size, timeout_s)
        except BaseException:
            _stop(started, graceful=False)
            raise
    _stop(processes, graceful=True)
    del store
    return values
