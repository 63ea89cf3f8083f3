"""--gpu-spec and --catalog on every planning command (issue 17): answers for hardware outside the catalog
say which measured GPU their fits came from; bad input is one `Error:` line and exit code 2."""

import json

import pytest
from click.testing import CliRunner

from ringplan.cli import main

SPEC = "memory=96GiB,bf16=989TF,hbm=3.35TB/s,link=450GB/s,gpus-per-node=8"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_capacity_on_a_gpu_outside_the_catalog():
    """`capacity --gpu-spec ... --tokens 1M` answers on the 96 GiB card, its fit transferred from a measured GPU."""
    result = run("capacity", "--gpu-spec", SPEC, "--tokens", "1M", "--format", "json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["query"]["gpu"] == "custom" and answer["query"]["usable_memory_bytes"] == 96 * 2**30
    assert answer["answer"]["minimum_world_size"] >= 1
    assert all("transferred from" in row["provenance"] for row in answer["rows"])
    table = run("capacity", "--gpu-spec", SPEC + ",name=next-gpu", "--tokens", "1M")
    assert "x next-gpu" in table.output and "transferred from" in table.output


def test_spec_on_a_catalog_gpu_changes_the_budget():
    """--gpu NAME --gpu-spec memory=...: that GPU with more memory; the budget follows the given memory."""
    result = run("capacity", "--gpu", "h100", "--gpu-spec", "memory=96GiB", "--tokens", "1M", "--format", "json")
    assert result.exit_code == 0, result.output
    query = json.loads(result.stdout)["query"]
    assert query["gpu"] == "h100-80gb-sxm(memory=96GiB)" and query["usable_memory_bytes"] == 96 * 2**30


def test_every_planning_command_takes_a_spec():
    """plan, simulate, overlap and gpus answer for the spec'd GPU."""
    plan = run("plan", "--gpu-spec", SPEC, "--model", "llama-3-8b", "--tokens", "128K", "--format", "json")
    assert plan.exit_code == 0, plan.output
    sim = run("simulate", "--gpu-spec", SPEC, "--tokens", "256K", "--ring-size", "4", "--format", "json")
    assert sim.exit_code == 0, sim.output
    over = run("overlap", "--gpu-spec", SPEC, "--format", "json")
    assert over.exit_code == 0 and {row["gpu"] for row in json.loads(over.stdout)} == {"custom"}
    listed = run("gpus", "--gpu-spec", SPEC, "--format", "json")
    assert [g["name"] for g in json.loads(listed.stdout)] == ["custom"]
    assert json.loads(listed.stdout)[0]["intra_node_bandwidth_bytes_per_s"] == 450e9


def test_catalog_file_on_capacity_and_gpus(tmp_path):
    """--catalog FILE: its GPU is listed by `gpus` and planned for by `capacity --gpu NAME`."""
    entry = {"name": "mi250", "driver_name": "AMD Instinct MI250", "usable_memory_bytes": 128 * 10**9,
             "peak_flops_per_s": {"bf16": 362e12}, "hbm_bandwidth_bytes_per_s": 3.2e12,
             "intra_node_link": "xgmi-mi300x", "inter_node_link": "infiniband-hdr-200", "gpus_per_node": 8}
    path = tmp_path / "my-gpus.json"
    path.write_text(json.dumps({"schema": "ringplan.catalog/1", "gpus": [entry]}))
    listed = run("gpus", "--catalog", str(path), "--format", "json")
    assert "mi250" in [g["name"] for g in json.loads(listed.stdout)]
    result = run("capacity", "--catalog", str(path), "--gpu", "mi250", "--tokens", "1M")
    assert result.exit_code == 0 and "x mi250" in result.output and "transferred from" in result.output


@pytest.mark.parametrize("args, named", [
    (["capacity", "--gpu-spec", "memory=lots,bf16=989TF,hbm=3TB/s,link=450GB/s,gpus-per-node=8", "--tokens", "1M"],
     "memory=lots"),
    (["capacity", "--gpu-spec", SPEC + ",tf32=1", "--tokens", "1M"], "accepted keys"),
    (["plan", "--gpu-spec", "bf16=989TF", "--model", "llama-3-8b", "--tokens", "1M"], "lacks memory"),
    (["simulate", "--gpu-spec", SPEC.replace("node=8", "node=x"), "--tokens", "1M"], "gpus-per-node=x"),
    (["overlap", "--gpu-spec", "hbm=fast"], "hbm=fast"),
    (["capacity", "--tokens", "1M"], "give --gpu NAME"),
    (["capacity", "--catalog", "CATALOG", "--gpu", "h100", "--tokens", "1M"], "usable_memory_bytes"),
    (["gpus", "--catalog", "CATALOG"], "usable_memory_bytes"),
])
def test_bad_hardware_input_is_one_error_line(tmp_path, args, named):
    """Malformed --gpu-spec fields and a catalog file that fails validation: one `Error:` line (naming the
    field, and the file), exit code 2."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"schema": "ringplan.catalog/1", "gpus": [
        {"name": "x", "driver_name": "X", "usable_memory_bytes": 0, "peak_flops_per_s": {"bf16": 1e12},
         "hbm_bandwidth_bytes_per_s": 1e12, "intra_node_link": "nvlink-4", "inter_node_link": "nvlink-4",
         "gpus_per_node": 8}]}))
    result = run(*[str(path) if a == "CATALOG" else a for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and named in lines[0]
    if "CATALOG" in args:
        assert str(path) in lines[0]
