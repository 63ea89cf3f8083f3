"""Answers a person can read (issue 16): at COLUMNS=100 every default-output line fits in 100
columns, the answer comes first, every searched setting says (chosen) or (given); the old option
spellings still work; warnings and the "what would fit" hint."""

import json
import re

import pytest
from click.testing import CliRunner

from ringplan.cli import main

WIDTH = 100
GPUS = ["gtx-1080", "v100-16gb", "v100-32gb", "a10-24gb", "l4", "l40s", "rtx-4090", "a100-40gb", "a100-80gb",
        "h100-80gb-sxm", "h100-80gb-pcie", "h200", "b200", "mi300x"]
SEED = "profiles/measured/gtx1080-seed.json"

#: (command line, answer lines that must be present). Every subcommand; attention and --model;
#: feasible and infeasible; every catalog GPU.
MATRIX = (
    [(f"capacity --gpu {gpu} --tokens 1M", ["answer:", "memory:", "uncertainty:", "(chosen)"]) for gpu in GPUS]
    + [(f"capacity --gpu {gpu} --gpus 8 --train --causal --layout zigzag", ["answer:", "(given)", "causal"])
       for gpu in GPUS]
    + [
        ("capacity --gpu l4 --tokens 64Mi --max-world-size 2", ["answer: no ring of up to 2"]),
        ("capacity --gpu h100 --tokens 100M --gpus 1", ["do NOT fit", "would fit:"]),
        ("capacity --gpu h100 --tokens 1M --step-time", ["step:", "tokens/s"]),
        ("capacity --gpu h100 --tokens 1M --breakdown", ["term (GiB)", "kv_recv"]),
        ("capacity --gpu h100 --gpus 16 --tokens 4M", ["answer:", "2 nodes"]),
        ("capacity --model llama-3-8b --gpu h100 --tokens 1M --train", ["answer:", "settings:", "(chosen)",
                                                                         "host RAM:", "offload chosen:"]),
        ("capacity --model llama-3-8b --gpu h100 --tokens 128K --train --sharding zero3", ["(given)", "(chosen)"]),
        ("capacity --model qwen3-0.6b --gpu a100-80gb --gpus 2", ["answer:", "hold at most", "forward (prefill)"]),
        ("capacity --model llama-3-8b --gpu h100 --tokens 4M --gpus 8 --train", ["do NOT fit", "would fit:"]),
        ("capacity --model llama-3-70b --gpu h200 --tokens 256K --train --breakdown", ["term (GiB)"]),
        ("plan --model llama-3-8b --gpu h100 --tokens 1M", ["answer:", "settings:", "(chosen)", "step:"]),
        ("plan --model llama-3-8b --gpu h100 --tokens 4M --gpus 8 --no-step-time", ["no setting fits",
                                                                                   "would fit:"]),
        ("plan --model qwen3-8b --gpu a100-80gb --tokens 256K --all --no-step-time", ["answer:", "fits"]),
        ("plan --model mistral-7b-v0.1 --gpu l40s --tokens 64K --forward --no-step-time", ["forward (prefill)"]),
        ("gpus", ["h100-80gb-sxm", "GiB"]),
        ("gpus --links", ["nvlink-4"]),
        ("gpus h100 --sources", ["usable_memory_bytes"]),
        ("models", ["llama-3-8b", "params B"]),
        ("models llama-3-8b", ["aliases"]),
        ("simulate --gpu h100 --tokens 1M --ring-size 8", ["answer:", "per forward pass"]),
        ("simulate --gpu h100 --tokens 256K --ring-size 4 --causal --layout zigzag --train", ["training step"]),
        ("overlap --gpu h100", ["answer:", "min tokens/GPU"]),
        ("overlap --gpu h200 --heads 32 --kv-heads 8 --train", ["backward"]),
        (f"fit {SEED}", ["seed form:"]),
        (f"fit {SEED} --residuals", ["residuals"]),
        ("fit profiles/measured/h200-profile-2026-11-25.json --form theta", ["theta form:"]),
    ]
)


def run(args: str, **env):
    return CliRunner(env={"COLUMNS": str(WIDTH), **env}).invoke(main, args.split(), catch_exceptions=False)


def test_matrix_is_large():
    """The readability matrix covers at least 40 commands and every subcommand of the planner."""
    assert len(MATRIX) >= 40
    assert {args.split()[0] for args, _ in MATRIX} >= {"capacity", "plan", "fit", "gpus", "models", "simulate",
                                                       "overlap"}


