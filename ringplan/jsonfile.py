"""The one reader and the one writer of the project's JSON files (profiles, fits, catalogs, configs).

``read_json_file`` reads only a regular file of at most ``MAX_JSON_BYTES`` (``/dev/zero`` or a FIFO
given as ``--profile`` is an error, not a hang), decodes UTF-8 and refuses duplicate object keys
(``json`` would keep the last one silently), too-deep nesting and oversized integers — every
failure a ``ValueError`` that names the file.

``write_merged_json`` replaces a file atomically (a temp file beside it, ``fsync``, ``os.replace``)
under an exclusive ``fcntl.flock`` on ``<file>.lock`` beside it, so writers in any process — whatever
their ``$TMPDIR`` — serialise and can merge what is on disk. A symlinked file is written through
(its target is replaced, the link stays); a symlinked lock path is refused; the file keeps its
permission bits (a new file gets the umask's); temp files a killed writer left are removed by the
next writer. Standard library only: the catalog reader is on every CLI call's cold start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ringplan.units import MIB

#: Largest JSON file read: the biggest committed profile is under 100 kB; 64 MiB is far beyond any.
MAX_JSON_BYTES = 64 * MIB
#: Seconds a writer waits for another writer's lock before giving up.
LOCK_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.005


class NotJsonError(ValueError):
    """The text is not JSON at all (a syntax error), as opposed to JSON the reader refuses."""


class _DuplicateKey(Exception):
    """Raised inside ``json.loads`` by the pairs hook; ``read_json_file`` names the file."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def parse_json_text(text: str, source: str) -> Any:
    """``json.loads(text)`` refusing duplicate keys; every failure a ``ValueError`` naming ``source``
    (``NotJsonError`` for a syntax error)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as exc:
        raise ValueError(f"{source}: key {exc.key!r} appears twice in one JSON object "
                         "(which value was meant? remove one)") from None
    except json.JSONDecodeError as exc:
        raise NotJsonError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{source}: not readable JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"{source}: not readable JSON ({exc})") from None


def read_json_text(path: str | Path, what: str = "profile file") -> str:
    """The UTF-8 text of ``path``, a regular file of at most ``MAX_JSON_BYTES``; else ``ValueError``
    naming the file (``what`` says what it should have been)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror})") from None
    _check_regular(path, what, info)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        _check_regular(path, what, os.fstat(handle.fileno()))  # replaced between stat and open
        data = handle.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {what} is larger than the {MAX_JSON_BYTES // MIB} MiB limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                         f"{exc.start})") from None


def _check_regular(path: Path, what: str, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: {what} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: {what} is not a regular file (a device, FIFO or socket cannot be read)")
    if info.st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {what} is {info.st_size:,} bytes, over the {MAX_JSON_BYTES // MIB} MiB limit")


def read_json_file(path: str | Path, what: str = "profile file") -> Any:
    """Parsed JSON of ``path`` (``read_json_text`` + ``parse_json_text``): missing, not a regular
    file, too large, not UTF-8, malformed, duplicate keys or too deep → ``ValueError`` naming it."""
    return parse_json_text(read_json_text(path, what), str(path))


# ----------------------------------------------------------------------------- writing


def write_merged_json(path: str | Path, merged_json: Callable[[], dict[str, Any]], *,
                      lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
    """Write ``merged_json()`` to ``path`` atomically under ``file_lock``; ``merged_json`` runs under
    the lock, so it can read what is on disk and merge. Through a symlink the target is written.
    Non-finite numbers are refused (``ValueError``) before anything is written."""
    target = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target, lock_timeout_s):
        remove_stale_temps(target)
        text = json.dumps(merged_json(), indent=1, allow_nan=False) + "\n"
        _replace(target, text)


def write_target(path: str | Path) -> Path:
    """The file a write to ``path`` replaces: the final target of a symlink, else ``path``."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _temp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]+\.tmp")


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temp files of ``target`` (``.<name>.<random>.tmp`` beside it). Call under the lock:
    then any such file is a killed writer's leftover. Returns what was removed."""
    pattern, removed = _temp_pattern(target), []
    with contextlib.suppress(FileNotFoundError), os.scandir(target.parent) as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _replace(target: Path, text: str) -> None:
    """Write ``text`` to a fresh temp file beside ``target`` (the umask's mode, or ``target``'s own
    permission bits when it exists), fsync it, and ``os.replace`` it onto ``target``."""
    tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(target: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``<target>.lock`` (created beside ``target``, never
    followed if it is a symlink; left in place — deleting a lock file races its next user).
    Waits at most ``timeout_s`` seconds, then ``TimeoutError``. POSIX only: elsewhere the write
    is still atomic but unlocked."""
    lock = target.with_name(target.name + ".lock")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield lock
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(lock):
            raise ValueError(f"{lock}: the lock file is a symbolic link; refusing to follow it (remove it)") from None
        raise ValueError(f"{lock}: cannot open the lock file ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{lock}: the lock path is not a regular file; remove it")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{target}: another writer has held {lock} for over {timeout_s:g} s; "
                                       "retry when it finishes") from None
                time.sleep(_LOCK_POLL_S)
        try:
            yield lock
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
