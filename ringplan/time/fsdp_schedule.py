"""FSDP2 on one rank: how parameters are grouped into units, how long a ring collective takes, and
how the compute stream and one transfer stream overlap (prefetch depth 1).

Sources: ``ringplan_runtime.stack_parallel.apply_fsdp`` (the units), Zhao et al. 2023, "PyTorch
FSDP" (the prefetch schedule), NCCL's ring bus bandwidth (the collectives). Pure Python: no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringplan import models as mdl


def fsdp_unit_params(model: mdl.ModelSpec) -> dict[str, int]:
    """Parameters of each FSDP2 unit as ``ringplan_runtime.stack_parallel.apply_fsdp`` groups them:
    ``root`` (the final norm), ``embedding`` (token table, learned positions; the LM head too when
    tied: one group), ``head`` (the untied LM head, else 0) and ``block`` (each of the L blocks)."""
    head = 0 if model.tied_embeddings else model.vocab_size * model.embed_dim
    return {"root": mdl.norm_parameter_count(model, model.embed_dim),
            "embedding": mdl.embedding_parameter_count(model) - head, "head": head,
            "block": mdl.layer_parameter_count(model)}


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamUnit:
    """One unit on the compute stream and its transfers: ``before_s`` must end before the compute
    starts (issued when the previous unit's compute starts), ``after_s`` is issued when it ends."""

    compute_s: float
    before_s: float = 0.0
    after_s: float = 0.0


def overlapped_end_s(units: list[StreamUnit]) -> float:
    """End time of a compute stream and one transfer stream (first in, first out, prefetch depth 1).

    The first unit's ``before`` transfer is exposed; later ones only where they outlast the compute
    they overlap; the last ``after`` transfers where nothing is left to hide them. Transfers run one
    at a time (all-gathers and reduce-scatters share the link). This is FSDP2's schedule (the next
    unit's all-gather overlaps this unit's compute; a unit's reduce-scatter follows its backward:
    Zhao et al. 2023, "PyTorch FSDP", on prefetching). Ignores compute slowed by concurrent transfers
    and a host that falls behind the GPU.
    """
    if not units:
        return 0.0
    link_free = ready = units[0].before_s
    compute_end = 0.0
    for i, unit in enumerate(units):
        start = max(compute_end, ready)
        if i + 1 < len(units):
            link_free = ready = max(link_free, start) + units[i + 1].before_s
        compute_end = start + unit.compute_s
        if unit.after_s:
            link_free = max(link_free, compute_end) + unit.after_s
    return max(compute_end, link_free)


def collective_s(link, total_bytes: float, group: int) -> float:
    """Seconds of a ring all-gather or reduce-scatter of a ``total_bytes`` buffer over ``group``
    ranks: each rank moves (G − 1)/G of it through its link, α + (G − 1)/G · bytes / β (α once: NCCL
    pipelines the G − 1 steps). An all-reduce is two of these. 0 for a group of one. Source: the
    ring algorithm's bus bandwidth (NCCL performance notes); ignores the reduction arithmetic and
    link contention with the ring attention exchange."""
    if group <= 1 or total_bytes <= 0:
        return 0.0
    return float(link.transfer_time_s(total_bytes * (group - 1) / group))
