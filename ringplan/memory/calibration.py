"""Calibrated memory model: the analytic byte terms with θ = 1, and only what they cannot know fitted.

The terms φ_j of ``ringplan.memory.attention_terms`` are the bytes of the tensors live at the peak, which is
what the live-tensor tracker measures (CI checks it on CPU for every runtime path; on 2×H200 the
tracked peak was Σφ + 16-32 bytes on every row of the current runtime). They are used as they are.
Three parts the terms cannot know are fitted per GPU (kernels and allocators differ):

* **workspace** ``W = peak allocated − Σφ``: memory the local kernel allocates inside the op (cuDNN's
  fp32 dQ accumulator and softmax statistics in backward, the cuBLAS workspace of the projections)
  and allocator granularity. Linear in a constant, the fp32 rows ``B·n·H·(D+1)·4`` and the same
  again under GQA; per kernel family (``memory_fits.kernel_family``: the ring does not matter).
  2×H200, cuDNN, bf16: forward 3 KiB; training one fp32 row block (two under GQA); the seed's
  dilated module with projections 33 MiB.
* **allocator slack** ``R = peak reserved − peak allocated``: the caching allocator's rounding and
  the blocks it keeps. Linear in a constant, the allocated bytes and the ring state (received K/V,
  fp32 accumulators and merge temporaries, fp32 dQ and travelling dK/dV); per kernel family, one GPU
  and a ring apart in training (``memory_fits.slack_family``). 2×H200: a few MiB up to 0.25% of
  allocated, but training on a ring 1.3 × the ring state.
* **memory outside the allocator** ``O = device used − peak reserved`` (CUDA context, cuBLAS/cuDNN
  handles, NCCL communicator and P2P buffers): a context constant, plus indicator terms for the
  projections (GEMM libraries), a ring (NCCL communicator) and ring traffic (P2P buffers, made on the
  first send/recv). 2×H200: 1.90 GB + 0.06 + 0.30 + 0.46 GB. Assumes one peer pair per rank whatever
  P (a rank sends to one neighbour and receives from the other).

Each part is a non-negative least-squares fit (``scipy.optimize.lsq_linear``, imported only to fit).

Rows of an older runtime (tracked peak above Σφ by more than ``STALE_TOLERANCE``: the runtime then
held tensors it no longer does) do not enter W when the kernel family has current rows; when it has
none they do, as measured (conservative: their extra tensors count as workspace). Their slack and
outside-allocator memory are used as measured.

Plans assume NCCL's P2P buffers on every ring (``assume_ring_traffic``): once any exchange has run
in the process (another layer, a warm-up, the emulator's calibration step) NCCL keeps them, and a
plan must not depend on a dilated layer never exchanging. A recorded run is predicted as it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ringplan.memory.attention_fits import kernel_family, row_family, row_inputs, slack_family
from ringplan.memory.attention_terms import TermInputs, branches, terms_at
from ringplan.memory.part_fit import CALIBRATION_KINDS, Calibration, PartFit, PartPoint, fit_part
from ringplan.profiles.attention import Measurement
from ringplan.units import FP32_BYTES
#: Tracked peak above Σφ by more than this fraction: the row was measured with an older runtime.
STALE_TOLERANCE = 0.005
WORKSPACE_FEATURES: tuple[str, ...] = ("constant_bytes", "fp32_rows", "gqa_fp32_rows")
SLACK_FEATURES: tuple[str, ...] = ("constant_bytes", "allocated", "ring_state")
OVERHEAD_FEATURES: tuple[str, ...] = ("context_bytes", "projections_bytes", "communicator_bytes", "p2p_buffers_bytes")
#: Terms held by the ring machinery (zero on one GPU).
RING_STATE_TERMS: tuple[str, ...] = ("kv_recv_bytes", "accumulator_bytes", "merge_temporaries_bytes",
                                     "dq_accumulator_bytes", "dkv_accumulator_bytes")


# ----------------------------------------------------------------------------- features


def fp32_rows_bytes(p: TermInputs) -> float:
    """One fp32 row block of the local queries: B·n·H·(D+1)·4 bytes (a dQ-sized fp32 buffer plus
    one fp32 statistic per row), the size of a tiled backward's internal workspace."""
    return p.batch * p.tokens_per_rank * p.n_heads * (p.head_dim + 1) * FP32_BYTES


