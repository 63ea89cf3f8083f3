"""Tensor parallelism (T = ``StackWorkload.tp_degree``) in a whole model's step time: the collectives of
Megatron-style TP with sequence parallelism (torchtitan's ``parallelize_module`` plan, as
``ringplan_runtime.tensor_parallel.apply_tp`` runs it) and the TP-local parameter counts FSDP2 moves.

Per block and pass, on one rank (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Sec. 4.2.2: with sequence parallelism the all-reduce of plain TP becomes an all-gather
and a reduce-scatter, of the same total volume):

* forward: all-gather of the attention norm's output [B, n, E] before q/k/v, reduce-scatter of o_proj's
  partial output, all-gather before gate/up, reduce-scatter of down's output — 4 collectives;
* backward: the mirror — an all-gather of the incoming gradient before o_proj's and down's backward, a
  reduce-scatter of the q/k/v and gate/up input gradients — 4 collectives; checkpointing's recomputed
  forward (selective or full: both re-run the projections and the MLP) runs 3 of the forward's 4 again
  (torch's non-reentrant checkpoint stops once every saved tensor is recomputed: down's reduce-scatter,
  the block's last op, is not);
* outside the blocks: the vocab-parallel embedding's reduce-scatter (forward) and all-gather (backward),
  the LM head's all-gather of the final norm's output (forward) and reduce-scatter of its gradient; a
  prefill all-gathers its final hidden state back to the rank's whole sequence (``StackRun.forward_hidden``).

The counts are the runtime's (``tests/time/test_tp_time.py`` counts its functional collectives at T = 2).

Each collective moves (T − 1)/T of a B·n·E·e buffer through the rank's link, α + (T − 1)/T·B·n·E·e / β
(``fsdp_schedule.collective_s``), over the intra-node link when the T ranks fit in a node (else the
inter-node link). **Not overlapped**: the plan issues each collective on the compute stream's critical path
(Megatron without communication overlap), so every second is exposed (``StepTime.tp_comm_s``).
Ignores: loss parallel's all-reduces of B·n fp32 row statistics (≤ 3·B·n·4 bytes, E·e/12 times smaller),
the all-reduce of the replicated norm weights' partial gradients (E per norm), and contention with the CP
exchange and FSDP's collectives.
"""

from __future__ import annotations

from ringplan.memory.tp_terms import gathered_hidden_bytes, tp_local_param_shapes
from ringplan.stack import StackWorkload
from ringplan.time.fsdp_schedule import collective_s

#: TP collectives of one block's forward (2 all-gathers, 2 reduce-scatters) and of its backward (the mirror).
BLOCK_FORWARD_COLLECTIVES = 4
BLOCK_BACKWARD_COLLECTIVES = 4
#: Of a block's forward collectives, those a checkpointed block runs again in backward (all but the last).
BLOCK_RECOMPUTED_COLLECTIVES = 3
#: Outside the blocks, per pass: the embedding's and the LM head's (training: one each way).
EDGE_COLLECTIVES = 2


def tp_collective_bytes(w: StackWorkload) -> float:
    """The buffer of one TP collective: B·n·E·e (``tp_terms.gathered_hidden_bytes``); each rank sends
    (T − 1)/T of it."""
    return gathered_hidden_bytes(w)


def tp_sent_bytes(w: StackWorkload, collectives: int) -> float:
    """Bytes one rank sends in ``collectives`` TP collectives: collectives × (T − 1)/T × B·n·E·e; 0 at T = 1."""
    t = w.tp_degree
    return collectives * (t - 1) / t * tp_collective_bytes(w)


def block_tp_collectives(w: StackWorkload, *, backward: bool) -> int:
    """TP collectives of one block's forward (4) or backward (4, plus 3 of the forward's again when
    checkpointing — selective or full — recomputes the projections and the MLP); 0 at T = 1."""
    if w.tp_degree == 1:
        return 0
    if not backward:
        return BLOCK_FORWARD_COLLECTIVES
    again = BLOCK_RECOMPUTED_COLLECTIVES if w.settings.checkpointing in ("selective", "full") else 0
    return BLOCK_BACKWARD_COLLECTIVES + again


def step_tp_collectives(w: StackWorkload) -> int:
    """Every TP collective of a step: L blocks' forward (and backward) plus the embedding's and (training)
    the LM head's. Prefill: L·4 + 2 (the embedding's reduce-scatter, the final hidden state's all-gather)."""
    if w.tp_degree == 1:
        return 0
    blocks = w.model.n_layers * block_tp_collectives(w, backward=False)
    if not w.training:
        return blocks + 2
    return blocks + w.model.n_layers * block_tp_collectives(w, backward=True) + 2 * EDGE_COLLECTIVES


def tp_link(w: StackWorkload, spec, timing):
    """(link model, label) the TP group talks over: intra-node when T ≤ GPUs per node, else inter-node."""
    from ringplan.time.timing_data import resolve_link

    scope = "intra_node" if w.tp_degree <= spec.gpus_per_node else "inter_node"
    return resolve_link(spec, scope, None, timing)


def tp_comm_s(w: StackWorkload, link) -> float:
    """Exposed seconds of a step's TP collectives: Σ collectives of ``collective_s(link, B·n·E·e, T)``
    (none hidden, module docstring); 0 at T = 1."""
    return step_tp_collectives(w) * collective_s(link, tp_collective_bytes(w), w.tp_degree)


def tp_unit_params(w: StackWorkload) -> dict[str, int]:
    """One TP rank's parameters per FSDP2 unit, named as ``fsdp_schedule.fsdp_unit_params`` (``root``,
    ``embedding``, ``head``, ``block``): Σ rows·columns of ``tp_terms.tp_local_param_shapes``."""
    units = tp_local_param_shapes(w)
    count = {name: sum(rows * cols for rows, cols in shapes) for name, shapes in units.items()}
    return {"root": count["root"], "embedding": count["embed"], "head": count["head"], "block": count["block"]}


def tp_param_count(w: StackWorkload) -> int:
    """Ψ_T: one TP rank's parameters, L blocks + embedding + head + final norm."""
    units = tp_unit_params(w)
    return w.model.n_layers * units["block"] + units["embedding"] + units["head"] + units["root"]
