"""Which local block kernel runs: capability checks, the ``auto`` order, and forced overrides.

Order on CUDA: cuDNN (sm90+, the fastest op that returns the LSE on H100: ~598 TFLOP/s bf16
non-causal at 32x128 heads vs 343 for the flash op, ../shared/ANCHORS.md) > flash (sm80+) >
memory-efficient > math. On CPU: the CPU flash op. A forced backend that cannot run the given
device/dtype/head_dim raises ``ValueError`` before any communication starts.
"""

from __future__ import annotations

import torch

from ringplan.workload import BACKENDS
from ringplan_runtime._compat import aten_op

CUDA_AUTO_ORDER: tuple[str, ...] = ("cudnn", "flash", "efficient", "math")
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
CPU_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (minimum compute capability, dtypes, largest head_dim); head_dim must be a multiple of 8.
# Limits from torch's sdp_utils checks (flash <= 256; cuDNN <= 128 kept conservative; the
# memory-efficient kernel also runs fp32).
CUDA_LIMITS: dict[str, tuple[tuple[int, int], tuple[torch.dtype, ...], int]] = {
    "cudnn": ((8, 0), HALF_DTYPES, 128),
    "flash": ((8, 0), HALF_DTYPES, 256),
    "efficient": ((5, 0), HALF_DTYPES + (torch.float32,), 256),
}
CUDNN_AUTO_MIN_CAPABILITY: tuple[int, int] = (9, 0)  # on A100 the flash op is the safer default
CUDA_OP_NAMES: dict[str, str] = {
    "cudnn": "_scaled_dot_product_cudnn_attention",
    "flash": "_scaled_dot_product_flash_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
}


def _cuda_reason(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    if aten_op(CUDA_OP_NAMES[backend]) is None:
        return f"this torch build has no aten.{CUDA_OP_NAMES[backend]}"
    min_capability, dtypes, max_head_dim = CUDA_LIMITS[backend]
    capability = torch.cuda.get_device_capability(device)
    if capability < min_capability:
        return f"needs compute capability >= {min_capability}, the GPU has {capability}"
    if dtype not in dtypes:
        return f"unsupported dtype {dtype} (supported: {[str(d) for d in dtypes]})"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head_dim {head_dim} must be a multiple of 8 and at most {max_head_dim}"
    if backend == "cudnn":
        version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if version is None or version < 90000:
            return f"needs cuDNN >= 9.0, found {version}"
    return None


def unsupported_reason(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``backend`` cannot run this block, or ``None`` when it can."""
    if backend == "cpu":
        if device.type != "cpu":
            return f"needs a CPU device, got {device}"
        return None if dtype in CPU_DTYPES else f"unsupported dtype {dtype} on CPU"
    if backend == "math":
        return None if dtype.is_floating_point else f"unsupported dtype {dtype} (needs floating point)"
    return _cuda_reason(backend, device, dtype, head_dim)


def select_backend(device, dtype: torch.dtype, head_dim: int, backend: str = "auto") -> str:
    """The local block kernel for ``device``/``dtype``/``head_dim``: ``backend`` if forced, else the fastest.

    Raises ``ValueError`` naming the reason when a forced backend cannot run, or when the name is unknown.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if backend != "auto":
        reason = unsupported_reason(backend, device, dtype, head_dim)
        if reason is not None:
            raise ValueError(f"forced backend {backend!r} cannot run on {device} with {dtype}, "
                             f"head_dim={head_dim}: {reason}")
        return backend
    if device.type != "cuda":
        return "cpu" if unsupported_reason("cpu", device, dtype, head_dim) is None else "math"
    for candidate in CUDA_AUTO_ORDER:
        if candidate == "cudnn" and torch.cuda.get_device_capability(device) < CUDNN_AUTO_MIN_CAPABILITY:
            continue
        if unsupported_reason(candidate, device, dtype, head_dim) is None:
            return candidate
    raise ValueError(f"no attention backend can run {dtype} head_dim={head_dim} on {device}")