#: Name tags of catalog GPUs of compute capability >= 9.0 (Hopper, Blackwell): where the runtime's ``auto``
#: runs cuDNN SDPA (``ringplan_runtime.backends.CUDNN_AUTO_MIN_CAPABILITY``; sm80 A100, sm89 L40S/RTX 4090 and
#: older get the flash op, fp32 the memory-efficient one). AMD GPUs have no cuDNN.
CUDNN_AUTO_GPU_TAGS: tuple[str, ...] = ("h100", "h200", "h800", "h20", "b200", "b100", "gb200")


def auto_backend(gpu_name: str, *, head_dim: int, half_precision: bool) -> str:
    """The local kernel the runtime's ``auto`` runs on ``gpu_name`` (``ringplan_runtime.backends.select_backend``):
    cuDNN on sm90+ for bf16/fp16 up to head_dim 128, then flash for bf16/fp16 up to 256, then the
    memory-efficient kernel (the only one for fp32) up to 256, else math. head_dim must be a multiple of 8
    for every fused kernel. Ignores: a torch build without cuDNN >= 9 (the runtime then falls to flash)."""
    aligned = head_dim % 8 == 0
    if half_precision and aligned and head_dim <= 128 and any(tag in gpu_name.lower() for tag in CUDNN_AUTO_GPU_TAGS):
        return "cudnn"
    if half_precision and aligned and head_dim <= 256:
        return "flash"
    return "efficient" if aligned and head_dim <= 256 else "math"


def kernel_backend(p: TermInputs, gpu_name: str | None) -> str:
    """The backend that runs ``p``'s blocks: the forced one, else ``auto_backend`` on ``gpu_name``
    (ValueError when ``auto`` has no GPU to resolve on)."""
    if p.backend != "auto":
        return p.backend
    if gpu_name is None:
        raise ValueError("backend 'auto' needs the GPU to tell which kernel runs (and so its workspace)")
    return auto_backend(gpu_name, head_dim=p.head_dim, half_precision=p.dtype_bytes == 2)


def gqa_fp32_rows_bytes(p: TermInputs, backend: str) -> float:
    """``fp32_rows_bytes`` again under GQA (H_kv < H) when ``backend`` is cuDNN, else 0: on H100 and H200
    cuDNN's GQA backward held twice the MHA workspace (fitted coefficient 0.99 on both). Flash and the
    memory-efficient kernel are run on K/V expanded to H heads by the runtime (the ``attention_terms``
    count that copy), so their workspace is the MHA one; not measured on a non-cuDNN GPU."""
    return fp32_rows_bytes(p) if backend == "cudnn" and p.n_kv_heads < p.n_heads else 0.0


def ring_state_bytes(terms: dict[str, float]) -> float:
    """Bytes of the terms the ring machinery holds (received K/V, accumulators, merge temporaries,
    travelling gradients): what the allocator caches between ring steps."""
    return sum(terms.get(name, 0.0) for name in RING_STATE_TERMS)


def ring_traffic(p: TermInputs) -> bool:
    """True when some attention branch exchanges K/V between ranks (a dilated branch whose segment
    fits one rank's chunk does not, so no NCCL P2P buffers are made)."""
    return any(b.group > 1 for b in branches(p))


def workspace_features(p: TermInputs, gpu_name: str | None = None) -> dict[str, float]:
    """The workspace features of ``p`` on ``gpu_name`` (needed when ``p.backend`` is ``auto``: the GQA
    doubling follows the backend that GPU runs, ``kernel_backend``)."""
    return {"constant_bytes": 1.0, "fp32_rows": fp32_rows_bytes(p),
            "gqa_fp32_rows": gqa_fp32_rows_bytes(p, kernel_backend(p, gpu_name))}


def slack_features(terms: dict[str, float], allocated_bytes: float) -> dict[str, float]:
    return {"constant_bytes": 1.0, "allocated": allocated_bytes, "ring_state": ring_state_bytes(terms)}


def overhead_features(p: TermInputs, *, assume_ring_traffic: bool = False) -> dict[str, float]:
    """Indicators of the outside-allocator parts; ``assume_ring_traffic``: P2P buffers on any ring."""
    traffic = ring_traffic(p) or (assume_ring_traffic and p.ring_size > 1)
    return {"context_bytes": 1.0, "projections_bytes": float(p.projections),
            "communicator_bytes": float(p.ring_size > 1), "p2p_buffers_bytes": float(traffic)}


