"""Step time of a whole transformer stack on one rank: a training step, or a prefill forward.

    step = host (start, kernel launches, allocator retries) + GEMMs + attention + elementwise + loss
           + optimizer + exposed FSDP communication + TP communication + exposed checkpoint offload

Per rank of m = B·S/P local tokens (``StepTime`` names every part; they sum to the step):

- GEMMs: per block q, k, v, o and the MLP (gate and up, down), and the LM head. Forward
  2·m·in·out FLOPs each; backward two GEMMs of that size (input and weight gradient);
  checkpointing adds a forward of what it recomputes (``RECOMPUTED``), a tiled MLP the forward of its
  MLP, run as n/t GEMMs of B·t rows each (``recomputed_parts``, ``gemm_rows``). Timed by shape from a
  measured GEMM profile of the GPU (``ringplan.time.gemms``, ``benchmarks/measure_gemm.py``),
  another GPU's scaled by the peak ratio, else the prior ``GEMM_EFFICIENCY`` × catalog peak.
- attention: one layer's attention under ``layout.cp_scheme`` — the ring from ``ringplan.time.attention_time``
  (kernels, merges, exposed ring exchange), all-gather / Ulysses / hybrid from ``ringplan.time.cp_time`` —
  on the rank's H/T heads × L; full checkpointing runs its forward again in backward.
- tensor parallel T > 1 (``ringplan.time.tp_time``): GEMMs of the TP-local shapes (``gemms.block_gemms``),
  the sequence-parallel elementwise bytes /T (``stack_bytes.tp_block_op_bytes``), the TP all-gathers and
  reduce-scatters, all exposed (``tp_comm_s``); FSDP moves the TP-local parameters over G.
- elementwise: norms, RoPE, q/k norms, the MLP activation, residual adds, the embedding and FSDP's
  copies and casts: minimal bytes (``stack_bytes``) / (0.9 × HBM bandwidth).
- loss (cross-entropy over V logits per token) and optimizer (foreach AdamW): bytes (``stack_bytes``)
  / HBM bandwidth.
- FSDP communication: α–β collectives played against compute by ``fsdp_schedule.overlapped_end_s``; checkpoint
  offload: PCIe copies on the compute stream (the runtime's ``save_on_cpu``), not hidden.
- host: the call overhead at the start (and after the loss is read), the eager kernel launches of the
  step (``host_launches.step_kernels`` × ``host_launches.DEFAULT_HOST_S_PER_KERNEL``) and, for a step
  whose peak allocation is at the capacity boundary, the allocator's retries
  (``host_launches.allocator_retry_s``).

numpy/scipy (through the time model) load only when a step time is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ringplan import models as mdl
from ringplan.memory.tp_terms import tp_attention_workload
from ringplan.stack import StackWorkload, shard_group_size, tokens_per_rank
from ringplan.time.fsdp_schedule import StreamUnit, collective_s, fsdp_unit_params, overlapped_end_s
from ringplan.time.gemms import (GEMM_PRIOR_RELATIVE_UNCERTAINTY, GemmModel, GemmShape, block_gemms, gemm_flops,
                                 gemm_model_for, lm_head_gemm)
from ringplan.time.host_launches import DEFAULT_HOST_S_PER_KERNEL, allocator_retry_s, host_launch_s, step_kernels
from ringplan.time.provenance import note_weakest, provenance_rank
from ringplan.time.stack_bytes import loss_bytes_per_token, optimizer_bytes, rms_norm_bytes, tp_block_op_bytes
from ringplan.time.tp_time import tp_comm_s, tp_link, tp_param_count, tp_unit_params

#: What a checkpointing mode runs again in backward (names of ``block_gemms`` and ``block_op_bytes``,
#: and "attention"), as ``ringplan_runtime.transformer.Block`` does: selective recomputes the whole
#: block but the ring attention core; full recomputes all of it.
_BLOCK_PARTS = frozenset({"q", "kv", "o", "gate_up", "up", "down", "norms", "qk_norm", "rope", "mlp_act", "residual"})
RECOMPUTED: dict[str, frozenset[str]] = {"none": frozenset(), "selective": _BLOCK_PARTS,
                                          "full": _BLOCK_PARTS | {"attention"}}
#: What a sequence-tiled MLP (``mlp_tile_tokens``) runs again in backward, tile by tile
#: (``ringplan_runtime.tiling``): the MLP's GEMMs and its activation; a no-op on top of checkpointing,
#: which already recomputes them.
MLP_PARTS: frozenset[str] = frozenset({"gate_up", "up", "down", "mlp_act"})


def recomputed_parts(w: StackWorkload) -> frozenset[str]:
    """Block parts run again in backward: checkpointing's (``RECOMPUTED``) and, with a tiled MLP, the MLP's."""
    tiled = MLP_PARTS if w.settings.mlp_tile_tokens is not None else frozenset()
    return RECOMPUTED[w.settings.checkpointing] | tiled


def gemm_rows(w: StackWorkload, shape: GemmShape, tokens: int) -> tuple[int, int]:
    """(rows per GEMM call, calls) of one block GEMM over ``tokens`` local rows: a tiled MLP runs its
    GEMMs on B·t rows, n / t times (t the MLP tile, n the tokens per rank); the rest once on all rows."""
    t = w.settings.mlp_tile_tokens
    if t is None or shape.name not in MLP_PARTS:
        return tokens, 1
    calls = tokens_per_rank(w) // t
    return tokens // calls, calls
#: Host link for checkpoint offload (pinned CPU memory ↔ GPU), by catalog GPU: the card's PCIe
#: generation from its datasheet (SXM modules talk to the CPU over PCIe too).
HOST_LINK: dict[str, str] = {
    "gtx-1080": "pcie-gen3-x16", "v100-16gb": "pcie-gen3-x16", "v100-32gb": "pcie-gen3-x16",
    "a10-24gb": "pcie-gen4-x16", "l4": "pcie-gen4-x16", "l40s": "pcie-gen4-x16", "rtx-4090": "pcie-gen4-x16",
    "a100-40gb": "pcie-gen4-x16", "a100-80gb": "pcie-gen4-x16", "h100-80gb-sxm": "pcie-gen5-x16",
    "h100-80gb-pcie": "pcie-gen5-x16", "h200": "pcie-gen5-x16", "b200": "pcie-gen5-x16", "mi300x": "pcie-gen5-x16",
}


# ----------------------------------------------------------------------------- the step


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTime:
    """Predicted seconds of one step on the busiest rank, by part (the parts sum to ``step_time_s``).

    ``fsdp_comm_s`` is the exposed part of the collectives (``fsdp_comm_total_s`` all of them),
    ``tp_comm_s`` the tensor-parallel collectives (all exposed; 0 at T = 1),
    ``offload_s`` the checkpoint copies (all exposed, ``offload_total_s`` the same);
    ``recompute_s`` is the share of GEMMs, attention and elementwise spent recomputing (already in
    them). ``relative_uncertainty`` covers only GEMMs timed from the prior efficiency; the measured
    parts' errors are what ``benchmarks/stack_accuracy.py`` reports. ``provenance`` is the weakest
    source among GEMMs, attention and links.
    """

    step_time_s: float
    gemm_s: float
    attention_s: float
    elementwise_s: float
    loss_s: float
    optimizer_s: float
    fsdp_comm_s: float
    offload_s: float
    host_overhead_s: float
    tp_comm_s: float = 0.0
    recompute_s: float = 0.0
    fsdp_comm_total_s: float = 0.0
    offload_total_s: float = 0.0
    tokens_per_rank: int = 0
    gemm_flops: float = 0.0
    relative_uncertainty: float = 0.0
    provenance: str = ""
    provenance_details: tuple[tuple[str, str], ...] = ()

    @property
    def parts_s(self) -> dict[str, float]:
        """The named parts that sum to ``step_time_s``."""
        return {name: getattr(self, name) for name in STEP_PARTS}


STEP_PARTS: tuple[str, ...] = ("gemm_s", "attention_s", "elementwise_s", "loss_s", "optimizer_s", "fsdp_comm_s",
                               "tp_comm_s", "offload_s", "host_overhead_s")


@dataclass(slots=True, kw_only=True)
class _Costs:
    """Running sums of one step's compute by part, and the provenance notes."""

    w: StackWorkload
    gemms: GemmModel
    hbm_rate_bytes_per_s: float
    tokens: int
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_PARTS, 0.0))
    recompute_s: float = 0.0
    flops: float = 0.0
    prior_gemm_s: float = 0.0
    weight: int = 1  # how many times the pass being costed runs (L for a block)
    notes: dict[str, str] = field(default_factory=dict)

    def gemm(self, pass_name: str, tokens: int, shape: GemmShape, *, recompute: bool = False,
             calls: int = 1) -> float:
        """Seconds of ``calls`` runs of ``shape`` over ``tokens`` rows each (added to the GEMM part)."""
        seconds, label = self.gemms.time_s(pass_name, tokens, shape)
        seconds *= calls
        self.note("gemm", label)
        self.flops += self.weight * calls * gemm_flops(tokens, shape)
        self.prior_gemm_s += self.weight * seconds if label.startswith("default") else 0.0
        return self.add("gemm_s", seconds, recompute)

    def bytes(self, part: str, moved_bytes: float, *, recompute: bool = False) -> float:
        return self.add(part, moved_bytes / self.hbm_rate_bytes_per_s, recompute)

    def add(self, part: str, seconds: float, recompute: bool = False) -> float:
        self.parts[part] += self.weight * seconds
        self.recompute_s += self.weight * seconds if recompute else 0.0
        return seconds

    def note(self, component: str, label: str) -> None:
        note_weakest(self.notes, component, label)


