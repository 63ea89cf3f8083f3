"""Profiles: every bundled file loads, the seed is encoded honestly, validation names file and field,
and writes are atomic merges that never drop rows."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringplan.paths import measured_dir, profiles_dir
from ringplan.profiles.attention import Measurement, Profile, load_profile, load_profiles, profile_to_json, write_profile
from ringplan.profiles.envelope import Provenance, merge_rows

SEED = measured_dir() / "gtx1080-seed.json"


def test_every_profile_file_loads():
    """Every JSON file under profiles/ (catalog, memory profiles) parses and validates."""
    from ringplan.hardware import load_catalog

    load_catalog(profiles_dir() / "gpus.json")
    files = sorted(measured_dir().glob("*.json"))
    assert SEED in files
    for path in files:
        assert load_profile(path).rows, path
    assert len(load_profiles()) == len(files)


def test_seed_profile_content():
    """The seed's two tables: 6 memory-scaling rows and 4 max-length rows (one OOM, one estimated),
    GTX 1080, the report's module shape, fp32 as a stated assumption, formula origin recorded."""
    profile = load_profile(SEED)
    scaling = [r for r in profile.rows if r.series == "memory-scaling"]
    longest = [r for r in profile.rows if r.series == "max-length"]
    assert len(scaling) == 6 and len(longest) == 4
    assert {r.gpu for r in profile.rows} == {"gtx-1080"}
    assert [r.oom for r in longest].count(True) == 1
    assert [r.kind for r in longest].count("estimated") == 1
    row = scaling[3]
    assert (row.seq_len_tokens, row.ring_size, row.peak_allocated_bytes) == (200_000, 4, 595e6)
    assert (row.embed_dim, row.n_heads, row.head_dim, row.dtype) == (768, 12, 64, "fp32")
    assert row.segment_lengths_tokens == (4096, 8192, 16384) and row.dilation_rates == (1, 2, 4)
    assert row.projections and not row.training and row.batch == 1
    assert all(r.device_used_bytes is None for r in profile.rows)
    assert "seed" in profile.provenance.source
    assert any("0.0089" in note for note in profile.provenance.notes)
    assert any("fp32" in a for a in profile.provenance.assumptions)


def _seed_json() -> dict:
    return json.loads(SEED.read_text())


def _write_json(tmp_path: Path, data, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["rows"][3].update(step_time_s=float("nan")), "rows[3].step_time_s is not a finite number: nan"),
    (lambda d: d["rows"][0].update(peak_allocated_bytes=float("inf")), "rows[0].peak_allocated_bytes is not a finite number: inf"),
    (lambda d: d["rows"][1].update(device_used_bytes=-5), "rows[1].device_used_bytes is negative: -5"),
    (lambda d: d["rows"][2].update(dtype="fp64"), "rows[2].dtype is not one of"),
    (lambda d: d["rows"][2].update(layout="spiral"), "rows[2].layout is not one of"),
    (lambda d: d["rows"][0].update(seq_len_tokens=0), "rows[0].seq_len_tokens is not a positive integer: 0"),
    (lambda d: d["rows"][0].update(ring_size=2.5), "rows[0].ring_size is not a positive integer: 2.5"),
    (lambda d: d["rows"][0].update(oom="no"), "rows[0].oom is not true/false"),
    (lambda d: d["rows"][0].update(gpu="h10"), "rows[0].gpu is not in the GPU catalog"),
    (lambda d: d["rows"][0].update(colour="red"), "rows[0].colour is not a known column"),
    (lambda d: d["rows"][0].pop("n_heads"), "rows[0].n_heads is missing"),
    (lambda d: d["rows"][0].update(dilation_rates=[1, 2]), "rows[0].dilation_rates does not have one rate per segment"),
    (lambda d: d["rows"][0].update(kind="guessed"), "rows[0].kind is not one of"),
    (lambda d: d["provenance"].update(colour="red"), "provenance.colour is not a known provenance key"),
    (lambda d: d.update(schema="ringplan.profile/0"), "schema must be"),
    (lambda d: d.update(rows={}), "rows is not a list"),
])
def test_validation_names_file_and_field(tmp_path, mutate, expected):
    """A malformed profile raises ValueError naming the file, the field and the bad value."""
    data = _seed_json()
    mutate(data)
    path = _write_json(tmp_path, data)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_missing_and_corrupt_files(tmp_path):
    """A missing file and non-JSON text are ValueErrors naming the file."""
    with pytest.raises(ValueError, match="not found"):
        load_profile(tmp_path / "absent.json")
    path = _write_json(tmp_path, '{"schema": "ringplan.profile/1", "rows": [')
    with pytest.raises(ValueError, match=r"p\.json: not valid JSON"):
        load_profile(path)


