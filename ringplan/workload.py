"""What is being planned: the attention workload and the ring it runs on.

One frozen dataclass per concept (STYLE.md). Sizes are in tokens and bytes; every
constructor validates its inputs and raises ``ValueError`` naming the offending values,
so the CLI can turn bad input into a one-line error with exit code 2.

Shared vocabulary with ``ringplan_runtime``: tensors are laid out ``[B, S, H, D]``
(batch, tokens, heads, head dim); ``seq_len_tokens`` is the global sequence length S;
``ring_size`` P is the size of the context-parallel group; ``tokens_per_rank`` is S / P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ringplan.units import DTYPE_BYTES

LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")
BACKENDS: tuple[str, ...] = ("auto", "cudnn", "flash", "efficient", "math", "cpu")
#: Context-parallel schemes (issue 14; ``ringplan_runtime``'s ``ring_attention``, ``allgather_attention``,
#: ``ulysses_attention``, ``hybrid_attention``): p2p ring, all-gather K/V, Ulysses all-to-all over
#: heads, and Ulysses of degree U inside × a ring of P/U across.
CP_SCHEMES: tuple[str, ...] = ("ring", "allgather", "ulysses", "hybrid")


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionShape:
    """Tensor shape of one attention layer: batch B, heads H, KV heads H_kv, head dim D.

    ``n_kv_heads`` defaults to ``n_heads`` (multi-head); fewer KV heads is GQA/MQA.
    ``embed_dim`` is the model width E seen by the QKV/out projections; it defaults to H·D.
    """

    n_heads: int
    head_dim: int
    n_kv_heads: int | None = None
    batch: int = 1
    embed_dim: int | None = None
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", self.n_heads * self.head_dim)
        _require_positive(n_heads=self.n_heads, head_dim=self.head_dim, n_kv_heads=self.n_kv_heads,
                          batch=self.batch, embed_dim=self.embed_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionPattern:
    """Which (query, key) pairs interact: causal or not, and optional LongNet dilation.

    Dilated attention (LongNet; microsoft/torchscale semantics): branch i splits the sequence
    into segments of ``segment_lengths_tokens[i]`` tokens and, inside each segment, keeps every
    ``dilation_rates[i]``-th token; head group g (of ``dilation_rates[i]`` equal groups) starts at
    offset g. Branches are merged by their log-sum-exp. Empty tuples mean dense attention.
    """

    causal: bool = False
    segment_lengths_tokens: tuple[int, ...] = ()
    dilation_rates: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "segment_lengths_tokens", tuple(self.segment_lengths_tokens))
        object.__setattr__(self, "dilation_rates", tuple(self.dilation_rates))
        if len(self.segment_lengths_tokens) != len(self.dilation_rates):
            raise ValueError(
                f"segment lengths {list(self.segment_lengths_tokens)} and dilation rates "
                f"{list(self.dilation_rates)} must have the same length")
        for w, r in zip(self.segment_lengths_tokens, self.dilation_rates):
            _require_positive(segment_length_tokens=w, dilation_rate=r)
            if w % r:
                raise ValueError(f"segment length {w} is not a multiple of its dilation rate {r}")

    @property
    def dilated(self) -> bool:
        return bool(self.segment_lengths_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One attention layer run over ``seq_len_tokens`` tokens, forward-only or training (fwd+bwd).

    ``projections`` includes the QKV and output projections of the seed's module
    (``RingDilatedAttention``): weights E×(H+2·H_kv)·D and H·D×E, applied to local tokens only.
    """

    seq_len_tokens: int
    shape: AttentionShape
    pattern: AttentionPattern = field(default_factory=AttentionPattern)
    training: bool = False
    projections: bool = False

    def __post_init__(self) -> None:
        _require_positive(seq_len_tokens=self.seq_len_tokens)
        for w in self.pattern.segment_lengths_tokens:
            if self.seq_len_tokens % w:
                raise ValueError(
                    f"sequence of {self.seq_len_tokens:,} tokens is not a multiple of segment length {w}; "
                    f"nearest valid lengths: {_nearest_multiples(self.seq_len_tokens, math.lcm(*self.pattern.segment_lengths_tokens))}")

    def with_seq_len(self, seq_len_tokens: int) -> "Workload":
        return Workload(seq_len_tokens=seq_len_tokens, shape=self.shape, pattern=self.pattern,
                        training=self.training, projections=self.projections)


