"""Compute time of the local block kernel: FLOP counts, and effective FLOP/s fitted or defaulted.

Time of one kernel call = overhead + FLOPs / F(n), F the effective FLOP/s of that kernel on that
GPU for (backend, head dim, dtype, GQA ratio, causal, pass) at n tokens per block. Where kernel
timings were measured (``ringplan.kernels/1`` profiles) the overhead and F(n) are fitted per key
(``kernel_rates``: the rate's block-size dependence), an unswept GQA ratio interpolated between its
neighbours, and a key's long blocks follow its family's longest sweep; elsewhere F defaults to the
ANCHORS.md H100 measurement of that kernel, scaled by the catalog peak of the target GPU. Every
kernel model carries a relative ± (``KERNEL_UNCERTAINTY``), widened where it is extrapolated.

FLOP conventions (as the anchors count them): a forward block of n_q queries × n_k keys costs
4·B·H·D·n_q·n_k (QKᵀ and PV, 2 FLOPs per multiply–add); a causal diagonal block half of it;
a backward block 2.5× its forward (FlashAttention-2's count: recompute S, dV, dP, dQ, dK).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ringplan.memory.calibration import CUDNN_AUTO_GPU_TAGS, auto_backend
from ringplan.time.kernel_rates import RateCurve, RatePoint, blended, block_tokens, extended_by_trend, fit_rate_curve
from ringplan.time.links import AffineFit, TimeCurve, fit_time_curve
from ringplan.profiles.timing import KernelRow

BACKWARD_FLOPS_PER_FORWARD = 2.5  # FlashAttention-2 paper (Dao 2023), section 4 / benchmark script
H100_BF16_PEAK_FLOPS_PER_S = 989.5e12  # NVIDIA H100 SXM5 datasheet: 1,979 TFLOP/s bf16 with sparsity / 2
PASSES = ("forward", "backward")
_REFERENCE_GPU = "h100"

# Effective FLOP/s of SDPA ops that return the LSE, one H100 80GB HBM3, bf16, 32 heads (12 at
# head_dim 64), 131,072 tokens: ANCHORS.md (torch 2.11.0+cu130, 2026-11-25). Causal FLOPs = half.
_ANCHOR = "ANCHORS.md H100 bf16 131072 tokens"
H100_FORWARD_FLOPS_PER_S: dict[tuple[str, int, bool], tuple[float, str]] = {
    ("cudnn", 128, False): (598e12, f"{_ANCHOR}, cudnn op 32x128 non-causal"),
    ("cudnn", 128, True): (542e12, f"{_ANCHOR}, cudnn op 32x128 causal"),
    ("flash", 128, False): (343e12, f"{_ANCHOR}, flash op 32x128 non-causal"),
    ("flash", 128, True): (312e12, f"{_ANCHOR}, flash op 32x128 causal"),
    ("efficient", 128, False): (177e12, f"{_ANCHOR}, efficient op 32x128 non-causal"),
    ("efficient", 128, True): (168e12, f"{_ANCHOR}, efficient op 32x128 causal"),
    ("cudnn", 64, False): (455e12, f"{_ANCHOR}, cudnn op 12x64 non-causal"),
    ("flash", 64, False): (296e12, f"{_ANCHOR}, flash op 12x64 non-causal"),
}
# Backward rate / forward rate: F.scaled_dot_product_attention fwd+bwd at 8,192 tokens, 32x128,
# 589 TFLOP/s over 3.5x forward FLOPs, with forward at 600 TFLOP/s (ANCHORS.md) gives backward
# 2.5 / (3.5/589 - 1/600) = 585 TFLOP/s, i.e. 0.975x forward. Assumed to hold for every backend.
BACKWARD_RATE_PER_FORWARD_RATE = 2.5 / (3.5 / 589e12 - 1 / 600e12) / 600e12


def attention_forward_flops(*, batch: int, n_heads: int, head_dim: int, q_tokens: int, kv_tokens: int,
                            causal: bool = False) -> float:
    """FLOPs of one forward attention block: 4·B·H·D·n_q·n_k, half of it for a causal diagonal block.

    Source: FlashAttention benchmark convention (ANCHORS.md counts causal as half). Ignores the
    softmax's exp/max/sum (O(n_q·n_k) non-matmul work) and the exact n(n+1)/2 count of a causal block.
    """
    for name, value in (("batch", batch), ("n_heads", n_heads), ("head_dim", head_dim),
                        ("q_tokens", q_tokens), ("kv_tokens", kv_tokens)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if causal and q_tokens != kv_tokens:
        raise ValueError(f"a causal diagonal block is square, got {q_tokens} queries x {kv_tokens} keys")
    flops = 4.0 * batch * n_heads * head_dim * q_tokens * kv_tokens
    return flops / 2 if causal else flops


def attention_pass_flops(pass_name: str, **shape: int | bool) -> float:
    """FLOPs of one block in ``pass_name``: forward, or backward = 2.5 × forward (FlashAttention-2)."""
    if pass_name not in PASSES:
        raise ValueError(f"pass {pass_name!r} is not one of {list(PASSES)}")
    factor = BACKWARD_FLOPS_PER_FORWARD if pass_name == "backward" else 1.0
    return factor * attention_forward_flops(**shape)


def qkv_projection_flops(*, batch: int, tokens: int, embed_dim: int, n_heads: int, n_kv_heads: int,
                         head_dim: int) -> float:
    """FLOPs of the Q, K and V projections of ``tokens`` local tokens (forward): 2·B·n·E·(H + 2·H_kv)·D.

    Backward is 2× this (input and weight gradients). Ignores biases.
    """
    return 2.0 * batch * tokens * embed_dim * (n_heads + 2 * n_kv_heads) * head_dim


def output_projection_flops(*, batch: int, tokens: int, embed_dim: int, n_heads: int, head_dim: int) -> float:
    """FLOPs of the output projection of ``tokens`` local tokens (forward): 2·B·n·H·D·E. Ignores biases."""
    return 2.0 * batch * tokens * n_heads * head_dim * embed_dim


def projection_forward_flops(*, batch: int, tokens: int, embed_dim: int, n_heads: int, n_kv_heads: int,
                             head_dim: int) -> float:
    """FLOPs of the QKV and output projections together (forward); backward is 2× this."""
    return qkv_projection_flops(batch=batch, tokens=tokens, embed_dim=embed_dim, n_heads=n_heads,
                                n_kv_heads=n_kv_heads, head_dim=head_dim) + \
        output_projection_flops(batch=batch, tokens=tokens, embed_dim=embed_dim, n_heads=n_heads, head_dim=head_dim)


def conversion_bytes(elements: float, *, from_bytes: int, to_bytes: int) -> float:
    """HBM bytes of a copy or dtype cast of ``elements`` values: n·(a + b) (read each once, write once).

    Used for the runtime's accumulator starts (bf16 block → fp32), final casts (fp32 → bf16),
    dilated gathers (bf16 → bf16) and GQA-free copies. Ignores caches (tensors are ≫ L2).
    """
    if elements < 0:
        raise ValueError(f"element count must be >= 0, got {elements!r}")
    return float(elements) * (from_bytes + to_bytes)


def accumulation_bytes(elements: float, *, accumulator_bytes: int, addend_bytes: int) -> float:
    """HBM bytes of an in-place add into an accumulator: n·(2·a + b) (read + write a, read b).

    The ring backward's dq/dK/dV ``add_`` (fp32 += bf16: 10 bytes per value) and the dilated
    backward's scatter-add. Ignores caches.
    """
    if elements < 0:
        raise ValueError(f"element count must be >= 0, got {elements!r}")
    return float(elements) * (2 * accumulator_bytes + addend_bytes)


def merge_bytes(*, batch: int, n_heads: int, head_dim: int, q_tokens: int, dtype_bytes: int) -> float:
    """HBM bytes one fp32 LSE merge moves: read+write the fp32 accumulator, read the block result.

    B·n_q·H·D·(4 + 4 + e) for the output plus B·H·n_q·12 for the three fp32 LSE vectors. A
    merge implemented as several elementwise kernels moves a multiple of this (fitted or assumed).
    """
    rows = batch * n_heads * q_tokens
    return float(rows * head_dim * (8 + dtype_bytes) + rows * 12)


def gradient_accumulate_bytes(*, batch: int, n_heads: int, n_kv_heads: int, head_dim: int, q_tokens: int,
                              kv_tokens: int, dtype_bytes: int) -> float:
    """HBM bytes of adding one block's dQ, dK, dV into fp32 accumulators (backward ring step).

    B·D·(n_q·H + 2·n_k·H_kv)·(4 + 4 + e): read and write the fp32 accumulator, read the block
    gradient. Ignores the dO·O row sums the backward kernel computes itself.
    """
    return float(batch * head_dim * (q_tokens * n_heads + 2 * kv_tokens * n_kv_heads) * (8 + dtype_bytes))


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelKey:
    """Which kernel: backend (cudnn | flash | efficient | math | cpu), head dim, causal, pass, dtype, and
    ``gqa_ratio`` = query heads per KV head (1 = MHA)."""

    backend: str
    head_dim: int
    causal: bool
    pass_name: str
    dtype: str = "bf16"
    gqa_ratio: int = 1

    @property
    def family(self) -> tuple[str, int, bool, str, str]:
        """The key without its GQA ratio: (backend, head_dim, causal, pass, dtype)."""
        return self.backend, self.head_dim, self.causal, self.pass_name, self.dtype


# Relative ± of one kernel call's predicted time, by how the model was found. SOURCE: the held-out
# kernel check of benchmarks/kernel_accuracy.py on the 2026-12-05 H100 sweep (every other swept
# tokens-per-block size left out of the fit; README "Kernel rates by shape"): |error| at >= 16,384
# tokens per block 5.2% at the 80th percentile ("measured"), 6.8% at the 90th ("interpolated": a GQA
# ratio between swept ones, or a long block on another ratio's trend), 15.6% at the 95th over every
# size ("extrapolated": past the swept sizes). Across GPUs or head dims: ASSUMED, not measured.
KERNEL_UNCERTAINTY: dict[str, float] = {"measured": 0.05, "interpolated": 0.07, "extrapolated": 0.15,
                                        "transferred": 0.25, "default": 0.30}


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelModel:
    """Time of one kernel call versus its FLOPs, and where that came from.

    ``provenance`` is one of: "measured on this GPU", "fitted on <gpu> and transferred",
    "default: <source>"; ``fit`` is the least-squares fit when measured; ``rate`` the rate curve
    over tokens per block (``kernel_rates``) when the profile has one for this key, which then
    decides the time; ``uncertainty`` the relative ± inside the measured range.
    """

    key: KernelKey
    curve: TimeCurve
    provenance: str
    fit: AffineFit | None = None
    rate: RateCurve | None = None
    uncertainty: float = KERNEL_UNCERTAINTY["default"]

    @property
    def effective_flops_per_s(self) -> float:
        """The large-block rate: the rate at the largest swept tokens per block, else 1 / the fitted slope."""
        if self.rate is not None:
            return self.rate.flops_per_s[-1]
        return 1.0 / self.curve.seconds_per_unit

    def time_s(self, flops: float | np.ndarray, tokens: float | np.ndarray | None = None) -> float | np.ndarray:
        """Seconds of one call of ``flops`` at ``tokens`` per block (√(n_q·n_k)); without ``tokens`` a
        rate model assumes the largest swept block."""
        if self.rate is not None:
            return self.rate.time_s(flops, self.rate.tokens[-1] if tokens is None else tokens)
        return self.curve.time_s(flops)

    def outside_measured_range(self, flops: float, tokens: float | None = None) -> bool:
        if self.rate is not None and tokens is not None:
            return flops > 0 and not self.rate.covers(tokens)
        span = self.curve.measured_range
        return span is not None and flops > 0 and not (span[0] <= flops <= span[1])

    def uncertainty_at(self, flops: float, tokens: float | None = None) -> float:
        """Relative ± of one call: ``uncertainty``, widened to the extrapolated one outside the measured range."""
        if self.outside_measured_range(flops, tokens):
            return max(self.uncertainty, KERNEL_UNCERTAINTY["extrapolated"])
        if self.rate is not None and tokens is not None and self.rate.from_trend(tokens):
            return max(self.uncertainty, KERNEL_UNCERTAINTY["interpolated"])
        return self.uncertainty

    def label_at(self, flops: float, tokens: float | None = None) -> str:
        """``provenance`` with the ± of this call, e.g. ``measured on this GPU (±5%)``."""
        return f"{self.provenance} (±{self.uncertainty_at(flops, tokens):.0%})"


def scaled_curve(curve: TimeCurve, factor: float) -> TimeCurve:
    """The same curve with every time multiplied by ``factor`` (a GPU that is ``1/factor`` as fast)."""
    return TimeCurve(intercept_s=curve.intercept_s * factor, seconds_per_unit=curve.seconds_per_unit * factor,
                     points=tuple((x, t * factor) for x, t in curve.points), extrapolation=curve.extrapolation)


# The flash op is FlashAttention-2, written for sm80 (mma.sync; no Hopper wgmma/TMA): on Hopper it reaches a
# smaller share of the peak than on Ampere/Ada, so a flash rate moves between the two by share of peak, not by
# peak alone. Hopper: 343 of 989.5 TFLOP/s on H100 (ANCHORS.md, 32x128 non-causal forward: 34.7%). sm8x: "50-73%
# of the theoretical maximum FLOPs/s on A100" (Dao 2023, FlashAttention-2, abstract): the midpoint, 61.5%, taken.
# Other backends (cuDNN, memory-efficient) keep the peak ratio: no published share per architecture to use.
FLASH_PEAK_SHARE: dict[str, float] = {"sm90": 343e12 / H100_BF16_PEAK_FLOPS_PER_S, "sm8x": (0.50 + 0.73) / 2}
#: Name tags of the catalog's sm80/sm86/sm89 NVIDIA GPUs (Ampere, Ada): where the flash op is at home.
SM8X_GPU_TAGS: tuple[str, ...] = ("a100", "a800", "a10", "a40", "a6000", "l4", "l40", "rtx-30", "rtx-40", "rtx 30",
                                  "rtx 40")


def architecture_share(gpu_name: str) -> str | None:
    """``sm90`` (Hopper/Blackwell: the GPUs where ``auto`` runs cuDNN), ``sm8x`` (Ampere/Ada), else None."""
    name = gpu_name.lower()
    if any(tag in name for tag in CUDNN_AUTO_GPU_TAGS):
        return "sm90"
    return "sm8x" if any(tag in name for tag in SM8X_GPU_TAGS) else None


def flash_transfer_gain(backend: str, source_gpu: str, target_gpu: str) -> float:
    """Factor on a rate moved by peak ratio from ``source_gpu`` to ``target_gpu``: for the flash op between a
    Hopper-class and an Ampere/Ada GPU, the ratio of its shares of peak (``FLASH_PEAK_SHARE``: 1.77 from H100/H200
    to A100); 1 otherwise (same architecture, another backend, or a GPU of neither kind)."""
    source, target = architecture_share(source_gpu), architecture_share(target_gpu)
    if backend != "flash" or source is None or target is None or source == target:
        return 1.0
    return FLASH_PEAK_SHARE[target] / FLASH_PEAK_SHARE[source]


def default_forward_flops_per_s(backend: str, head_dim: int, causal: bool) -> tuple[float, str]:
    """H100 bf16 effective forward FLOP/s for a kernel, from ANCHORS.md, with its source.

    Unlisted combinations are derived from listed ones: causal = non-causal × (causal/non-causal
    of the same backend at head_dim 128); another head dim = the nearest listed one × (flash's
    ratio between the two head dims when it is known). ValueError for math/cpu (no anchor).
    """
    if (backend, head_dim, causal) in H100_FORWARD_FLOPS_PER_S:
        return H100_FORWARD_FLOPS_PER_S[(backend, head_dim, causal)]
    if (backend, 128, False) not in H100_FORWARD_FLOPS_PER_S:
        raise ValueError(f"no default FLOP/s for backend {backend!r}; measure it with benchmarks/measure_timing.py "
                         f"(defaults exist for {sorted({k[0] for k in H100_FORWARD_FLOPS_PER_S})})")
    base_dim = 64 if head_dim <= 96 else 128
    rate, source = H100_FORWARD_FLOPS_PER_S.get((backend, base_dim, False), (None, ""))
    if rate is None:  # e.g. efficient at head_dim 64: flash's 64/128 ratio
        rate = H100_FORWARD_FLOPS_PER_S[(backend, 128, False)][0] * (296e12 / 343e12)
        source = f"{_ANCHOR}, {backend} 128 x flash 64/128 ratio"
    if base_dim != head_dim:
        source += f" (head_dim {head_dim} taken as {base_dim})"
    if causal:
        rate *= H100_FORWARD_FLOPS_PER_S[(backend, 128, True)][0] / H100_FORWARD_FLOPS_PER_S[(backend, 128, False)][0]
        source += " x causal/non-causal ratio at 128"
    return rate, source


def default_kernel_model(key: KernelKey, *, gpu_name: str, peak_flops_per_s: float) -> KernelModel:
    """Kernel model from ANCHORS.md's H100 rate × (this GPU's peak / H100's peak), no overhead term."""
    if key.dtype not in ("bf16", "fp16"):
        raise ValueError(f"no default kernel rate for dtype {key.dtype!r} (anchors are bf16); measure it")
    if key.pass_name not in PASSES:
        raise ValueError(f"pass {key.pass_name!r} is not one of {list(PASSES)}")
    if not np.isfinite(peak_flops_per_s) or peak_flops_per_s <= 0:
        raise ValueError(f"{gpu_name}: peak FLOP/s must be positive, got {peak_flops_per_s!r}")
    rate, source = default_forward_flops_per_s(key.backend, key.head_dim, key.causal)
    if key.pass_name == "backward":
        rate *= BACKWARD_RATE_PER_FORWARD_RATE
        source += " x backward/forward 0.975 (F.sdpa fwd+bwd 589 TFLOP/s)"
    rate *= peak_flops_per_s / H100_BF16_PEAK_FLOPS_PER_S
    if _REFERENCE_GPU not in gpu_name.lower():
        source += f" x peak ratio {peak_flops_per_s / H100_BF16_PEAK_FLOPS_PER_S:.3f} (transferred from H100)"
    gain = flash_transfer_gain(key.backend, _REFERENCE_GPU, gpu_name)
    if gain != 1.0:
        rate = min(rate * gain, peak_flops_per_s)
        source += f" x flash share of peak {gain:.2f} (FlashAttention-2 on sm8x vs Hopper)"
    return KernelModel(key=key, curve=TimeCurve(intercept_s=0.0, seconds_per_unit=1.0 / rate, extrapolation="kernel"),
                       provenance=f"default: {source}")


