"""What is planned for a whole model: the stack, its sequence, the GPUs and the memory settings.

Notation (README, ``docs/STACK.md``): W world size = DP × P × T, P context-parallel (ring) size,
T tensor-parallel degree, DP = W / (P·T) data-parallel replicas, G sharding-group size, S global
tokens per sequence.

Every rank of the job is in one tensor-parallel group of T ranks (Megatron-style tensor parallelism
with sequence parallelism: attention heads, FFN columns and the vocabulary split T ways; torchtitan's
``parallelize_module`` plan), one context-parallel group of P ranks (``layout.cp_scheme``: ring,
all-gather, Ulysses or hybrid) and one sharding group of G ranks over which its TP shard of the
weights, gradients and optimizer states is split (ZeRO-1/2/3; ``zero3`` is FSDP2 ``fully_shard``
over the DP × CP ranks, as torchtitan composes FSDP2 × CP × TP on one DeviceMesh). Constructors validate and raise ``ValueError``
naming the offending values, so the CLI turns bad input into a one-line error with exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ringplan.models import ModelSpec
from ringplan.workload import (DTYPE_BYTES, AttentionPattern, AttentionShape, RingLayout, Workload,
                               check_layout_fits)

SHARDINGS: tuple[str, ...] = ("none", "zero1", "zero2", "zero3")  # zero3 == FSDP (FSDP2 fully_shard)
CHECKPOINTING: tuple[str, ...] = ("none", "selective", "full")
LOSS_MODES: tuple[str, ...] = ("full", "chunked")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {list(choices)}")


def _require_positive_int(**values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StackSettings:
    """How the stack's memory is managed.

    ``sharding``: ``none`` (every rank holds everything), ``zero1`` (optimizer states split over G),
    ``zero2`` (+ gradients), ``zero3`` (+ parameters; FSDP). ``shard_group_size`` G: None = the
    whole world (DP × P); only meaningful with a sharding. ``checkpointing``: ``none`` keeps every
    activation, ``selective`` keeps the attention core and recomputes MLP/norms, ``full`` keeps only
    each block's input. ``offload_checkpoints`` moves those saved inputs to pinned CPU memory (full
    checkpointing only). ``loss``: ``full`` materialises all logits, ``chunked`` computes the loss
    over ``loss_chunk_tokens`` tokens at a time (the loss tile: B·n local tokens in tiles of that many,
    each recomputed in backward). ``mlp_tile_tokens`` t: None runs the MLP on all local tokens at
    once; t runs it on t tokens of each of the B sequences at a time, each tile recomputed in
    backward (t must divide the tokens per rank n). ``param_dtype`` is the compute / gathered-weight
    dtype, ``master_dtype`` that of the sharded master parameters, gradients and Adam states.
    ``offload_params`` keeps the sharded master parameters, their reduced gradients and the AdamW
    states in pinned host memory and steps AdamW on the CPU (FSDP2 ``CPUOffloadPolicy``, training
    under ``zero3`` or ``none``); FSDP2 offloads the three together, so ``offload_params`` implies
    ``offload_optimizer``, and ``offload_optimizer`` alone (optimizer states only, parameters on the
    GPU) is refused: the runtime cannot run it (``ringplan.memory.offload_terms``).
    """

    sharding: str = "zero3"
    shard_group_size: int | None = None
    checkpointing: str = "none"
    offload_checkpoints: bool = False
    loss: str = "chunked"
    loss_chunk_tokens: int = 4096
    mlp_tile_tokens: int | None = None
    param_dtype: str = "bf16"
    master_dtype: str = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False

    def __post_init__(self) -> None:
        _require_choice("sharding", self.sharding, SHARDINGS)
        _require_choice("checkpointing", self.checkpointing, CHECKPOINTING)
        _require_choice("loss", self.loss, LOSS_MODES)
        _require_choice("param_dtype", self.param_dtype, tuple(DTYPE_BYTES))
        _require_choice("master_dtype", self.master_dtype, tuple(DTYPE_BYTES))
        if not isinstance(self.loss_chunk_tokens, int) or isinstance(self.loss_chunk_tokens, bool) \
                or self.loss_chunk_tokens <= 0:
            raise ValueError(f"loss chunk must be a positive number of tokens, got {self.loss_chunk_tokens!r}")
        if self.mlp_tile_tokens is not None:
            _require_positive_int(mlp_tile_tokens=self.mlp_tile_tokens)
        if self.shard_group_size is not None:
            _require_positive_int(shard_group_size=self.shard_group_size)
            if self.sharding == "none":
                raise ValueError(f"a sharding group of {self.shard_group_size} GPUs needs a sharding "
                                 f"(one of {list(SHARDINGS[1:])}), got sharding 'none'")
        if not isinstance(self.offload_checkpoints, bool):
            raise ValueError(f"offload_checkpoints must be true or false, got {self.offload_checkpoints!r}")
        if self.offload_checkpoints and self.checkpointing != "full":
            raise ValueError(f"offloading checkpoints to CPU needs full checkpointing, "
                             f"got checkpointing {self.checkpointing!r}")
        check_offload(self)

    @property
    def param_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def master_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.master_dtype]


@dataclass(frozen=True, slots=True, kw_only=True)
class StackWorkload:
    """One step of a whole model: ``batch`` sequences of S = ``seq_len_tokens`` tokens per
    data-parallel replica, on W = ``world_size`` GPUs in context-parallel groups of
    P = ``layout.ring_size`` ranks and tensor-parallel groups of T = ``tp_degree`` ranks.

    ``training`` False is forward only (prefill): weights in ``param_dtype``, no gradients or
    optimizer states.
    """

    model: ModelSpec
    seq_len_tokens: int
    batch: int = 1
    training: bool = True
    world_size: int
    layout: RingLayout
    settings: StackSettings = field(default_factory=StackSettings)
    tp_degree: int = 1
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        """The fields' hash, computed once: the term functions' caches look a workload up thousands of
        times per search, and hashing the model spec each time was a third of a ``plan``."""
        if self._hash is None:
            object.__setattr__(self, "_hash", hash((self.model, self.seq_len_tokens, self.batch, self.training,
                                                    self.world_size, self.layout, self.settings, self.tp_degree)))
        return self._hash

    def __post_init__(self) -> None:
        for name, kind in (("model", ModelSpec), ("layout", RingLayout), ("settings", StackSettings)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _require_positive_int(seq_len_tokens=self.seq_len_tokens, batch=self.batch, world_size=self.world_size,
                              tp_degree=self.tp_degree)
        if not isinstance(self.training, bool):
            raise ValueError(f"training must be true or false, got {self.training!r}")
        w, p, t = self.world_size, self.layout.ring_size, self.tp_degree
        if w % p:
            raise ValueError(f"world size {w} is not a multiple of the ring size {p}")
        if w % (p * t):
            raise ValueError(f"world size {w} is not a multiple of context parallel {p} x tensor parallel {t} "
                             f"(W = DP x CP x TP)")
        check_tp_degree(self.model, t)
        if t > 1 and (self.settings.mlp_tile_tokens is not None or self.settings.offload_params):
            what = "a tiled MLP" if self.settings.mlp_tile_tokens is not None else "parameter offload"
            raise ValueError(f"{what} with tensor parallelism is not run (ringplan_runtime refuses it: its terms "
                             f"are not validated); use tensor parallel 1 or drop it")
        n = self.seq_len_tokens // p
        if t > 1 and n % t:
            valid = " or ".join(f"{d:,}" for d in nearest_multiples(self.seq_len_tokens, p * t))
            raise ValueError(f"tensor parallel {t} splits each rank's {n:,} tokens over its {t} GPUs (sequence "
                             f"parallelism) and {t} does not divide {n:,}; nearest valid lengths: {valid}")
        g, holders = self.settings.shard_group_size, w // t
        where = f"the world size {w}" if t == 1 else f"the {holders} GPUs holding one tensor-parallel shard (W / TP)"
        if g is not None and g > holders:
            raise ValueError(f"sharding group of {g} GPUs is larger than {where}")
        if g is not None and holders % g:
            holders_text = f"world size {w}" if t == 1 else f"{holders} GPUs holding one tensor-parallel shard"
            raise ValueError(f"{holders_text} is not a multiple of the sharding group of {g} GPUs")
        if self.settings.offload_params and not self.training:
            raise ValueError("offloading parameters and optimizer states needs training (a forward pass keeps "
                             "replicated weights on the GPU and has no optimizer)")
        check_layout_fits(attention_workload(self), self.layout)
        check_mlp_tile(self.settings.mlp_tile_tokens, tokens_per_rank(self))


def check_offload(settings: StackSettings) -> None:
    """``ValueError`` for an offload setting the runtime cannot run: not a bool, optimizer states
    alone, or a sharding other than zero3/none. Sets ``offload_optimizer`` when ``offload_params``
    is on (FSDP2's ``CPUOffloadPolicy`` moves parameters, gradients and optimizer states together)."""
    for name in ("offload_optimizer", "offload_params"):
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(settings, name)!r}")
    if settings.offload_params:
        object.__setattr__(settings, "offload_optimizer", True)
    elif settings.offload_optimizer:
        raise ValueError("offloading the optimizer states alone is not run: FSDP2's CPUOffloadPolicy moves the "
                         "parameters, gradients and optimizer states to the host together; set offload_params "
                         "(it implies offload_optimizer)")
    if settings.offload_params and settings.sharding not in ("zero3", "none"):
        raise ValueError(f"offloading parameters and optimizer states needs FSDP2 (sharding zero3 or none), "
                         f"got sharding {settings.sharding!r}")


