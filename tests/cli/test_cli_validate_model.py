"""``ringplan validate --model`` through CliRunner on CPU: bad input exits 2 before launching, the
verdict and exit code of an OOM, and a tiny custom model end to end on two gloo ranks."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from ringplan.cli import main  # noqa: E402
from ringplan.models import ModelSpec  # noqa: E402
from ringplan.stack import StackSettings, StackWorkload  # noqa: E402
from ringplan.workload import RingLayout  # noqa: E402
from ringplan_runtime import validate as validate_module  # noqa: E402
from ringplan_runtime.validate import Figure, verdict  # noqa: E402

#: A tiny custom Llama-shaped model (E = 4 x 16 = 64) measured in fp32 on CPU.
TINY = ["--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--embed-dim", "64", "--ffn", "128",
        "--vocab", "256", "--dtype", "fp32", "--device", "cpu", "--warmup", "1", "--steps", "1"]


def _have_stack_runtime() -> bool:
    """The whole-model runtime pieces (stack terms, stack_sweep's point runner) are present."""
    if importlib.util.find_spec("ringplan.memory.stack_terms") is None:
        return False
    try:
        from ringplan_runtime.stack_sweep import StackPointResult, run_stack_points  # noqa: F401
    except ImportError:
        return False
    return True


HAVE_STACK_RUNTIME = _have_stack_runtime()
if HAVE_STACK_RUNTIME:
    from ringplan_runtime.stack_sweep import StackPointResult
needs_stack_runtime = pytest.mark.skipif(not HAVE_STACK_RUNTIME, reason="stack terms / measure_stack not present yet")


def run(*args: str):
    return CliRunner().invoke(main, ["validate", *args])


def tiny_workload(world: int = 2) -> StackWorkload:
    model = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                      ffn_type="swiglu", vocab_size=256, norm="rmsnorm")
    return StackWorkload(model=model, seq_len_tokens=256, world_size=world, layout=RingLayout(ring_size=world),
                         settings=StackSettings(param_dtype="fp32"))


