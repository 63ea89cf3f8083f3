"""The committed fits (``profiles/fitted/*.json``): one hashed cache for every memory model.

``ringplan fit --write`` fits the calibrations of a model (the attention-level one on
``profiles/measured``, the whole-model one on ``profiles/measured/stack``) and writes them with the
SHA-256 of each input: every profile file and the planner sources that turn rows into a fit (the
byte terms, the row families, the part fitter). The planner reads the file with ``json`` alone —
no profile validation, no numpy or scipy — while every hash matches and every number in it is
valid, and fits from the profiles again when not (a profile was added or re-measured, a formula
changed, the file is corrupt), saying so in one line on stderr. A test recomputes each fit and
fails when the committed file is stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ringplan.memory.part_fit import CALIBRATION_KINDS, Calibration, calibration_from_json, calibration_to_json
from ringplan.paths import fitted_dir
from ringplan.jsonfile import read_json_file, write_merged_json

#: The memory package's folder: the fit sources are module files in it.
MEMORY_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True, kw_only=True)
class FitCache:
    """One committed fit: its schema and file, the default folder of its profiles, the module files
    of ``ringplan/memory`` whose content decides it, and how to fit it from a folder of profiles
    (returning the calibrations by GPU and the names of the files used). ``prefix`` starts its
    messages (``"stack "`` for the whole-model fit)."""

    schema: str
    file_name: str
    sources: tuple[str, ...]
    profiles_dir: Callable[[], Path]
    fit: Callable[[Path | None], tuple[dict[str, Calibration], str]]
    prefix: str = ""

    def path(self) -> Path:
        """``profiles/fitted/<file_name>`` (under ``$RINGPLAN_PROFILES_DIR`` when that is set)."""
        return fitted_dir() / self.file_name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_hashes(cache: FitCache, directory: str | Path | None = None) -> dict[str, dict[str, str]]:
    """SHA-256 of every profile file of the fit (by name) and of every fit source (by module file)."""
    directory = Path(directory) if directory is not None else cache.profiles_dir()
    profiles = {p.name: _sha256(p) for p in sorted(directory.glob("*.json"))} if directory.is_dir() else {}
    return {"profiles": profiles, "sources": {name: _sha256(MEMORY_PACKAGE / name) for name in cache.sources}}


def compute_fit(cache: FitCache, directory: str | Path | None = None) -> dict:
    """The file's content for the profiles in ``directory``: schema, inputs' hashes, the row kinds
    used and one calibration per GPU."""
    calibrations, _ = cache.fit(Path(directory) if directory is not None else None)
    return {"schema": cache.schema, "generated_by": "ringplan fit --write",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "inputs": input_hashes(cache, directory), "kinds": list(CALIBRATION_KINDS),
            "calibrations": {gpu: calibration_to_json(c) for gpu, c in sorted(calibrations.items())}}


def read_fit(cache: FitCache, path: str | Path | None = None) -> dict | None:
    """The file's JSON, or None when it is missing, unreadable or of another schema."""
    return read_fit_or_reason(cache, path)[0]


def read_fit_or_reason(cache: FitCache, path: str | Path | None = None) -> tuple[dict | None, str | None]:
    """(the file's JSON, None), or (None, why it cannot be read: missing, unreadable — e.g. a
    duplicate key —, of another schema)."""
    path = Path(path) if path is not None else cache.path()
    if not path.exists():
        return None, f"no {cache.prefix}fit file at {path} (run `ringplan fit --write`)"
    try:
        payload = read_json_file(path, "fit file")
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"{path} cannot be read ({exc})"
    if not isinstance(payload, dict) or payload.get("schema") != cache.schema:
        return None, f"{path} is not a {cache.schema} file"
    return payload, None


def write_fit(cache: FitCache, path: str | Path | None = None, directory: str | Path | None = None) -> dict:
    """Compute the fit and write it atomically; an unchanged fit leaves the file (and its date) as it is."""
    path = Path(path) if path is not None else cache.path()
    payload = compute_fit(cache, directory)
    existing = read_fit(cache, path)
    if existing is not None and {**existing, "date": None} == {**payload, "date": None}:
        return existing
    write_merged_json(path, lambda: payload)
    return payload


def stale_reason(cache: FitCache, payload: dict | None, directory: str | Path | None = None) -> str | None:
    """Why the committed fit cannot be used (missing, an input added/removed/changed), or None."""
    if payload is None:
        return f"no {cache.prefix}fit file at {cache.path()} (run `ringplan fit --write`)"
    current, cached = input_hashes(cache, directory), payload.get("inputs", {})
    for group in ("profiles", "sources"):
        now, then = current[group], cached.get(group, {})
        changed = sorted(name for name in set(now) | set(then) if now.get(name) != then.get(name))
        if changed:
            return (f"{cache.prefix}{group} changed since the fit was written: {', '.join(changed)} "
                    "(run `ringplan fit --write`)")
    if payload.get("kinds") != list(CALIBRATION_KINDS):
        return f"{cache.prefix}fit used row kinds {payload.get('kinds')}, the planner uses {list(CALIBRATION_KINDS)}"
    return None


def committed_calibrations(cache: FitCache, payload: dict | None,
                           directory: str | Path | None = None) -> tuple[dict[str, Calibration] | None, str | None]:
    """(the committed calibrations, None) when the file matches its inputs and every number in it
    is valid, else (None, why not)."""
    reason = stale_reason(cache, payload, directory)
    if reason is not None:
        return None, reason
    try:
        raw = payload["calibrations"]
        return {gpu: calibration_from_json(fit) for gpu, fit in raw.items()}, None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        return None, f"{cache.path()} is corrupt ({exc})"


def fresh_calibrations(cache: FitCache, path: str | Path | None = None,
                       directory: str | Path | None = None) -> dict[str, Calibration] | None:
    """The committed calibrations when the file matches its inputs and is valid, else None."""
    return committed_calibrations(cache, read_fit(cache, path), directory)[0]


def usable_calibrations(cache: FitCache) -> dict[str, Calibration] | None:
    """The committed calibrations when usable; else None, after a one-line notice on stderr saying
    why (the caller then fits from the profiles: a stale or corrupt fit is never used, and never
    silently replaced)."""
    payload, reason = read_fit_or_reason(cache)
    committed = None
    if payload is not None:
        committed, reason = committed_calibrations(cache, payload)
    if committed is None:
        print(f"ringplan: {reason}; fitting from the profiles now", file=sys.stderr)
    return committed
