"""The planner CLI through CliRunner: answers, formats, exit codes, every bad-input path, option set."""

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from ringplan.cli import main
from ringplan.paths import measured_dir

SEED = str(measured_dir() / "gtx1080-seed.json")

# Golden option sets (torchtitan's test_no_new_cli_options): a new option is a decision, update here.
EXPECTED_OPTIONS = {
    "capacity": ["--allow-cross-node", "--backend", "--batch", "--breakdown", "--catalog", "--causal", "--checkpointing",
                 "--config", "--cp",
                 "--dilation-rates", "--dtype", "--embed-dim", "--ffn", "--format", "--forward", "--forward-only",
                 "--gpu", "--gpu-spec", "--gpus", "--head-dim", "--heads", "--host-memory", "--kv-heads", "--layers",
                 "--layout",
                 "--loss", "--loss-chunk", "--max-world-size", "--mlp-tile", "--model", "--model-form", "--no-causal", "--no-offload",
                 "--no-offload-params", "--no-projections", "--no-step-time", "--offload", "--offload-params", "--plot",
                 "--profile", "--projections", "--ring-size", "--safety-margin", "--segment-lengths", "--shard-group", "--sharding", "--step-time",
                 "--tokens", "--tp", "--train", "--training", "--ulysses-degree", "--vocab",
                 "--world-size"],
    "gpus": ["--catalog", "--format", "--gpu-spec", "--links", "--sources"],
    "fit": ["--form", "--format", "--include-estimated", "--prior-weight", "--residuals", "--series", "--target",
            "--write"],
}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", sorted(EXPECTED_OPTIONS))
def test_no_new_cli_options(command):
    """The option set of each planner command is exactly the documented one, and every option has help."""
    cmd = main.get_command(None, command)
    options = sorted(o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-"))
    assert options == EXPECTED_OPTIONS[command]
    assert all(p.help for p in cmd.params if isinstance(p, click.Option))


def test_capacity_answers_the_readme_question():
    """`ringplan capacity --gpu a100-40gb --tokens 1M` prints a minimum world size and a table, exit 0."""
    result = run("capacity", "--gpu", "a100-40gb", "--tokens", "1M")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("answer: 1,000,000 tokens need 1 x a100-40gb")
    assert "| GPUs" in result.output and "uncertainty:" in result.output


def test_capacity_json_and_csv():
    """JSON has the query, the answer and per-row bytes that add up; CSV has a header and one line per row."""
    result = run("capacity", "--gpu", "h100", "--tokens", "4Mi", "--heads", "8", "--kv-heads", "2", "--train",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["answer"]["minimum_world_size"] >= 1 and data["query"]["n_kv_heads"] == 2
    for row in data["rows"]:
        parts = sum(v for k, v in row.items() if k.endswith("_bytes") and k not in (
            "total_bytes", "uncertainty_bytes", "usable_memory_bytes", "budget_bytes", "headroom_bytes"))
        assert parts == pytest.approx(row["total_bytes"], abs=len(row))
        assert row["seq_len_tokens"] == 4 * 2**20
    csv_out = run("capacity", "--gpu", "h100", "--tokens", "4Mi", "--format", "csv").output.splitlines()
    assert csv_out[0].startswith("world_size,seq_len_tokens,tokens_per_rank") and len(csv_out) >= 2


def test_capacity_max_tokens_and_single_check():
    """--world-size alone: the largest sequence (and the next that fails); with --tokens: one plan."""
    result = run("capacity", "--gpu", "h100", "--world-size", "8", "--format", "json")
    assert result.exit_code == 0
    answer = json.loads(result.output)["answer"]
    assert answer["max_tokens"] > 1_000_000 and answer["world_size"] == 8
    assert run("capacity", "--gpu", "h100", "--world-size", "8", "--tokens", "1M").exit_code == 0
    assert run("capacity", "--gpu", "h100", "--world-size", "1", "--tokens", "100M").exit_code == 1


def test_capacity_exit_1_when_nothing_fits():
    """No ring up to --max-world-size holds the sequence: a clear message and exit code 1."""
    result = run("capacity", "--gpu", "l4", "--tokens", "64Mi", "--max-world-size", "2")
    assert result.exit_code == 1
    assert "no ring of up to 2" in result.output


def test_capacity_seed_form_and_seed_shape():
    """The seed's own shape on a GTX 1080: --model-form seed uses the seed's profile (here
    extrapolated from gtx-1080, seed form); the calibrated form takes its parts from a GPU this runtime was measured
    on (the seed's figures are another implementation's), so it is 'transferred'."""
    shape = ["--heads", "12", "--head-dim", "64", "--embed-dim", "768", "--dtype", "fp32", "--projections",
             "--segment-lengths", "4096,8192,16384", "--dilation-rates", "1,2,4"]
    analytic = run("capacity", "--gpu", "gtx-1080", "--tokens", "196608", *shape, "--format", "json")
    assert analytic.exit_code == 0, analytic.output
    assert json.loads(analytic.output)["rows"][0]["provenance"].startswith("transferred from ")
    seed = run("capacity", "--gpu", "gtx-1080", "--tokens", "196608", *shape, "--model-form", "seed", "--format", "json")
    rows = json.loads(seed.output)["rows"]
    assert all(row["model_form"] == "seed" for row in rows)
    assert "from gtx-1080" in rows[0]["provenance"] and rows[0]["provenance"].endswith("(seed form)")


def test_capacity_plot(tmp_path):
    """--plot writes a PNG (skipped without matplotlib)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "capacity.png"
    result = run("capacity", "--gpu", "a100-40gb", "--tokens", "1M", "--plot", str(out))
    assert result.exit_code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _profile_with(tmp_path, mutate):
    data = json.loads(open(SEED).read())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


BAD_INPUTS = [
    (["capacity", "--gpu", "h100", "--tokens", "0"], "'0'"),
    (["capacity", "--gpu", "h100", "--tokens", "-5"], "'-5'"),
    (["capacity", "--gpu", "h100", "--tokens", "lots"], "'lots'"),
    (["capacity", "--gpu", "h100", "--tokens", "1,000,001", "--world-size", "2"], "1,000,000 or 1,000,002"),
    (["capacity", "--gpu", "h100", "--tokens", "1000001", "--layout", "zigzag"], "nearest valid lengths"),
    (["capacity", "--gpu", "h10", "--tokens", "1M"], "'h10'"),
    (["capacity", "--gpu", "a100", "--tokens", "1M"], "a100-40gb, a100-80gb"),
    (["capacity", "--gpu", "h100", "--tokens", "1Mi", "--segment-lengths", "4096,8192", "--dilation-rates", "1"],
     "[4096, 8192]"),
    (["capacity", "--gpu", "h100", "--tokens", "1M", "--segment-lengths", "4096", "--dilation-rates", "1"],
     "not a multiple of segment length 4096"),
    (["capacity", "--gpu", "h100", "--tokens", "1M", "--heads", "32", "--kv-heads", "3"], "n_kv_heads=3"),
    (["capacity", "--gpu", "h100"], "--tokens"),
    (["capacity", "--gpu", "h100", "--tokens", "1M", "--safety-margin", "1.5"], "1.5"),
    (["capacity", "--gpu", "h100", "--tokens", "1M", "--profile", "/nonexistent/profile.json"], "/nonexistent/profile.json"),
    (["fit", "/nonexistent/profile.json"], "/nonexistent/profile.json: profile file not found"),
    (["fit", SEED, "--series", "nope"], "'nope'"),
    (["gpus", "h10"], "'h10'"),
]


@pytest.mark.parametrize("args, fragment", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(args, fragment):
    """Each bad input: exit code 2, a single 'Error: …' line naming the value, no traceback."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception) or \
        isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["rows"][3].update(step_time_s=float("nan")), "rows[3].step_time_s is not a finite number: nan"),
    (lambda d: d["rows"][0].update(peak_allocated_bytes="lots"), "rows[0].peak_allocated_bytes is not a finite number"),
])
@pytest.mark.parametrize("command", ["fit", "capacity"])
def test_corrupt_profiles_exit_2(tmp_path, mutate, fragment, command):
    """A profile with a non-finite or non-numeric figure: one line naming file and field, exit 2."""
    path = _profile_with(tmp_path, mutate)
    args = ["fit", path] if command == "fit" else ["capacity", "--gpu", "h100", "--tokens", "1M", "--profile", path]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {path}: {fragment}" or (path in result.output and fragment in result.output)
    assert len(result.output.strip().splitlines()) == 1


