"""Whole-model per-GPU memory: the analytic stack terms with θ = 1, plus what they cannot know.

The terms φ_j of ``ringplan.memory.stack_terms`` are the bytes of the tensors live at the peak (weights,
gradients, optimizer states, saved activations, the ring attention of one layer, logits/loss).
As in the attention-level model (``ringplan.memory.calibration``), three parts are fitted per GPU
from measured whole-model runs (``profiles/measured/stack/*.json``), each a non-negative least
squares fit (``ringplan.memory.part_fit.fit_part``) over a few physical features:

* **workspace** ``peak allocated − Σφ`` (kernel and GEMM workspaces, FSDP's copy-in/copy-out and
  prefetch buffers beyond the terms): a constant, the gathered unit (one block's weights in the
  compute dtype, zero unless parameters are gathered) and one hidden state of the rank's tokens
  ``B·n·E·e``. Per mode (training / forward).
* **allocator slack at rest** ``reserved − allocated`` on runs with room to spare (peak allocated ≤
  ``PRESSURE_FRACTION`` of usable memory): a constant, one q-sized tensor per layer ``L·B·n·H·D·e``
  (under CPU run-ahead the ring keeps one communication buffer per layer cached), the fp32 logits
  of a full loss ``B·n·V·4`` (the block stays cached after the loss) and the gathered unit (FSDP's
  all-gather / reduce-scatter blocks, kept per stream). One fit over both modes (``family="at_rest"``).
* **fragmentation reserve** (``family="pressure"``): the caching allocator gives cached blocks back
  when an allocation would fail, so slack at rest is not what decides an OOM. The reserve is the
  largest slack seen on a *pressure row* of that GPU (peak allocated > ``PRESSURE_FRACTION`` of
  usable memory, a run at the capacity boundary that did not OOM): what the allocator could not
  give back. Without pressure rows, the slack at rest (conservative).
* **memory outside the allocator** ``device used − reserved``: a CUDA context constant, one
  NCCL communicator per process group of more than one rank (FSDP's world, a ring smaller than it)
  and the ring's P2P buffers (P > 1). One fit per GPU.

Two figures: **device used at rest** (``MemoryPrediction.device_used_at_rest_bytes``, what
nvidia-smi shows for a run with room to spare) = allocated + slack at rest + outside, and the
**need** (``total_bytes``, what must fit) = allocated + min(reserve, slack at rest) + outside.
Plans use ``need + residual bound`` (workspace and outside fits' worst residuals, grown beyond the
measured figures; the slack fit's too where the slack at rest is the reserve).

Where a GPU has no whole-model rows, another GPU's whole-model fit is used ("transferred"); where
none exists at all, the prediction is the terms + one layer's attention workspace and the memory
outside the allocator from the attention-level calibration of that GPU (``default_memory_model``),
and the residual bound adds a stated prior: ``PRIOR_RELATIVE_UNCERTAINTY`` (10%) of Σφ for the
unmeasured workspace and allocator slack (FSDP training holds allocator slack of several percent).

The fits are committed in ``profiles/fitted/stack-fit.json`` (``ringplan fit --write``) with the
SHA-256 of their inputs, and read with ``json`` alone (no numpy or scipy at a cold start) while
every hash matches; otherwise they are fitted from the stack profiles again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from ringplan.hardware import GpuSpec
from ringplan.memory.fit_cache import FitCache, usable_calibrations
from ringplan.memory.part_fit import CALIBRATION_KINDS, Calibration, PartFit, PartPoint, fit_part
from ringplan.memory.attention_model import (PRIOR_RELATIVE_UNCERTAINTY, ChosenParts, MemoryModel, MemoryPrediction,
                                   calibrated_provenance)
from ringplan.models import layer_parameter_count
from ringplan.paths import stack_profiles_dir
from ringplan.stack import StackWorkload, shard_group_size, tokens_per_rank

WORKSPACE_FEATURES: tuple[str, ...] = ("constant_bytes", "gathered_unit", "hidden")
SLACK_FEATURES: tuple[str, ...] = ("constant_bytes", "stashed_q", "full_logits", "gathered_unit")
#: A run whose peak allocated exceeds this fraction of the GPU's usable memory ran under pressure.
PRESSURE_FRACTION = 0.85
OUTSIDE_FEATURES: tuple[str, ...] = ("context_bytes", "communicator_bytes", "p2p_buffers_bytes")


# ----------------------------------------------------------------------------- features


def gathered_block_feature_bytes(w: StackWorkload) -> float:
    """The fits' *feature* for gathered parameters (not the byte term, which is
    ``model_states.gathered_unit_bytes``: padded rows, every unit): one transformer block's
    parameters in the compute dtype when they are gathered (training with ``zero3`` over G > 1
    ranks), else 0 — layer parameters × e_param.

    The unit FSDP2 all-gathers before a block runs and frees after (it prefetches the next one);
    the caching allocator keeps such blocks per stream. Ignores the embedding / LM-head unit. Tensor
    parallel T > 1: one TP rank's block (``tp_terms.tp_local_param_shapes``)."""
    if not (w.training and w.settings.sharding == "zero3" and shard_group_size(w) > 1):
        return 0.0
    if w.tp_degree > 1:
        from ringplan.memory.tp_terms import tp_local_param_shapes

        block = sum(rows * cols for rows, cols in tp_local_param_shapes(w)["block"])
        return float(block * w.settings.param_dtype_bytes)
    return float(layer_parameter_count(w.model) * w.settings.param_dtype_bytes)