ROW = Measurement(gpu="h100-80gb-sxm", seq_len_tokens=131_072, ring_size=2, n_heads=32, n_kv_heads=32, head_dim=128,
                  embed_dim=4096, dtype="bf16", device_used_bytes=20e9, peak_reserved_bytes=19e9,
                  peak_allocated_bytes=18e9)


def _profile(*rows, command="run-1") -> Profile:
    return Profile(provenance=Provenance(command=command, method="test"), rows=tuple(rows))


def test_write_merges_by_key_and_never_drops(tmp_path):
    """Second write: a measured row replaces its key, a reported row does not, other keys stay;
    the first provenance moves to history; the file is replaced atomically (no temp files left;
    the lock file stays beside it)."""
    path = tmp_path / "measured" / "h100.json"
    a = ROW
    b = replace(ROW, seq_len_tokens=262_144)
    write_profile(path, _profile(a, b))
    a_new = replace(a, device_used_bytes=21e9)
    b_reported = replace(b, device_used_bytes=1.0, kind="reported")
    c = replace(ROW, ring_size=4)
    merged = write_profile(path, _profile(a_new, b_reported, c, command="run-2"))
    on_disk = load_profile(path)
    assert on_disk.rows == merged.rows
    by_key = {r.key: r for r in on_disk.rows}
    assert len(on_disk.rows) == 3
    assert by_key[a.key].device_used_bytes == 21e9
    assert by_key[b.key].device_used_bytes == 20e9
    assert c.key in by_key
    assert on_disk.provenance.command == "run-2" and on_disk.history[0]["command"] == "run-1"
    assert sorted(p.name for p in path.parent.iterdir()) == ["h100.json", "h100.json.lock"]


def test_write_refuses_bad_rows_and_corrupt_files(tmp_path):
    """Non-finite new figures are rejected before writing; a corrupt file on disk is left untouched."""
    path = tmp_path / "p.json"
    with pytest.raises(ValueError, match="step_time_s is not a finite number: nan"):
        write_profile(path, _profile(replace(ROW, step_time_s=math.nan)))
    assert not path.exists()
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_profile(path, _profile(ROW))
    assert path.read_text() == "{broken"


def test_json_round_trip():
    """profile_to_json → load gives back the same rows and provenance."""
    from ringplan.profiles.attention import profile_from_json

    profile = load_profile(SEED)
    again = profile_from_json(json.loads(json.dumps(profile_to_json(profile))), "again")
    assert again.rows == profile.rows and again.provenance == profile.provenance


rows_strategy = st.lists(st.builds(
    lambda s, p, kind, used: replace(ROW, seq_len_tokens=s, ring_size=p, kind=kind, device_used_bytes=used),
    st.sampled_from([4096, 8192, 16384]), st.sampled_from([1, 2, 4]),
    st.sampled_from(["measured", "reported", "estimated"]), st.floats(1e6, 1e11)), max_size=12)


@given(rows_strategy, rows_strategy)
def test_merge_keeps_every_key(old, new):
    """merge_rows: keys = old keys ∪ new keys, each once; an old row survives unless a measured
    new row has its key; a non-measured new row never overrides."""
    old = list({r.key: r for r in old}.values())
    merged = merge_rows(tuple(old), tuple(new))
    keys = [r.key for r in merged]
    assert len(keys) == len(set(keys))
    assert set(keys) == {r.key for r in old} | {r.key for r in new}
    for row in old:
        replacement = [r for r in new if r.key == row.key and r.kind == "measured"]
        expected = replacement[-1] if replacement else row
        assert next(r for r in merged if r.key == row.key) == expected