def test_not_json_profile_exits_2(tmp_path):
    """A profile that is not JSON: one line naming the file, exit 2."""
    path = tmp_path / "broken.json"
    path.write_text("{rows: [")
    result = CliRunner().invoke(main, ["fit", str(path)])
    assert result.exit_code == 2 and f"{path}: not valid JSON" in result.output


def test_gpus_lists_the_catalog():
    """`ringplan gpus` lists every catalog GPU; JSON carries sources; one name can be asked for."""
    table = run("gpus").output
    for name in ("gtx-1080", "a100-40gb", "h100-80gb-sxm", "h200", "b200", "mi300x"):
        assert name in table
    records = json.loads(run("gpus", "--format", "json").output)
    assert all(r["sources"]["usable_memory_bytes"] for r in records)
    assert json.loads(run("gpus", "H100", "--format", "json").output)[0]["name"] == "h100-80gb-sxm"
    assert "nvlink-4" in run("gpus", "--links").output
    assert run("gpus", "--format", "csv").output.startswith("name,aliases,driver_name")


def test_fit_reports_the_seed_formula():
    """`ringplan fit` on the seed's memory-scaling series recovers 0.0089 MB/token and 150 MB."""
    result = run("fit", SEED, "--series", "memory-scaling", "--form", "seed", "--format", "json")
    fit = json.loads(result.output)["fits"][0]
    assert fit["mb_per_token"] == pytest.approx(0.0089, abs=2e-5)
    assert fit["overhead_mb"] == pytest.approx(150, abs=1)
    both = run("fit", SEED, "--residuals")
    assert both.exit_code == 0 and "seed form:" in both.output
    assert "analytic form: no rows of kind 'measured'" in both.output


def test_import_never_loads_torch():
    """Importing the planner and its CLI (and answering a query) never imports torch, scipy,
    matplotlib — nor numpy: the default model reads the committed fit (a stale fit fails here)."""
    code = ("import sys; from click.testing import CliRunner; from ringplan.cli import main; import ringplan; "
            "r = CliRunner().invoke(main, ['capacity', '--gpu', 'a100-40gb', '--tokens', '1M']); "
            "assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'scipy', 'matplotlib', 'numpy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_capacity_step_time_columns():
    """--step-time adds the time model's step time and exposed communication to every shown row;
    without it the columns stay out."""
    result = run("capacity", "--gpu", "h100", "--tokens", "1Mi", "--step-time", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert rows and all("step_time_ms" in row for row in rows)
    assert any(row["step_time_ms"] for row in rows)
    plain = json.loads(run("capacity", "--gpu", "h100", "--tokens", "1Mi", "--format", "json").output)["rows"]
    assert all("step_time_ms" not in row for row in plain)
