"""``--no-progress`` needs no tqdm: the progress bar's module is imported only when a bar is shown."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

import ringplan_runtime.sweep as sweep_module
from ringplan.cli import main
from ringplan_runtime.harness import NoProgressBar, progress_bar
from ringplan_runtime.points import PointResult

PROFILE = ["profile", "--tokens", "256", "--world-sizes", "1", "--device", "cpu", "--record-as", "gtx-1080",
           "--heads", "4", "--head-dim", "32", "--dtype", "fp32"]


def _lost_points(points, **kwargs):
    """Stands for ``run_points``: every point lost (nothing measured, nothing written)."""
    return [PointResult(point=point, feasible=False, failure="rank lost") for point in points]


def test_disabled_bar_does_not_import_tqdm(monkeypatch):
    """With tqdm unimportable, a disabled bar is a stand-in whose calls do nothing."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = progress_bar(3, enabled=False, desc="x")
    assert isinstance(bar, NoProgressBar)
    bar.set_postfix_str("ok")
    bar.update(1)
    bar.close()
    with pytest.raises(ImportError):
        progress_bar(3, enabled=True, desc="x")


def test_profile_no_progress_runs_without_tqdm(monkeypatch, tmp_path):
    """``ringplan profile --no-progress`` runs its sweep with tqdm unimportable; with the bar on, the
    same run needs tqdm (so the first run proves the import is skipped)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sweep_module, "run_points", _lost_points)
    quiet = CliRunner().invoke(main, [*PROFILE, "--out", str(tmp_path / "a.json"), "--no-progress"])
    assert quiet.exit_code == 1 and quiet.exception is None or isinstance(quiet.exception, SystemExit), quiet.output
    assert "0 of 1 points merged" in quiet.output
    loud = CliRunner().invoke(main, [*PROFILE, "--out", str(tmp_path / "b.json"), "--progress"])
    assert isinstance(loud.exception, ImportError)
