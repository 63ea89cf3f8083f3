"""The whole stack under FSDP2 (ZeRO-3), context and tensor parallelism: ``build_stack(w, device=...)``.

Ranks: W = DP × P × T (T = ``w.tp_degree``). Rank r is TP index r mod T, CP (ring) index (r // T) mod P
and replica r // (P·T) of the data-parallel batch: TP groups of T consecutive ranks, CP groups of P
ranks T apart (with T = 1: rings of P consecutive ranks, ring = all ranks when DP = 1). Every rank of
a TP group holds the same CP chunk of the same sequences. The CP scheme is ``w.layout.cp_scheme``
(ring, allgather, ulysses over the CP group; hybrid: Ulysses groups of U consecutive CP indices × rings
of R = P / U CP indices U apart, the batch sharded by ``hybrid_shard_sequence``).
T = 1: weights, gradients and AdamW states are sharded by FSDP2 ``fully_shard`` over all W ranks (or,
with ``shard_group_size`` G < W, over G consecutive ranks and replicated across the W / G groups:
FSDP2's HSDP); the CP groups are ``dist.new_group``s. T > 1: one DeviceMesh (dp, cp, tp)
(``tensor_parallel.stack_mesh``), the model parallelized over its ``tp`` dim (``tensor_parallel.apply_tp``,
Megatron TP + sequence parallelism), FSDP2 over the flattened dp × cp ranks of one TP coordinate
(torchtitan's ``dp_shard_cp``; HSDP with G < W / T), the CP group its ``cp`` dim.
``sharding="none"`` is the same machinery with G = 1 (every rank holds everything; gradients are
all-reduced). ZeRO-1/2 are planned, not run. ``offload_params``: FSDP2 ``CPUOffloadPolicy`` (pinned on
CUDA): the master shards, reduced gradients and AdamW states live on the host and AdamW steps on the CPU.

Build order: the model on the meta device (checkpointing set per block), cast, ``apply_tp`` (T > 1),
``fully_shard`` each block, then the embedding and the LM head (one FSDP group ``[embedding, head]``
when tied: one table, one owner), then the root (it owns the final norm); ``MixedPrecisionPolicy(
param_dtype, reduce_dtype = master dtype)``, ``reshard_after_forward=True``; then ``to_empty`` on the
device and ``init_parameters`` (seeded, identical on every rank, equal to the dense model's init).

Loss scaling (exact): each rank's loss is  L_r = (sum of its token losses) / N, N = labelled tokens
of the whole global batch (all rings, all replicas). Counts and loss sums are all-reduced over the W
ranks: with T > 1 every TP rank holds its group's loss, so both sums are T× and their ratio exact.
The gradient of the global mean loss is Σ ∇L over the W / T distinct (dp, cp) ranks. FSDP2
reduce-scatters with AVG over its W / T ranks, i.e. gives (T/W)·Σ ∇g, so each rank back-propagates
loss_sum · W / (all-reduced count) = (W / T)·L_r (``StackRun.loss_scale`` = W) and the sharded
gradients equal the dense model's gradient of the global mean loss. (``set_gradient_divide_factor
(1.0)`` would do the same on NCCL but becomes PREMUL_SUM, which gloo refuses; scaling the loss works
on both, in torch 2.11 and 2.13.) The reported loss is the global mean.

Forward-only workloads (``training=False``): weights in ``param_dtype`` replicated on every rank (no
FSDP, no gradients, no optimizer; TP-sharded when T > 1), run under ``torch.inference_mode`` (``no_grad``
when T > 1: ``StackRun.hidden``); prefill =
embedding, blocks and final norm (no KV cache is kept; the next-token logits, B·V, are not computed).
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringplan.stack import StackWorkload, data_parallel_size
from ringplan_runtime.dtypes import torch_dtype
from ringplan_runtime.hybrid_attention import hybrid_shard_sequence
from ringplan_runtime.layouts import shard_sequence
from ringplan_runtime.tensor_parallel import (apply_tp, check_tensor_parallel, fsdp_mesh, local_value, loss_context,
                                              stack_mesh)
from ringplan_runtime.transformer import IGNORE_INDEX, Transformer, init_parameters, lm_loss, rope_positions

RUN_SHARDINGS = ("none", "zero3")
LEARNING_RATE = 1e-4  # fixed: the runs measure memory and time, not convergence
_RING_GROUPS: dict[tuple[int, int], list] = {}
_HYBRID_GROUPS: dict[tuple[int, int, int, int], tuple[list, list]] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where a rank sits: its data-parallel replica, its CP (ring) index and its TP index."""

    rank: int
    replica: int
    ring_index: int
    tp_index: int = 0


