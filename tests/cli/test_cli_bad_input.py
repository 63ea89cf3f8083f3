"""Issue 18's bad inputs, one per case: exit code 2 and exactly one ``Error:`` line naming the option
(or file), never a traceback, refused before any planning work."""

import pytest
from click.testing import CliRunner

from ringplan.cli import main
from ringplan.cli.common import error_line

HUGE = "1" + "0" * 310
CAP = ["capacity", "--gpu", "h100", "--tokens", "1M"]
SIM = ["simulate", "--gpu", "h100", "--tokens", "1M"]
MODEL = ["capacity", "--model", "gpt2", "--gpu", "h100", "--tokens", "1M"]

CASES = [
    # item 9: integers of 300+ digits anywhere, non-finite timeouts
    (CAP + ["--heads", HUGE], "--heads"),
    (CAP + ["--batch", HUGE], "--batch"),
    (MODEL + ["--layers", HUGE], "--layers"),
    (MODEL + ["--vocab", HUGE], "--vocab"),
    (MODEL + ["--ffn", HUGE], "--ffn"),
    (SIM + ["--inter-bandwidth", HUGE, "--inter-latency-us", "5"], "--inter-bandwidth"),
    (CAP + ["--tokens", HUGE], "--tokens"),
    (["validate", "--world-size", "1", "--tokens", "1K", "--timeout", "inf"], "--timeout"),
    (["validate", "--world-size", "1", "--tokens", "1K", "--timeout", "nan"], "--timeout"),
    # item 11: nan / inf through every float option
    (["validate", "--world-size", "1", "--tokens", "1K", "--tolerance", "nan"], "--tolerance"),
    (["validate", "--world-size", "1", "--tokens", "1K", "--time-tolerance", "nan"], "--time-tolerance"),
    (["validate", "--world-size", "1", "--tokens", "1K", "--capacity-tolerance", "inf"], "--capacity-tolerance"),
    (["validate", "--world-size", "1", "--tokens", "1K", "--resolution", "nan"], "--resolution"),
    (CAP + ["--safety-margin", "nan"], "--safety-margin"),
    (["plan", "--model", "gpt2", "--gpu", "h100", "--tokens", "1M", "--safety-margin", "nan"], "--safety-margin"),
    (SIM + ["--step-overhead-us", "inf"], "--step-overhead-us"),
    (SIM + ["--intra-bandwidth", "10GB", "--intra-latency-us", "nan"], "--intra-latency-us"),
    (["fit", "--prior-weight", "nan"], "--prior-weight"),
    # item 12: empty list entries, Unicode digits, zero GPUs per node, a mistyped timing folder
    (CAP + ["--segment-lengths", "4096,,8192", "--dilation-rates", "1,2"], "--segment-lengths"),
    (CAP + ["--segment-lengths", ","], "--segment-lengths"),
    (["capacity", "--gpu", "h100", "--tokens", "１２３"], "--tokens"),
    (["capacity", "--gpu", "h100", "--tokens", "٣٠٠٠"], "--tokens"),
    (SIM + ["--intra-bandwidth", "٣GB", "--intra-latency-us", "5"], "--intra-bandwidth"),
    (CAP + ["--heads", "３２"], "--heads"),
    (SIM + ["--gpus-per-node", "0"], "--gpus-per-node"),
    (SIM + ["--timing-dir", "/nonexistent/timing"], "--timing-dir"),
    (SIM + ["--segment-lengths", "4096,", "--dilation-rates", "1"], "--segment-lengths"),
    (["capacity", "--gpu", "h100", "--world-size", "8", "--segment-lengths", "4294967291,4294967279",
      "--dilation-rates", "1,1"], "--segment-lengths"),
    # item 6: options bounded to what is meaningful
    (SIM + ["--timeline-width", "1000000000"], "--timeline-width"),
    (SIM + ["--ring-size", "10000"], "--ring-size"),
    (["capacity", "--gpu", "h100", "--tokens", "1M", "--max-world-size", str(10**18)], "--max-world-size"),
    # user files that are not regular files
    (MODEL[:1] + ["--config", "/dev/zero", "--gpu", "h100", "--tokens", "1M"], "--config"),
    (["fit", "/dev/zero"], "/dev/zero"),
    # item 10: simulate and overlap usage errors are one line like the others
    (SIM + ["--heads", "x"], "--heads"),
    (["overlap", "--scope", "sideways"], "--scope"),
]


@pytest.mark.parametrize("args, option", CASES)
def test_bad_input_is_one_error_line(args, option):
    """Exit code 2, one line starting 'Error:' that names the option or file, no exception."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and option in lines[0], result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(lines[0]) < 300


def test_error_line_folds_and_names():
    """OSError names its file; RecursionError names the user files; newlines fold into one line."""
    assert error_line(FileNotFoundError(2, "No such file or directory", "/x.json")) == \
        "/x.json: No such file or directory"
    assert error_line(RecursionError("maximum recursion depth exceeded"), ["a.json"]) == \
        "a.json: nested too deeply to read"
    assert error_line(ValueError("first\nsecond")) == "first; second"
    assert error_line(KeyError("h10")) == "h10"
    assert len(error_line(ValueError("x" * 10_000))) <= 501