def kernel_row_flops(row: KernelRow) -> float:
    """FLOPs of a measured attention row (forward_backward rows count 3.5 × forward)."""
    factor = {"forward": 1.0, "backward": BACKWARD_FLOPS_PER_FORWARD,
              "forward_backward": 1.0 + BACKWARD_FLOPS_PER_FORWARD}[row.pass_name]
    return factor * attention_forward_flops(batch=row.batch, n_heads=row.n_heads, head_dim=row.head_dim,
                                            q_tokens=row.q_tokens, kv_tokens=row.kv_tokens, causal=row.causal)


def fit_kernel_curves(rows: Iterable[KernelRow]) -> dict[KernelKey, AffineFit]:
    """Fit overhead + FLOPs/F per (backend, head dim, causal, pass, dtype) from attention rows.

    Needs ≥ 2 distinct block sizes per key; keys with fewer rows are left out (not guessed).
    ``forward_backward`` rows are kept for reporting only: the ring times passes separately.
    """
    groups: dict[KernelKey, list[tuple[float, float]]] = {}
    for row in rows:
        if row.op != "attention" or row.pass_name not in PASSES:
            continue
        key = KernelKey(backend=row.backend, head_dim=row.head_dim, causal=row.causal,
                        pass_name=row.pass_name, dtype=row.dtype)
        groups.setdefault(key, []).append((kernel_row_flops(row), row.seconds))
    fits = {}
    for key, pts in groups.items():
        if len({x for x, _ in pts}) >= 2:
            fits[key] = fit_time_curve([x for x, _ in pts], [t for _, t in pts], extrapolation="kernel")
    return fits


