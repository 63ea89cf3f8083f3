"""Timing and GEMM profiles through the envelope: committed files load, a bad file in a timing
directory is a clear error naming it (never IsADirectoryError or UnicodeDecodeError), repeated and
non-finite rows are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ringplan.paths import timing_dir
from ringplan.profiles.gemm import GEMM_FORMAT, GemmProfile, gemm_profiles_in, load_gemm_profile, write_gemm_profile
from ringplan.profiles.timing import (P2P_FORMAT, TIMING_PROVENANCE_KEYS, KernelProfile, P2pProfile,
                                      load_timing_profile, timing_profiles_in, write_timing_profile)

PROVENANCE = {key: "x" for key in TIMING_PROVENANCE_KEYS} | {"gpu_driver_name": "NVIDIA H100 80GB HBM3", "gpu_count": 2}
P2P = {"schema": P2P_FORMAT, "provenance": PROVENANCE, "link": {"scope": "intra_node", "world_size": 2},
       "rows": [{"message_bytes": 4096, "seconds_median": 1e-4, "repeats": 3},
                {"message_bytes": 8192, "seconds_median": 2e-4, "repeats": 3}]}
GEMM = {"schema": GEMM_FORMAT, "provenance": PROVENANCE,
        "rows": [{"op": "gemm", "name": "q", "pass": "forward", "dtype": "bf16", "tokens": t, "in_features": 64,
                  "out_features": 64, "seconds_median": 1e-5 * t / 1024, "repeats": 3} for t in (1024, 2048)]}


def test_committed_timing_and_gemm_files_load():
    """Every committed timing file loads through the envelope (p2p, kernels and GEMM apart)."""
    p2p, kernels = timing_profiles_in()
    assert p2p and kernels and gemm_profiles_in()
    assert all(isinstance(p, P2pProfile) for p in p2p) and all(isinstance(k, KernelProfile) for k in kernels)
    assert all(isinstance(g, GemmProfile) for g in gemm_profiles_in(timing_dir()))


def test_round_trip_and_locked_write(tmp_path):
    """A p2p and a GEMM profile written and read back; the writer leaves only the file and its lock."""
    write_timing_profile(tmp_path / "p2p.json", P2P)
    write_gemm_profile(tmp_path / "gemm.json", GEMM)
    assert load_timing_profile(tmp_path / "p2p.json").provenance["gpu_count"] == 2
    assert len(load_gemm_profile(tmp_path / "gemm.json").rows) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemm.json", "gemm.json.lock", "p2p.json", "p2p.json.lock"]


def test_a_directory_named_json_is_walked_not_read(tmp_path):
    """``x.json/`` in a timing directory is a folder: its files are found, it is not opened."""
    (tmp_path / "x.json").mkdir()
    (tmp_path / "x.json" / "p2p.json").write_text(json.dumps(P2P))
    p2p, kernels = timing_profiles_in(tmp_path)
    assert len(p2p) == 1 and not kernels and gemm_profiles_in(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    (b'{"schema": "ringplan.p2p/1", "rows": \xfe}', r"bad\.json: JSON file in the timing directory is not UTF-8 text"),
    (b'{"schema": "a", "schema": "b"}', r"bad\.json: key 'schema' appears twice"),
    (b"[" * 100_000, r"bad\.json: not readable JSON \(nested too deeply\)"),
])
def test_unreadable_timing_files_name_the_file(tmp_path, content, message):
    """A non-UTF-8, duplicate-key or too-deep file in a timing directory: ValueError naming it."""
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        timing_profiles_in(tmp_path)
    with pytest.raises(ValueError, match=message):
        gemm_profiles_in(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["rows"].append(dict(d["rows"][0])), r"rows\[0\] and rows\[2\] have the same key \(one row per run\): 4096"),
    (lambda d: d["rows"][0].update(seconds_median=float("inf")), r"row 0 seconds_median=inf is not a finite number"),
    (lambda d: d["rows"][0].update(message_bytes=10**309), r"row 0 message_bytes=<1027-bit integer> is larger than"),
    (lambda d: d["rows"][1].update(seconds_median=10**309), r"row 1 seconds_median=<1027-bit integer> is larger than"),
    (lambda d: d["link"].update(nodes=-1), r"link\.nodes is not a non-negative integer: -1"),
    (lambda d: d["provenance"].pop("git_sha"), r"provenance lacks \['git_sha'\]"),
    (lambda d: d.update(extra=1), r"extra is not a known top-level key"),
])
def test_bad_timing_rows_name_file_and_field(tmp_path, mutate, message):
    """Repeated message sizes, non-finite or oversized figures, bad link sizes, missing provenance."""
    data = json.loads(json.dumps(P2P))
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_timing_profile(path)
    with pytest.raises(ValueError, match=message):
        write_timing_profile(tmp_path / "new.json", data)
    assert not (tmp_path / "new.json").exists()


def test_repeated_gemm_rows_are_refused(tmp_path):
    """Two GEMM rows of one shape, pass and token count: an error naming both."""
    data = json.loads(json.dumps(GEMM))
    data["rows"].append(dict(data["rows"][1], seconds_median=1.0))
    with pytest.raises(ValueError, match=r"g\.json: rows\[1\] and rows\[2\] have the same key"):
        write_gemm_profile(tmp_path / "g.json", data)


def test_cli_names_a_bad_timing_file_in_one_line(tmp_path):
    """``simulate --timing-dir`` over a directory holding a non-UTF-8 file: one ``Error:`` line, exit 2."""
    from ringplan.cli import main

    bad = Path(tmp_path) / "k.json"
    bad.write_bytes(b"\xff\xfe")
    result = CliRunner().invoke(main, ["simulate", "--gpu", "h100", "--tokens", "128K", "--ring-size", "2",
                                       "--timing-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "not UTF-8" in errors[0], result.output


def test_text_that_is_not_json_is_skipped(tmp_path):
    """A file that is not JSON at all (another tool's, half-written by hand) is not a timing profile."""
    (tmp_path / "notes.json").write_text("{not json")
    (tmp_path / "p2p.json").write_text(json.dumps(P2P))
    assert len(timing_profiles_in(tmp_path)[0]) == 1 and gemm_profiles_in(tmp_path) == []