# ----------------------------------------------------------------------------- fitting


def row_point(row: Measurement, features: dict[str, float], observed_bytes: float, figure_bytes: float) -> PartPoint:
    """A measured row as a part fit sees it."""
    return PartPoint(features=features, observed_bytes=observed_bytes, figure_bytes=figure_bytes,
                     tokens_per_rank=row.tokens_per_rank, ring_size=row.ring_size)


def is_stale(row: Measurement, analytic_bytes: float) -> bool:
    """The row's tracked peak exceeds Σφ by more than ``STALE_TOLERANCE``: an older runtime."""
    return row.tracked_peak_bytes is not None and row.tracked_peak_bytes > analytic_bytes * (1 + STALE_TOLERANCE)


def fit_workspace(rows: Sequence[Measurement], *, source: str = "") -> PartFit:
    """W = allocated − Σφ on rows of one GPU and kernel family (relative weights: allocated).
    Rows of the current runtime only, when the family has any (else all, marked ``stale_rows``)."""
    analytic = {id(r): sum(terms_at(row_inputs(r)).values()) for r in rows}
    current = [r for r in rows if not is_stale(r, analytic[id(r)])]
    used = current or list(rows)

    points = [row_point(r, workspace_features(row_inputs(r), r.gpu), r.peak_allocated_bytes - analytic[id(r)],
                        r.peak_allocated_bytes) for r in used]
    first = used[0]
    return fit_part("workspace", first.gpu, kernel_family(row_family(first)), points, WORKSPACE_FEATURES,
                    relative=True, stale_rows=0 if current else len(used), source=source)


def fit_slack(rows: Sequence[Measurement], *, source: str = "") -> PartFit:
    """R = reserved − allocated on rows of one GPU and family (relative weights: reserved)."""
    points = [row_point(r, slack_features(terms_at(row_inputs(r)), r.peak_allocated_bytes),
                        r.peak_reserved_bytes - r.peak_allocated_bytes, r.peak_reserved_bytes) for r in rows]
    return fit_part("slack", rows[0].gpu, slack_family(row_family(rows[0])), points, SLACK_FEATURES,
                    relative=False, source=source)


def fit_overhead(rows: Sequence[Measurement], *, source: str = "") -> PartFit:
    """O = device used − reserved on every row of one GPU (absolute least squares: a near-constant)."""
    points = [row_point(r, overhead_features(row_inputs(r)), r.device_used_bytes - r.peak_reserved_bytes,
                        r.device_used_bytes) for r in rows]
    return fit_part("overhead", rows[0].gpu, "all", points, OVERHEAD_FEATURES, relative=False, source=source)


# ----------------------------------------------------------------------------- one GPU's calibration


def _grouped(rows: Sequence[Measurement], key: Callable[[Measurement], str]) -> dict[str, list[Measurement]]:
    groups: dict[str, list[Measurement]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def fit_calibrations(rows: Sequence[Measurement], *, kinds: Sequence[str] = CALIBRATION_KINDS,
                     source: str = "") -> dict[str, Calibration]:
    """Calibrations of every GPU with usable rows (not OOM, of ``kinds``): a part is fitted wherever
    rows carry its two figures. GPUs with no figure at all are left out."""
    usable = [r for r in rows if not r.oom and r.kind in kinds]
    result = {}
    for gpu, members in sorted(_grouped(usable, lambda r: r.gpu).items()):
        allocated = [r for r in members if r.peak_allocated_bytes is not None]
        reserved = [r for r in allocated if r.peak_reserved_bytes is not None]
        used = [r for r in members if r.device_used_bytes is not None and r.peak_reserved_bytes is not None]
        workspace = {k: fit_workspace(v, source=source)
                     for k, v in _grouped(allocated, lambda r: kernel_family(row_family(r))).items()}
        slack = {k: fit_slack(v, source=source)
                 for k, v in _grouped(reserved, lambda r: slack_family(row_family(r))).items()}
        overhead = fit_overhead(used, source=source) if used else None
        if workspace or overhead is not None:
            result[gpu] = Calibration(gpu=gpu, workspace=workspace, slack=slack, overhead=overhead)
    return result


