"""CPU smoke test of ``benchmarks/bench_runtime.py``: formulas, bookkeeping, budget, isolation, gloo launch
(the script's own ``--cpu-smoke`` path), and ``benchmarks/two_gpu_run.sh --dry-run``.

The GPU numbers come from the lead's launch on 2 H100s; here CI checks that the script still runs
end to end on CPU (gloo, tiny sizes), that every case is recorded whatever happens to it, and that
the derived metrics are the formulas they claim to be. context_parallel needs CUDA: on CPU its
cases must be recorded as skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
BENCH_PATH = REPO / "benchmarks" / "bench_runtime.py"
TWO_GPU_RUN = REPO / "benchmarks" / "two_gpu_run.sh"
REL_TOL = 1e-12  # exact formulas: only float rounding


def _load_bench():
    if "bench_runtime" in sys.modules:
        return sys.modules["bench_runtime"]
    spec = importlib.util.spec_from_file_location("bench_runtime", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_runtime"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _options(tmp_path: Path, **overrides):
    base = dict(out_dir=tmp_path, tokens=(64, 128), heads=(bench.Heads.parse("4x16"), bench.Heads.parse("4/2x16")),
                dilated=(((32, 64, 128), (1, 2, 4)),), dtype="fp32", warmup=1, repeats=2, budget_s=600.0,
                device="cpu", pg_timeout_s=60.0)
    return bench.Options(**{**base, **overrides})


def _record(part, method, seconds, *, ring_size=1, causal=True, mode="fwd", tokens=262_144, heads="32x128",
            peak=None, **extra):
    return {"part": part, "method": method, "heads": heads, "seq_len_tokens": tokens, "causal": causal, "mode": mode,
            "ring_size": ring_size, "tokens_per_rank": tokens // ring_size, "status": "ok", "reason": "",
            "time_median_s": seconds, "time_min_s": seconds, "time_max_s": seconds, "times_s": [seconds],
            "extra_peak_bytes": peak, "flops": 1e15, "density": extra.pop("density", 1.0),
            "segment_lengths": None, "dilation_rates": None, **extra}


# ---------------------------------------------------------------- 1. hand-computed formulas

def test_attention_flops_hand_computed():
    """4·S²·H·D forward (S=4, H=2, D=8 → 1024), causal halves it, fwd+bwd is 3.5× forward."""
    kw = dict(seq_len_tokens=4, n_heads=2, head_dim=8)
    assert bench.attention_flops(causal=False, training=False, **kw) == 1024
    assert bench.attention_flops(causal=True, training=False, **kw) == 512
    assert bench.attention_flops(causal=True, training=True, **kw) == 1792


def test_dilated_pairs_hand_computed_and_dense_reduction():
    """S=16, w=(8,16), r=(1,2): 16·8/1 + 16·16/4 = 192 pairs; one branch w=S, r=1 is dense (density 1)."""
    assert bench.dilated_attended_pairs(seq_len_tokens=16, segment_lengths=(8, 16), dilation_rates=(1, 2)) == 192
    heads = bench.Heads.parse("4x16")
    dense_like = bench.Config(heads=heads, seq_len_tokens=256, causal=False, training=False, dilation=((256,), (1,)))
    assert bench.dilated_density(dense_like) == 1.0
    dense = bench.Config(heads=heads, seq_len_tokens=256, causal=False, training=False)
    assert math.isclose(bench.config_flops(dense_like), bench.config_flops(dense), rel_tol=REL_TOL)


def test_heads_parse_and_reject():
    """``32/8x128`` is GQA with label kept; malformed or non-dividing heads raise ValueError naming the input."""
    gqa = bench.Heads.parse("32/8x128")
    assert (gqa.n_heads, gqa.n_kv_heads, gqa.head_dim, gqa.label) == (32, 8, 128, "32/8x128")
    assert bench.Heads.parse("32x128").label == "32x128"
    for bad in ("32", "32/5x128", "0x128", "ax128"):
        with pytest.raises(ValueError, match=bad.replace("/", ".")):
            bench.Heads.parse(bad)


# ---------------------------------------------------------------- 2. bookkeeping

def test_merge_outcomes_slowest_rank_per_step_and_failures():
    """Distributed cases take the slowest rank per step; single-GPU rank 0; any failure fails the case."""
    ok0 = {"status": "ok", "reason": "", "times_s": [1.0, 3.0], "extra_peak_bytes": 10, "notes": []}
    ok1 = {"status": "ok", "reason": "", "times_s": [2.0, 1.0], "extra_peak_bytes": 30, "notes": []}
    merged = bench.merge_outcomes([ok0, ok1], "max")
    assert merged["times_s"] == [2.0, 3.0] and merged["extra_peak_bytes"] == 30
    assert merged["rank_median_s"] == [2.0, 1.5]
    assert bench.merge_outcomes([ok0, ok1], "rank0")["times_s"] == [1.0, 3.0]
    oom = {**ok1, "status": "oom", "reason": "CUDA out of memory"}
    skip = {**ok0, "status": "skipped", "reason": "setup failed on another rank"}
    failed = bench.merge_outcomes([skip, oom], "max")
    assert failed["status"] == "oom" and failed["times_s"] == []
    assert "rank 1: CUDA out of memory" in failed["reason"] and "rank 0" in failed["reason"]


def test_derive_speedup_ideal_tflops_and_dilated_ratio():
    """speedup = best single / time; % ideal = speedup / P; TFLOP/s = flops / P / time; dilated vs dense × density."""
    records = [_record("single", "cudnn", 1.0), _record("single", "flash", 1.8),
               _record("ring", "zigzag", 0.55, ring_size=2),
               _record("ring", "contiguous", 2.0, ring_size=2, causal=False),
               _record("single", "cudnn", 4.0, causal=False),
               _record("ring_dilated", "contiguous", 0.3, ring_size=2, causal=False, density=0.125)]
    by_method = {(r["part"], r["method"], r["causal"]): r for r in bench.derive(records)}
    ring = by_method[("ring", "zigzag", True)]
    assert ring["baseline"] == "single cudnn"
    assert math.isclose(ring["speedup_vs_single"], 1.0 / 0.55, rel_tol=REL_TOL)
    assert math.isclose(ring["pct_of_ideal"], 100.0 / 0.55 / 2, rel_tol=REL_TOL)
    assert math.isclose(ring["tflops_per_gpu"], 1e15 / 2 / 0.55 / 1e12, rel_tol=REL_TOL)
    assert by_method[("single", "cudnn", True)]["is_baseline"]
    assert not by_method[("single", "flash", True)]["is_baseline"]
    dilated = by_method[("ring_dilated", "contiguous", False)]
    assert math.isclose(dilated["time_over_dense_x_density"], 0.3 / (2.0 * 0.125), rel_tol=REL_TOL)
    assert dilated["speedup_vs_single"] is None


def test_targets_pass_and_miss_with_margins():
    """Issue 6 targets: faster than context_parallel with ≤ 75% of its extra peak; ≥ 1.95×; ≥ 90% ideal."""
    gb = 10**9
    records = bench.derive([
        _record("single", "cudnn", 1.0), _record("single", "cudnn", 3.0, causal=False),
        _record("context_parallel", "alltoall lb", 0.50, ring_size=2, peak=8 * gb),
        _record("context_parallel", "allgather lb", 0.52, ring_size=2, peak=10 * gb),
        _record("ring", "zigzag", 0.49, ring_size=2, peak=5 * gb),
        _record("ring", "contiguous", 1.6, ring_size=2, causal=False, peak=7 * 2**30),
        _record("single", "cudnn", 2.0, mode="fwd+bwd", tokens=131_072),
        _record("ring", "zigzag", 1.2, ring_size=2, mode="fwd+bwd", tokens=131_072)])
    lines = bench.targets(records, "32x128", world_size=2)
    assert lines[0].startswith("PASS causal zigzag fwd 262,144")  # 0.49 < 0.50 and 5 GB <= 0.75 * 8 GB
    assert lines[1].startswith("MISS non-causal fwd") and "1.88x" in lines[1]  # 3.0 / 1.6
    assert any(line.startswith("MISS causal zigzag fwd+bwd 131,072") and "83.3%" in line for line in lines)
    assert any(line.startswith("PASS ring zigzag fwd causal, 131,072 tokens/GPU") for line in lines)
    assert any(line.startswith("MISS ring contiguous fwd non-causal, 131,072") for line in lines)  # 7 GiB > 6 GiB
    assert bench.targets(records, "32x128", world_size=1)[0].startswith("targets are defined for 2 GPUs")


def test_plan_priority_and_family_narrowing(tmp_path):
    """Default grid: causal main-shape fwd first, dilated after the dense non-causal reference, 262K fwd+bwd last."""
    options = bench.Options(out_dir=tmp_path)
    configs = bench.plan(options, world_size=2)
    first, last = configs[0], configs[-1]
    assert (first.heads.label, first.seq_len_tokens, first.causal, first.training) == ("32x128", 65_536, True, False)
    assert (last.heads.label, last.seq_len_tokens, last.causal, last.training) == ("32x128", 262_144, True, True)
    dilated_at = min(i for i, c in enumerate(configs) if c.dilation)
    assert any(not c.causal and not c.training and c.seq_len_tokens == 262_144 for c in configs[:dilated_at])
    assert all(c.seq_len_tokens < 262_144 for c in configs[:-1] if c.training)
    assert not any(c.dilation for c in bench.plan(options, world_size=1))
    env = bench.Env(rank=0, world_size=2, device=torch.device("cpu"), start_s=0.0)
    big = configs[2]  # 32x128 causal fwd 262,144
    assert bench.family_kernels(big, env, options) == list(bench.KERNELS)  # no survey yet: all kernels
    env.family_s[big.group] = {"cudnn": 1.0, "flash": 1.7, "efficient": 3.4, "sdpa_default": 1.02}
    assert bench.family_kernels(big, env, options) == ["cudnn"]  # default: the winner only
    wider = dataclasses.replace(options, family_keep_ratio=1.25)
    assert bench.family_kernels(big, env, wider) == ["cudnn", "sdpa_default"]
    assert bench.family_kernels(configs[0], env, wider) == list(bench.KERNELS)  # at 65,536: the whole family


def test_cp_api_shim_matches_installed_torch():
    """The version shim finds context_parallel(mesh, buffers=, buffer_seq_dims=, no_restore_buffers=) and options."""
    import inspect

    cp = bench.cp_api()
    params = inspect.signature(cp.context_parallel).parameters
    assert {"buffers", "buffer_seq_dims", "no_restore_buffers"} <= set(params)
    assert hasattr(cp._cp_options, "enable_load_balance") and hasattr(cp._cp_options, "rotate_method")
    saved = cp._cp_options.rotate_method
    try:
        cp.set_rotate_method("alltoall")
        assert cp._cp_options.rotate_method.name == "ALL_TO_ALL"
    finally:
        cp._cp_options.rotate_method = saved


# ---------------------------------------------------------------- 3. isolation and budget (one process)

def test_failures_are_isolated_and_fallback_is_noted(tmp_path, monkeypatch):
    """A raising kernel is recorded (error / oom) and the launch moves on; a fallback runs once and says why."""
    real = bench.kernel_forward

    def flaky(kernel, causal, gqa):
        if causal:
            def boom(*_):
                raise (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB") if gqa
                       else RuntimeError("kernel exploded"))
            return boom
        return real(kernel, causal, gqa)

    monkeypatch.setattr(bench, "kernel_forward", flaky)
    records, _, table = bench.run(_options(tmp_path))
    singles = [r for r in records if r["part"] == "single" and r["method"] == "sdpa_default"]
    assert {r["status"] for r in singles if r["causal"] and r["heads"] == "4x16"} == {"error"}
    assert {r["status"] for r in singles if r["causal"] and r["heads"] == "4/2x16"} == {"oom"}
    assert all(r["status"] == "ok" and r["time_median_s"] > 0 for r in singles if not r["causal"])
    assert "kernel exploded" in json.loads((tmp_path / "bench_runtime.json").read_text())["records"][3]["reason"]

    env = bench.Env(rank=0, world_size=1, device=torch.device("cpu"), start_s=time.monotonic())
    cfg = bench.Config(heads=bench.Heads.parse("4x16"), seq_len_tokens=64, causal=False, training=False)
    good = bench.Variant(part="single", method="good", reduce="rank0", cost_factor=1.0,
                         prepare=lambda: bench.single_gpu_case(cfg, "sdpa_default", env, _options(tmp_path)))

    def broken():
        raise RuntimeError("enable_gqa not supported")

    record = bench.run_variant(bench.Variant(part="single", method="native", reduce="rank0", cost_factor=1.0,
                                             prepare=broken, fallback=good), cfg, env, _options(tmp_path))
    assert record["status"] == "ok" and record["method"] == "good"
    assert record["notes"][0] == "native attempt failed: RuntimeError: enable_gqa not supported"


def test_zero_budget_skips_every_case_and_says_so(tmp_path):
    """With no time left every case is recorded as skipped by the budget; stdout ends with the table."""
    from click.testing import CliRunner

    result = CliRunner().invoke(bench.main, ["--out", str(tmp_path), "--tokens", "64", "--heads", "4x16",
                                             "--device", "cpu", "--budget-s", "0"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "bench_runtime.json").read_text())
    assert payload["complete"] and payload["records"]
    assert all(r["status"] == "skipped" and r["reason"].startswith("time budget") for r in payload["records"])
    assert any("skipped by the time budget" in note for note in payload["notes"])
    tail = result.output.rstrip().splitlines()
    assert tail[-1] == "(no cases)"  # the compact table leaves budget-skipped cases to bench_runtime.md
    assert tail[-2] == f"{len(payload['records'])} case(s) skipped by the time budget (listed in bench_runtime.md)"
    assert payload["provenance"]["environment"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_bad_cli_input_exits_2(tmp_path):
    """Malformed heads or dilated specs are a usage error (exit code 2), not a traceback."""
    from click.testing import CliRunner

    for args in (["--heads", "32/5x128"], ["--dilated", "64,128:1"], ["--tokens", "abc"]):
        result = CliRunner().invoke(bench.main, ["--out", str(tmp_path), "--device", "cpu", *args])
        assert result.exit_code == 2, (args, result.output)


# ---------------------------------------------------------------- 4. issue 19: targets, predictions, the device script

def test_issue19_targets_per_scheme_with_margins():
    """Each scheme vs the fastest context_parallel per case (<= 1.0x), >= 10% faster somewhere, extra peak
    <= 50% of the smaller context_parallel peak, fwd+bwd >= 95% of ideal at the largest size."""
    gb = 10**9
    c262 = dict(ring_size=2, tokens=262_144)
    records = bench.derive([
        _record("single", "cudnn", 1.0), _record("single", "cudnn", 3.6, mode="fwd+bwd"),
        _record("context_parallel", "allgather lb", 0.52, peak=12 * gb, **c262),
        _record("context_parallel", "alltoall lb", 0.50, peak=8 * gb, **c262),
        _record("context_parallel", "alltoall lb", 1.9, peak=24 * gb, mode="fwd+bwd", **c262),
        _record("ring", "zigzag", 0.45, peak=3 * gb, **c262),  # 0.90x of 0.50: 11.1% faster
        _record("ring", "zigzag", 1.85, peak=10 * gb, mode="fwd+bwd", **c262),  # 97.3% of ideal
        _record("allgather", "zigzag", 0.49, peak=5 * gb, **c262),  # 62.5% of 8 GB: MISS memory
        _record("allgather", "zigzag", 1.95, peak=11 * gb, mode="fwd+bwd", **c262),  # slower: MISS, 92.3%
        _record("ulysses", "zigzag", 0.51, peak=4 * gb, **c262)])  # 1.02x: MISS time
    lines = bench.targets_issue19(records, world_size=2)
    assert lines[0].startswith("PASS >= 10% faster") and "11.1% faster (ring, 32x128 262,144 causal fwd)" in lines[0]
    ring_time = next(line for line in lines if line.startswith("PASS ring at least as fast"))
    assert ring_time.endswith("in 2/2 cases; worst 0.974x its time (32x128 262,144 causal fwd+bwd), "
                              "best 0.900x (32x128 262,144 causal fwd)")
    assert any(line.startswith("PASS ring extra peak <= 50%") and "worst 42%" in line for line in lines)
    assert any(line.startswith("PASS ring zigzag fwd+bwd") and "97.3% of ideal" in line for line in lines)
    assert any(line.startswith("MISS allgather at least as fast") and "1/2 cases" in line for line in lines)
    assert any(line.startswith("MISS allgather extra peak") and "worst 62%" in line for line in lines)
    assert any(line.startswith("MISS allgather zigzag fwd+bwd") and "92.3%" in line for line in lines)
    assert any(line.startswith("MISS ulysses at least as fast") and "0/1 cases" in line for line in lines)
    assert bench.targets_issue19([], world_size=1)[0].startswith("targets are defined for 2 GPUs")
    assert all(line.startswith("NOT MEASURED") for line in bench.targets_issue19(records[:2], world_size=2))


def test_predictions_and_their_errors():
    """Every ringplan scheme gets the planner's per-rank peak (the cp_terms sum) and, for a catalog GPU, a
    step time; derive turns them into signed % errors against the measured peak and median time."""
    from ringplan.memory.cp_terms import memory_terms
    from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload

    kw = dict(n_heads=32, n_kv_heads=8, head_dim=128, seq_len_tokens=262_144, causal=True, training=True,
              world_size=2, dtype="bf16")
    workload = Workload(seq_len_tokens=262_144, training=True, pattern=AttentionPattern(causal=True),
                        shape=AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bf16"))
    for scheme in bench.SCHEMES:
        got = bench.predict(scheme, "zigzag", gpu="h100-80gb-sxm", **kw)
        expected = sum(memory_terms(workload, RingLayout(ring_size=2, layout="zigzag", cp_scheme=scheme)).values())
        assert got["predicted_peak_bytes"] == expected > 0, (scheme, got)
        if got["predicted_step_s"] is None:  # the scheme's time model may not be in this checkout
            assert got["prediction_note"].startswith("time:"), got
        else:
            assert 0.1 < got["predicted_step_s"] < 100
    assert bench.predict("ring", "zigzag", gpu=None, **kw)["prediction_note"] == "time: no catalog GPU here"
    row = _record("ulysses", "zigzag", 2.0, ring_size=2, peak_allocated_bytes=10, predicted_peak_bytes=11,
                  predicted_step_s=1.5)
    derived = bench.derive([row])[0]
    assert math.isclose(derived["peak_error_pct"], 10.0) and math.isclose(derived["time_error_pct"], -25.0)


def test_two_gpu_run_dry_run_prints_every_step_within_budget(tmp_path):
    """The device script's dry run writes nothing, names every step once with its budget (sum < 9 minutes)
    and launches the bench on the issue-19 grid with every scheme and both context_parallel rotations."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(TWO_GPU_RUN), "--dry-run", str(out)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    steps = [line for line in result.stdout.splitlines() if line.startswith("[")]
    names = [line[1:].split(",")[0] for line in steps]
    assert names == ["machine", "bench_runtime", "profile", "stack_sweep", "refit", "validate_ring",
                     "bisect_ring_emulated", "check_ring", "check_allgather", "check_ulysses"]
    budgets = [int(line.split(", ")[1].split(" s]")[0]) for line in steps]
    assert sum(budgets) < 9 * 60
    argv = shlex.split(steps[1].split("] ", 1)[1])  # printed shell-quoted: exactly what runs
    assert argv[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["--grid"] == "issue19" and opts["--tokens"] == "131072,262144" and opts["--heads"] == "32x128,32/8x128"
    assert opts["--parts"] == "single,cp,ring,allgather,ulysses"
    hard = int(opts["--hard-timeout-s"])
    assert hard < budgets[1]  # the bench's own watchdog fires before the step's timeout


@pytest.mark.slow
def test_cpu_smoke_two_gloo_ranks_record_every_case(tmp_path):
    """``--cpu-smoke``'s path (2 spawned gloo ranks): singles timed, context_parallel skipped (needs CUDA),
    ring / all-gather / Ulysses timed with the planner's predictions, the dilated case recorded."""
    bench.spawn_smoke(bench.smoke_options(tmp_path))
    payload = json.loads((tmp_path / "bench_runtime.json").read_text())
    records = payload["records"]
    assert payload["complete"] and payload["provenance"]["world_size"] == 2
    assert payload["provenance"]["machine"]["cpu_count"] >= 1 and payload["options"]["grid"] == "issue19"
    cp = [r for r in records if r["part"] == "context_parallel"]
    assert cp and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in cp)
    assert {r["method"] for r in cp} == {"allgather lb", "alltoall lb", "allgather no-lb", "alltoall no-lb"}
    singles = [r for r in records if r["part"] == "single"]
    assert singles and all(r["status"] == "ok" and r["ring_size"] == 1 and r["method"] == "sdpa_default"
                           for r in singles)
    dense = {(r["heads"], r["causal"], r["mode"]) for r in singles}
    assert len(dense) == 4  # causal/non-causal x fwd/fwd+bwd (one shape: GQA)
    for scheme in bench.SCHEMES:
        rows = [r for r in records if r["part"] == scheme]
        assert {(r["heads"], r["causal"], r["mode"]) for r in rows} == dense, scheme
        assert {r["method"] for r in rows if r["causal"]} == {"zigzag"}
        for r in rows:
            assert r["status"] == "ok", r
            assert r["ring_size"] == 2 and len(r["rank_median_s"]) == 2 and r["time_median_s"] > 0
            assert r["speedup_vs_single"] is not None and r["predicted_peak_bytes"] > 0
    dilated = [r for r in records if r["part"] == "ring_dilated"]
    assert len(dilated) == 1 and dilated[0]["status"] in ("ok", "error")
    assert "TypeError" not in dilated[0]["reason"]  # the runtime's failures are its tests'; API misuse is ours
    assert (tmp_path / "bench_runtime.md").read_text().count("\n|") >= len(records)
    assert "## Targets (issue 19)" in (tmp_path / "bench_runtime.md").read_text()
    compact = bench.markdown_table(bench.derive(records), compact=True).splitlines()
    assert compact[-1].startswith("| dilated") and all(len(line) < 120 for line in compact)
