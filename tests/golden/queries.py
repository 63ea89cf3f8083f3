"""The golden query set: every planner answer that a refactor must leave byte-identical.

``python tests/golden/queries.py --write`` records each query's exit code and output in
``tests/golden/answers.json``; ``tests/test_golden.py`` replays them and shows which changed.
A change that is meant to change answers rewrites the file and says why in its commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANSWERS = HERE / "answers.json"

GPUS = ["gtx-1080", "v100-16gb", "v100-32gb", "a10-24gb", "l4", "l40s", "rtx-4090", "a100-40gb",
        "a100-80gb", "h100-80gb-sxm", "h100-80gb-pcie", "h200", "b200", "mi300x"]
MODELS = ["llama-3-8b", "llama-3-70b", "qwen3-0.6b", "qwen3-8b", "qwen3-32b", "mistral-7b-v0.1",
          "gpt2", "gpt2-xl"]


def attention_queries() -> list[str]:
    queries = []
    for gpu in GPUS:
        queries.append(f"capacity --gpu {gpu} --tokens 1M")
        queries.append(f"capacity --gpu {gpu} --world-size 8")
    for gpu in ["h100", "h200", "a100-40gb", "gtx-1080", "l40s"]:
        queries += [
            f"capacity --gpu {gpu} --tokens 2M --train --causal --layout zigzag",
            f"capacity --gpu {gpu} --world-size 4 --heads 32 --kv-heads 8 --train --causal --layout zigzag",
            f"capacity --gpu {gpu} --tokens 512K --heads 12 --head-dim 64 --embed-dim 768 --projections",
            f"capacity --gpu {gpu} --world-size 2 --train --causal --layout contiguous",
            f"capacity --gpu {gpu} --tokens 196608 --world-size 4 --heads 12 --head-dim 64 --embed-dim 768"
            " --dtype fp32 --projections --segment-lengths 4096,8192,16384 --dilation-rates 1,2,4",
            f"capacity --gpu {gpu} --world-size 1 --model-form seed",
            f"capacity --gpu {gpu} --tokens 4M --heads 32 --kv-heads 1 --backend math",
            f"capacity --gpu {gpu} --world-size 3 --batch 2 --dtype fp16 --safety-margin 0.1",
        ]
    queries += [
        "capacity --gpu h100 --tokens 1M --step-time",
        "capacity --gpu h200 --world-size 8 --train --causal --layout zigzag --step-time",
        "capacity --gpu a100-40gb --tokens 1M --max-world-size 2",
        "capacity --gpu gtx-1080 --tokens 8M",
    ]
    return queries


def stack_queries() -> list[str]:
    queries = []
    for model in MODELS:
        for gpu in ["h100", "a100-80gb", "h200", "l40s"]:
            queries.append(f"capacity --model {model} --gpu {gpu} --tokens 128K --train")
        queries.append(f"capacity --model {model} --gpu h100 --gpus 8 --train")
        queries.append(f"capacity --model {model} --gpu h200 --gpus 2")
    base = "capacity --model llama-3-8b --gpu h100 --tokens 256K --train"
    for sharding in ["none", "zero1", "zero2", "zero3"]:
        for checkpointing in ["none", "selective", "full"]:
            queries.append(f"{base} --sharding {sharding} --checkpointing {checkpointing}")
    for extra in ["--offload", "--no-offload", "--loss full", "--loss chunked --loss-chunk 4096",
                  "--shard-group 2", "--ring-size 4", "--layout zigzag", "--batch 2"]:
        queries.append(f"{base} {extra}")
    queries += [
        "capacity --model qwen3-8b --gpu h100 --gpus 8 --train --checkpointing full",
        "capacity --model qwen3-8b --gpu h100 --gpus 8 --train --checkpointing full --no-offload",
        "capacity --model gpt2-xl --gpu h100 --gpus 2 --train --checkpointing none --loss full",
        "capacity --model gpt2-xl --gpu h100 --gpus 2 --train --checkpointing none --loss full --tokens 32768",
        "capacity --model gpt2-xl --gpu l40s --tokens 98304 --gpus 6 --train --sharding none"
        " --checkpointing full --loss full",
        "capacity --model gpt2-xl --gpu l40s --tokens 98304 --gpus 8 --train --sharding none"
        " --checkpointing full --loss full",
        "capacity --model llama-3-8b --gpu h100 --tokens 1M --train",
        "capacity --model llama-3-70b --gpu h100 --tokens 1M --train --gpus 64",
        "capacity --model llama-3-8b --gpu h100 --tokens 1M --layers 4 --vocab 32000 --ffn 8192",
        "capacity --model qwen3-0.6b --gpu gtx-1080 --tokens 32K --train",
    ]
    return queries


def plan_queries() -> list[str]:
    queries = []
    for model in ["llama-3-8b", "qwen3-0.6b", "mistral-7b-v0.1", "gpt2-xl", "llama-3-70b"]:
        for gpu in ["h100", "h200", "a100-80gb"]:
            queries.append(f"plan --model {model} --gpu {gpu} --tokens 256K --gpus 2")
        queries.append(f"plan --model {model} --gpu h100 --tokens 1M")
        queries.append(f"plan --model {model} --gpu h100 --tokens 128K --gpus 8 --all")
    queries += [
        "plan --model llama-3-8b --gpu h200 --tokens 256K --gpus 2 --step-time",
        "plan --model llama-3-8b --gpu h100 --tokens 512K --gpus 8 --forward",
        "plan --model llama-3-8b --gpu h100 --tokens 512K --gpus 8 --ring-size 4",
        "plan --model llama-3-8b --gpu h100 --tokens 512K --gpus 8 --sharding zero3 --checkpointing full",
        "plan --model llama-3-8b --gpu h100 --tokens 512K --gpus 8 --layout zigzag --step-time",
        "plan --hidden 2048 --heads 16 --kv-heads 4 --layers 8 --ffn 8192 --vocab 32000 --gpu h100"
        " --tokens 128K --gpus 2",
        "plan --model qwen3-8b --gpu h100 --tokens 256K --gpus 4 --dtype bf16 --master-dtype fp32",
        "plan --model llama-3-8b --gpu l40s --tokens 64K --gpus 4 --loss chunked --loss-chunk 2048",
    ]
    return queries


def time_queries() -> list[str]:
    queries = []
    for gpu in ["h100", "h200", "a100-80gb", "gtx-1080", "mi300x"]:
        dtype = " --dtype fp32" if gpu == "gtx-1080" else ""
        queries.append(f"simulate --gpu {gpu} --tokens 1M --ring-size 8{dtype}")
        queries.append(f"simulate --gpu {gpu} --tokens 256K --ring-size 4 --causal --layout zigzag --training{dtype}")
    queries += [
        "simulate --gpu h100 --tokens 1M --ring-size 16 --causal --layout contiguous",
        "simulate --gpu h100 --tokens 2M --ring-size 32 --nodes 4 --inter-link infiniband-ndr-400",
        "simulate --gpu h100 --tokens 1M --ring-size 8 --heads 32 --kv-heads 8 --projections",
        "simulate --gpu h200 --tokens 512Ki --ring-size 4 --segment-lengths 8192,16384 --dilation-rates 1,2",
        "simulate --gpu h100 --tokens 1M --ring-size 8 --intra-bandwidth 100GB --intra-latency-us 20",
        "simulate --gpu h100 --tokens 1M --ring-size 8 --step-overhead-us 50 --timeline-ranks 0,7",
        "simulate --gpu a100-40gb --tokens 128K --ring-size 2 --dtype fp16 --batch 2",
        "overlap",
        "overlap --gpu h100 --gpu a100-80gb",
        "overlap --gpu h100 --causal --layout zigzag --training",
        "overlap --gpu h200 --heads 32 --kv-heads 8 --scope both",
        "overlap --gpu h100 --scope inter --inter-link infiniband-ndr-400",
        "overlap --gpu gtx-1080 --head-dim 64 --heads 12 --dtype fp32",
        "overlap --gpu b200 --batch 4",
    ]
    return queries


def fit_queries() -> list[str]:
    return [
        "fit profiles/measured/gtx1080-seed.json",
        "fit profiles/measured/gtx1080-seed.json --series memory-scaling --form seed",
        "fit profiles/measured/h100-profile-2026-11-25.json",
        "fit profiles/measured/h100-profile-2026-11-25.json --form both",
        "fit profiles/measured/h200-profile-2026-11-25.json --form theta",
        "fit profiles/measured/h200-profile-2026-11-25.json --target peak_allocated_bytes",
        "fit profiles/measured/h100-profile-2026-11-25.json profiles/measured/h200-profile-2026-11-25.json",
        "fit profiles/measured/stack/stack-h100-2026-11-26.json",
        "fit profiles/measured/stack/stack-h200-2026-11-26.json",
        "gpus",
        "gpus --links",
        "models",
    ]


def all_queries() -> list[str]:
    """Each query once, in the json format (the complete answer) and a few as tables."""
    base = attention_queries() + stack_queries() + plan_queries() + time_queries() + fit_queries()
    queries = [f"{query} --format json" for query in base]
    queries += [query for query in base[::9]]  # every 9th also as the default table
    return list(dict.fromkeys(queries))


def fresh_models() -> None:
    """Forget the memory models a previous query built, so each answer is the one a fresh process
    gives: a model memoises its predictions, and the searches' lower bound reads an exact figure
    once it was predicted, so which equal-memory setting a table shows could depend on the queries
    (or tests) run before it in the same process."""
    from ringplan.memory.attention_model import default_memory_model
    from ringplan.memory.stack_model import default_stack_memory_model

    default_stack_memory_model.cache_clear()
    default_memory_model.cache_clear()


def run_query(query: str) -> dict:
    from click.testing import CliRunner

    from ringplan.cli import main

    fresh_models()
    result = CliRunner().invoke(main, query.split(), catch_exceptions=True)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += f"\nEXCEPTION {type(result.exception).__name__}: {result.exception}"
    return {"exit_code": result.exit_code, "output": output}


REPORTS = ["benchmarks/accuracy_report.py", "benchmarks/stack_accuracy.py"]


def report_outputs(script: str) -> dict[str, dict]:
    """The files a benchmark report writes, less the line naming its own command."""
    import subprocess
    import tempfile

    repo = HERE.parent.parent
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, str(repo / script), "--out", out], cwd=repo,
                              capture_output=True, text=True, check=False)
        outputs = {f"{script} exit": {"exit_code": done.returncode, "output": done.stderr[-2000:]}}
        for path in sorted(Path(out).iterdir()):
            lines = [line.replace(str(repo), "<repo>") for line in path.read_text().splitlines() if out not in line]
            outputs[f"{script} {path.name}"] = {"exit_code": 0, "output": "\n".join(lines)}
    return outputs


def answers() -> dict[str, dict]:
    recorded = {query: run_query(query) for query in all_queries()}
    for script in REPORTS:
        recorded.update(report_outputs(script))
    return recorded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="record the answers in answers.json")
    args = parser.parse_args()
    recorded = answers()
    if args.write:
        ANSWERS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        print(f"{len(recorded)} answers written to {ANSWERS}")
    else:
        print(f"{len(recorded)} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