def _block_pass_s(c: _Costs, attention_s: tuple[float, float], backward: bool) -> float:
    """Seconds of one block's forward, or its backward with what checkpointing recomputes."""
    model, e = c.w.model, c.w.settings.param_dtype_bytes
    ops = tp_block_op_bytes(model, e, c.w.tp_degree)
    again = recomputed_parts(c.w) if backward else frozenset()
    total = 0.0
    for shape in block_gemms(model, c.w.tp_degree):
        rows, calls = gemm_rows(c.w, shape, c.tokens)
        if not backward:
            total += c.gemm("forward", rows, shape, calls=calls)
            continue
        total += c.gemm("backward_input", rows, shape, calls=calls) + c.gemm("backward_weight", rows, shape, calls=calls)
        total += c.gemm("forward", rows, shape, recompute=True, calls=calls) if shape.name in again else 0.0
    for name, (fwd, bwd) in ops.items():
        total += c.bytes("elementwise_s", (bwd if backward else fwd) * c.tokens)
        total += c.bytes("elementwise_s", fwd * c.tokens, recompute=True) if name in again else 0.0
    total += c.add("attention_s", attention_s[1] if backward else attention_s[0])
    total += c.add("attention_s", attention_s[0], recompute=True) if "attention" in again else 0.0
    return total


