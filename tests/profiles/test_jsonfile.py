"""The one JSON reader and writer (``ringplan.jsonfile``): bounded, strict reads that name the file,
and locked atomic writes that keep every concurrent writer's rows, follow symlinks, keep permissions
and clean up after killed writers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ringplan.jsonfile import (MAX_JSON_BYTES, file_lock, parse_json_text, read_json_file, remove_stale_temps,
                               write_merged_json)

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- reading


def test_duplicate_keys_are_refused_with_file_and_key(tmp_path):
    """``{"a": 1, "a": 2}`` is ambiguous: an error naming the file and the key, at any depth."""
    for text in ('{"a": 1, "a": 2}', '{"rows": [{"x": 1, "y": 2, "x": 3}]}'):
        path = tmp_path / "dup.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=r"dup\.json: key '(a|x)' appears twice"):
            read_json_file(path)
    assert read_json_file(_write(tmp_path, '{"a": {"a": 1}}')) == {"a": {"a": 1}}  # same key, two objects


def _write(tmp_path: Path, text: str | bytes, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("special, message", [
    ("/dev/zero", "is not a regular file"),
    ("/dev/null", "is not a regular file"),
])
def test_devices_are_refused_without_reading(special, message):
    """A device given as a profile is refused at once (``/dev/zero`` would otherwise read forever)."""
    if not os.path.exists(special):
        pytest.skip(f"{special} absent")
    with pytest.raises(ValueError, match=f"{special}: profile file {message}"):
        read_json_file(special)


def test_fifo_is_refused_without_blocking(tmp_path):
    """A FIFO is not opened for reading (which would block until a writer comes)."""
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe.json: profile file is not a regular file"):
        read_json_file(fifo)


def test_directory_missing_and_oversized_files(tmp_path):
    """A directory, a missing file and a file over the size cap are ValueErrors naming the file."""
    (tmp_path / "x.json").mkdir()
    with pytest.raises(ValueError, match=r"x\.json: profile file is a directory, not a file"):
        read_json_file(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"absent\.json: config file not found"):
        read_json_file(tmp_path / "absent.json", "config file")
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: no 64 MiB written
    with pytest.raises(ValueError, match=r"big\.json: profile file is 67,108,865 bytes, over the 64 MiB limit"):
        read_json_file(big)


def test_non_utf8_deep_nesting_and_huge_integers(tmp_path):
    """Bytes that are not UTF-8, nesting deeper than Python recurses, and integers of more digits
    than Python converts: each a ValueError naming the file (never UnicodeDecodeError, RecursionError)."""
    with pytest.raises(ValueError, match=r"f\.json: profile file is not UTF-8 text \(byte 0xff at offset 9\)"):
        read_json_file(_write(tmp_path, b'{"rows": \xff}'))
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(ValueError, match=r"f\.json: not readable JSON \(nested too deeply\)"):
        read_json_file(_write(tmp_path, deep))
    with pytest.raises(ValueError, match=r"f\.json: not readable JSON"):
        read_json_file(_write(tmp_path, "[" + "9" * 5000 + "]"))
    with pytest.raises(ValueError, match=r"f\.json: not valid JSON \(Expecting value at line 1 column 2\)"):
        read_json_file(_write(tmp_path, "[,]"))


def test_parse_json_text_names_the_source():
    """The text parser used for strings names its source the same way."""
    with pytest.raises(ValueError, match="<stdin>: key 'k' appears twice"):
        parse_json_text('{"k": 1, "k": 1}', "<stdin>")


# ----------------------------------------------------------------------------- writing


def test_write_through_a_symlink_updates_the_target(tmp_path):
    """Writing a symlinked file replaces the link's target; the link stays a link."""
    target = tmp_path / "store" / "real.json"
    target.parent.mkdir()
    target.write_text("{}\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_merged_json(link, lambda: {"n": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"n": 1}
    assert (target.parent / "real.json.lock").exists() and not (tmp_path / "link.json.lock").exists()


def test_permissions_are_kept_and_new_files_follow_the_umask(tmp_path):
    """An existing file keeps its mode (no forced 0644); a new file gets 0666 minus the umask."""
    path = tmp_path / "p.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    write_merged_json(path, lambda: {"n": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    old = os.umask(0o027)
    try:
        write_merged_json(tmp_path / "new.json", lambda: {"n": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640


def test_stale_temp_files_are_cleaned_on_the_next_write(tmp_path):
    """A killed writer's ``.<name>.<random>.tmp`` is removed by the next write of that file; other
    files' temps are not touched."""
    path = tmp_path / "p.json"
    stale = [tmp_path / ".p.json.k3j4h5g6.tmp", tmp_path / ".p.json.0a1b2c3d4e5f.tmp"]
    other = tmp_path / ".q.json.k3j4h5g6.tmp"
    for tmp in (*stale, other):
        tmp.write_text("partial")
    write_merged_json(path, lambda: {"n": 1})
    assert not any(tmp.exists() for tmp in stale) and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.json.k3j4h5g6.tmp", "p.json", "p.json.lock"]
    assert remove_stale_temps(path) == []


def test_symlinked_lock_is_refused(tmp_path):
    """A lock path that is a symlink is never followed (it could point anywhere)."""
    path = tmp_path / "p.json"
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "p.json.lock").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=r"p\.json\.lock: the lock file is a symbolic link"):
        write_merged_json(path, lambda: {"n": 1})
    assert not path.exists() and not elsewhere.exists()


def test_lock_wait_times_out_with_a_clear_error(tmp_path):
    """While another holder keeps the lock, a writer gives up after its timeout and writes nothing."""
    path = tmp_path / "p.json"
    with file_lock(path):
        with pytest.raises(TimeoutError, match=r"p\.json: another writer has held .*p\.json\.lock for over 0\.05 s"):
            write_merged_json(path, lambda: {"n": 1}, lock_timeout_s=0.05)
    assert not path.exists()


def test_non_finite_numbers_are_not_written(tmp_path):
    """NaN is not JSON: the write fails before the file is touched."""
    path = tmp_path / "p.json"
    with pytest.raises(ValueError):
        write_merged_json(path, lambda: {"x": float("nan")})
    assert not path.exists()


WRITER = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from ringplan.profiles.attention import Measurement, Profile, write_profile
    from ringplan.profiles.envelope import Provenance

    path, first, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    row = Measurement(gpu="h100", seq_len_tokens=1, ring_size=1, n_heads=8, n_kv_heads=8, head_dim=64,
                      embed_dim=512, dtype="bf16", peak_allocated_bytes=1e9)
    for i in range(150):
        write_profile(path, Profile(provenance=Provenance(command=command),
                                    rows=(replace(row, seq_len_tokens=first + i),)))
""")


def test_two_processes_with_different_tmpdirs_keep_every_row(tmp_path):
    """Two writers whose $TMPDIR differ, 150 merged writes each into one file: all 300 rows stay
    (the lock lives beside the file, not in the temp dir), and the history holds each provenance
    once instead of one entry per interleaved write."""
    path = tmp_path / "shared.json"
    procs = []
    for n, first in enumerate((1_000, 2_000)):
        tmpdir = tmp_path / f"tmp{n}"
        tmpdir.mkdir()
        env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(first), f"writer-{n}"], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    from ringplan.profiles.attention import load_profile

    profile = load_profile(path)
    assert sorted(r.seq_len_tokens for r in profile.rows) == [*range(1_000, 1_150), *range(2_000, 2_150)]
    assert len(profile.history) <= 2
    assert not list(tmp_path.glob(".shared.json.*.tmp"))


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import ringplan.jsonfile as jsonfile

    def die(src, dst):  # killed after the temp file is written, before it replaces the target
        os.kill(os.getpid(), signal.SIGKILL)

    jsonfile.os.replace = die
    jsonfile.write_merged_json(sys.argv[1], lambda: {"n": "half-written"})
""")


def test_a_killed_writer_leaves_no_temp_after_the_next_write(tmp_path):
    """A writer SIGKILLed between writing its temp file and the replace: the target is untouched,
    its lock is free (the kernel drops it), and the next write removes the leftover temp."""
    path = tmp_path / "p.json"
    write_merged_json(path, lambda: {"n": 1})
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, timeout=60)
    assert done.returncode == -9
    assert json.loads(path.read_text()) == {"n": 1} and len(list(tmp_path.glob(".p.json.*.tmp"))) == 1
    write_merged_json(path, lambda: {"n": 2}, lock_timeout_s=5)
    assert json.loads(path.read_text()) == {"n": 2} and not list(tmp_path.glob(".p.json.*.tmp"))
