"""CLI fuzz (issue 18): random commands with valid and hostile option values never crash.

Every invocation uses under ``RUN_LIMIT_S`` CPU seconds and ends with exit code 0 (a plan), 1 (only a "no plan fits"
answer of ``capacity`` or ``plan``) or 2 (exactly one line, starting ``Error:``, no traceback).
Commands: capacity (one attention layer and --model), plan, simulate, overlap, fit, gpus, models.
Hostile values: integers of hundreds of digits, nan, inf, Unicode digits, empty lists, negative
numbers, missing files, /dev/zero, a directory, a deeply nested or non-UTF-8 JSON file.

Bounded: ``2 x`` the Hypothesis profile's ``max_examples`` invocations (200 under ``ci``, under a
minute on two cores); ``RINGPLAN_FUZZ_SCALE=10`` runs ten times as many.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringplan.cli import main
from ringplan.paths import measured_dir

#: Most CPU seconds one invocation may use (issue 18: "every run ends within 10 s"). CPU time, not
#: wall time: on a shared two-core machine other processes stretch wall time several-fold.
RUN_LIMIT_S = 10.0
#: Wall-clock seconds after which an invocation counts as hung (an alarm interrupts it).
HANG_LIMIT_S = 60.0
SCALE = float(os.environ.get("RINGPLAN_FUZZ_SCALE", "1"))
EXAMPLES = max(10, int(2 * settings.default.max_examples * SCALE))

HUGE = ["9" * 400, "1" + "0" * 310, str(2**64), "99999999999999999999", "1" * 5000]
HOSTILE = HUGE + ["0", "-1", "-5", "nan", "inf", "-inf", "1e400", "１２３", "٣٠٠٠", "", ",", " ", "x",
                  "4096,,8192", "1,", "0x10", "1_000", "3.5", "1.0000005M", "\x00", "../..", "💥"]


def _files() -> dict[str, str]:
    """User files, valid and hostile, in a folder made once per session."""
    folder = Path(tempfile.mkdtemp(prefix="ringplan-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    nested = folder / "nested.json"
    nested.write_text("[" * 200_000 + "]" * 200_000)
    latin = folder / "latin1.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    config = folder / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512,
                                  "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1024,
                                  "vocab_size": 32000, "max_position_embeddings": 4096}))
    huge_config = folder / "huge.json"
    huge_config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 10**400, "hidden_size": 1e308,
                                       "num_attention_heads": -3, "vocab_size": "lots"}))
    empty = folder / "empty.json"
    empty.write_text("")
    return {"nested": str(nested), "latin": str(latin), "config": str(config), "huge": str(huge_config),
            "empty": str(empty), "folder": str(folder), "missing": str(folder / "missing.json"),
            "zero": "/dev/zero", "seed": str(measured_dir() / "gtx1080-seed.json"),
            "h100": str(measured_dir() / "h100-profile-2026-11-25.json")}


FILES = _files()
PATHS = list(FILES.values())


def values(*valid) -> st.SearchStrategy[str]:
    """Four times in five a valid value, else a hostile one."""
    good = st.sampled_from([str(v) for v in valid])
    return st.one_of(good, good, good, good, st.sampled_from(HOSTILE + PATHS[:3]))


GPU = values("h100", "a100-40gb", "gtx-1080", "h200", "mi300x", "h10", "a100")
MODEL = values("llama-3-8b", "gpt2", "qwen3-0.6b", "mistral-7b-v0.1", "llama-3-70b", "nope")
TOKENS = values("1M", "128Ki", "64Ki", "1000001", "4M", "32K", "1125899906842624", "2M")
SHAPE = {"--heads": values(8, 12, 32, 65536), "--kv-heads": values(1, 4, 8, 3), "--head-dim": values(64, 128),
         "--batch": values(1, 2, 4)}
ATTENTION = {"--gpu": GPU, "--tokens": TOKENS, "--world-size": values(1, 2, 8, 3, 1000000),
             "--max-world-size": values(1, 16, 1024, 1000000), "--safety-margin": values(0, 0.05, 0.5, 0.99, 1),
             **SHAPE, "--embed-dim": values(768, 4096), "--dtype": values("bf16", "fp16", "fp32"),
             "--segment-lengths": values("4096,8192", "4096", "4294967291,4294967279", "68719476735"),
             "--dilation-rates": values("1,2", "1", "5"), "--layout": values("contiguous", "zigzag"), "--backend": values("auto", "math", "flash"),
             "--model-form": values("analytic", "seed"), "--profile": st.sampled_from(PATHS),
             "--format": values("table", "json", "csv")}
FLAGS = {"capacity": ["--causal", "--train", "--projections", "--step-time"],
         "model": ["--train", "--forward", "--offload", "--no-offload", "--step-time"],
         "plan": ["--train", "--forward", "--all", "--no-step-time", "--offload"],
         "simulate": ["--training", "--causal", "--projections"],
         "overlap": ["--training", "--causal"], "fit": ["--include-estimated", "--residuals"],
         "gpus": ["--links", "--sources"], "models": ["--sources"]}
STACK = {"--model": MODEL, "--config": st.sampled_from(PATHS), "--layers": values(1, 4, 32, 100000),
         "--ffn": values(1024, 14336), "--vocab": values(32000, 128256), "--sharding": values("none", "zero1", "zero3"),
         "--checkpointing": values("none", "selective", "full"), "--loss": values("full", "chunked"),
         "--loss-chunk": values("4096", "8Ki", "1"), "--shard-group": values(1, 2, 8), "--ring-size": values(1, 2, 4)}
MODEL_CAPACITY = {"--gpu": GPU, "--tokens": TOKENS, "--gpus": values(1, 2, 8, 64),
                  "--max-world-size": values(1, 64, 1024), "--safety-margin": values(0.05, 0.5),
                  "--format": values("table", "json", "csv"), **STACK}
PLAN = {**MODEL_CAPACITY, "--hidden": values(2048, 4096), "--heads": values(16, 32), "--kv-heads": values(4, 8),
        "--batch": values(1, 2), "--layout": values("contiguous", "zigzag"), "--dtype": values("bf16", "fp32"),
        "--master-dtype": values("fp32", "bf16")}
LINKS = {"--intra-link": values("nvlink-4", "pcie-4", "nope"), "--inter-link": values("infiniband-ndr-400"),
         "--intra-bandwidth": values("100GB", "1", "300GB/s"), "--intra-latency-us": values(5, 20, 0),
         "--inter-bandwidth": values("50GB"), "--inter-latency-us": values(5)}
TIME = {**SHAPE, "--dtype": values("bf16", "fp32"), "--backend": values("auto", "flash", "cpu"),
        "--layout": values("contiguous", "zigzag"), "--timing-dir": st.sampled_from(PATHS + [str(measured_dir())]),
        "--step-overhead-us": values(0, 50, 1000), "--format": values("table", "json", "csv"), **LINKS}
SIMULATE = {"--gpu": GPU, "--tokens": values("1M", "64Ki", "256K", "1Mi", "1000"),
            "--ring-size": values(1, 2, 4, 8, 3, 2048, 4096, 10000), "--embed-dim": values(4096),
            "--segment-lengths": values("2048,8192", "4096"), "--dilation-rates": values("1,2", "1"),
            "--nodes": values(1, 2, 3), "--gpus-per-node": values(1, 4, 8), "--timeline-width": values(10, 72, 1000),
            "--timeline-ranks": values("0,1", "0", "7"), **TIME}
OVERLAP = {"--gpu": GPU, "--scope": values("intra", "inter", "both"), **TIME}
FIT = {"--form": values("seed", "analytic", "both", "theta"), "--target": values("auto", "peak_allocated_bytes"),
       "--series": values("memory-scaling", "nope"), "--prior-weight": values(0.001, 0, 1),
       "--format": values("table", "json", "csv")}
COMMANDS = {"capacity": ("capacity", ATTENTION, ["--gpu", "--tokens"]),
            "model": ("capacity", MODEL_CAPACITY, ["--model", "--gpu", "--tokens"]),
            "plan": ("plan", PLAN, ["--model", "--gpu", "--tokens"]),
            "simulate": ("simulate", SIMULATE, ["--gpu", "--tokens"]),
            "overlap": ("overlap", OVERLAP, ["--gpu"]),
            "fit": ("fit", FIT, []),
            "gpus": ("gpus", {"--format": values("table", "json", "csv")}, []),
            "models": ("models", {"--config": st.sampled_from(PATHS), "--format": values("table", "json")}, [])}
POSITIONAL = {"fit": st.lists(st.sampled_from(PATHS + HOSTILE[:3]), min_size=1, max_size=2),
              "gpus": st.lists(GPU, max_size=2), "models": st.lists(MODEL, max_size=2)}
#: What a "no plan fits" answer says (table, JSON or CSV): the only output exit code 1 may carry.
NO_PLAN = re.compile(r"does NOT fit|no ring of up to|no setting|not even the shortest|\"feasible\": false|False")


@st.composite
def invocations(draw) -> tuple[str, list[str]]:
    """A command, its usual options (most of the time), a few random options and flags."""
    kind = draw(st.sampled_from(sorted(COMMANDS)))
    name, options, usual = COMMANDS[kind]
    args = [name]
    chosen = [o for o in usual if draw(st.integers(0, 9)) > 0]
    chosen += draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True))
    for option in dict.fromkeys(chosen):
        args += [option, draw(options[option])]
    args += draw(st.lists(st.sampled_from(FLAGS[kind]), max_size=2, unique=True))
    if kind in POSITIONAL:
        args += draw(POSITIONAL[kind])
    return kind, args


class RanTooLong(Exception):
    """Raised by the alarm inside an invocation that outlives ``HANG_LIMIT_S``."""


def _alarm(signum, frame):
    raise RanTooLong(f"hung: ran longer than {HANG_LIMIT_S} s")


def invoke(args: list[str]):
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_LIMIT_S)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invocations())
def test_cli_never_crashes(invocation):
    """Exit code 0, 1 only for "no plan fits" (capacity, plan), or 2 with one Error: line; no
    traceback, no uncaught exception, every run within RUN_LIMIT_S CPU seconds."""
    kind, args = invocation
    started = time.process_time()
    result = invoke(args)
    elapsed = time.process_time() - started
    shown = " ".join(a if len(a) < 60 else a[:60] + "…" for a in args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))[-3000:]
        raise AssertionError(f"ringplan {shown}: uncaught {trace}")
    assert elapsed < RUN_LIMIT_S, f"ringplan {shown}: {elapsed:.1f} CPU s"
    assert "Traceback" not in result.output, f"ringplan {shown}:\n{result.output[-2000:]}"
    assert result.exit_code in (0, 1, 2), f"ringplan {shown}: exit {result.exit_code}\n{result.output[-2000:]}"
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), f"ringplan {shown}:\n{result.output[-2000:]}"
    if result.exit_code == 1:
        assert kind in ("capacity", "model", "plan") and NO_PLAN.search(result.output), \
            f"ringplan {shown}: exit 1 without a no-plan answer\n{result.output[-2000:]}"
