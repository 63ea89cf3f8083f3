"""Stack profiles (``ringplan.stack/1``): every committed file loads, rows round-trip to the same
workload, writes merge by key without dropping rows, and bad fields name the file and the field."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ringplan.models import load_model_catalog
from ringplan.paths import stack_profiles_dir
from ringplan.profiles.envelope import Provenance
from ringplan.stack import StackSettings, StackWorkload
from ringplan.profiles.stack import (
    STACK_SCHEMA,
    StackProfile,
    load_stack_profile,
    load_stack_profiles,
    measurement_from_workload,
    stack_profile_to_json,
    stack_rows,
    write_stack_profile,
)
from ringplan.workload import RingLayout

MODEL = load_model_catalog().model("llama-3-8b").with_layers(4)
PROVENANCE = Provenance(gpu_driver_name="NVIDIA H100 80GB HBM3", torch_version="2.13.0", date="2026-11-26T00:00:00Z",
                        command="python benchmarks/stack_sweep.py out", method="test")


def workload(seq=65536, checkpointing="full", training=True) -> StackWorkload:
    return StackWorkload(model=MODEL, seq_len_tokens=seq, world_size=2, layout=RingLayout(ring_size=2),
                         training=training, settings=StackSettings(checkpointing=checkpointing))


def row(seq=65536, kind="measured", **figures):
    return measurement_from_workload(workload(seq), gpu="h100", kind=kind, **figures)


def test_every_committed_stack_profile_loads():
    """Every file in profiles/measured/stack validates (the directory may hold none yet)."""
    files = sorted(stack_profiles_dir().glob("*.json"))
    assert len(load_stack_profiles()) == len(files)
    assert len(stack_rows()) == sum(len(load_stack_profile(f).rows) for f in files)


def test_round_trip_keeps_rows_and_workload(tmp_path):
    """Written and read back: the same rows (GPU name canonical), and ``row.workload()`` is the run's."""
    original = row(peak_allocated_bytes=5.0e10, tracked_peak_bytes=4.9e10, resident_bytes=1.2e10, step_time_s=3.2)
    written = write_stack_profile(tmp_path / "a.json", StackProfile(provenance=PROVENANCE, rows=(original,)))
    loaded = load_stack_profile(tmp_path / "a.json")
    assert loaded.rows == written.rows and loaded.provenance == PROVENANCE
    assert loaded.rows[0].gpu == "h100-80gb-sxm"
    assert loaded.rows[0].workload() == workload()
    assert json.loads((tmp_path / "a.json").read_text())["schema"] == STACK_SCHEMA


def test_writes_merge_by_key(tmp_path):
    """A second write adds new keys, replaces a same-key row only with a measured one, never drops a
    row; a different provenance goes to history."""
    path = tmp_path / "m.json"
    write_stack_profile(path, StackProfile(provenance=PROVENANCE, rows=(row(32768, step_time_s=1.0),
                                                                        row(65536, step_time_s=2.0))))
    later = replace(PROVENANCE, date="2026-11-27T00:00:00Z")
    write_stack_profile(path, StackProfile(provenance=later, rows=(row(65536, step_time_s=9.0),
                                                                   row(32768, kind="reported", step_time_s=7.0),
                                                                   row(131072, step_time_s=4.0))))
    profile = load_stack_profile(path)
    assert [(r.seq_len_tokens, r.step_time_s) for r in profile.rows] == [(32768, 1.0), (65536, 9.0), (131072, 4.0)]
    assert profile.provenance == later and len(profile.history) == 1


def test_settings_and_model_shape_are_part_of_the_key(tmp_path):
    """Two runs differing only in checkpointing, or only in the layer count, are two rows."""
    a = row()
    b = replace(a, settings=StackSettings(checkpointing="none"))
    c = replace(a, model=MODEL.with_layers(8))
    path = tmp_path / "k.json"
    write_stack_profile(path, StackProfile(provenance=PROVENANCE, rows=(a, b, c)))
    assert len(load_stack_profile(path).rows) == 3


def _json_with(tmp_path: Path, mutate) -> Path:
    data = stack_profile_to_json(StackProfile(provenance=PROVENANCE, rows=(row(),)))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(schema="ringplan.profile/1"), "schema"),
    (lambda d: d["rows"][0].update(colour="red"), r"rows\[0\]\.colour is not a known column"),
    (lambda d: d["rows"][0].pop("gpu"), r"rows\[0\]\.gpu is missing"),
    (lambda d: d["rows"][0].update(gpu="h900"), r"rows\[0\]\.gpu is not in the GPU catalog"),
    (lambda d: d["rows"][0]["model"].update(n_kv_heads=5), r"rows\[0\]\.model is invalid .*n_kv_heads"),
    (lambda d: d["rows"][0]["model"].update(depth=3), r"rows\[0\]\.model\.depth is not a known field"),
    (lambda d: d["rows"][0]["settings"].update(checkpointing="some"), r"rows\[0\]\.settings is invalid"),
    (lambda d: d["rows"][0].update(ring_size=3), r"rows\[0\] is not a valid run"),
    (lambda d: d["rows"][0].update(peak_allocated_bytes=-1), r"rows\[0\]\.peak_allocated_bytes is negative"),
    (lambda d: d["rows"][0].update(oom="no"), r"rows\[0\]\.oom is not true/false"),
    (lambda d: d["provenance"].update(gpu="x"), r"provenance\.gpu is not a known provenance key"),
])
def test_bad_fields_name_file_and_field(tmp_path, mutate, message):
    """Each malformed field raises ValueError naming the file and the field."""
    path = _json_with(tmp_path, mutate)
    with pytest.raises(ValueError, match=message) as error:
        load_stack_profile(path)
    assert str(path) in str(error.value)


def test_missing_or_corrupt_files_are_value_errors(tmp_path):
    """A missing file and invalid JSON are ValueErrors naming the file; a corrupt file is not overwritten."""
    with pytest.raises(ValueError, match="not found"):
        load_stack_profile(tmp_path / "none.json")
    corrupt = tmp_path / "c.json"
    corrupt.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_stack_profile(corrupt, StackProfile(provenance=PROVENANCE, rows=(row(),)))
    assert corrupt.read_text() == "{"
    assert load_stack_profiles(tmp_path / "absent") == []
