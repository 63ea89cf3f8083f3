"""How a whole model's GPUs are split besides data parallelism: the tensor-parallel degree T and the
context-parallel scheme (issue 14). W = DP × P × T (``ringplan.stack``).

A ``Parallelism`` is one such choice; ``parallelism_space`` lists the ones a search tries for a model on
a GPU: T over the powers of two up to the GPUs of one node that divide the model's heads and FFN
(``stack.check_tp_degree``), times the schemes ring, all-gather and Ulysses (hybrid only with a given
Ulysses degree). ``check_placement`` refuses what a node cannot hold: tensor parallelism and Ulysses
exchange every layer's activations, so T (and T × U) stay inside one node unless ``allow_cross_node``
(Megatron and torchtitan place TP innermost, on NVLink); Ulysses needs U | H/T.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringplan.models import ModelSpec
from ringplan.stack import check_tp_degree
from ringplan.workload import CP_SCHEMES, check_cp_scheme

#: Schemes searched when none is given (hybrid needs a Ulysses degree: given only).
SEARCHED_SCHEMES: tuple[str, ...] = ("ring", "allgather", "ulysses")


@dataclass(frozen=True, slots=True)
class Parallelism:
    """Tensor-parallel degree T, context-parallel scheme and (hybrid) Ulysses degree U."""

    tp_degree: int = 1
    cp_scheme: str = "ring"
    ulysses_degree: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tp_degree, bool) or not isinstance(self.tp_degree, int) or self.tp_degree <= 0:
            raise ValueError(f"tensor parallel degree must be a positive integer, got {self.tp_degree!r}")
        check_cp_scheme(self.cp_scheme, self.ulysses_degree)

    @property
    def label(self) -> str:
        """``TP2 ulysses``, ``ring`` (T = 1 is not named), ``hybrid U4``."""
        scheme = self.cp_scheme + (f" U{self.ulysses_degree}" if self.cp_scheme == "hybrid" else "")
        return (f"TP{self.tp_degree} " if self.tp_degree > 1 else "") + scheme


DEFAULT_PARALLELISM = Parallelism()


def parallelism_key(p: Parallelism) -> tuple[int, int, int]:
    """Order without a time model: no tensor parallelism first, then the smaller T (less traffic
    every layer), then the scheme in ``CP_SCHEMES`` order (the ring first: what was measured)."""
    return p.tp_degree, CP_SCHEMES.index(p.cp_scheme), p.ulysses_degree or 0


def tp_degrees(model: ModelSpec, gpus_per_node: int) -> tuple[int, ...]:
    """The powers of two up to one node's GPUs that are valid tensor-parallel degrees for ``model``."""
    degrees, t = [], 1
    while t <= max(1, gpus_per_node):
        try:
            check_tp_degree(model, t)
            degrees.append(t)
        except ValueError:
            pass
        t *= 2
    return tuple(degrees)


def parallelism_space(model: ModelSpec, gpus_per_node: int, *, tp: tuple[int, ...] | None = None,
                      schemes: tuple[str, ...] | None = None,
                      ulysses_degree: int | None = None) -> tuple[Parallelism, ...]:
    """Every (T, scheme) the search tries, in ``parallelism_key`` order: the given T values (checked
    against the model: ``ValueError`` naming the nearest valid ones) or ``tp_degrees``; the given
    schemes or ``SEARCHED_SCHEMES`` (a hybrid needs ``ulysses_degree``)."""
    for t in tp or ():
        check_tp_degree(model, t)
    degrees = tp or tp_degrees(model, gpus_per_node)
    chosen = schemes or SEARCHED_SCHEMES
    space = [Parallelism(tp_degree=t, cp_scheme=s, ulysses_degree=ulysses_degree if s == "hybrid" else None)
             for t in degrees for s in chosen]
    return tuple(sorted(set(space), key=parallelism_key))


def check_placement(p: Parallelism, *, ring_size: int, model: ModelSpec, gpus_per_node: int,
                    allow_cross_node: bool) -> None:
    """``ValueError`` unless ``p`` can run with a context-parallel group of ``ring_size`` ranks: the
    Ulysses degree divides the heads each TP rank holds (H / T); T, and T × U for Ulysses and hybrid,
    fit one node of ``gpus_per_node`` GPUs unless ``allow_cross_node``."""
    u = ring_size if p.cp_scheme == "ulysses" else (p.ulysses_degree or 1) if p.cp_scheme == "hybrid" else 1
    local_heads = model.n_heads // p.tp_degree
    if u > 1 and local_heads % u:
        raise ValueError(f"Ulysses over {u} GPUs needs {u} to divide the {local_heads} heads of a tensor-parallel "
                         f"rank ({model.n_heads} / TP {p.tp_degree})")
    inner = p.tp_degree * u
    if not allow_cross_node and inner > gpus_per_node:
        what = f"tensor parallel {p.tp_degree}" + (f" x Ulysses {u}" if u > 1 else "")
        raise ValueError(f"{what} = {inner} GPUs exceeds one node of {gpus_per_node}: it exchanges every layer's "
                         f"activations (pass --allow-cross-node to plan it over the inter-node link)")
