"""``ringplan profile`` and ``ringplan validate`` through CliRunner on CPU: results, exit codes,
errors before launching, the option surface, torch-free start of the planner commands, and the
OOM-boundary search against a simulated device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ringplan.cli import main

torch = pytest.importorskip("torch")

from ringplan.hardware import load_catalog  # noqa: E402
from ringplan.memory.attention_model import MemoryModel  # noqa: E402
from ringplan.profiles.attention import load_profile  # noqa: E402
from ringplan.workload import AttentionShape, RingLayout, Workload  # noqa: E402
from ringplan_runtime import validate as validate_module  # noqa: E402
from ringplan_runtime.measure import MeasureSettings  # noqa: E402
from ringplan_runtime.points import PointResult  # noqa: E402
from ringplan_runtime.validate import Plan, bisect_boundary, check_launch  # noqa: E402

SMALL = ["--heads", "4", "--head-dim", "32", "--dtype", "fp32", "--warmup", "0", "--steps", "1"]

PROFILE_OPTIONS = {
    "--out", "--tokens", "--world-sizes", "--shape", "--mode", "--record-as", "--series", "--progress",
    "--device", "--warmup", "--steps", "--timeout", "--batch", "--heads", "--kv-heads", "--head-dim", "--embed-dim",
    "--dtype", "--causal", "--segment-lengths", "--dilation-rates", "--train", "--training", "--projections",
    "--layout", "--backend", "--format"}
VALIDATE_OPTIONS = {
    "--gpu", "--world-size", "--tokens", "--tolerance", "--time-tolerance", "--bisect", "--capacity-tolerance",
    "--resolution", "--safety-margin", "--emulate-gpu", "--profile", "--record", "--device", "--warmup", "--steps",
    "--timeout", "--batch", "--heads", "--kv-heads", "--head-dim", "--embed-dim", "--dtype", "--causal",
    "--segment-lengths", "--dilation-rates", "--train", "--training", "--projections", "--layout", "--backend",
    "--format",
    # whole models (validate --model)
    "--model", "--config", "--layers", "--ffn", "--vocab", "--sharding", "--shard-group", "--checkpointing",
    "--offload", "--offload-params", "--loss", "--loss-chunk", "--mlp-tile", "--ring-size", "--write",
    # tensor parallelism and the context-parallel schemes (issue 14)
    "--tp", "--cp", "--ulysses-degree",
    # hardware outside the catalog (issue 17)
    "--gpu-spec", "--catalog"}


def _options(name: str) -> set[str]:
    command = main.get_command(None, name)
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


@pytest.mark.parametrize("name, expected", [("profile", PROFILE_OPTIONS), ("validate", VALIDATE_OPTIONS)])
def test_option_surface_is_guarded(name, expected):
    """Golden option set: adding or renaming an option is a deliberate change of this test."""
    assert _options(name) == expected


def test_planner_commands_do_not_import_torch():
    """`ringplan --help` and `ringplan capacity` run without importing torch (fresh interpreter)."""
    code = ("import sys; from click.testing import CliRunner; from ringplan.cli import main; "
            "r1 = CliRunner().invoke(main, ['--help']); "
            "r2 = CliRunner().invoke(main, ['capacity', '--gpu', 'h100', '--tokens', '1M']); "
            "assert r1.exit_code == 0, r1.output; assert r2.exit_code in (0, 1), r2.output; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.slow
def test_validate_on_cpu_checks_the_byte_terms():
    """CPU, ring of 2, causal zigzag training: the tracker matches Σ memory_terms and the ring
    traffic matches, so validate exits 0 and reports both figures in JSON."""
    result = CliRunner().invoke(main, ["validate", "--world-size", "2", "--tokens", "512", "--causal", "--layout",
                                       "zigzag", "--train", "--format", "json", *SMALL])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    figures = {f["figure"]: f for f in payload["figures"]}
    assert payload["passed"] and figures["tracked_peak_bytes"]["within"] and figures["bytes_sent_per_rank"]["within"]


@pytest.mark.slow
def test_validate_under_torchrun(tmp_path):
    """torchrun … ringplan validate: rank 0 prints the verdict, every rank exits 0. (torchrun through
    ``python -m torch.distributed.run`` and a two-line entry script: no PATH assumptions.)"""
    entry = tmp_path / "ringplan_entry.py"
    entry.write_text("from ringplan.cli import main\nmain()\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(entry),
               "validate", "--world-size", "2", "--tokens", "256", "--train", "--format", "json", *SMALL]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    payload = json.loads(completed.stdout)
    assert payload["passed"] and payload["measured"]["world_size"] == 2


@pytest.mark.parametrize("args, message", [
    (["--emulate-gpu", "a100-41gb"], "unknown GPU"),
    (["--emulate-gpu", "a100-40gb", "--device", "cpu"], "needs CUDA"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--bisect", "--device", "cpu"], "needs CUDA devices"),
    (["--tokens", "65536", "--device", "cpu"], "small sizes"),
])
def test_validate_bad_input_exits_2_before_launching(args, message):
    """Unknown GPU, emulation or --bisect without CUDA, oversized CPU runs: one-line error, exit 2."""
    base = ["validate", "--world-size", "1", "--tokens", "256", *SMALL]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_emulated_gpu_larger_than_the_real_one_is_refused(monkeypatch):
    """Emulating an H200 on an 80 GB card, or 2 ranks on 1 visible GPU: ValueError before launch."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(validate_module, "real_memory_bytes", lambda: 85_520_809_984)
    catalog = load_catalog()
    with pytest.raises(ValueError, match="must be smaller than the real one"):
        check_launch(world_size=1, device_type="cuda", emulate=catalog.gpu("h200"))
    with pytest.raises(ValueError, match="needs 2 GPUs, 1 visible"):
        check_launch(world_size=2, device_type="cuda", emulate=None)
    check_launch(world_size=1, device_type="cuda", emulate=catalog.gpu("a100-40gb"))  # smaller: fine


