"""Where the planner's data lives: the one place for these paths.

Layout (under ``profiles_dir()``)::

    gpus.json, models.json    the GPU and model catalogs
    measured/*.json           attention-layer memory profiles (``ringplan.profile/1``)
    measured/stack/*.json     whole-model profiles (``ringplan.stack/1``)
    measured/timing/*.json    timing profiles (``ringplan.p2p/1``, ``ringplan.kernels/1``, ``ringplan.gemm/1``)
    fitted/*.json             fits derived from the measured files (``ringplan fit --write``)
    emulated/*.json           emulated-GPU bisections (not fitted by default)

``$RINGPLAN_PROFILES_DIR`` moves the whole tree (tests and other checkouts use it). Standard library
only: the catalog path is on the cold-start path of every CLI call.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that replaces the default ``profiles/`` directory.
PROFILES_DIR_ENV = "RINGPLAN_PROFILES_DIR"


def profiles_dir() -> Path:
    """``$RINGPLAN_PROFILES_DIR`` if set, else the ``profiles/`` folder next to the ``ringplan``
    package (the repository checkout)."""
    override = os.environ.get(PROFILES_DIR_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / "profiles"


def measured_dir() -> Path:
    """``profiles/measured``: every ``*.json`` here feeds the default memory model."""
    return profiles_dir() / "measured"


def stack_profiles_dir() -> Path:
    """``profiles/measured/stack``: the whole-model profiles."""
    return measured_dir() / "stack"


def timing_dir() -> Path:
    """``profiles/measured/timing``: ring-exchange, kernel and GEMM timing profiles."""
    return measured_dir() / "timing"


def fitted_dir() -> Path:
    """``profiles/fitted``: the committed fits derived from the measured profiles."""
    return profiles_dir() / "fitted"


def emulated_dir() -> Path:
    """``profiles/emulated``: emulated-GPU bisections, read by the accuracy reports, never fitted."""
    return profiles_dir() / "emulated"
