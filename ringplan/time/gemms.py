"""GEMM timing of a transformer stack: the GEMM shapes of a block and the LM head, timed by shape
from the measured GEMM profiles (``ringplan.gemm/1``, written by ``benchmarks/measure_gemm.py``,
read by ``ringplan.profiles.gemm``).

``gemm_model_for`` picks the GPU's own profile, else another GPU's scaled by the peak ratio, else the
prior ``GEMM_EFFICIENCY`` × catalog peak. numpy/scipy (through ``links.fit_time_curve``) load only
when a measured profile is fitted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringplan import models as mdl
from ringplan.profiles.gemm import GemmProfile, GemmRow, gemm_profiles_in

#: Relative uncertainty of a GEMM time from the prior efficiency: a policy (public H100 bf16 GEMM
#: rates at transformer shapes span roughly 0.5-0.8 of dense peak), not a measurement.
GEMM_PRIOR_RELATIVE_UNCERTAINTY = 0.25


# ----------------------------------------------------------------------------- GEMM shapes


@dataclass(frozen=True, slots=True, kw_only=True)
class GemmShape:
    """``count`` GEMMs [tokens, in_features] × [in_features, out_features] (a linear layer's weight)."""

    name: str
    in_features: int
    out_features: int
    count: int = 1


def block_gemms(model: mdl.ModelSpec, tp_degree: int = 1) -> tuple[GemmShape, ...]:
    """The GEMMs of one block: q (E → H·D), k and v (E → H_kv·D), o (H·D → E), and the MLP —
    SwiGLU gate and up (E → F, two) and down (F → E), GELU up and down. Separate projections, as
    torchtitan's Llama; biases are elementwise and ignored. Tensor parallel T (Megatron, torchtitan's
    plan): the column-parallel GEMMs keep out_features/T (q H/T·D, k and v max(1, H_kv/T)·D — replicated
    KV heads when T > H_kv —, gate/up F/T), the row-parallel in_features/T (o H/T·D, down F/T), over the
    all-gathered B·n rows."""
    e, f = model.embed_dim, model.ffn_dim // tp_degree
    q, kv = model.q_dim // tp_degree, max(1, model.n_kv_heads // tp_degree) * model.head_dim
    if tp_degree == 1:
        q, kv = model.q_dim, model.kv_dim
    mlp = (GemmShape(name="gate_up", in_features=e, out_features=f, count=2) if model.ffn_type == "swiglu"
           else GemmShape(name="up", in_features=e, out_features=f))
    return (GemmShape(name="q", in_features=e, out_features=q),
            GemmShape(name="kv", in_features=e, out_features=kv, count=2),
            GemmShape(name="o", in_features=q, out_features=e), mlp,
            GemmShape(name="down", in_features=f, out_features=e))


def lm_head_gemm(model: mdl.ModelSpec, tp_degree: int = 1) -> GemmShape:
    """The LM head: E → V (tied or not, the same GEMM); column-parallel under tensor parallel T:
    E → ⌈V/T⌉ (vocab-parallel logits, loss parallel)."""
    return GemmShape(name="lm_head", in_features=model.embed_dim, out_features=-(-model.vocab_size // tp_degree))


def gemm_flops(tokens: int, shape: GemmShape) -> float:
    """FLOPs of one forward pass of ``shape`` over ``tokens`` rows: 2·m·in·out per GEMM × count
    (each backward GEMM — input gradient, weight gradient — costs the same)."""
    return 2.0 * tokens * shape.in_features * shape.out_features * shape.count


@dataclass(frozen=True, slots=True, kw_only=True)
class GemmModel:
    """Seconds of a GEMM by (pass, in, out) on one GPU type.

    ``curves`` (pass, in, out) → time vs FLOPs (``links.TimeCurve``, kernel extrapolation)
    fitted on ``source``'s rows; ``scale`` multiplies their seconds (the peak-FLOP/s ratio when the
    rows come from another GPU). Without curves: FLOPs / (``GEMM_EFFICIENCY`` × ``peak_flops_per_s``).
    """

    gpu_name: str
    peak_flops_per_s: float
    curves: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    scale: float = 1.0
    source: str = ""

    def time_s(self, pass_name: str, tokens: int, shape: GemmShape) -> tuple[float, str]:
        """Seconds of ``shape.count`` GEMMs of ``pass_name`` over ``tokens`` rows, and the provenance.

        The measured (in, out) when present, else the measured shape nearest in log(in·out) and
        log(in/out) at the same FLOPs (labelled transferred); outside the measured FLOPs:
        extrapolated. No curves: the prior efficiency."""
        from ringplan.time.kernels import GEMM_EFFICIENCY

        one = GemmShape(name=shape.name, in_features=shape.in_features, out_features=shape.out_features)
        flops = gemm_flops(tokens, one)
        same = [k for k in self.curves if k[0] == pass_name]
        if not same:
            return (shape.count * flops / (GEMM_EFFICIENCY * self.peak_flops_per_s),
                    f"default: assumed GEMM efficiency {GEMM_EFFICIENCY} of catalog peak "
                    f"(±{GEMM_PRIOR_RELATIVE_UNCERTAINTY:.0%})")
        key = (pass_name, shape.in_features, shape.out_features)
        label = self.source
        if key not in self.curves:
            key = _nearest_shape(tuple(same), shape.in_features, shape.out_features)
            label = f"{self.source} at {key[1]}x{key[2]} (nearest shape, transferred)"
        curve = self.curves[key]
        low, high = curve.measured_range or (flops, flops)
        if not low * (1 - 1e-9) <= flops <= high * (1 + 1e-9):
            label = f"extrapolated outside measured range ({label})"
        return shape.count * float(curve.time_s(flops)) * self.scale, label


@functools.lru_cache(maxsize=4096)
def _nearest_shape(keys: tuple[tuple[str, int, int], ...], in_features: int, out_features: int) -> tuple[str, int, int]:
    """The measured (pass, in, out) nearest to (in, out) by ``_shape_distance``."""
    return min(keys, key=lambda k: _shape_distance(k[1], k[2], in_features, out_features))


def _shape_distance(in_a: int, out_a: int, in_b: int, out_b: int) -> float:
    return math.log(in_a * out_a / (in_b * out_b)) ** 2 + math.log(in_a * out_b / (out_a * in_b)) ** 2


@functools.lru_cache(maxsize=8)
def _measured_gemm_curves(directory: str) -> dict[str, tuple[str, dict]]:
    """driver name (lower case) → (profile path, {(pass, in, out): TimeCurve}), latest profile per GPU."""
    from ringplan.time.links import fit_time_curve

    chosen: dict[str, GemmProfile] = {}
    for profile in sorted(gemm_profiles_in(directory), key=lambda p: str(p.provenance.get("date", ""))):
        chosen[profile.gpu_driver_name.lower()] = profile
    fitted = {}
    for name, profile in chosen.items():
        groups: dict[tuple[str, int, int], list[GemmRow]] = {}
        for row in profile.rows:
            groups.setdefault((row.pass_name, row.in_features, row.out_features), []).append(row)
        curves = {key: fit_time_curve([r.flops for r in rows], [r.seconds for r in rows], extrapolation="kernel").curve
                  for key, rows in groups.items() if len({r.tokens for r in rows}) >= 2}
        fitted[name] = (profile.path, curves)
    return fitted


def gemm_model_for(gpu, dtype: str = "bf16", timing_dir: str | Path | None = None) -> GemmModel:
    """The GPU's GEMM model: its own measured profile, else another GPU's scaled by the peak ratio
    (the fastest-peak donor first), else the prior efficiency. Unknown dtype peak → ValueError."""
    from ringplan.paths import timing_dir as default_timing_dir

    peak = gpu.peak_flops_per_s.get(dtype) or (gpu.peak_flops_per_s.get("bf16") if dtype == "fp16" else None)
    if not peak:
        raise ValueError(f"{gpu.name}: no peak FLOP/s for {dtype} in the catalog (has {sorted(gpu.peak_flops_per_s)})")
    measured = _measured_gemm_curves(str(Path(timing_dir).resolve() if timing_dir else default_timing_dir()))
    own = measured.get(gpu.driver_name.lower())
    if own is not None and own[1]:
        return GemmModel(gpu_name=gpu.name, peak_flops_per_s=peak, curves=own[1], source="measured on this GPU")
    from ringplan.hardware import load_catalog

    for driver, (_, curves) in sorted(measured.items()):
        donor = load_catalog().gpu_by_driver_name(driver)
        donor_peak = donor.peak_flops_per_s.get(dtype) if donor is not None else None
        if curves and donor_peak:
            return GemmModel(gpu_name=gpu.name, peak_flops_per_s=peak, curves=curves, scale=donor_peak / peak,
                             source=f"fitted on {donor.name} and transferred")
    return GemmModel(gpu_name=gpu.name, peak_flops_per_s=peak)