@pytest.mark.parametrize("args,expected", MATRIX, ids=[args for args, _ in MATRIX])
def test_default_output_fits_100_columns(args, expected):
    """Every line of the default output (stdout and stderr) is at most 100 characters, the answer
    lines are present, and each searched setting shown is labelled (chosen) or (given)."""
    result = run(args)
    assert result.exit_code in (0, 1), result.output
    too_wide = [line for line in result.output.splitlines() if len(line) > WIDTH]
    assert not too_wide, too_wide
    for fragment in expected:
        assert fragment in result.output, (fragment, result.output)
    if "settings:" in result.output:
        block = " ".join(result.output.split("settings:", 1)[1].split("memory:", 1)[0].split())
        names = ["sharding", "checkpointing", "offload", "loss"]
        for setting, after in zip(names, names[1:] + [None]):
            value = block.split(setting, 1)[1]
            value = value.split(after, 1)[0] if after else value
            assert re.search(r"\((chosen|given|forward)\)", value), (setting, block)


def test_answer_comes_first():
    """The first line of an answer is the answer, not a header."""
    for args in ("capacity --gpu a100-40gb --tokens 1M", "capacity --model llama-3-8b --gpu h100 --tokens 1M",
                 "plan --model llama-3-8b --gpu h100 --tokens 1M --no-step-time"):
        assert run(args).stdout.splitlines()[0].startswith("answer: ")


def test_width_follows_the_terminal():
    """A wider terminal gets a wider table (the per-term breakdown keeps more columns)."""
    narrow = run("capacity --gpu h100 --gpus 64 --breakdown")
    wide = run("capacity --gpu h100 --gpus 64 --breakdown", COLUMNS="200")
    assert max(map(len, wide.stdout.splitlines())) > max(map(len, narrow.stdout.splitlines()))
    assert max(map(len, wide.stdout.splitlines())) <= 200


def test_json_gains_readable_fields():
    """JSON answers say which settings were chosen or given, causal, the layout with nodes, host RAM,
    tokens/s and warnings; the old fields stay."""
    data = json.loads(run("capacity --model llama-3-8b --gpu h100 --tokens 1M --train --sharding zero3 "
                          "--format json").stdout)
    answer = data["answer"]
    assert answer["minimum_world_size"] == answer["layout"]["world_size"] and "text" in answer
    assert answer["settings_source"]["sharding"] == "given"
    assert answer["settings_source"]["checkpointing"] == "chosen"
    assert answer["causal"] is True and answer["layout"]["nodes"] >= 1
    assert answer["host_ram_per_node_bytes"] >= 0 and isinstance(answer["warnings"], list)
    attention = json.loads(run("capacity --gpu h100 --tokens 1M --step-time --format json").stdout)["answer"]
    assert attention["causal"] is False and attention["tokens_per_s"] > 0
    assert attention["settings_source"]["world_size"] == "chosen"


def test_offload_names_the_alternative_it_beat():
    """When offload is chosen, the answer says what the run needs without it, and the host RAM per node."""
    result = run("capacity --model llama-3-8b --gpu h100 --tokens 1M --train")
    assert "offload chosen: without it the same plan needs" in result.stdout
    data = json.loads(run("capacity --model llama-3-8b --gpu h100 --tokens 1M --train --format json").stdout)
    assert data["answer"]["without_offload_bytes"] > data["answer"]["settings"]["total_bytes"]
    assert data["answer"]["host_ram_per_node_bytes"] > 0


def test_what_would_fit_when_nothing_does():
    """S on W that does not fit: the fewest GPUs that hold S and the most tokens W GPUs hold, in the
    text and in JSON; both answers are themselves feasible."""
    data = json.loads(run("capacity --gpu h100 --tokens 100M --gpus 1 --format json").stdout)["answer"]
    fewest, longest = data["would_fit"]["world_size"], data["would_fit"]["seq_len_tokens"]
    assert fewest > 1 and 0 < longest < 100_000_000
    assert run(f"capacity --gpu h100 --tokens 100M --gpus {fewest}").exit_code == 0
    assert run(f"capacity --gpu h100 --tokens {longest} --gpus 1").exit_code == 0
    plan = json.loads(run("plan --model llama-3-8b --gpu h100 --tokens 4M --gpus 8 --no-step-time "
                          "--format json").stdout)["answer"]
    assert plan["would_fit"]["world_size"] > 8 and plan["would_fit"]["seq_len_tokens"] < 4_000_000


