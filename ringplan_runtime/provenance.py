"""Where a measurement came from: hardware, software versions, code version, date, command, method.

Every measured profile row carries one ``Provenance`` (STYLE.md: "never hand-edit a measured
file: re-measure" — provenance is what makes re-measuring possible). The GPU name is the one
the driver reports (NVML, else torch), so a profile can be matched to a catalog entry by its
``driver_name``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ringplan_runtime import nvml

_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Hardware and software a measurement ran on, the code version, when, how, and by which method.

    ``gpu_name`` is the driver's name (``"NVIDIA H100 80GB HBM3"``) or the CPU's on CPU runs;
    ``gpu_count`` the devices used; version fields are None when not applicable (no CUDA/NCCL on CPU).
    """

    gpu_name: str
    gpu_count: int
    driver_version: str | None
    torch_version: str
    cuda_version: str | None
    nccl_version: str | None
    git_sha: str
    date_utc: str
    command: str
    method: str
    hostname: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def git_sha(repo_root: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the runtime's checkout; env ``RINGPLAN_GIT_SHA`` when git is absent."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root or _REPO_ROOT, capture_output=True,
                                text=True, timeout=10, check=True)
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("RINGPLAN_GIT_SHA", "unknown")


def nccl_version() -> str | None:
    """NCCL version torch was built with (``"2.21.5"``), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return None
    return ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)


def device_name(device_index: int | None = None) -> str:
    """The GPU's name as the driver reports it (NVML by UUID, else torch), or the CPU's name."""
    if device_index is None or not torch.cuda.is_available():
        return platform.processor() or platform.machine() or "cpu"
    from ringplan_runtime.measure import nvml_names

    for ref in nvml_names(torch.device("cuda", device_index)):
        name = nvml.gpu_name(ref)
        if name:
            return name
    return torch.cuda.get_device_name(device_index)


def command_line(argv: list[str] | None = None) -> str:
    """The exact command that ran, shell-quoted (``sys.argv`` with the program's base name)."""
    args = list(sys.argv if argv is None else argv)
    if args and args[0].endswith(("ringplan", "__main__.py")):
        args[0] = "ringplan"
    return shlex.join(args)


def current_provenance(*, method: str, gpu_count: int, device_index: int | None = None,
                       command: str | None = None) -> Provenance:
    """Provenance of a measurement that runs now on ``gpu_count`` devices (0 on CPU)."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    on_gpu = device_index is not None and torch.cuda.is_available()
    return Provenance(
        gpu_name=device_name(device_index if on_gpu else None), gpu_count=gpu_count,
        driver_version=nvml.driver_version() if on_gpu else None, torch_version=torch.__version__,
        cuda_version=torch.version.cuda if on_gpu else None, nccl_version=nccl_version() if on_gpu else None,
        git_sha=git_sha(), date_utc=now.isoformat().replace("+00:00", "Z"), command=command or command_line(),
        method=method, hostname=platform.node())
