"""Whole-model CLI through CliRunner: `capacity --model` (fewest GPUs, most tokens, one check),
`plan` (ranked settings, --all), exit codes, every bad-input path, option set, no numpy at start."""

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ringplan.cli import main

HF_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "hf_configs"
# Golden option set (torchtitan's test_no_new_cli_options): a new option is a decision, update here.
PLAN_OPTIONS = ["--all", "--allow-cross-node", "--backend", "--batch", "--breakdown", "--catalog", "--checkpointing", "--config", "--cp", "--dtype",
                "--embed-dim", "--ffn", "--ffn-type", "--format", "--forward", "--forward-only", "--gpu", "--gpu-spec",
                "--gpus",
                "--head-dim", "--heads", "--hidden", "--host-memory", "--kv-heads",
                "--layers", "--layout", "--loss", "--loss-chunk", "--master-dtype", "--max-world-size", "--mlp-tile", "--model",
                "--no-offload", "--no-offload-params", "--no-qk-norm", "--no-step-time", "--norm", "--offload",
                "--offload-params", "--qk-norm", "--ring-size",
                "--safety-margin", "--shard-group", "--sharding", "--step-time", "--tied-embeddings", "--tokens",
                "--tp", "--train", "--training", "--ulysses-degree", "--untied-embeddings", "--vocab", "--world-size"]
LLAMA_1M = ["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1M", "--train"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def as_json(*args: str) -> dict:
    result = run(*args, "--format", "json")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)