@pytest.mark.slow
def test_profile_on_cpu_writes_rows_with_provenance(tmp_path):
    """Two lengths × two world sizes × forward/training: 8 rows, the exact command in provenance."""
    out = tmp_path / "cpu.json"
    args = ["profile", "--out", str(out), "--tokens", "256,512", "--world-sizes", "1,2", "--mode", "forward",
            "--mode", "training", "--record-as", "gtx-1080", "--no-progress", "--format", "json", *SMALL]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert len(profile.rows) == 8
    assert all(row.tracked_peak_bytes and row.step_time_s for row in profile.rows)
    assert profile.provenance.torch_version == torch.__version__


def test_profile_on_cpu_needs_a_catalog_name():
    """CPU rows need a catalog GPU name: without --record-as the command stops before launching."""
    result = CliRunner().invoke(main, ["profile", "--out", "x.json", "--tokens", "256", "--device", "cpu", *SMALL])
    assert result.exit_code == 2 and "--record-as" in result.output


# ----------------------------------------------------------------------------- OOM boundary search


def _fake_runner(boundary_tokens: int, calls: list[int]):
    """A stand-in for run_points: a device whose OOM boundary is ``boundary_tokens``."""
    def run_points(points, **_kwargs):
        point = points[0]
        calls.append(point.workload.seq_len_tokens)
        fits = point.workload.seq_len_tokens <= boundary_tokens
        return [PointResult(point=point, feasible=fits, failure=None if fits else "oom")]
    return run_points


@pytest.mark.parametrize("boundary_fraction", [0.9, 0.985, 1.0, 1.2])
def test_bisect_finds_the_boundary_within_resolution(monkeypatch, boundary_fraction):
    """Whatever the true boundary relative to the prediction, the search brackets it between a
    feasible and an OOM probe at most ``resolution`` apart, and judges 'never above' correctly."""
    gpu = load_catalog().gpu("a100-40gb")
    workload = Workload(seq_len_tokens=1024, shape=AttentionShape(n_heads=32, head_dim=128))
    plan = Plan(workload=workload, layout=RingLayout(ring_size=2), gpu=gpu, device_type="cuda")
    model = MemoryModel()  # unfitted: θ = 1
    from ringplan.capacity.attention import CapacityQuery, max_tokens

    predicted = max_tokens(CapacityQuery(workload=workload, gpu=gpu, model=model, safety_margin=0.05), 2).best
    boundary = int(predicted.seq_len_tokens * boundary_fraction)
    calls: list[int] = []
    monkeypatch.setattr(validate_module, "run_points", _fake_runner(boundary, calls))
    found = bisect_boundary(plan, model=model, settings=MeasureSettings(), resolution=0.01, max_probes=40)
    assert found.predicted_max_tokens == predicted.seq_len_tokens
    assert found.measured_max_tokens <= boundary < found.first_oom_tokens
    assert (found.first_oom_tokens - found.measured_max_tokens) <= max(2, 0.01 * found.measured_max_tokens)
    assert found.never_above == (predicted.seq_len_tokens <= found.measured_max_tokens)
    assert len(calls) <= 16