def placement(w: StackWorkload, rank: int) -> Placement:
    """Replica r // (P·T), CP index (r // T) mod P, TP index r mod T; ``ValueError`` for a rank outside W."""
    if not 0 <= rank < w.world_size:
        raise ValueError(f"rank {rank} is outside a world of {w.world_size}")
    p, t = w.layout.ring_size, w.tp_degree
    return Placement(rank=rank, replica=rank // (p * t), ring_index=(rank // t) % p, tp_index=rank % t)


def cp_chunk(x: torch.Tensor, w: StackWorkload, cp_index: int, dim: int = 1) -> torch.Tensor:
    """The part of the full sequence ``x`` that CP index ``cp_index`` holds: ``shard_sequence`` per the
    layout, or for hybrid (CP index j·U + u) piece u of ring chunk j (``hybrid_shard_sequence``)."""
    layout = w.layout
    if layout.cp_scheme != "hybrid":
        return shard_sequence(x, rank=cp_index, ring_size=layout.ring_size, layout=layout.layout, dim=dim)
    u = layout.ulysses_size
    return hybrid_shard_sequence(x, ring_index=cp_index // u, ring_size=layout.ring_degree, ulysses_index=cp_index % u,
                                 ulysses_size=u, layout=layout.layout, dim=dim)


def global_batch(w: StackWorkload, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), int64 ``[DP·B, S]`` (``[B, S]`` when DP = 1), seeded, identical on every rank.

    labels[:, i] = tokens[:, i + 1] (next-token targets on the GLOBAL sequence), the last is −100.
    """
    dp = data_parallel_size(w)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, w.model.vocab_size, (dp * w.batch, w.seq_len_tokens), generator=generator)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, labels


def local_batch(tokens: torch.Tensor, labels: torch.Tensor, rank: int,
                w: StackWorkload) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``[B, n]`` tokens and labels: its replica's rows, its CP chunk (``cp_chunk``); the
    same on every rank of a TP group."""
    where = placement(w, rank)
    rows = slice(where.replica * w.batch, (where.replica + 1) * w.batch)
    if tokens.shape != labels.shape or tokens.shape[0] < rows.stop:
        raise ValueError(f"tokens {tuple(tokens.shape)} / labels {tuple(labels.shape)} do not hold "
                         f"{data_parallel_size(w)} replicas of batch {w.batch}")

    def shard(t):
        return cp_chunk(t[rows], w, where.ring_index).contiguous()

    return shard(tokens), shard(labels)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ring_group(w: StackWorkload):
    """The CP group of this rank: ``None`` (the default group) when P = W, else its ring of P
    consecutive ranks. Every rank creates every ring (``new_group`` is collective), once per (W, P)."""
    p = w.layout.ring_size
    if p == w.world_size:
        return None
    key = (w.world_size, p)
    if key not in _RING_GROUPS:
        _RING_GROUPS[key] = [dist.new_group(list(range(start, start + p))) for start in range(0, w.world_size, p)]
    return _RING_GROUPS[key][dist.get_rank() // p]


def cp_members(w: StackWorkload) -> list[list[int]]:
    """Every CP group's global ranks in CP-index order (rank (dp·P + c)·T + t), one group per (dp, t)."""
    p, t = w.layout.ring_size, w.tp_degree
    return [[(dp * p + c) * t + tp for c in range(p)] for dp in range(data_parallel_size(w)) for tp in range(t)]


def hybrid_groups(w: StackWorkload) -> tuple:
    """(Ulysses group, ring group) through this rank for the hybrid scheme: in each CP group, U
    consecutive CP indices form a Ulysses group, the CP indices u, u + U, … a ring (as ``hybrid_attention``'s
    grid). Every rank creates every group in the same order (``new_group`` is collective), once per shape."""
    u = w.layout.ulysses_size
    key = (w.world_size, w.layout.ring_size, w.tp_degree, u)
    if key not in _HYBRID_GROUPS:
        ulysses, rings = {}, {}
        for members in cp_members(w):
            for parts, into in (([members[j:j + u] for j in range(0, len(members), u)], ulysses),
                                ([members[i::u] for i in range(u)], rings)):
                for part in parts:
                    group = dist.new_group(part)
                    into.update(dict.fromkeys(part, group))
        _HYBRID_GROUPS[key] = (ulysses, rings)
    ulysses, rings = _HYBRID_GROUPS[key]
    return ulysses[dist.get_rank()], rings[dist.get_rank()]


def attention_group(w: StackWorkload, root=None):
    """What ``context_parallel_attention`` takes: the hybrid pair, else the CP group (the stack mesh's
    ``cp`` dim when T > 1, else ``ring_group``)."""
    if w.layout.cp_scheme == "hybrid":
        return hybrid_groups(w)
    return root["cp"].get_group() if root is not None else ring_group(w)


def check_runnable_workload(w: StackWorkload) -> None:
    """Raise ``ValueError`` for settings this runtime does not run, or a world that does not match W."""
    s = w.settings
    if w.training and s.sharding not in RUN_SHARDINGS:
        raise ValueError(f"sharding {s.sharding!r} is planned, not run: the runtime runs {list(RUN_SHARDINGS)} "
                         f"(zero3 = FSDP2 fully_shard; none = every rank holds everything)")
    _, world = _world()
    if world != w.world_size:
        raise ValueError(f"the workload has world size {w.world_size} but this process group has {world} ranks "
                         f"(launch with torchrun --nproc_per_node={w.world_size} or spawn(world_size=...))")
    if w.training and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("training runs FSDP2 and needs torch.distributed initialised "
                         "(ringplan_runtime.init_from_env() or spawn), even for one rank")
    check_tensor_parallel(w)


def shard_mesh(w: StackWorkload, device: torch.device):
    """1-D mesh of all W ranks (zero3, G = W), else the HSDP mesh (W/G replicas × G shards); G = 1 for none."""
    from torch.distributed.device_mesh import init_device_mesh

    g = 1 if w.settings.sharding == "none" else (w.settings.shard_group_size or w.world_size)
    if g == w.world_size:
        return init_device_mesh(device.type, (w.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (w.world_size // g, g), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: Transformer, mesh, settings) -> None:
    """``fully_shard`` each block, the embedding and the head (one group when tied), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch_dtype(settings.param_dtype),
                                  reduce_dtype=torch_dtype(settings.master_dtype))
    kwargs = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": True}
    if settings.offload_params:  # master shards, their gradients and AdamW's states on the host; AdamW steps there
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")  # pinning needs CUDA
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    if model.lm_head.weight is None:  # tied: the table is used by both, so both are one FSDP group
        fully_shard([model.embed_tokens, model.lm_head], **kwargs)
    else:
        fully_shard(model.embed_tokens, **kwargs)
        fully_shard(model.lm_head, **kwargs)
    fully_shard(model, **kwargs)


def _new_model(w: StackWorkload, group) -> Transformer:
    s = w.settings
    with torch.device("meta"):
        return Transformer(w.model, group=group, layout=w.layout.layout, backend=w.layout.backend,
                           cp_scheme=w.layout.cp_scheme, checkpointing=s.checkpointing if w.training else "none",
                           offload_checkpoints=s.offload_checkpoints and w.training,
                           mlp_tile_tokens=s.mlp_tile_tokens)


def build_stack(w: StackWorkload, *, device, seed: int = 0) -> StackRun:
    """The model of ``w`` on ``device``, sharded and initialised, with its optimizer (see module docstring)."""
    check_runnable_workload(w)
    device = torch.device(device)
    use_expandable_segments(device)
    rank, _ = _world()
    root = stack_mesh(w, device.type) if w.tp_degree > 1 else None
    model = _new_model(w, attention_group(w, root))
    model = model.to(torch_dtype(w.settings.master_dtype if w.training else w.settings.param_dtype))
    if root is not None:
        apply_tp(model, root["tp"])
    if not w.training:
        model = model.to_empty(device=device)
        init_parameters(model, seed=seed, device=device)
        model.requires_grad_(False)
        return StackRun(workload=w, model=model, optimizer=None, device=device, rank=rank, loss_scale=1.0,
                        positions=_positions(w, rank, device))
    apply_fsdp(model, shard_mesh(w, device) if root is None else fsdp_mesh(root, w), w.settings)
    # With CPUOffloadPolicy FSDP2 wants the sharded parameters materialised on the host (torchtitan
    # does the same: to_empty on "cpu"); the values are drawn on the compute device, as without offload.
    model.to_empty(device="cpu" if w.settings.offload_params else device)
    init_parameters(model, seed=seed, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, foreach=True)
    return StackRun(workload=w, model=model, optimizer=optimizer, device=device, rank=rank,
                    loss_scale=float(w.world_size), positions=_positions(w, rank, device))


#: The CUDA caching allocator setting the runtime runs (and the planner plans) whole models with.
ALLOCATOR_SETTING = "expandable_segments:True"


def use_expandable_segments(device) -> None:
    """Run the caching allocator with expandable segments (unless ``PYTORCH_CUDA_ALLOC_CONF`` says
    otherwise), as long-context trainers do: FSDP2's gathered weights, the ring's buffers and the
    chunked loss free and re-allocate blocks of many sizes, and with fixed segments the blocks the
    allocator keeps grew reserved memory 20-60 % above allocated on 2×H200 (c017531 sweep,
    benchmarks/results/h200x2-2026-11-26/). No effect on CPU."""
    if torch.device(device).type != "cuda" or "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; older: the cuda one
    (setter or torch.cuda.memory._set_allocator_settings)(ALLOCATOR_SETTING)


def _positions(w: StackWorkload, rank: int, device) -> torch.Tensor:
    where = placement(w, rank)
    if w.layout.cp_scheme == "hybrid":
        return cp_chunk(torch.arange(w.seq_len_tokens), w, where.ring_index, dim=0).contiguous().to(device)
    return rope_positions(w.seq_len_tokens, where.ring_index, w.layout.ring_size, w.layout.layout).to(device)


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


@dataclass(slots=True, kw_only=True)
class StackRun:
    """A built stack on one rank. ``loss_scale`` multiplies the local loss before backward (W under FSDP)."""

    workload: StackWorkload
    model: Transformer
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    rank: int
    loss_scale: float
    positions: torch.Tensor

    def _require(self, training: bool) -> None:
        if self.workload.training != training:
            kind = "a training" if self.workload.training else "a forward-only"
            raise ValueError(f"this is {kind} run: use {'step/backward' if self.workload.training else 'forward'}")

    def backward(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward and backward of the local ``[B, n]`` batch; gradients stay in ``.grad``. Returns the
        global mean loss (all ranks' token losses / all labelled tokens)."""
        self._require(True)
        s = self.workload.settings
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        with loss_context(self.workload.tp_degree):  # T > 1: vocabulary-parallel cross-entropy
            hidden = self.model(tokens, self.positions)
            loss_sum, n_local = lm_loss(self.model, hidden, labels, mode=s.loss, chunk_tokens=s.loss_chunk_tokens)
            del hidden
            loss_sum = local_value(loss_sum)
            n_global = _all_reduce_sum(n_local.detach().clone()).to(loss_sum.dtype)
            (loss_sum * (self.loss_scale / n_global)).backward()
        return (_all_reduce_sum(loss_sum.detach()) / n_global).item()

    def optimizer_step(self) -> None:
        """AdamW step on the (sharded) master parameters, then ``zero_grad(set_to_none=True)``."""
        self._require(True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """One training step (forward, backward, optimizer step, zero_grad); the global mean loss."""
        loss = self.backward(tokens, labels)
        self.optimizer_step()
        return loss

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Forward-only: final-norm hidden states ``[B, n, E]`` of the local tokens (an inference tensor
        when T = 1). T > 1 runs under ``no_grad``: under ``inference_mode`` DTensor raises and catches an
        AssertionError per sharded op (torch 2.13: "Shard dim -1 ... must be normalized") whose
        traceback cycles keep every block's activations alive until the garbage collector runs."""
        self._require(False)
        with torch.inference_mode() if self.workload.tp_degree == 1 else torch.no_grad():
            return local_value(self.model(tokens.to(self.device), self.positions))

    def forward(self, tokens: torch.Tensor) -> None:
        """Forward-only prefill of the local tokens; the result is dropped."""
        self.hidden(tokens)
