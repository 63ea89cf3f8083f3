"""Pinned host memory this process holds: torch's CUDA caching host allocator, ``/proc/self/status``
and a census of the host tensors a training step keeps (parameters, gradients, optimizer states).

Three readings, each with the name of its source (``PinnedHostReading``):

1. torch's caching host allocator (``torch.cuda.host_memory_stats``): every ``Tensor.pin_memory()``,
   ``torch.empty(..., pin_memory=True)`` and pinned ``.to("cpu", non_blocking=True)`` destination
   goes through it (FSDP2 ``CPUOffloadPolicy(pin_memory=True)`` pins each master shard with
   ``pin_memory()`` and copies each reduced gradient with ``.to("cpu", non_blocking=True)``;
   ``save_on_cpu(pin_memory=True)`` allocates ``torch.empty(..., pin_memory=True)``). Blocks are
   rounded up to a power of two and freed ones are cached, so the allocator holds more than the
   tensors. Its statistics changed names across torch versions (``allocator_figures`` reads both):
   older torch: ``allocated_bytes`` = blocks in use, ``reserved_bytes`` = in use + cached;
   newer torch (2.13's docstring): ``active_bytes`` = blocks in use, ``allocated_bytes`` = in use + cached.
2. ``/proc/self/status``: ``VmLck`` (mlock'ed) and ``VmPin`` (pinned by the kernel's pin_user_pages
   accounting) — a cross-check only: cudaHostAlloc'ed memory is pinned by the NVIDIA driver, which
   need not account it in either (then both read 0); ``VmRSS`` / ``VmHWM`` are the process's
   resident memory, pinned or not.
3. ``host_tensor_census(model, optimizer)``: the bytes of the CPU storages behind the parameters,
   their gradients and each optimizer state, and how many of them are pinned (``is_pinned``).

Pure parsing (``parse_proc_status``, ``allocator_figures``) works without torch or CUDA; the readers
return None figures (with the reason as the source) where the instrument is absent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace

PROC_STATUS = "/proc/self/status"
#: ``/proc/self/status`` fields read, all in kB in the file (bytes here).
PROC_FIELDS = ("VmLck", "VmPin", "VmRSS", "VmHWM")
ALLOCATOR_SOURCE = "torch.cuda.host_memory_stats"


# ----------------------------------------------------------------------------- /proc/self/status


def parse_proc_status(text: str, names: Iterable[str] = PROC_FIELDS) -> dict[str, int]:
    """The ``names`` fields of a ``/proc/<pid>/status`` text, in bytes (the file says kB = 1024 bytes).
    Fields absent from the text (an older kernel has no VmPin) are absent from the result."""
    wanted, out = set(names), {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key.strip() not in wanted:
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        unit = parts[1].lower() if len(parts) > 1 else ""
        scale = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "b": 1, "": 1}.get(unit)
        if scale is not None:
            out[key.strip()] = int(parts[0]) * scale
    return out


def read_proc_status(path: str = PROC_STATUS) -> dict[str, int]:
    """``parse_proc_status`` of ``path``; {} where it cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_proc_status(handle.read())
    except OSError:
        return {}


# ----------------------------------------------------------------------------- torch's caching host allocator


def allocator_figures(stats: Mapping[str, object]) -> dict[str, object]:
    """In-use and held (in use + cached) bytes, current and peak, from a flat ``host_memory_stats``
    dict of either naming (module docstring), and the schema it used. None figures for an empty or
    unknown dict (CUDA not initialised: ``host_memory_stats`` returns {})."""
    def get(key: str) -> int | None:
        value = stats.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    if "active_bytes.current" in stats:  # newer: allocated = active + cached
        in_use, held, schema = "active_bytes", "allocated_bytes", "active_bytes (in use) / allocated_bytes (held)"
    elif "reserved_bytes.current" in stats:  # older: allocated = in use, reserved = in use + cached
        in_use, held, schema = "allocated_bytes", "reserved_bytes", "allocated_bytes (in use) / reserved_bytes (held)"
    else:
        return {"in_use_bytes": None, "in_use_peak_bytes": None, "held_bytes": None, "held_peak_bytes": None,
                "schema": "unknown keys: " + ", ".join(sorted(stats)[:8]) if stats else "no statistics"}
    return {"in_use_bytes": get(f"{in_use}.current"), "in_use_peak_bytes": get(f"{in_use}.peak"),
            "held_bytes": get(f"{held}.current"), "held_peak_bytes": get(f"{held}.peak"), "schema": schema}


def host_allocator_stats() -> tuple[dict[str, object], str]:
    """torch's flat host allocator statistics and their source, or ({}, why not)."""
    try:
        import torch
    except ImportError:
        return {}, "no torch"
    if not torch.cuda.is_available():
        return {}, "no CUDA"
    if not torch.cuda.is_initialized():
        return {}, "CUDA not initialised"
    reader = getattr(torch.cuda, "host_memory_stats", None)
    if reader is None:
        return {}, f"torch {torch.__version__} has no torch.cuda.host_memory_stats"
    return dict(reader()), ALLOCATOR_SOURCE


def reset_host_peak() -> bool:
    """Reset the host allocator's peak statistics (``reset_peak_host_memory_stats``); False when absent."""
    try:
        import torch
    except ImportError:
        return False
    reset = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
    if reset is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    reset()
    return True


# ----------------------------------------------------------------------------- one reading