def kernel_row_key(row: KernelRow) -> KernelKey:
    """The key of an attention row (GQA ratio from its head counts; 1 when KV heads are not given)."""
    ratio = row.n_heads // row.n_kv_heads if row.n_kv_heads else 1
    return KernelKey(backend=row.backend, head_dim=row.head_dim, causal=row.causal, pass_name=row.pass_name,
                     dtype=row.dtype, gqa_ratio=max(1, ratio))


def fit_kernel_rates(rows: Iterable[KernelRow]) -> dict[KernelKey, RateCurve]:
    """A rate curve per (backend, head dim, dtype, GQA ratio, causal, pass) from attention rows (``kernel_rates``).

    Keys with fewer than 2 tokens-per-block sizes are left out. A key swept to fewer tokens than the
    longest of its family (same key, other GQA ratios) continues along that one's trend.
    """
    groups: dict[KernelKey, list[RatePoint]] = {}
    for row in rows:
        if row.op != "attention" or row.pass_name not in PASSES:
            continue
        groups.setdefault(kernel_row_key(row), []).append(RatePoint(
            batch_heads=row.batch * row.n_heads, head_dim=row.head_dim, q_tokens=row.q_tokens,
            kv_tokens=row.kv_tokens, flops=kernel_row_flops(row), seconds=row.seconds))
    curves = {key: fit_rate_curve(points) for key, points in groups.items() if len({p.tokens for p in points}) >= 2}
    longest: dict[tuple, RateCurve] = {}
    for key, curve in curves.items():
        if key.family not in longest or curve.tokens[-1] > longest[key.family].tokens[-1]:
            longest[key.family] = curve
    return {key: extended_by_trend(curve, longest[key.family]) for key, curve in curves.items()}