def test_plan_option_set():
    """The plan command's options are exactly the documented ones, each with help."""
    cmd = main.get_command(None, "plan")
    options = sorted(o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-"))
    assert options == PLAN_OPTIONS
    assert all(p.help for p in cmd.params if isinstance(p, click.Option))


def test_capacity_model_fewest_gpus():
    """`capacity --model llama-3-8b --gpu h100 --tokens 1M --train`: the fewest GPUs, the settings,
    tokens per GPU and memory by term; the answer row fits and every row with fewer GPUs does not."""
    result = run(*LLAMA_1M)
    assert result.exit_code == 0, result.output
    assert "1,000,000 tokens need" in result.output and "llama-3-8b" in result.output
    data = as_json(*LLAMA_1M)
    minimum = data["answer"]["minimum_world_size"]
    rows = {row["world_size"]: row for row in data["rows"]}
    assert rows[minimum]["feasible"] and rows[minimum]["tokens_per_rank"] * rows[minimum]["ring_size"] == 1_000_000
    assert all(not row["feasible"] for w, row in rows.items() if w < minimum)
    answer_row = rows[minimum]
    terms = [k for k in answer_row if k.endswith("_bytes") and k not in
             ("total_bytes", "residual_bound_bytes", "uncertainty_bytes", "usable_memory_bytes", "budget_bytes",
              "headroom_bytes")]
    assert sum(answer_row[k] for k in terms) == pytest.approx(answer_row["total_bytes"], abs=len(terms))
    assert answer_row["total_bytes"] + answer_row["residual_bound_bytes"] <= answer_row["budget_bytes"] + 1


def test_capacity_model_hints_a_length_that_splits():
    """1,000,001 = 101 × 9,901 splits over few world sizes: the answer (101 GPUs) is right under the
    constraints, and the note names the rounded length's answer, which needs fewer GPUs; a length
    whose answer is a power of two gets no note."""
    result = run("capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1000001", "--train")
    assert result.exit_code == 0, result.output
    assert "101 x" in result.output and "note: 1,000,001 splits evenly over few GPU counts" in result.output
    rounded = as_json("capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "999424", "--train")
    assert f"999,424 tokens fit on {rounded['answer']['minimum_world_size']} x" in result.output
    assert "note:" not in run(*LLAMA_1M).output


def test_capacity_model_max_tokens_and_check():
    """--gpus K alone: the most tokens (that length fits, the next valid one is named); with
    --tokens: one check, exit 0 when it fits and 1 when not."""
    data = as_json("capacity", "--model", "llama-3-8b", "--gpu", "h100", "--gpus", "8", "--train")
    best = data["answer"]["max_tokens"]
    assert best and data["rows"][0]["feasible"] and data["rows"][0]["seq_len_tokens"] == best
    fits = run("capacity", "--model", "llama-3-8b", "--gpu", "h100", "--gpus", "8", "--tokens", str(best), "--train")
    assert fits.exit_code == 0 and "tokens fit on 8 x" in fits.output
    unit = 8  # contiguous layout over a ring of 8
    over = run("capacity", "--model", "llama-3-8b", "--gpu", "h100", "--gpus", "8", "--tokens", str(best + unit),
               "--train")
    assert over.exit_code == 1 and "do NOT fit" in over.output


def test_capacity_model_exit_1_when_nothing_fits():
    """Nothing fits within --max-world-size: a one-line answer and exit code 1 (as the attention capacity)."""
    result = run("capacity", "--model", "llama-3-70b", "--gpu", "gtx-1080", "--tokens", "1M", "--train",
                 "--max-world-size", "4")
    assert result.exit_code == 1 and "no setting on up to 4" in result.output


def test_capacity_model_forward_csv_and_config():
    """Forward (prefill) plans, CSV output, and a model read from a local config.json."""
    forward = as_json("capacity", "--model", "qwen3-0.6b", "--gpu", "h100", "--tokens", "128Ki", "--forward")
    assert all(row["sharding"] == "none" and row["checkpointing"] == "none" for row in forward["rows"])
    csv = run("capacity", "--model", "qwen3-0.6b", "--gpu", "h100", "--tokens", "128Ki", "--format", "csv")
    assert csv.exit_code == 0 and csv.output.splitlines()[0].startswith("world_size,ring_size,data_parallel")
    from_file = run("capacity", "--config", str(HF_CONFIGS / "qwen3-0.6b.json"), "--gpu", "h100", "--tokens", "64Ki",
                    "--train")
    assert from_file.exit_code == 0 and "model: qwen3-0.6b" in from_file.output, from_file.output
    bad = run("capacity", "--config", str(HF_CONFIGS / "bad-kv-heads.json"), "--gpu", "h100", "--tokens", "64Ki")
    assert bad.exit_code == 2 and "Error:" in bad.output


def test_capacity_model_pinned_settings():
    """Settings options given are pinned: every row uses them."""
    data = as_json(*LLAMA_1M, "--sharding", "zero2", "--checkpointing", "full")
    assert all(row["sharding"] == "zero2" and row["checkpointing"] == "full" for row in data["rows"])
    offload = as_json(*LLAMA_1M, "--offload")
    assert all(row["offload_checkpoints"] and row["checkpointing"] == "full" for row in offload["rows"])


def test_plan_ranks_feasible_settings():
    """`plan`: every feasible setting, ranked (by step time when the time model gives one), each
    within budget; --all adds the infeasible ones, each with why."""
    data = as_json("plan", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "256Ki", "--gpus", "8")
    rows = data["rows"]
    assert rows and all(row["feasible"] and row["headroom_bytes"] >= 0 for row in rows)
    times = [row["step_time_s"] for row in rows if row["step_time_s"] is not None]
    assert times == sorted(times)
    everything = as_json("plan", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "256Ki", "--gpus", "8", "--all")
    infeasible = [row for row in everything["rows"] if not row["feasible"]]
    assert len(everything["rows"]) > len(rows) and all("budget" in row["why"] for row in infeasible)
    assert run("plan", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "256Ki", "--gpus", "8",
               "--no-step-time").exit_code == 0


def test_plan_exit_1_and_all_lists_why():
    """No setting fits: exit 1; the table with --all says why for each."""
    result = run("plan", "--model", "llama-3-70b", "--gpu", "h100", "--tokens", "1M", "--gpus", "2", "--all",
                 "--no-step-time")
    assert result.exit_code == 1 and "no setting fits" in result.output and "would fit:" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["capacity", "--model", "llama-9b", "--gpu", "h100", "--tokens", "1M"], "closest names"),
    (["capacity", "--model", "llama-3-8b", "--kv-heads", "5", "--gpu", "h100", "--tokens", "1M"], "n_kv_heads"),
    (["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1M", "--gpus", "8", "--shard-group", "16",
      "--train"], "larger than the world size"),
    (["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1M", "--gpus", "8", "--shard-group", "16"],
     "larger than the world size"),
    (["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1000001", "--gpus", "8"], "does not split"),
    (["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1000001", "--layout", "zigzag"],
     "does not split"),
    (["capacity", "--gpu", "h100", "--tokens", "1M", "--sharding", "zero2"], "give --model"),
    (["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1M", "--segment-lengths", "4096",
      "--dilation-rates", "1"], "one attention layer"),
    (["capacity", "--model", "llama-3-8b", "--config", "x.json", "--gpu", "h100", "--tokens", "1M"], "not both"),
    (["capacity", "--model", "llama-3-8b", "--gpu", "h100", "--gpus", "6", "--ring-size", "4"], "cannot be split"),
    (["plan", "--model", "llama-9b", "--gpu", "h100", "--tokens", "1M"], "closest names"),
    (["plan", "--model", "llama-3-8b", "--heads", "30", "--gpu", "h100", "--tokens", "1M"], "n_kv_heads"),
    (["plan", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1M", "--gpus", "4", "--shard-group", "8"],
     "larger than the world size"),
    (["plan", "--model", "llama-3-8b", "--gpu", "h100", "--tokens", "1000001", "--gpus", "8"], "does not split"),
    (["plan", "--model", "llama-3-8b", "--gpu", "h200x", "--tokens", "1M"], "closest"),
])
def test_bad_input_is_one_line_exit_2(args, fragment):
    """Bad input: one line naming the problem, exit code 2, no traceback."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output


def test_capacity_model_needs_no_numpy():
    """`capacity --model ... --train --no-step-time` never imports numpy, scipy or torch (memory from the
    committed fits, settings by the documented order); by default the step time loads the time model
    (numpy), never scipy (its fits are solved with numpy) nor torch."""
    for args, refused in ((LLAMA_1M + ["--no-step-time"], ("torch", "scipy", "numpy")), (LLAMA_1M, ("torch", "scipy"))):
        code = ("import sys; from click.testing import CliRunner; from ringplan.cli import main; "
                f"r = CliRunner().invoke(main, {args!r}); assert r.exit_code == 0, r.output; "
                f"bad = [m for m in {refused!r} if m in sys.modules]; assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True)