@dataclass(frozen=True, slots=True, kw_only=True)
class RingLayout:
    """How the sequence is spread over the context-parallel group of ``ring_size`` ranks.

    ``contiguous``: rank p holds tokens [p·S/P, (p+1)·S/P). ``zigzag``: the sequence is cut into
    2P chunks and rank p holds chunks p and 2P-1-p (balances causal work). ``backend`` is the
    local block kernel (``auto`` lets the runtime choose the fastest one that returns the LSE).

    ``cp_scheme`` (``CP_SCHEMES``) is how the P ranks compute attention over the whole sequence:
    ``ring`` (p2p K/V ring, the default), ``allgather`` (K/V all-gathered), ``ulysses`` (all-to-all
    to head shards over all P ranks: ``ulysses_degree`` U = P, filled in when None) or ``hybrid``
    (Ulysses of degree ``ulysses_degree`` U inside × a ring of R = P/U across; needs U > 1, R > 1).
    The scheme lives here rather than in a second dataclass because every consumer of a plan
    (terms, time, capacity search) already receives the layout: defaults keep every ring plan as it was.
    """

    ring_size: int
    layout: str = "contiguous"
    backend: str = "auto"
    cp_scheme: str = "ring"
    ulysses_degree: int | None = None

    def __post_init__(self) -> None:
        _require_positive(ring_size=self.ring_size)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {list(LAYOUTS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        check_cp_scheme(self.cp_scheme, self.ulysses_degree)
        if self.cp_scheme == "ulysses" and self.ulysses_degree is None:
            object.__setattr__(self, "ulysses_degree", self.ring_size)
        u, p = self.ulysses_degree, self.ring_size
        if self.cp_scheme == "ulysses" and u != p:
            raise ValueError(f"Ulysses runs over the whole group: degree U={u} must equal the group size P={p} "
                             f"(for U < P use the hybrid scheme)")
        if self.cp_scheme == "hybrid" and (p % u or p // u < 2):
            valid = [m for m in (max(2, p // u) * u, (p // u + 1) * u) if m // u >= 2]
            raise ValueError(f"hybrid needs the Ulysses degree U={u} to divide the group size P={p} with a ring "
                             f"R = P/U > 1; nearest valid group sizes for U={u}: {sorted(set(valid))}")

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    @property
    def ulysses_size(self) -> int:
        """U: ranks of one Ulysses group (1 for ring and all-gather)."""
        return self.ulysses_degree if self.cp_scheme in ("ulysses", "hybrid") else 1

    @property
    def ring_degree(self) -> int:
        """R = P / U: ranks of the (inner) ring, or of the all-gather group (P for ring and all-gather)."""
        return self.ring_size // self.ulysses_size


def check_cp_scheme(cp_scheme: str, ulysses_degree: int | None) -> None:
    """``ValueError`` naming the values unless ``cp_scheme`` is known and ``ulysses_degree`` suits it:
    none for ring and all-gather (1 allowed), none or any positive integer for Ulysses (it must equal P),
    an integer > 1 for hybrid."""
    if cp_scheme not in CP_SCHEMES:
        raise ValueError(f"context-parallel scheme {cp_scheme!r} is not one of {list(CP_SCHEMES)}")
    if ulysses_degree is not None:
        _require_positive(ulysses_degree=ulysses_degree)
    if cp_scheme in ("ring", "allgather") and ulysses_degree not in (None, 1):
        raise ValueError(f"a Ulysses degree ({ulysses_degree}) applies to the ulysses and hybrid schemes, "
                         f"not to {cp_scheme}")
    if cp_scheme == "hybrid" and (ulysses_degree is None or ulysses_degree < 2):
        raise ValueError(f"hybrid needs a Ulysses degree U > 1 (Ulysses inside × a ring of P/U across), "
                         f"got {ulysses_degree!r}")


def _nearest_multiples(value: int, step: int) -> str:
    below = (value // step) * step
    above = below + step
    return f"{below:,} or {above:,}" if below > 0 else f"{above:,}"


def tokens_per_rank(workload: Workload, layout: RingLayout) -> int:
    """Tokens each rank holds: S / P. Raises when S does not split as the layout requires."""
    check_layout_fits(workload, layout)
    return workload.seq_len_tokens // layout.ring_size


def check_layout_fits(workload: Workload, layout: RingLayout) -> None:
    """Raise ``ValueError`` (with lengths that would work) unless S splits over the ring.

    Contiguous needs S divisible by P; zigzag by 2P. Dilated patterns also need each segment
    either to fit whole ranks (S/P a multiple of the segment) or to span whole ranks (the
    segment a multiple of S/P), and S/P a multiple of every dilation rate.
    """
    s, p = workload.seq_len_tokens, layout.ring_size
    step = p * layout.chunks_per_rank
    if s % step:
        raise ValueError(
            f"sequence of {s:,} tokens does not split over {p} rank{'s' if p != 1 else ''} with the {layout.layout} layout "
            f"(needs a multiple of {step}); nearest valid lengths: {_nearest_multiples(s, step)}")
    if layout.cp_scheme != "ring":
        check_scheme_fits(workload, layout)
    if not workload.pattern.dilated:
        return
    if layout.layout != "contiguous" and p > 1:
        raise ValueError("dilated attention supports the contiguous layout only")
    local = s // p
    for w, r in zip(workload.pattern.segment_lengths_tokens, workload.pattern.dilation_rates):
        if local % w and w % local:
            raise ValueError(
                f"segment length {w} and {local} tokens per rank do not nest (one must divide the other)")
        if local % r:
            raise ValueError(f"{local} tokens per rank is not a multiple of dilation rate {r}")


def check_scheme_fits(workload: Workload, layout: RingLayout) -> None:
    """``ValueError`` unless the all-gather / Ulysses / hybrid scheme can run ``workload``: dense attention
    without the projection module (the runtime's schemes take q, k, v), a tiled backend (the math
    backend's workspace is modelled for the ring only), and U dividing the H query heads (the nearest
    valid degrees named)."""
    check_scheme_workload(workload, layout.cp_scheme, layout.backend)
    check_ulysses_heads(workload.shape.n_heads, layout.ulysses_size)


def check_scheme_workload(workload: Workload, cp_scheme: str, backend: str) -> None:
    """The group-size-free part of ``check_scheme_fits``: dense, no projections, a tiled backend."""
    if cp_scheme == "ring":
        return
    if workload.pattern.dilated:
        raise ValueError(f"dilated attention runs on the ring scheme only, not {cp_scheme}")
    if workload.projections:
        raise ValueError(f"projections (the seed's module) run on the ring scheme only, not {cp_scheme}")
    if backend == "math":
        raise ValueError(f"the math backend's memory is modelled for the ring scheme only, not {cp_scheme}; "
                         f"use one of {[b for b in BACKENDS if b != 'math']}")


def check_ulysses_heads(n_heads: int, ulysses_degree: int) -> None:
    """``ValueError`` naming the nearest valid degrees unless the Ulysses degree U divides the H query heads."""
    if n_heads % ulysses_degree:
        divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        below = [d for d in divisors if d < ulysses_degree][-1:]
        above = [d for d in divisors if d > ulysses_degree][:1]
        raise ValueError(f"{n_heads} query heads do not split over a Ulysses degree of {ulysses_degree}: nearest "
                         f"valid degrees for {n_heads} heads: {below + above}")