def fit_merge_curve(rows: Iterable[KernelRow]) -> AffineFit | None:
    """Fit seconds ≈ overhead + bytes/rate of the fp32 LSE merge from ``op='merge'`` rows (None if < 2 sizes)."""
    pts = [(merge_bytes(batch=r.batch, n_heads=r.n_heads, head_dim=r.head_dim, q_tokens=r.q_tokens,
                        dtype_bytes=2 if r.dtype in ("bf16", "fp16") else 4), r.seconds)
           for r in rows if r.op == "merge"]
    if len({x for x, _ in pts}) < 2:
        return None
    return fit_time_curve([x for x, _ in pts], [t for _, t in pts])


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredKernels:
    """Fitted kernel curves of one GPU type (from one or more kernel profiles)."""

    gpu_driver_name: str
    peak_flops_per_s: float
    fits: dict[KernelKey, AffineFit] = field(default_factory=dict)
    merge_fit: AffineFit | None = None
    rates: dict[KernelKey, RateCurve] = field(default_factory=dict)
    peaks_flops_per_s: dict[str, float] = field(default_factory=dict)

    def peak_for(self, dtype: str) -> float:
        """This GPU's catalog peak for ``dtype`` (fp16 falls back to bf16), else ``peak_flops_per_s``."""
        return self.peaks_flops_per_s.get(dtype) or \
            (self.peaks_flops_per_s.get("bf16") if dtype == "fp16" else None) or self.peak_flops_per_s

    def rate_curve(self, key: KernelKey) -> tuple[RateCurve, str] | None:
        """The curve of ``key`` from this GPU's sweep and how it was found ('' exact; 'GQA g between a and b';
        'extrapolated (GQA g as a)'), or None when its family (key without GQA ratio) was not swept."""
        family = {k.gqa_ratio: c for k, c in self.rates.items() if k.family == key.family}
        if not family:
            return None
        g = key.gqa_ratio
        if g in family:
            return family[g], ""
        lower, higher = [r for r in family if r < g], [r for r in family if r > g]
        if lower and higher:
            lo, hi = max(lower), min(higher)
            return blended(family[lo], family[hi], (g - lo) / (hi - lo)), f"GQA {g} between {lo} and {hi}"
        near = max(lower) if lower else min(higher)
        return family[near], f"extrapolated (GQA {g} as {near}"


