"""Whole-model sweeps under torchrun, re-run into the same output: each run reads only its own ranks'
results (issue 18: a shared ``<OUT>.ranks/`` appended across runs wrote wrong rows)."""

from __future__ import annotations

import json

import pytest

from ringplan.profiles.stack import load_stack_profile
from ringplan_runtime import spawn
from runtime.helpers import stack_sweep_runs

TINY = {"name": "tiny", "n_layers": 2, "embed_dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "ffn_dim": 128, "ffn_type": "swiglu", "vocab_size": 256, "norm": "rmsnorm"}


def _points_file(tmp_path, name: str, seq_len_tokens: int):
    path = tmp_path / name
    path.write_text(json.dumps([{"model": TINY, "seq_len_tokens": seq_len_tokens, "world_size": 2,
                                 "ring_size": 2}]))
    return path


@pytest.mark.slow
def test_torchrun_reruns_into_one_out_write_their_own_rows(tmp_path):
    """Two torchrun-style runs (2 gloo ranks) into the same --out, the first at 2,048 tokens, the
    second at 512: the second row's tracked peak is its own, below the first's (a run reading the
    first run's results too would report their larger peak), and no rank-results directory is left."""
    out = tmp_path / "stack.json"
    common = ["--out", str(out), "--warmup", "1", "--steps", "1", "--record-as", "h100", "--device", "cpu",
              "--no-progress"]
    long_points, short_points = _points_file(tmp_path, "long.json", 2048), _points_file(tmp_path, "short.json", 512)
    spawn(stack_sweep_runs, world_size=2, backend="gloo", timeout_s=300,
          args=([["--points", str(long_points), *common], ["--points", str(short_points), *common]],))
    rows = {row.seq_len_tokens: row for row in load_stack_profile(out).rows}
    assert sorted(rows) == [512, 2048]
    assert rows[512].tracked_peak_bytes < rows[2048].tracked_peak_bytes
    assert [p.name for p in tmp_path.iterdir() if ".ranks" in p.name] == []


@pytest.mark.parametrize("module", ["ringplan_runtime.stack_sweep", "ringplan_runtime.stack_measure"])
def test_sweep_entry_points_run(module):
    """Both module names run the sweep's command line (``stack_measure`` is its former name)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--points" in done.stdout, done.stderr[-2000:]