@pytest.mark.parametrize("old,new", [
    ("simulate --gpu h100 --tokens 256K --ring-size 4 --training",
     "simulate --gpu h100 --tokens 256K --ring-size 4 --train"),
    ("overlap --gpu h100 --training", "overlap --gpu h100 --train"),
    ("overlap --gpu h100 --forward-only", "overlap --gpu h100 --forward"),
    ("capacity --gpu h100 --tokens 1M --training", "capacity --gpu h100 --tokens 1M --train"),
    ("capacity --gpu h100 --world-size 8", "capacity --gpu h100 --gpus 8"),
    ("plan --model llama-3-8b --gpu h100 --tokens 128K --world-size 8 --no-step-time",
     "plan --model llama-3-8b --gpu h100 --tokens 128K --gpus 8 --no-step-time"),
    ("plan --model llama-3-8b --gpu h100 --tokens 128K --forward-only --no-step-time",
     "plan --model llama-3-8b --gpu h100 --tokens 128K --forward --no-step-time"),
    ("plan --layers 4 --heads 8 --hidden 512 --ffn 1024 --vocab 1000 --gpu h100 --tokens 64K --no-step-time",
     "plan --layers 4 --heads 8 --embed-dim 512 --ffn 1024 --vocab 1000 --gpu h100 --tokens 64K --no-step-time"),
    ("capacity --gpu h100 --tokens 1M --dtype bfloat16", "capacity --gpu h100 --tokens 1M --dtype bf16"),
    ("capacity --gpu h100 --tokens 1M --dtype float32", "capacity --gpu h100 --tokens 1M --dtype fp32"),
    ("simulate --gpu h100 --tokens 1M --ring-size 8 --dtype float16",
     "simulate --gpu h100 --tokens 1M --ring-size 8 --dtype fp16"),
    ("capacity --gpu h100 --tokens 1e6", "capacity --gpu h100 --tokens 1M"),
    ("capacity --gpu h100 --tokens 1_000_000", "capacity --gpu h100 --tokens 1000000"),
    ("capacity --gpu h100 --tokens 1M --safety-margin 5%", "capacity --gpu h100 --tokens 1M --safety-margin 0.05"),
])
def test_aliases_give_the_same_answer(old, new):
    """Old and alternative spellings give byte-identical answers to the canonical ones."""
    assert run(old + " --format json").output == run(new + " --format json").output


def test_quiet_aliases_stay_out_of_help():
    """--help lists the canonical names (--train/--forward, --gpus, --embed-dim), not the old ones."""
    assert "--training" not in run("simulate --help").output and "--train" in run("simulate --help").output
    assert "--hidden " not in run("plan --help").output and "--embed-dim" in run("plan --help").output
    capacity_help = run("capacity --help").output.replace("alias --world-size", "")
    assert not re.search(r"(?<![\w-])--world-size", capacity_help)


def test_searched_options_say_so_in_help():
    """Searched settings say 'Searched when not given' instead of showing a default."""
    text = " ".join(run("plan --help").output.split())
    for flag in ("--sharding", "--checkpointing", "--offload", "--loss "):
        after = text.split(flag, 1)[1][:400]
        assert "Searched when not given" in after, flag
    assert "default: zero3" not in text


def test_safety_margin_as_percent_is_explained():
    """--safety-margin 5 is an error that suggests 0.05 or 5%."""
    result = run("capacity --gpu h100 --tokens 1M --safety-margin 5")
    assert result.exit_code == 2 and "did you mean 0.05" in result.output


def test_warnings_on_stderr_and_in_json():
    """A ring spanning nodes and a length beyond the model's positions warn on stderr (one line
    each) and in the JSON answer's warnings."""
    result = run("capacity --model llama-3-8b --gpu h100 --tokens 1M --gpus 16 --train --tp 1")
    assert "warning: the ring of 16 GPUs spans 2 nodes" in result.stderr
    tp = run("capacity --model llama-3-8b --gpu h100 --tokens 1M --gpus 16 --train --tp 8")
    assert "warning: the ring of 2 GPUs spans 2 nodes" in tp.stderr  # TP innermost: each hop strides 8 GPUs
    assert "warning: 1,000,000 tokens > llama-3-8b's 8,192 positions" in result.stderr
    data = json.loads(run("capacity --model llama-3-8b --gpu h100 --tokens 1M --gpus 16 --train "
                          "--format json").stdout)
    assert any("spans 2 nodes" in w for w in data["answer"]["warnings"])
    attention = run("capacity --gpu h100 --gpus 16 --tokens 4M")
    assert "spans 2 nodes" in attention.stderr


def test_times_are_readable():
    """Times print in ms / s / min / h."""
    from ringplan.cli.readable import time_text

    assert time_text(0.0123) == "12.3 ms" and time_text(3.2) == "3.2 s"
    assert time_text(600) == "10 min" and time_text(5 * 3600) == "5 h"