# One ring step's fixed GPU-side cost besides its kernels' work (the gaps between the ~10 small
# kernels of a step, the stream wait on the exchange): ASSUMED 20 µs (overhead_fits.fit_step_overhead_s
# fits it from ring step times). Default merge: 3× the minimal HBM traffic (an unfused merge of
# several elementwise kernels), ASSUMED until op='merge' rows are measured.
DEFAULT_STEP_OVERHEAD_S = 20e-6
DEFAULT_MERGE_TRAFFIC_FACTOR = 3.0
# ASSUMED: contiguous elementwise copies/casts/adds stream at 90% of the catalog HBM bandwidth
# (CUDA device-to-device copies and STREAM triad reach ~3.0 of 3.35 TB/s on H100 SXM); not
# measured by ringplan. The merge (strided LSE views, 8 small kernels) has its own fitted rate.
ELEMENTWISE_HBM_EFFICIENCY = 0.9
# ASSUMED (no GEMM timing in this repo): large bf16 GEMMs reach ~70% of the catalog peak.
GEMM_EFFICIENCY = 0.7


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeModel:
    """Every local cost of one GPU type: attention kernels, the per-step merge, a fixed step overhead.

    ``this_gpu`` holds fits measured on this GPU type, ``other_gpus`` fits from other types
    (transferred by the ratio of peak FLOP/s); anything unmeasured falls back to the defaults.
    """

    gpu_name: str
    peak_flops_per_s: float
    hbm_bandwidth_bytes_per_s: float
    this_gpu: MeasuredKernels | None = None
    other_gpus: tuple[MeasuredKernels, ...] = ()
    step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S
    _models: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # key → KernelModel

    def __post_init__(self) -> None:
        for name in ("peak_flops_per_s", "hbm_bandwidth_bytes_per_s"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{self.gpu_name}: {name} must be positive, got {value!r}")
        if not np.isfinite(self.step_overhead_s) or self.step_overhead_s < 0:
            raise ValueError(f"step overhead must be >= 0 s, got {self.step_overhead_s!r}")

    def kernel(self, key: KernelKey) -> KernelModel:
        """The best-founded model of ``key``: measured here > measured here at a near shape >
        measured on another GPU (scaled by peak ratio) > ANCHORS.md default.

        Rate curves (``MeasuredKernels.rates``) come first, best first: this GPU at the same head dim
        and dtype (a GQA ratio between swept ones interpolated), the other half dtype here, another
        GPU at the same head dim, then the nearest head dim here or there; else the fitted curves.
        Looked up once per key (a whole-model search asks thousands of times)."""
        if key not in self._models:
            self._models[key] = self._kernel(key)
        return self._models[key]

    def _kernel(self, key: KernelKey) -> KernelModel:
        found = self._rate_model(key)
        if found is not None:
            return found
        if self.this_gpu is not None:
            found = _closest_fit(self.this_gpu.fits, key)
            if found is not None:
                fit_key, fit = found
                label = "measured on this GPU" if fit_key == key else \
                    f"measured on this GPU at head_dim {fit_key.head_dim} {fit_key.dtype} (transferred)"
                return KernelModel(key=key, curve=fit.curve, provenance=label, fit=fit)
        for other in self.other_gpus:
            found = _closest_fit(other.fits, key)
            if found is not None:
                factor = other.peak_flops_per_s / self.peak_flops_per_s / \
                    flash_transfer_gain(key.backend, other.gpu_driver_name, self.gpu_name)
                return KernelModel(key=key, curve=scaled_curve(found[1].curve, factor), fit=found[1],
                                   provenance=f"fitted on {other.gpu_driver_name} and transferred")
        return default_kernel_model(key, gpu_name=self.gpu_name, peak_flops_per_s=self.peak_flops_per_s)

    def _rate_model(self, key: KernelKey) -> KernelModel | None:
        sources = [(m, m is self.this_gpu) for m in (self.this_gpu, *self.other_gpus) if m is not None and m.rates]
        half = ("bf16", "fp16")
        dtypes = [key.dtype] + [d for d in half if key.dtype in half and d != key.dtype]
        dims = sorted({k.head_dim for m, _ in sources for k in m.rates if k.backend == key.backend},
                      key=lambda d: (abs(d - key.head_dim), -d))
        for head_dim in dims:
            for measured, here in sorted(sources, key=lambda s: not s[1]):
                for dtype in dtypes:
                    probe = KernelKey(backend=key.backend, head_dim=head_dim, causal=key.causal,
                                      pass_name=key.pass_name, dtype=dtype, gqa_ratio=key.gqa_ratio)
                    found = measured.rate_curve(probe)
                    if found is not None:
                        return self._rated(key, measured, here, probe, *found)
        return None

    def _rated(self, key: KernelKey, measured: MeasuredKernels, here: bool, probe: KernelKey, curve: RateCurve,
               how: str) -> KernelModel:
        """A KernelModel from a found rate curve, scaled to this GPU and labelled."""
        if here:
            base = "measured on this GPU"
            if (probe.head_dim, probe.dtype) != (key.head_dim, key.dtype):
                base += f" at head_dim {probe.head_dim} {probe.dtype} (transferred)"
            curve = curve.capped(self.peak_flops_per_s)
        else:
            gain = flash_transfer_gain(key.backend, measured.gpu_driver_name, self.gpu_name)
            factor = measured.peak_for(key.dtype) / self.peak_flops_per_s / gain
            curve = curve.scaled(factor).capped(self.peak_flops_per_s)
            base = f"fitted on {measured.gpu_driver_name} and transferred"
            if (probe.head_dim, probe.dtype) != (key.head_dim, key.dtype):
                base = f"fitted on {measured.gpu_driver_name} at head_dim {probe.head_dim} {probe.dtype} and transferred"
            if gain != 1.0:
                base += f" (x flash share of peak {gain:.2f})"
        kind = "transferred" if "transferred" in base else "measured"
        if how.startswith("extrapolated"):
            label, kind = f"{how}: {base})", ("transferred" if kind == "transferred" else "extrapolated")
        else:
            label = f"{base}, {how}" if how else base
            kind = "interpolated" if how and kind == "measured" else kind
        flat = TimeCurve(intercept_s=curve.overhead_s, seconds_per_unit=1.0 / curve.flops_per_s[-1],
                         extrapolation="kernel")
        return KernelModel(key=key, curve=flat, provenance=label, rate=curve, uncertainty=KERNEL_UNCERTAINTY[kind])

    def merge_s(self, moved_bytes: float) -> tuple[float, str]:
        """GPU seconds of one fp32 LSE merge queued behind a block kernel, with provenance.

        Measured: the fitted slope × ``merge_bytes`` (the merge's rate, per minimal byte). The
        fit's intercept (~90 µs on H200 for 8 small kernels) is host dispatch: timed alone the GPU
        waits for it, but in a ring step the host queues the merge while the block kernel runs, so
        it is not on the GPU's path (``step_overhead_s`` covers the kernels' launch gaps).
        Default: 3× the minimal traffic at the catalog HBM bandwidth.
        """
        if self.this_gpu is not None and self.this_gpu.merge_fit is not None:
            return moved_bytes * self.this_gpu.merge_fit.curve.seconds_per_unit, "measured on this GPU"
        return (moved_bytes * DEFAULT_MERGE_TRAFFIC_FACTOR / self.hbm_bandwidth_bytes_per_s,
                "default: assumed 3x minimal traffic at catalog HBM bandwidth")

    def elementwise_s(self, moved_bytes: float) -> float:
        """Seconds of contiguous copies/casts/adds moving ``moved_bytes``: bytes / (0.9 × HBM bandwidth).

        Source: catalog HBM bandwidth × ELEMENTWISE_HBM_EFFICIENCY (assumed). Ignores launch gaps.
        """
        return moved_bytes / (ELEMENTWISE_HBM_EFFICIENCY * self.hbm_bandwidth_bytes_per_s)

    def gemm_s(self, flops: float) -> float:
        """Seconds of dense bf16 GEMMs of ``flops``: flops / (GEMM_EFFICIENCY × catalog peak). Assumed rate."""
        return flops / (GEMM_EFFICIENCY * self.peak_flops_per_s)

    def fastest_backend(self, head_dim: int, dtype: str) -> str:
        """The backend the runtime's ``auto`` runs (``ringplan.memory.calibration.auto_backend``, the one rule the
        memory model's workspace also follows), so the plan times the kernel that will run: on Hopper/Blackwell
        cudnn for bf16/fp16 up to head_dim 128 (ANCHORS.md: 1.75x flash on H100), then flash for bf16/fp16 up
        to 256, then the memory-efficient kernel (the only one for fp32) up to 256, else math."""
        return auto_backend(self.gpu_name, head_dim=head_dim, half_precision=dtype in ("bf16", "fp16"))


def _closest_fit(fits: dict[KernelKey, AffineFit], key: KernelKey) -> tuple[KernelKey, AffineFit] | None:
    """Exact key, else same backend/causal/pass with bf16↔fp16 and the nearest head dim."""
    if key in fits:
        return key, fits[key]
    half = {"bf16", "fp16"}
    near = [k for k in fits if k.backend == key.backend and k.causal == key.causal and k.pass_name == key.pass_name
            and (k.dtype == key.dtype or {k.dtype, key.dtype} <= half)]
    if not near:
        return None
    best = min(near, key=lambda k: (abs(k.head_dim - key.head_dim), k.dtype != key.dtype, -k.head_dim))
    return best, fits[best]