def _head_pass_s(c: _Costs, backward: bool) -> float:
    """Final norm, then (training) the LM head and loss chunk by chunk; a chunk's logits and loss
    forward run again in backward (``checkpoint`` per chunk, loss ``chunked``)."""
    model, s, e, t = c.w.model, c.w.settings, c.w.settings.param_dtype_bytes, c.w.tp_degree
    norm = rms_norm_bytes(e)[1 if backward else 0]
    total = c.bytes("elementwise_s", norm * model.embed_dim * (c.tokens if t == 1 else c.tokens / t))  # SP norm
    if not c.w.training:
        return total
    chunked = s.loss == "chunked"
    chunk = min(s.loss_chunk_tokens, c.tokens) if chunked else c.tokens
    sizes = [chunk] * (c.tokens // chunk) + ([c.tokens % chunk] if c.tokens % chunk else [])
    head, loss = lm_head_gemm(model, t), loss_bytes_per_token(model, e, t)
    for size in sizes:
        if backward:
            total += c.gemm("backward_input", size, head) + c.gemm("backward_weight", size, head)
            total += c.gemm("forward", size, head, recompute=True) if chunked else 0.0
        else:
            total += c.gemm("forward", size, head)
    total += c.bytes("loss_s", loss[1 if backward else 0] * c.tokens)
    return total + (c.bytes("loss_s", loss[0] * c.tokens, recompute=True) if backward and chunked else 0.0)


def _embedding_pass_s(c: _Costs, backward: bool) -> float:
    """Token (and learned position) lookup; backward zero-fills the dense V×E gradient and adds rows
    (vocab-parallel under tensor parallel T: the rank's ⌈V/T⌉ rows, the lookup over all B·n rows)."""
    model, e = c.w.model, c.w.settings.param_dtype_bytes
    tables = 2 if model.position == "learned" else 1
    if not backward:
        return c.bytes("elementwise_s", tables * 2 * model.embed_dim * e * c.tokens)
    vocab = -(-model.vocab_size // c.w.tp_degree)
    return c.bytes("elementwise_s", vocab * model.embed_dim * e + tables * 3 * model.embed_dim * e * c.tokens)


def _fsdp_copies_s(c: _Costs, params: int, *, gathers: int, reduces: bool) -> float:
    """FSDP2's copies around one unit's collectives, at HBM speed (training runs; the runtime runs
    ``none`` as FSDP2 over groups of one): per all-gather the cast of the local master shard to the
    param dtype (read m, write e per local parameter) and the copy-out of the gathered buffer into
    the parameters (read e, write e per parameter); per reduce-scatter the copy of the gradients into
    the master-dtype buffer (read e, write m) and the division of the local shard (read m, write m)."""
    if not c.w.training or params == 0:
        return 0.0
    g, e, m = shard_group_size(c.w), c.w.settings.param_dtype_bytes, c.w.settings.master_dtype_bytes
    gather = (m + e) * params / g + 2 * e * params
    reduce = (e + m) * params + 2 * m * params / g
    return c.bytes("elementwise_s", gathers * gather + (reduce if reduces else 0.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Links:
    """The link models of the sharding group and of the data-parallel replicas of a shard."""

    shard: Any
    replica: Any


def _links(c: _Costs, spec, timing_dir) -> _Links:
    from ringplan.time.timing_data import load_timing_data, resolve_link

    timing, per_node = load_timing_data(timing_dir), spec.gpus_per_node
    g, w, t = shard_group_size(c.w), c.w.world_size, c.w.tp_degree

    def link(group: int, span: int, name: str):
        found, label = resolve_link(spec, "intra_node" if span <= per_node else "inter_node", None, timing)
        if group > 1:
            c.note(name, label)
        return found

    # a sharding group's G ranks are T apart (TP innermost): they span G·T ranks
    return _Links(shard=link(g, g * t, "sharding link"), replica=link(w, w, "data-parallel link"))


def _gather_s(w: StackWorkload, links: _Links, params: int) -> float:
    """All-gather of one unit's parameters in the param dtype over the sharding group (zero3)."""
    return collective_s(links.shard, w.settings.param_dtype_bytes * params, shard_group_size(w))


def _grad_sync_s(w: StackWorkload, links: _Links, params: int) -> float:
    """Gradient synchronisation of one unit: reduce-scatter of master-dtype gradients over the
    sharding group G, then an all-reduce of the shard over the W/(T·G) replicas (``none``: G = 1, an
    all-reduce over all W/T ranks holding the TP shard, as DDP). Context-parallel ranks hold gradients of
    different tokens, so they take part like data-parallel ones."""
    g, m = shard_group_size(w), w.settings.master_dtype_bytes
    replicas = w.world_size // w.tp_degree // g
    return collective_s(links.shard, m * params, g) + 2 * collective_s(links.replica, m * params / g, replicas)


def _stream_units(c: _Costs, attention: tuple[float, float], links: _Links | None,
                  backward: bool) -> list[StreamUnit]:
    """The units in FSDP2's order with their transfers.

    Forward: root (final-norm weight), embedding, blocks, head (final norm, LM head, loss).
    Backward: head, blocks in reverse, embedding, root. Every unit but the root is gathered again
    for backward (``reshard_after_forward=True``); a tied head is gathered with the embedding's
    group at each use and reduced once with it. Prefill: no transfers (weights replicated).
    """
    w = c.w
    units = fsdp_unit_params(w.model) if w.tp_degree == 1 else tp_unit_params(w)  # one TP rank's parameters
    gathered = w.training and w.settings.sharding == "zero3"
    head_params = units["head"] or units["embedding"]  # what the LM head gathers

    def gather(params: int) -> float:
        return _gather_s(w, links, params) if gathered else 0.0

    def sync(params: int) -> float:
        return _grad_sync_s(w, links, params) if w.training and backward else 0.0

    def copies(params: int, gathers: int = 1) -> float:
        return _fsdp_copies_s(c, params, gathers=gathers, reduces=backward)

    c.weight = w.model.n_layers
    block_s = _block_pass_s(c, attention, backward) + copies(units["block"])
    c.weight = 1
    blocks = [StreamUnit(before_s=gather(units["block"]), compute_s=block_s, after_s=sync(units["block"]))
              ] * w.model.n_layers
    embedding = StreamUnit(before_s=gather(units["embedding"]),
                           compute_s=_embedding_pass_s(c, backward) + copies(units["embedding"]),
                           after_s=sync(units["embedding"]))
    head_compute = (_head_pass_s(c, backward) + _fsdp_copies_s(c, head_params, gathers=1, reduces=False)
                    + copies(units["head"], 0))  # a tied head's gradients are reduced with the embedding
    head = StreamUnit(before_s=gather(head_params), compute_s=head_compute, after_s=sync(units["head"]))
    if not backward:
        root = StreamUnit(before_s=gather(units["root"]), compute_s=copies(units["root"]))
        return [root, embedding, *blocks, head]
    root = StreamUnit(compute_s=copies(units["root"], 0), after_s=sync(units["root"]))
    return [head, *blocks, embedding, root]


def _offload_s(c: _Costs, spec) -> float:
    """Seconds of moving each block's saved input (B·n·E·e bytes) to pinned CPU memory in forward
    and back in backward over the GPU's PCIe link (``HOST_LINK``), α + bytes/β each way. The
    runtime's ``torch.autograd.graph.save_on_cpu`` issues these copies on the compute stream
    (non-blocking for the host, serialised with the kernels on the GPU): nothing hides them."""
    if not (c.w.training and c.w.settings.offload_checkpoints):
        return 0.0
    from ringplan.time.links import link_model_from_spec
    from ringplan.hardware import load_catalog

    if spec.name not in HOST_LINK:
        raise ValueError(f"{spec.name}: no host (PCIe) link known for checkpoint offload; known: {sorted(HOST_LINK)}")
    link = link_model_from_spec(load_catalog().link(HOST_LINK[spec.name]))
    c.note("offload link", f"default: catalog {link.name}")
    copy = float(link.transfer_time_s(c.tokens * c.w.model.embed_dim * c.w.settings.param_dtype_bytes))
    return 2 * copy * c.w.model.n_layers


def _state_offload(c: _Costs, spec):
    """``offload_time.OffloadTime`` of parameter / optimizer-state offload (all 0 without it): the CPU
    AdamW step and the exposed part of the PCIe copies."""
    from ringplan.hardware import load_catalog
    from ringplan.time.offload_time import offload_time

    if c.w.settings.offload_params:
        c.note("offload link", "default: catalog PCIe link and DRAM bandwidth of the GPU's host system")
    return offload_time(c.w, spec, load_catalog())


def _attention_s(c: _Costs, spec, timing_dir) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's attention on the rank's H/T heads
    (``tp_terms.tp_attention_workload``) from the attention time model of ``layout.cp_scheme`` (no host
    call overhead: inside a stack the host queues it behind earlier kernels). At P = 1 every scheme is
    one local kernel: the ring's model. With T > 1 the CP group's ranks are T apart (TP innermost): a node
    holds GPUs per node / T of them."""
    work = tp_attention_workload(c.w)
    key = (work, c.w.layout, c.w.tp_degree, id(spec), str(timing_dir))
    if key not in _ATTENTION_SECONDS:  # the same layer recurs across a search's settings (sharding, loss, ...)
        if len(_ATTENTION_SECONDS) > 4096:
            _ATTENTION_SECONDS.clear()
        notes: dict[str, str] = {}
        seconds = _layer_attention_s(c.w, work, spec, timing_dir, notes)
        _ATTENTION_SECONDS[key] = (seconds, notes, spec)  # the spec kept alive: its id is in the key
    seconds, notes, _ = _ATTENTION_SECONDS[key]
    for label in notes.values():
        c.note("attention", label)
    return seconds


def ranks_per_node(ring_size: int, slots_per_node: int) -> int:
    """CP ranks placed on each node: all of them when the ring fits one node's ``slots_per_node`` (GPUs per
    node / T: TP ranks are innermost), else the largest divisor of P that fits, the ring spread evenly over
    P / that many nodes (20 ranks on nodes of 8: 5 on each of 4 nodes). A ring that does not fill whole nodes
    still crosses the inter-node link, and its time is that of an even placement."""
    if ring_size <= slots_per_node:
        return slots_per_node
    return max(d for d in range(1, slots_per_node + 1) if ring_size % d == 0)


#: (attention workload, layout, T, GPU spec id, timing dir) → ((forward, backward) s, provenance notes, spec).
_ATTENTION_SECONDS: dict[tuple, tuple[tuple[float, float], dict[str, str], Any]] = {}


def _layer_attention_s(w: StackWorkload, work, spec, timing_dir, notes: dict[str, str]) -> tuple[float, float]:
    """``_attention_s`` computed: the ring's time model, or ``_cp_attention_s`` for the other schemes."""
    from ringplan.time.attention_time import step_time_prediction

    per_node = ranks_per_node(w.layout.ring_size, max(1, spec.gpus_per_node // w.tp_degree))
    if w.layout.cp_scheme != "ring" and w.layout.ring_size > 1:
        return _cp_attention_s(w, work, spec, notes, per_node)
    forward = step_time_prediction(replace(work, training=False), w.layout, spec, timing_dir=timing_dir,
                                   call_overhead_s=0.0, gpus_per_node=per_node)
    note_weakest(notes, "attention", forward.provenance)
    if not w.training:
        return forward.step_time_s, 0.0
    both = step_time_prediction(work, w.layout, spec, timing_dir=timing_dir, call_overhead_s=0.0,
                                gpus_per_node=per_node)
    note_weakest(notes, "attention", both.provenance)
    return forward.step_time_s, max(0.0, both.step_time_s - forward.step_time_s)


def _cp_attention_s(w: StackWorkload, work, spec, notes: dict[str, str], per_node: int) -> tuple[float, float]:
    """(forward, backward) seconds of the all-gather / Ulysses / hybrid attention (``cp_time.cp_step_time``:
    compute + exposed collectives, without its call overhead)."""
    from ringplan.time.cp_time import cp_step_time

    forward = cp_step_time(replace(work, training=False), w.layout, spec, gpus_per_node=per_node)
    note_weakest(notes, "attention", forward.provenance)
    if not w.training:
        return forward.compute_s + forward.exposed_comm_s, 0.0
    both = cp_step_time(work, w.layout, spec, gpus_per_node=per_node)
    note_weakest(notes, "attention", both.provenance)
    forward_s = forward.compute_s + forward.exposed_comm_s
    return forward_s, max(0.0, both.compute_s + both.exposed_comm_s - forward_s)


def step_time(w: StackWorkload, gpu, *, timing_dir: str | Path | None = None,
              call_overhead_s: float | None = None, host_s_per_kernel: float | None = None,
              allocator_pressure: bool = False) -> StepTime:
    """Predict one step of ``w`` on GPUs of type ``gpu`` (catalog name or ``GpuSpec``).

    Training: forward, backward (with recomputation) and optimizer, FSDP/ZeRO collectives played
    against compute, checkpoint offload copies added. ``training=False`` (prefill): the forward only,
    weights replicated (no collectives), hidden states without the LM head. ``call_overhead_s``:
    host time before the first kernel (default ``attention_time.DEFAULT_CALL_OVERHEAD_S``), paid at the
    start and, in training, again after the loss is read on the host (``StackRun.backward``'s
    ``.item()``) before the optimizer's kernels are queued. ``host_s_per_kernel``: host seconds per
    launched kernel (default ``host_launches.DEFAULT_HOST_S_PER_KERNEL``; 0 leaves the launches out).
    ``allocator_pressure``: the step's peak allocation is above ``memory.stack_model.PRESSURE_FRACTION``
    of usable memory (the caller knows it from the memory model), so the allocator's retries are added.
    All three land in ``host_overhead_s``. Tensor parallel T > 1: ``tp_comm_s`` (``tp_time.tp_comm_s``).
    Bad input (unknown GPU, no data for the dtype) raises ValueError.
    """
    from ringplan.time.attention_time import DEFAULT_CALL_OVERHEAD_S
    from ringplan.time.kernels import ELEMENTWISE_HBM_EFFICIENCY
    from ringplan.time.timing_data import resolve_gpu

    spec = resolve_gpu(gpu)
    c = _Costs(w=w, gemms=gemm_model_for(spec, w.settings.param_dtype, timing_dir),
               hbm_rate_bytes_per_s=ELEMENTWISE_HBM_EFFICIENCY * spec.hbm_bandwidth_bytes_per_s,
               tokens=w.batch * tokens_per_rank(w))
    c.note("elementwise", f"default: assumed {ELEMENTWISE_HBM_EFFICIENCY} of catalog HBM bandwidth")
    attention = _attention_s(c, spec, timing_dir)
    links = _links(c, spec, timing_dir) if w.training else None
    units = _stream_units(c, attention, links, backward=False)
    if w.training:
        backward = _stream_units(c, attention, links, backward=True)
        comm = overlapped_end_s(units) + overlapped_end_s(backward) - sum(u.compute_s for u in units + backward)
        units += backward
        local = _rank_params(w) / shard_group_size(w)
        if w.settings.offload_params:  # AdamW steps on the host (ringplan.time.offload_time)
            c.add("optimizer_s", _state_offload(c, spec).cpu_optimizer_step_time_s)
        else:
            c.bytes("optimizer_s", optimizer_bytes(local, w.settings.master_dtype_bytes))
    else:
        comm = overlapped_end_s(units) - sum(u.compute_s for u in units)
    total = sum(u.before_s + u.after_s for u in units)
    if w.training and w.settings.sharding in ("zero1", "zero2") and shard_group_size(w) > 1:
        regather = _gather_s(w, links, _rank_params(w))  # the updated shards, after the step
        comm, total = comm + regather, total + regather
    offload = _offload_s(c, spec) + (_state_offload(c, spec).exposed_pcie_time_s if w.training else 0.0)
    overhead = DEFAULT_CALL_OVERHEAD_S if call_overhead_s is None else float(call_overhead_s)
    per_kernel = DEFAULT_HOST_S_PER_KERNEL if host_s_per_kernel is None else host_s_per_kernel
    c.parts["tp_comm_s"] = _tp_comm_s(c, spec, timing_dir)
    device = sum(c.parts.values()) + comm + offload
    host = (overhead * (2 if w.training else 1) + host_launch_s(step_kernels(w), per_kernel)
            + (allocator_retry_s(device) if allocator_pressure else 0.0))
    c.parts.update(fsdp_comm_s=comm, offload_s=offload, host_overhead_s=host)
    return _result(c, fsdp_total=total, offload_total=offload)


def _rank_params(w: StackWorkload) -> int:
    """Parameters one rank's TP shard holds before sharding over G: Ψ (T = 1), else ``tp_time.tp_param_count``."""
    return mdl.parameter_count(w.model) if w.tp_degree == 1 else tp_param_count(w)


def _tp_comm_s(c: _Costs, spec, timing_dir) -> float:
    """The step's TP collectives (``tp_time.tp_comm_s``, all exposed); 0 at T = 1."""
    if c.w.tp_degree == 1:
        return 0.0
    from ringplan.time.timing_data import load_timing_data

    link, label = tp_link(c.w, spec, load_timing_data(timing_dir))
    c.note("tensor-parallel link", label)
    return tp_comm_s(c.w, link)


def _result(c: _Costs, *, fsdp_total: float, offload_total: float) -> StepTime:
    step = sum(c.parts.values())
    worst = max((v for k, v in c.notes.items() if k != "elementwise"), key=provenance_rank, default="measured")
    return StepTime(step_time_s=step, **c.parts, recompute_s=c.recompute_s, fsdp_comm_total_s=fsdp_total,
                    offload_total_s=offload_total, tokens_per_rank=c.tokens, gemm_flops=c.flops,
                    relative_uncertainty=GEMM_PRIOR_RELATIVE_UNCERTAINTY * c.prior_gemm_s / step if step else 0.0,
                    provenance=worst, provenance_details=tuple(sorted(c.notes.items())))