@pytest.mark.parametrize("args, message", [
    (["--model", "llama3-8bb", "--world-size", "1", "--tokens", "256"], "closest names"),
    (["--layers", "2", "--heads", "6", "--kv-heads", "4", "--head-dim", "16", "--ffn", "64", "--vocab", "128",
      "--world-size", "1", "--tokens", "256"], "not a multiple of n_kv_heads"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--shard-group", "4"], "larger than the world size"),
    ([*TINY, "--world-size", "2", "--tokens", "255"], "does not split"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--layout", "zigzag", "--ring-size", "2", "--batch", "1",
      "--tokens", "258"], "does not split"),
    ([*TINY, "--world-size", "3", "--ring-size", "2", "--tokens", "256"], "not a multiple of the ring size"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--write", "x.json"], "pass --gpu NAME"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--bisect"], "--bisect is an option of one attention layer"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--projections"], "attention layer"),
    (["--world-size", "1", "--tokens", "256", "--checkpointing", "full"], "option of a whole model"),
    (["--model", "gpt2", "--layers", "1", "--world-size", "1", "--tokens", "256", "--device", "cpu"], "planned, not run"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--train", "--sharding", "zero2"], "planned, not run"),
    ([*TINY, "--world-size", "1", "--tokens", "1Mi"], "tokens per rank on CPU"),
    ([*TINY, "--world-size", "2", "--tokens", "256", "--gpu", "h1000"], "unknown GPU"),
    # tensor parallelism and CP schemes (issue 14)
    ([*TINY, "--world-size", "3", "--tp", "2", "--tokens", "256"], "not a multiple of tensor parallel 2"),
    ([*TINY, "--world-size", "2", "--tp", "2", "--tokens", "255"], "sequence parallelism"),
    ([*TINY, "--world-size", "2", "--tp", "2", "--tokens", "256", "--mlp-tile", "64"], "tiled MLP"),
    ([*TINY, "--world-size", "8", "--tp", "2", "--cp", "ulysses", "--tokens", "256"], "Ulysses"),
    ([*TINY, "--world-size", "2", "--tp", "2", "--tokens", "256", "--gpu", "h100", "--write", "x.json"],
     "no tensor-parallel"),
    (["--world-size", "2", "--tokens", "256", "--tp", "2"], "option of a whole model"),
    (["--world-size", "2", "--tokens", "256", "--cp", "ulysses"], "option of a whole model"),
])
def test_bad_input_exits_2_before_launching(args, message, monkeypatch):
    """Every bad input is a one-line error with exit code 2, and no rank is started."""
    def no_launch(*_, **__):
        raise AssertionError("a rank was launched")

    monkeypatch.setattr(validate_module, "run_stack", no_launch)
    monkeypatch.setattr(validate_module, "run_points", no_launch)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@needs_stack_runtime
def test_an_oom_passes_only_when_predicted_infeasible():
    """The existing validate convention: OOM + predicted infeasible passes; OOM otherwise fails; a run
    passes when every figure is within tolerance and it was not predicted infeasible."""
    oom = StackPointResult(workload=tiny_workload(), feasible=False, failure="oom")
    ran = StackPointResult(workload=tiny_workload(), feasible=True)
    close = (Figure(name="tracked_peak_bytes", predicted=101.0, measured=100.0, source="t", tolerance=0.05),)
    far = (Figure(name="tracked_peak_bytes", predicted=120.0, measured=100.0, source="t", tolerance=0.05),)
    assert verdict(oom, (), False) and not verdict(oom, (), True) and not verdict(oom, (), None)
    assert verdict(ran, close, None) and verdict(ran, close, True)
    assert not verdict(ran, far, True) and not verdict(ran, close, False)


@needs_stack_runtime
def test_oom_is_reported_as_a_result_with_exit_1(monkeypatch):
    """A run that ran out of memory (not predicted: CPU has no memory model) prints FAILED: oom, exit 1."""
    def fake_run(plan, **_):
        return StackPointResult(workload=plan.workload, feasible=False, failure="oom")

    monkeypatch.setattr(validate_module, "run_stack", fake_run)
    result = run(*TINY, "--world-size", "2", "--tokens", "256", "--train")
    assert result.exit_code == 1, result.output
    assert "FAILED: oom" in result.output and "FAIL" in result.output


@needs_stack_runtime
@pytest.mark.slow
def test_tiny_model_end_to_end_on_two_gloo_ranks(tmp_path):
    """A 2-layer custom model trains one step on 2 gloo ranks (ring of 2, FSDP over both, full
    checkpointing): the tracked live-tensor peak matches Σ stack_terms within 5%, exit 0; --write
    records the row for the named GPU."""
    from ringplan.profiles.stack import load_stack_profile

    out = tmp_path / "stack.json"
    result = run(*TINY, "--world-size", "2", "--tokens", "256", "--train", "--checkpointing", "full",
                 "--gpu", "h100", "--write", str(out), "--format", "json", "--timeout", "300")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    tracked = next(f for f in payload["figures"] if f["figure"] == "tracked_peak_bytes")
    assert tracked["within"] is True and payload["measured"]["feasible"] is True
    (row,) = load_stack_profile(out).rows
    assert (row.gpu, row.world_size, row.ring_size, row.oom, row.settings.checkpointing) == \
        ("h100-80gb-sxm", 2, 2, False, "full")
    assert row.tracked_peak_bytes == payload["measured"]["tracked_peak_bytes"]


@needs_stack_runtime
@pytest.mark.slow
def test_tiny_model_under_torchrun(tmp_path):
    """torchrun … ringplan validate --layers …: rank 0 prints the verdict, every rank exits 0."""
    import subprocess
    import sys

    entry = tmp_path / "ringplan_entry.py"
    entry.write_text("from ringplan.cli import main\nmain()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(entry),
           "validate", *TINY, "--world-size", "2", "--tokens", "256", "--train", "--checkpointing", "selective",
           "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(done.stdout[done.stdout.index("{"):])
    assert payload["passed"] is True and payload["measured"]["settings"]["checkpointing"] == "selective"


@needs_stack_runtime
@pytest.mark.slow
def test_tensor_parallel_ulysses_model_end_to_end_on_four_gloo_ranks():
    """--tp 2 --cp ulysses on 4 gloo ranks (CP 2 x TP 2, FSDP2 over the 2 ranks of each TP coordinate):
    the step runs, the JSON record names the scheme and the degrees, and the header says them."""
    result = run(*TINY, "--world-size", "4", "--tp", "2", "--cp", "ulysses", "--tokens", "256", "--train",
                 "--format", "json", "--timeout", "300")
    assert result.exit_code in (0, 1), result.output  # 1 only if the planner's TP terms miss (not the runtime)
    payload = json.loads(result.output[result.output.index("{"):])
    measured = payload["measured"]
    assert measured["feasible"] is True and measured["tracked_peak_bytes"] > 0
    assert (measured["tp_degree"], measured["cp_scheme"], measured["ring_size"]) == (2, "ulysses", 2)
    assert "ulysses 2, TP 2" in payload["plan"]