def hidden_bytes(w: StackWorkload) -> float:
    """One hidden state of the rank's tokens: B·n·E·e_param bytes (n = S / P). Kernel and GEMM
    workspaces of a block scale with it."""
    return float(w.batch * tokens_per_rank(w) * w.model.embed_dim * w.settings.param_dtype_bytes)


def stashed_q_bytes(w: StackWorkload) -> float:
    """One query-sized tensor per layer: L·B·n·H·D·e_param bytes. Under CPU run-ahead the ring's
    communication buffers of every layer are allocated before the first is freed on the compute
    stream, so the caching allocator keeps about one per layer (fitted coefficient ~1.3). Forward
    and training alike. Tensor parallel T: the rank's H/T heads."""
    m, heads = w.model, w.model.n_heads // w.tp_degree
    return float(m.n_layers * w.batch * tokens_per_rank(w) * heads * m.head_dim * w.settings.param_dtype_bytes)


def full_logits_bytes(w: StackWorkload) -> float:
    """The fp32 logits of a full (unchunked) training loss: B·n·V·4 bytes, else 0. After the loss
    the block stays cached (nothing else of its size is allocated until the next step). Loss parallel
    (T > 1): ⌈V/T⌉ columns."""
    if not (w.training and w.settings.loss == "full"):
        return 0.0
    return float(w.batch * tokens_per_rank(w) * -(-w.model.vocab_size // w.tp_degree) * 4)


def communicator_count(w: StackWorkload) -> int:
    """NCCL communicators of more than one rank a rank holds: FSDP's / the data-parallel world
    (W > 1; the W/T ranks of one TP coordinate under tensor parallelism), the ring when it is a smaller
    group (1 < P < W/T) and the tensor-parallel group (T > 1)."""
    p, holders = w.layout.ring_size, w.world_size // w.tp_degree
    return int(holders > 1) + int(1 < p < holders) + int(w.tp_degree > 1)


def workspace_features(w: StackWorkload) -> dict[str, float]:
    return {"constant_bytes": 1.0, "gathered_unit": gathered_block_feature_bytes(w), "hidden": hidden_bytes(w)}


def slack_features(w: StackWorkload) -> dict[str, float]:
    return {"constant_bytes": 1.0, "stashed_q": stashed_q_bytes(w), "full_logits": full_logits_bytes(w),
            "gathered_unit": gathered_block_feature_bytes(w)}


def under_pressure(peak_allocated_bytes: float, usable_memory_bytes: float | None) -> bool:
    """A run at the capacity boundary: peak allocated > ``PRESSURE_FRACTION`` × usable memory."""
    return usable_memory_bytes is not None and peak_allocated_bytes > PRESSURE_FRACTION * usable_memory_bytes


def outside_features(w: StackWorkload) -> dict[str, float]:
    return {"context_bytes": 1.0, "communicator_bytes": float(communicator_count(w)),
            "p2p_buffers_bytes": float(w.layout.ring_size > 1)}


def attention_outside_features(w: StackWorkload) -> dict[str, float]:
    """The attention-level outside-allocator features for a whole model: GEMM libraries loaded
    (``projections_bytes``), one NCCL communicator each (see ``communicator_count``), P2P buffers
    on a ring."""
    return {"context_bytes": 1.0, "projections_bytes": 1.0, "communicator_bytes": float(communicator_count(w)),
            "p2p_buffers_bytes": float(w.layout.ring_size > 1)}


def mode_family(w: StackWorkload) -> str:
    """The family workspace and slack are fitted per: ``training`` or ``forward``."""
    return "training" if w.training else "forward"


def analytic_terms(w: StackWorkload) -> dict[str, float]:
    """``stack_terms(w)``: the named per-rank bytes at the peak (θ = 1)."""
    from ringplan.memory.stack_terms import stack_terms

    return stack_terms(w)


def lower_bound_terms(w: StackWorkload) -> dict[str, float] | None:
    """The terms of one training instant, the loss backward (``stack_terms.loss_backward_instant``:
    model states and every block's saved activations; with T > 1 the loss-parallel forward,
    ``loss_forward_instant``, which holds more), ~1/50 of ``stack_terms``' cost: the peak is the
    largest instant, so Σ of these never exceeds Σ ``stack_terms(w)`` (a test checks it).
    None for a forward pass (few candidates, nothing to prune)."""
    if not w.training:
        return None
    from ringplan.memory.offload_terms import device_instant
    from ringplan.memory.stack_terms import loss_backward_instant, loss_forward_instant

    if w.tp_degree > 1:
        return device_instant(w, "loss_forward", loss_forward_instant(w))
    return device_instant(w, "loss_backward", loss_backward_instant(w))


# ----------------------------------------------------------------------------- fitting


@dataclass(frozen=True, slots=True, kw_only=True)
class StackPoint:
    """One measured whole-model run as the fits see it."""

    gpu: str
    workload: StackWorkload
    peak_allocated_bytes: float | None
    peak_reserved_bytes: float | None
    device_used_bytes: float | None
    usable_memory_bytes: float | None = None  # the GPU's; None: no row counts as a pressure row

    @property
    def pressure(self) -> bool:
        return self.peak_allocated_bytes is not None and under_pressure(self.peak_allocated_bytes,
                                                                        self.usable_memory_bytes)


def stack_part_point(w: StackWorkload, features: dict[str, float], observed_bytes: float,
                     figure_bytes: float) -> PartPoint:
    """A whole-model run as a part fit sees it."""
    return PartPoint(features=features, observed_bytes=observed_bytes, figure_bytes=figure_bytes,
                     tokens_per_rank=tokens_per_rank(w), ring_size=w.layout.ring_size)


def reserve_fit(gpu: str, points: list[StackPoint], *, source: str) -> PartFit | None:
    """The fragmentation reserve: the largest ``reserved − allocated`` of the pressure rows (a
    constant; residuals = each row's slack − reserve ≤ 0), None without pressure rows."""
    rows = [p for p in points if p.pressure and p.peak_reserved_bytes is not None]
    if not rows:
        return None
    observed = [p.peak_reserved_bytes - p.peak_allocated_bytes for p in rows]
    reserve = max(observed)
    n_tokens = [tokens_per_rank(p.workload) for p in rows]
    return PartFit(part="slack", gpu=gpu, family="pressure", coefficients={"constant_bytes": reserve},
                   residuals_bytes=tuple(o - reserve for o in observed),
                   figures_bytes=tuple(p.peak_reserved_bytes for p in rows),
                   tokens_per_rank_range=(min(n_tokens), max(n_tokens)),
                   ring_sizes=tuple(sorted({p.workload.layout.ring_size for p in rows})), source=source,
                   identified=("constant_bytes",))


def fit_stack_calibration(points: list[StackPoint], *, source: str = "") -> Calibration:
    """Workspace per mode, slack at rest (rows not under pressure), the fragmentation reserve
    (pressure rows) and the outside memory of one GPU's runs (each part where the runs carry its
    two figures)."""
    gpu = points[0].gpu
    workspace, slack = {}, {}
    at_rest = [p for p in points if p.peak_allocated_bytes is not None and p.peak_reserved_bytes is not None
               and not p.pressure]
    if at_rest:
        slack["at_rest"] = fit_part("slack", gpu, "at_rest", [
            stack_part_point(p.workload, slack_features(p.workload), p.peak_reserved_bytes - p.peak_allocated_bytes,
                             p.peak_reserved_bytes) for p in at_rest], SLACK_FEATURES, relative=False, source=source)
    if (reserve := reserve_fit(gpu, points, source=source)) is not None:
        slack["pressure"] = reserve
    for family in ("training", "forward"):
        members = [p for p in points if mode_family(p.workload) == family and p.peak_allocated_bytes is not None]
        if members:
            analytic = {id(p): sum(analytic_terms(p.workload).values()) for p in members}
            workspace[family] = fit_part("workspace", gpu, family, [
                stack_part_point(p.workload, workspace_features(p.workload), p.peak_allocated_bytes - analytic[id(p)],
                                 p.peak_allocated_bytes) for p in members], WORKSPACE_FEATURES, relative=True,
                source=source)
    used = [p for p in points if p.device_used_bytes is not None and p.peak_reserved_bytes is not None]
    outside = fit_part("overhead", gpu, "all", [
        stack_part_point(p.workload, outside_features(p.workload), p.device_used_bytes - p.peak_reserved_bytes,
                         p.device_used_bytes) for p in used], OUTSIDE_FEATURES, relative=False,
        source=source) if used else None
    return Calibration(gpu=gpu, workspace=workspace, slack=slack, overhead=outside)


def fit_stack_calibrations(points: list[StackPoint], *, source: str = "") -> dict[str, Calibration]:
    """One calibration per GPU with runs."""
    by_gpu: dict[str, list[StackPoint]] = {}
    for point in points:
        by_gpu.setdefault(point.gpu, []).append(point)
    return {gpu: fit_stack_calibration(members, source=source) for gpu, members in sorted(by_gpu.items())}


# ----------------------------------------------------------------------------- prediction


@dataclass(frozen=True, slots=True, kw_only=True)
class StackMemoryModel:
    """Whole-model predictions: stack fits per GPU (``calibrations``), else the attention-level
    model's fits (``attention``; default: ``default_memory_model()``) and the prior."""

    calibrations: dict[str, Calibration] = field(default_factory=dict)
    attention: MemoryModel | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def predict(self, w: StackWorkload, gpu: GpuSpec) -> MemoryPrediction:
        """Per-rank device memory of one step of ``w`` on ``gpu`` (memoised per workload and GPU)."""
        key = (w, gpu.name, gpu.runtime_overhead_bytes)
        if key not in self._cache:
            self._cache[key] = self._predict(w, gpu, analytic_terms(w))
        return self._cache[key]

    def lower_bound_bytes(self, w: StackWorkload, gpu: GpuSpec) -> float:
        """A certified lower bound of ``predict(w, gpu).upper_bytes`` at a fraction of its cost (0
        when there is none): total + bound from one instant's terms (``lower_bound_terms``), since
        every fitted part and bound is non-decreasing in Σφ."""
        key = (w, gpu.name, gpu.runtime_overhead_bytes)
        if key in self._cache:  # predicted already: the exact figure
            return self._cache[key].upper_bytes
        phi = lower_bound_terms(w)
        if phi is None:
            return 0.0
        figures = self._figures(w, gpu, sum(phi.values()))
        return figures.total_bytes + figures.bound_bytes

    def parts_for(self, w: StackWorkload, gpu: GpuSpec) -> ChosenParts:
        """The stack fits used for ``w`` on ``gpu``: this GPU's, else the GPU's with the most runs."""
        family = mode_family(w)
        key = ("parts", gpu.name, family)
        if key in self._cache:
            return self._cache[key]
        ordered = sorted(self.calibrations.values(), key=lambda c: (c.gpu != gpu.name, -len(c.workspace), c.gpu))

        def first(pick) -> PartFit | None:
            return next((f for c in ordered if (f := pick(c)) is not None), None)

        self._cache[key] = ChosenParts(workspace=first(lambda c: c.workspace.get(family)),
                                       slack=first(lambda c: c.slack.get("at_rest")),
                                       overhead=first(lambda c: c.overhead))
        return self._cache[key]

    def _attention_transfer(self, w: StackWorkload, gpu: GpuSpec) -> "_AttentionTransfer":
        """The attention-level parts lent to ``w`` (memoised: they do not depend on the settings
        searched, only on one layer's attention, the ring and the number of communicators)."""
        key = ("attention", w.model, w.seq_len_tokens, w.batch, w.training, w.settings.param_dtype, w.layout,
               w.tp_degree, communicator_count(w), gpu.name, gpu.runtime_overhead_bytes)
        if key not in self._cache:
            self._cache[key] = _AttentionTransfer.of(self.attention, w, gpu)
        return self._cache[key]

    def reserve_for(self, chosen: ChosenParts) -> PartFit | None:
        """The fragmentation reserve of the GPU whose slack fit is used (None: none measured)."""
        calibration = self.calibrations.get(chosen.slack.gpu) if chosen.slack else None
        return calibration.slack.get("pressure") if calibration else None

    def _reserve_and_bound(self, chosen: ChosenParts, slack: float, allocated: float,
                           n: float) -> tuple[float, float]:
        """(the slack the need counts, its residual bound): the slack at rest and its fit's bound,
        capped by the fragmentation reserve where one was measured — the need's slack is then
        ``min(slack, reserve)`` and its upper end ``min(slack + bound, reserve)``, both continuous
        and non-decreasing in the slack (a bound that vanished once the slack passed the reserve
        made feasibility flip back and forth with tokens)."""
        slack_bound = chosen.slack.uncertainty_bytes(allocated + slack, n) if chosen.slack else 0.0
        reserve_fit_ = self.reserve_for(chosen)
        if reserve_fit_ is None:
            return slack, slack_bound
        reserve = reserve_fit_.bytes({"constant_bytes": 1.0})
        return min(slack, reserve), min(slack + slack_bound, reserve) - min(slack, reserve)

    def _figures(self, w: StackWorkload, gpu: GpuSpec, analytic: float) -> "_Figures":
        """Workspace, slack at rest, the reserve, outside memory and the residual bound of the need
        around Σφ = ``analytic`` (the slack features do not depend on Σφ: the bound stays monotone)."""
        chosen = self.parts_for(w, gpu)
        attention = self._attention_transfer(w, gpu) if chosen.workspace is None or chosen.overhead is None else None
        workspace = chosen.workspace.bytes(workspace_features(w)) if chosen.workspace else attention.workspace_bytes
        allocated = analytic + workspace
        slack = chosen.slack.bytes(slack_features(w)) if chosen.slack else 0.0
        n = tokens_per_rank(w)
        reserve, slack_bound = self._reserve_and_bound(chosen, slack, allocated, n)
        outside = chosen.overhead.bytes(outside_features(w)) if chosen.overhead else attention.outside_bytes
        total = allocated + reserve + outside
        # A whole model's figures are dominated by model states that do not extrapolate: the workspace
        # and slack residuals grow with the tokens per rank beyond the measured range (what does), the
        # outside memory (a context constant and indicators) with its figure only.
        bound = slack_bound + sum(fit.uncertainty_bytes(figure, tokens) for fit, figure, tokens in
                                  ((chosen.workspace, allocated, n), (chosen.overhead, total, None)) if fit)
        if chosen.workspace is None or chosen.slack is None:
            bound += PRIOR_RELATIVE_UNCERTAINTY * analytic
        if attention is not None:
            bound += attention.bound_bytes(total, workspace=chosen.workspace is None,
                                           outside=chosen.overhead is None)
        return _Figures(chosen=chosen, attention=attention, workspace_bytes=workspace, slack_bytes=slack,
                        reserve_bytes=reserve, outside_bytes=outside, total_bytes=total, bound_bytes=bound)

    def _predict(self, w: StackWorkload, gpu: GpuSpec, phi: dict[str, float]) -> MemoryPrediction:
        analytic = sum(phi.values())
        f = self._figures(w, gpu, analytic)
        kind, label = _provenance(f.chosen, f.attention, w, gpu)
        if f.slack_bytes > f.reserve_bytes:
            label += (f"; memory = need (fragmentation reserve {f.reserve_bytes / 2**30:.1f} GiB from runs at the "
                      f"capacity boundary); at rest the allocator caches more: "
                      f"{(analytic + f.workspace_bytes + f.slack_bytes + f.outside_bytes) / 2**30:.1f} GiB used")
        uncertainty = f.bound_bytes + (PRIOR_RELATIVE_UNCERTAINTY * (f.total_bytes - analytic)
                                       if kind != "measured" else 0.0)
        parts = {**phi, "workspace_bytes": f.workspace_bytes, "fragmentation_reserve_bytes": f.reserve_bytes,
                 "runtime_overhead_bytes": f.outside_bytes}
        allocated = analytic + f.workspace_bytes
        at_rest = allocated + f.slack_bytes + f.outside_bytes
        return MemoryPrediction(terms_bytes=parts, total_bytes=f.total_bytes, tokens_per_rank=tokens_per_rank(w),
                                fitted_figure="device_used_bytes", peak_allocated_bytes=allocated,
                                peak_reserved_bytes=allocated + f.slack_bytes if f.chosen.slack else None,
                                relative_uncertainty=uncertainty / f.total_bytes if f.total_bytes > 0 else 0.0,
                                provenance=label, provenance_kind=kind, model_form="analytic",
                                residual_bound_bytes=f.bound_bytes, device_used_at_rest_bytes=at_rest)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Figures:
    chosen: ChosenParts
    attention: "_AttentionTransfer | None"
    workspace_bytes: float
    slack_bytes: float
    reserve_bytes: float
    outside_bytes: float
    total_bytes: float
    bound_bytes: float


@dataclass(frozen=True, slots=True, kw_only=True)
class _AttentionTransfer:
    """What the attention-level calibration of a GPU lends a whole model without stack fits: one
    layer's attention workspace (``attention_workload``) and the memory outside the allocator."""

    parts: ChosenParts
    workspace_bytes: float
    attention_allocated_bytes: float
    outside_bytes: float
    label: str
    tokens_per_rank: float

    @classmethod
    def of(cls, model: MemoryModel | None, w: StackWorkload, gpu: GpuSpec) -> "_AttentionTransfer":
        from ringplan.memory.attention_model import default_memory_model
        from ringplan.memory.tp_terms import tp_attention_workload

        model = model if model is not None else default_memory_model()
        attention = tp_attention_workload(w)  # the rank's H/T heads
        parts = model.parts_for(attention, w.layout, gpu)
        prediction = model.predict(attention, w.layout, gpu)
        outside = parts.overhead.bytes(attention_outside_features(w)) if parts.overhead \
            else float(gpu.runtime_overhead_bytes)
        return cls(parts=parts, workspace_bytes=prediction.terms_bytes.get("workspace_bytes", 0.0),
                   attention_allocated_bytes=prediction.peak_allocated_bytes or 0.0, outside_bytes=outside,
                   label=prediction.provenance, tokens_per_rank=tokens_per_rank(w))

    def bound_bytes(self, total_bytes: float, *, workspace: bool, outside: bool) -> float:
        """Residual bounds of the lent parts; the catalog overhead (nothing measured) gets the prior."""
        bound = 0.0
        if workspace and self.parts.workspace:
            bound += self.parts.workspace.uncertainty_bytes(self.attention_allocated_bytes, self.tokens_per_rank)
        if outside:
            bound += self.parts.overhead.uncertainty_bytes(total_bytes) if self.parts.overhead \
                else PRIOR_RELATIVE_UNCERTAINTY * self.outside_bytes
        return bound


def _provenance(chosen: ChosenParts, attention: _AttentionTransfer | None, w: StackWorkload,
                gpu: GpuSpec) -> tuple[str, str]:
    """("measured" | "transferred" | "extrapolated" | "analytic", label) of a whole-model prediction."""
    prior = f"bound + {PRIOR_RELATIVE_UNCERTAINTY:.0%} of the terms (workspace/slack not measured)"
    if chosen.workspace is None and chosen.slack is None and chosen.overhead is None:
        if attention is None or (attention.parts.workspace is None and attention.parts.overhead is None):
            return "analytic", f"analytic, no whole-model or attention fit; catalog overhead; {prior}"
        return "transferred", f"no whole-model runs: attention-level fit ({attention.label}); {prior}"
    kind, label = calibrated_provenance(chosen, gpu, tokens_per_rank(w), w.layout.ring_size)
    label = f"whole-model fit {label}"
    if chosen.overhead is None and attention is not None and attention.parts.overhead is not None:
        label = label.replace("; catalog overhead", "; outside-allocator memory from the attention-level fit")
    if chosen.workspace is None or chosen.slack is None:
        label += f"; {prior}"
    return kind, label


# ----------------------------------------------------------------------------- the committed fit


def stack_point(row) -> StackPoint:
    """A ``StackMeasurement`` as the fits see it (the GPU's usable memory from the catalog, so that
    pressure rows are known; None for a GPU the catalog lacks)."""
    from ringplan.hardware import load_catalog

    try:
        usable = float(load_catalog().gpu(row.gpu).usable_memory_bytes)
    except ValueError:
        usable = None
    return StackPoint(gpu=row.gpu, workload=row.workload(), peak_allocated_bytes=row.peak_allocated_bytes,
                      peak_reserved_bytes=row.peak_reserved_bytes, device_used_bytes=row.device_used_bytes,
                      usable_memory_bytes=usable)


def stack_points(directory: str | Path | None = None) -> tuple[list[StackPoint], str]:
    """The runs the fits use (not OOM, of ``CALIBRATION_KINDS``) and the names of their files."""
    from ringplan.profiles.stack import load_stack_profiles

    points, names = [], set()
    for profile in load_stack_profiles(directory):
        for row in profile.rows:
            if row.oom or row.kind not in CALIBRATION_KINDS:
                continue
            points.append(stack_point(row))
            names.add(Path(profile.path or "").name)
    return points, ", ".join(sorted(names))


def _fit_stack_profiles(directory: Path | None) -> tuple[dict[str, Calibration], str]:
    """One calibration per GPU with runs in ``directory`` (none when there are no runs: the model
    then works from the terms and the attention-level fits) and the names of their files."""
    points, source = stack_points(directory)
    return (fit_stack_calibrations(points, source=source) if points else {}), source


#: ``profiles/fitted/stack-fit.json``: the calibrations of ``profiles/measured/stack``.
STACK_FIT = FitCache(schema="ringplan.stack-fit/1", file_name="stack-fit.json",
                     sources=("stack_terms.py", "model_states.py", "stack_model.py", "attention_terms.py",
                              "part_fit.py", "offload_terms.py", "tp_terms.py", "cp_terms.py"),
                     profiles_dir=stack_profiles_dir, fit=_fit_stack_profiles, prefix="stack ")


@functools.lru_cache(maxsize=1)
def default_stack_memory_model() -> StackMemoryModel:
    """The model of ``profiles/measured/stack``: the committed fit when fresh, else fitted now."""
    calibrations = usable_calibrations(STACK_FIT)
    if calibrations is None:
        calibrations = _fit_stack_profiles(None)[0]
    return StackMemoryModel(calibrations=calibrations)
