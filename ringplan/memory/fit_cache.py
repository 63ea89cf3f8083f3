"""The committed calibration ``profiles/fitted/memory-fit.json``, derived from ``profiles/measured``.

``ringplan fit --write`` fits the calibrations (``ringplan.memory.calibration``) on every measured
profile and writes them here with the SHA-256 of each input: every ``profiles/measured/*.json``
file and the planner sources that turn rows into a fit (the byte terms, the row families, the
calibration). The planner reads the file with ``json`` alone — no profile validation, no numpy or
scipy — while every hash matches, and fits from the profiles again when one does not (a profile
was added or re-measured, a term formula changed). A test recomputes the fit and fails when the
committed file is stale.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

from ringplan.memory.calibration import (CALIBRATION_KINDS, Calibration, calibration_from_json, calibration_to_json,
                                         fit_calibrations)
from ringplan.profiles.attention import measured_dir, profiles_dir

FIT_SCHEMA = "ringplan.memory-fit/1"
#: Planner sources whose content decides the fit (hashed beside the profiles).
FIT_SOURCES: tuple[str, ...] = ("attention_terms.py", "attention_fits.py", "calibration.py")


def fit_cache_path() -> Path:
    """``profiles/fitted/memory-fit.json`` (under ``$RINGPLAN_PROFILES_DIR`` when that is set)."""
    return profiles_dir() / "fitted" / "memory-fit.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_hashes(directory: str | Path | None = None) -> dict[str, dict[str, str]]:
    """SHA-256 of every measured profile file (by name) and of every fit source (by module file)."""
    directory = Path(directory) if directory is not None else measured_dir()
    package = Path(__file__).resolve().parent
    profiles = {p.name: _sha256(p) for p in sorted(directory.glob("*.json"))} if directory.is_dir() else {}
    return {"profiles": profiles, "sources": {name: _sha256(package / name) for name in FIT_SOURCES}}


def fit_payload(calibrations: dict[str, Calibration], hashes: dict[str, dict[str, str]]) -> dict:
    """The file's content: schema, inputs' hashes, the row kinds used, one calibration per GPU."""
    return {"schema": FIT_SCHEMA, "generated_by": "ringplan fit --write",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "inputs": hashes, "kinds": list(CALIBRATION_KINDS),
            "calibrations": {gpu: calibration_to_json(c) for gpu, c in sorted(calibrations.items())}}


def compute_fit(directory: str | Path | None = None) -> dict:
    """Fit every measured profile in ``directory`` (default ``profiles/measured``): the payload."""
    from ringplan.memory.attention_model import measured_rows

    hashes = input_hashes(directory)
    rows = measured_rows(directory)
    sources = ", ".join(sorted({Path(source).name for _, source in rows if source}))
    return fit_payload(fit_calibrations([row for row, _ in rows], source=sources), hashes)


def write_fit_cache(path: str | Path | None = None, directory: str | Path | None = None) -> dict:
    """Compute the fit and write it atomically (temp file + ``os.replace``); returns the payload.
    An unchanged fit leaves the file as it is (its date included)."""
    path = Path(path) if path is not None else fit_cache_path()
    payload = compute_fit(directory)
    existing = read_fit_cache(path)
    if existing is not None and {**existing, "date": None} == {**payload, "date": None}:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return payload


def read_fit_cache(path: str | Path | None = None) -> dict | None:
    """The file's JSON, or None when it is missing, unreadable or of another schema."""
    path = Path(path) if path is not None else fit_cache_path()
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("schema") == FIT_SCHEMA else None


def stale_reason(payload: dict | None, directory: str | Path | None = None) -> str | None:
    """Why the cached fit cannot be used (missing, an input added/removed/changed), or None."""
    if payload is None:
        return f"no fit file at {fit_cache_path()} (run `ringplan fit --write`)"
    current, cached = input_hashes(directory), payload.get("inputs", {})
    for group in ("profiles", "sources"):
        now, then = current[group], cached.get(group, {})
        changed = sorted(name for name in set(now) | set(then) if now.get(name) != then.get(name))
        if changed:
            return f"{group} changed since the fit was written: {', '.join(changed)} (run `ringplan fit --write`)"
    if payload.get("kinds") != list(CALIBRATION_KINDS):
        return f"fit used row kinds {payload.get('kinds')}, the planner uses {list(CALIBRATION_KINDS)}"
    return None


def fresh_calibrations(path: str | Path | None = None, directory: str | Path | None = None
                       ) -> dict[str, Calibration] | None:
    """The cached calibrations when the file matches its inputs, else None (the caller fits)."""
    payload = read_fit_cache(path)
    if stale_reason(payload, directory) is not None:
        return None
    try:
        return {gpu: calibration_from_json(raw) for gpu, raw in payload["calibrations"].items()}
    except (KeyError, TypeError, ValueError):
        return None
