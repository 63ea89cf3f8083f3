"""The shared envelope (``ringplan.profiles.envelope``): one provenance for every format, one checker
whose errors name file and field, repeated rows refused, a history that does not grow with each
interleaved write — and every reader of project JSON refusing duplicate keys."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from ringplan.paths import measured_dir, profiles_dir, stack_profiles_dir
from ringplan.profiles.attention import Measurement, Profile, load_profile, write_profile
from ringplan.profiles.envelope import (PROVENANCE_KEYS, Checker, Provenance, merged_history, provenance_to_json,
                                        shown)
from ringplan.profiles.stack import load_stack_profile

SEED = measured_dir() / "gtx1080-seed.json"


def _seed_json() -> dict:
    return json.loads(SEED.read_text())


def _write(tmp_path: Path, data, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_provenance_keys_cover_every_committed_file():
    """PROVENANCE_KEYS is the one key set: every provenance block committed under profiles/ uses
    only these keys (plus notes/assumptions), and Provenance has a field for each."""
    fields = set(Provenance.__dataclass_fields__)
    assert set(PROVENANCE_KEYS) | {"notes", "assumptions"} == fields
    for path in profiles_dir().rglob("*.json"):
        data = json.loads(path.read_text())
        for block in [data.get("provenance", {})] + data.get("history", []) if isinstance(data, dict) else []:
            assert set(block) <= fields, (path, set(block) - fields)


@pytest.mark.parametrize("where, value, expected", [
    ("rows[0].peak_allocated_bytes", 10**309, "is not a finite number: <1027-bit integer>"),
    ("rows[0].peak_allocated_bytes", float("inf"), "is not a finite number: inf"),
    ("rows[0].seq_len_tokens", 2**64, "is larger than 9223372036854775807"),
])
def test_huge_and_non_finite_figures_name_file_and_field(tmp_path, where, value, expected):
    """An integer ≥ 10^309 (no float value), an infinite figure and an oversized count are
    ValueErrors naming the file and the field (never OverflowError)."""
    data = _seed_json()
    data["rows"][0][where.split(".")[1]] = value
    text = json.dumps(data).replace("Infinity", "1e999")  # what a JSON writer would produce
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert f"{path}: {where} {expected}" in str(info.value)


def test_repeated_rows_are_refused_with_their_indices(tmp_path):
    """Two rows of one key in a profile: which one counts? An error naming both rows."""
    data = _seed_json()
    data["rows"].append(dict(data["rows"][2], peak_allocated_bytes=1.0))
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"p\.json: rows\[2\] and rows\[{len(data['rows']) - 1}\] have the same key"):
        load_profile(path)
    stack_file = sorted(stack_profiles_dir().glob("*.json"))[0]
    stack = json.loads(stack_file.read_text())
    stack["rows"].insert(1, stack["rows"][0])
    with pytest.raises(ValueError, match=r"s\.json: rows\[0\] and rows\[1\] have the same key"):
        load_stack_profile(_write(tmp_path, stack, "s.json"))


def test_duplicate_keys_in_a_profile_are_refused(tmp_path):
    """A profile row with a key given twice (``"oom": false, ..., "oom": true``) is an error, not last-wins."""
    text = SEED.read_text().replace('"oom": false', '"oom": false, "oom": true', 1)
    with pytest.raises(ValueError, match=r"p\.json: key 'oom' appears twice"):
        load_profile(_write(tmp_path, text))


def test_provenance_aliases_and_types(tmp_path):
    """The runtime's names (gpu_name, date_utc) read as the envelope's; a key given under both names,
    a non-string value and an unknown key are errors naming the field."""
    check = Checker("f.json")
    assert check.provenance({"gpu_name": "G", "date_utc": "d", "gpu_count": 2}) == {
        "gpu_driver_name": "G", "date": "d", "gpu_count": 2}
    for raw, message in [({"gpu_name": "G", "gpu_driver_name": "G"}, "given twice"),
                         ({"command": 3}, "provenance.command is not a string: 3"),
                         ({"gpu_count": 0}, "provenance.gpu_count is not a positive integer: 0"),
                         ({"colour": "red"}, "provenance.colour is not a known provenance key")]:
        with pytest.raises(ValueError, match=message):
            check.provenance(raw)


def test_history_does_not_grow_per_interleaved_write(tmp_path):
    """Writers A and B alternating: the history names each earlier provenance once."""
    path = tmp_path / "p.json"
    row = Measurement(gpu="h100", seq_len_tokens=4096, ring_size=1, n_heads=8, n_kv_heads=8, head_dim=64,
                      embed_dim=512, dtype="bf16", peak_allocated_bytes=1e9)
    for i in range(6):
        command = "A" if i % 2 == 0 else "B"
        write_profile(path, Profile(provenance=Provenance(command=command), rows=(replace(row, seq_len_tokens=4096 + i),)))
    profile = load_profile(path)
    assert len(profile.rows) == 6 and profile.provenance.command == "B"
    assert [entry["command"] for entry in profile.history] == ["A", "B"]


def test_merged_history_ignores_keys_stated_as_null():
    """A history entry written before a key existed equals the same provenance written with it as null."""
    old = provenance_to_json(Provenance(command="A"))
    assert merged_history(({"command": "A"},), old, provenance_to_json(Provenance(command="B"))) == ({"command": "A"},)
    assert merged_history((), old, old) == ()


def test_shown_cuts_long_values():
    """Error messages show at most 80 characters of a value."""
    assert len(shown("x" * 500)) == 80 and shown(10**400) == "<1329-bit integer>"


def test_catalogs_fits_and_configs_refuse_duplicate_keys(tmp_path):
    """The GPU catalog, the model catalog and a Hugging Face config read through the one reader:
    a duplicate key is an error naming the file; a fit file with one is not used."""
    from ringplan.hardware import load_catalog
    from ringplan.models import load_model_catalog, model_from_hf_config

    gpus = (profiles_dir() / "gpus.json").read_text().replace('"schema"', '"schema": "x", "schema"', 1)
    with pytest.raises(ValueError, match=r"gpus\.json: key 'schema' appears twice"):
        load_catalog(_write(tmp_path, gpus, "gpus.json"))
    models = (profiles_dir() / "models.json").read_text().replace('"schema"', '"schema": "x", "schema"', 1)
    with pytest.raises(ValueError, match=r"models\.json: key 'schema' appears twice"):
        load_model_catalog(_write(tmp_path, models, "models.json"))
    config = _write(tmp_path, '{"model_type": "llama", "hidden_size": 4096, "hidden_size": 8192}', "config.json")
    with pytest.raises(ValueError, match=r"config\.json: key 'hidden_size' appears twice"):
        model_from_hf_config(config)
    from ringplan.memory.attention_model import MEMORY_FIT
    from ringplan.memory.fit_cache import read_fit

    fit_text = MEMORY_FIT.path().read_text()
    assert read_fit(MEMORY_FIT, _write(tmp_path, fit_text, "fit.json")) is not None
    assert read_fit(MEMORY_FIT, _write(tmp_path, fit_text.replace('"schema"', '"schema": 1, "schema"', 1), "fit.json")) is None


@pytest.mark.parametrize("flag", ["--profile", "--config"])
def test_cli_reports_unreadable_inputs_in_one_line(tmp_path, flag):
    """A device, a FIFO or a file with duplicate keys given to the CLI: one ``Error:`` line, exit 2."""
    from ringplan.cli import main

    dup = _write(tmp_path, '{"a": 1, "a": 2}', "dup.json")
    for given in ("/dev/zero", str(dup)):
        result = CliRunner().invoke(main, ["capacity", "--gpu", "h100", "--tokens", "1M", flag, given])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and given in errors[0], result.output


def test_package_names_resolve_lazily():
    """Every name ``ringplan.profiles`` lists resolves to its module's object."""
    import importlib

    import ringplan.profiles as profiles

    for name, module in profiles._LAZY.items():
        assert getattr(profiles, name) is getattr(importlib.import_module(f"ringplan.profiles.{module}"), name)