def check_tp_degree(model: ModelSpec, tp_degree: int) -> None:
    """``ValueError`` naming the nearest valid degrees unless T divides the query heads H, the KV heads
    H_kv (or H_kv divides T: each KV head is then replicated T / H_kv times, as Megatron does) and the
    FFN width F (column/row-parallel MLP)."""
    t, h, h_kv, f = tp_degree, model.n_heads, model.n_kv_heads, model.ffn_dim
    if t == 1:
        return
    if h % t or f % t or (h_kv % t and t % h_kv):
        valid = [d for d in range(1, h + 1) if h % d == 0 and f % d == 0 and (h_kv % d == 0 or d % h_kv == 0)]
        nearest = " or ".join(str(d) for d in sorted(sorted(valid, key=lambda d: (abs(d - t), d))[:2]))
        raise ValueError(f"tensor parallel {t} does not divide {model.name}'s {h} heads / {h_kv} KV heads / "
                         f"FFN width {f:,}; nearest valid degrees: {nearest}")


def kv_heads_per_tp_rank(w: StackWorkload) -> int:
    """KV heads a tensor-parallel rank holds: H_kv / T, or 1 when T > H_kv (each KV head replicated
    T / H_kv times)."""
    return max(1, w.model.n_kv_heads // w.tp_degree)


def default_mlp_tile_tokens(model: ModelSpec) -> int:
    """The MLP tile the search tries: the model width E in tokens, rounded up to a power of two (so it
    divides power-of-two lengths). Arctic Long Sequence Training's ``TiledMLP`` shards the sequence
    into ceil(S / E) tiles (Bekman et al. 2025, arXiv:2506.13996): a tile's FFN activations are then
    about one MLP weight matrix, E·F."""
    return 1 << max(0, (model.embed_dim - 1).bit_length())


def nearest_multiples(value: int, unit: int) -> tuple[int, ...]:
    """The multiples of ``unit`` just below and above ``value`` (positive ones only)."""
    below = value // unit * unit
    return tuple(m for m in (below, below + unit) if m > 0)


def nearest_divisors(n: int, target: int, count: int = 2) -> list[int]:
    """The ``count`` divisors of ``n`` closest to ``target`` (ties: the smaller first), ascending."""
    divisors = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    divisors = sorted(set(divisors + [n // d for d in divisors]))
    return sorted(sorted(divisors, key=lambda d: (abs(d - target), d))[:count])


def check_mlp_tile(tile_tokens: int | None, n: int) -> None:
    """``ValueError`` naming the nearest valid tiles unless the MLP tile divides the n tokens per rank."""
    if tile_tokens is not None and n % tile_tokens:
        valid = " or ".join(f"{d:,}" for d in nearest_divisors(n, tile_tokens))
        raise ValueError(f"an MLP tile of {tile_tokens:,} tokens does not divide the {n:,} tokens per rank; "
                         f"nearest valid tiles: {valid}")


def attention_workload(w: StackWorkload) -> Workload:
    """One layer's attention as the attention-level planner sees it: the model's H, H_kv, D and
    E, batch B, causal, forward or training as the stack, weights in ``param_dtype``, projections
    excluded (the stack terms count them with the rest of the weights)."""
    m = w.model
    shape = AttentionShape(n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, batch=w.batch,
                           embed_dim=m.embed_dim, dtype=w.settings.param_dtype)
    return Workload(seq_len_tokens=w.seq_len_tokens, shape=shape, pattern=AttentionPattern(causal=True),
                    training=w.training, projections=False)


def tokens_per_rank(w: StackWorkload) -> int:
    """Tokens of each sequence a rank holds: n = S / P."""
    return w.seq_len_tokens // w.layout.ring_size


def data_parallel_size(w: StackWorkload) -> int:
    """Data-parallel replicas DP = W / (P·T) (each holds ``batch`` sequences)."""
    return w.world_size // (w.layout.ring_size * w.tp_degree)


def shard_group_size(w: StackWorkload) -> int:
    """Resolved sharding group G: 1 without sharding (every rank holds a full copy of its TP shard),
    else the setting, or W / T (every rank holding the same TP shard) when the setting is None.
    Sharded state per rank is the rank's TP shard of the state / G."""
    if w.settings.sharding == "none":
        return 1
    return w.settings.shard_group_size or w.world_size // w.tp_degree