@dataclass(frozen=True, slots=True, kw_only=True)
class PinnedHostReading:
    """Pinned host memory of this process now (peaks: since the last ``reset_host_peak``), in bytes;
    None where the source does not give the figure. ``allocator_source`` / ``proc_source`` name them."""

    allocator_in_use_bytes: int | None = None
    allocator_in_use_peak_bytes: int | None = None
    allocator_held_bytes: int | None = None
    allocator_held_peak_bytes: int | None = None
    allocator_source: str = ""
    proc_locked_bytes: int | None = None
    proc_pinned_bytes: int | None = None
    proc_rss_bytes: int | None = None
    proc_rss_peak_bytes: int | None = None
    proc_source: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def reading_from(stats: Mapping[str, object], stats_source: str, proc: Mapping[str, int],
                 proc_source: str = PROC_STATUS) -> PinnedHostReading:
    """A ``PinnedHostReading`` from raw host allocator statistics and parsed ``/proc`` fields (pure)."""
    figures = allocator_figures(stats)
    source = f"{stats_source} [{figures['schema']}]" if stats else stats_source
    present = [name for name in ("VmLck", "VmPin") if name in proc]
    return PinnedHostReading(
        allocator_in_use_bytes=figures["in_use_bytes"], allocator_in_use_peak_bytes=figures["in_use_peak_bytes"],
        allocator_held_bytes=figures["held_bytes"], allocator_held_peak_bytes=figures["held_peak_bytes"],
        allocator_source=source, proc_locked_bytes=proc.get("VmLck"), proc_pinned_bytes=proc.get("VmPin"),
        proc_rss_bytes=proc.get("VmRSS"), proc_rss_peak_bytes=proc.get("VmHWM"),
        proc_source=f"{proc_source} ({', '.join(present) or 'no VmLck/VmPin'})" if proc else f"{proc_source} unreadable")


def read_pinned_host(proc_path: str = PROC_STATUS) -> PinnedHostReading:
    """The pinned host memory this process holds now (module docstring)."""
    stats, source = host_allocator_stats()
    return reading_from(stats, source, read_proc_status(proc_path), proc_path)


def max_reading(a: PinnedHostReading, b: PinnedHostReading) -> PinnedHostReading:
    """Field-wise maximum of two readings (None ignored; sources from ``a``, else ``b``)."""
    values = {}
    for f in fields(PinnedHostReading):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name.endswith("_source"):
            values[f.name] = x or y
        else:
            values[f.name] = y if x is None else x if y is None else max(x, y)
    return replace(a, **values)


class PinnedSampler:
    """Reads ``reader()`` every ``interval_s`` on a daemon thread while inside ``with``; ``peak`` is the
    field-wise maximum of every reading (including one at entry and one at exit), ``samples`` their
    number. Catches what the allocator's peak statistics may approximate (they are per bucket in
    newer torch) and the peak of ``VmRSS`` / ``VmLck`` / ``VmPin``, which have no peak of their own."""

    def __init__(self, reader: Callable[[], PinnedHostReading] = read_pinned_host, interval_s: float = 0.05) -> None:
        self.reader, self.interval_s = reader, interval_s
        self.peak: PinnedHostReading | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> None:
        reading = self.reader()
        with self._lock:
            self.peak = reading if self.peak is None else max_reading(self.peak, reading)
            self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PinnedSampler:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ringplan-pinned-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


# ----------------------------------------------------------------------------- host tensors of a step


def _local(tensor):
    """The local tensor of a DTensor (FSDP2 shards), else the tensor."""
    return getattr(tensor, "_local_tensor", tensor)


def _storage_key_and_bytes(tensor) -> tuple[tuple[int, int], int] | None:
    """(a key identifying the storage, its bytes) of a CPU tensor; None for another device or no storage."""
    tensor = _local(tensor)
    if getattr(tensor, "device", None) is None or tensor.device.type != "cpu":
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (storage.data_ptr(), storage.nbytes()), storage.nbytes()


def power_of_two_at_least(n: int) -> int:
    """The block torch's caching host allocator asks CUDA for a request of ``n`` bytes (next power of two)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def census_of(groups: Mapping[str, Iterable[object]]) -> dict[str, dict[str, int]]:
    """For each named group of tensors: the bytes of their distinct CPU storages (a storage counted
    once over all groups, first group first), how many of those bytes are pinned, the pinned ones
    rounded up as the host allocator's blocks (``power_of_two_at_least``; a view of a larger pinned
    block, or a block shared by several tensors, is not seen as such), and the count."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, dict[str, int]] = {}
    for name, tensors in groups.items():
        total = pinned = rounded = count = 0
        for tensor in tensors:
            if tensor is None:
                continue
            found = _storage_key_and_bytes(tensor)
            if found is None or found[0] in seen:
                continue
            seen.add(found[0])
            total, count = total + found[1], count + 1
            if _local(tensor).is_pinned():
                pinned, rounded = pinned + found[1], rounded + power_of_two_at_least(found[1])
        out[name] = {"bytes": total, "pinned_bytes": pinned, "pinned_rounded_bytes": rounded, "tensors": count}
    return out


def host_tensor_census(model, optimizer=None) -> dict[str, dict[str, int]]:
    """``census_of`` the model's parameters (``params``), their ``.grad`` (``grads``) and every tensor
    optimizer state by its key (``exp_avg``, ``exp_avg_sq``, ``step``, … for AdamW), CPU storages only
    (an un-offloaded run's GPU tensors count 0)."""
    params = list(model.parameters())
    groups: dict[str, list] = {"params": params, "grads": [p.grad for p in params]}
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if hasattr(value, "untyped_storage") or hasattr(value, "_local_tensor"):
                    groups.setdefault(str(key), []).append(value)
    return census_of(groups)
