"""The whole stack under FSDP2 (ZeRO-3) and context parallelism: ``build_stack(w, device=...)``.

Ranks: W = DP × P. Rank r is at ring index r mod P of ring r // P (rings of P consecutive ranks;
ring = all ranks when DP = 1), and replica r // P of the data-parallel batch. Weights, gradients and
AdamW states are sharded by FSDP2 ``fully_shard`` over all W ranks (or, with ``shard_group_size``
G < W, over G consecutive ranks and replicated across the W / G groups: FSDP2's HSDP).
``sharding="none"`` is the same machinery with G = 1 (every rank holds everything; gradients are
all-reduced). ZeRO-1/2 are planned, not run. ``offload_params``: FSDP2 ``CPUOffloadPolicy`` (pinned on
CUDA): the master shards, reduced gradients and AdamW states live on the host and AdamW steps on the CPU.

Build order: the model on the meta device (checkpointing set per block), ``fully_shard`` each block,
then the embedding and the LM head (one FSDP group ``[embedding, head]`` when tied: one table, one
owner), then the root (it owns the final norm); ``MixedPrecisionPolicy(param_dtype, reduce_dtype =
master dtype)``, ``reshard_after_forward=True``; then ``to_empty`` on the device and
``init_parameters`` (seeded, identical on every rank, equal to the dense model's init).

Loss scaling (exact): each rank's loss is  L_r = (sum of its token losses) / N, N = labelled tokens
of the whole global batch (all rings, all replicas; one all-reduce of a count). The gradient of the
global mean loss is Σ_r ∇L_r. FSDP2 reduce-scatters with AVG over its W ranks, i.e. gives
(1/W)·Σ_r ∇g_r, so each rank back-propagates W·L_r (``StackRun.loss_scale`` = W) and the sharded
gradients equal the dense model's gradient of the global mean loss. (``set_gradient_divide_factor
(1.0)`` would do the same on NCCL but becomes PREMUL_SUM, which gloo refuses; scaling the loss works
on both, in torch 2.11 and 2.13.) The reported loss is the global mean: Σ_r L_r (one all-reduce).

Forward-only workloads (``training=False``): weights in ``param_dtype`` replicated on every rank (no
FSDP, no gradients, no optimizer), run under ``torch.inference_mode``; prefill = embedding, blocks and
final norm (no KV cache is kept; the next-token logits, B·V, are not computed).
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringplan.stack import StackWorkload
from ringplan_runtime.dtypes import torch_dtype
from ringplan_runtime.layouts import shard_sequence
from ringplan_runtime.transformer import IGNORE_INDEX, Transformer, init_parameters, lm_loss, rope_positions

RUN_SHARDINGS = ("none", "zero3")
LEARNING_RATE = 1e-4  # fixed: the runs measure memory and time, not convergence
_RING_GROUPS: dict[tuple[int, int], list] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where a rank sits: its ring (replica) and its index in the ring."""

    rank: int
    replica: int
    ring_index: int


def placement(w: StackWorkload, rank: int) -> Placement:
    """Ring r // P (= data-parallel replica), index r mod P; ``ValueError`` for a rank outside W."""
    if not 0 <= rank < w.world_size:
        raise ValueError(f"rank {rank} is outside a world of {w.world_size}")
    p = w.layout.ring_size
    return Placement(rank=rank, replica=rank // p, ring_index=rank % p)


def global_batch(w: StackWorkload, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), int64 ``[DP·B, S]`` (``[B, S]`` when DP = 1), seeded, identical on every rank.

    labels[:, i] = tokens[:, i + 1] (next-token targets on the GLOBAL sequence), the last is −100.
    """
    dp = w.world_size // w.layout.ring_size
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, w.model.vocab_size, (dp * w.batch, w.seq_len_tokens), generator=generator)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, labels


def local_batch(tokens: torch.Tensor, labels: torch.Tensor, rank: int,
                w: StackWorkload) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``[B, n]`` tokens and labels: its replica's rows, its ring chunk(s) per the layout."""
    where = placement(w, rank)
    rows = slice(where.replica * w.batch, (where.replica + 1) * w.batch)
    if tokens.shape != labels.shape or tokens.shape[0] < rows.stop:
        raise ValueError(f"tokens {tuple(tokens.shape)} / labels {tuple(labels.shape)} do not hold "
                         f"{w.world_size // w.layout.ring_size} replicas of batch {w.batch}")

    def shard(t):
        return shard_sequence(t[rows], rank=where.ring_index, ring_size=w.layout.ring_size, layout=w.layout.layout,
                              dim=1).contiguous()

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
                           checkpointing=s.checkpointing if w.training else "none",
                           offload_checkpoints=s.offload_checkpoints and w.training,
                           mlp_tile_tokens=s.mlp_tile_tokens)


def build_stack(w: StackWorkload, *, device, seed: int = 0) -> StackRun:
    """The model of ``w`` on ``device``, sharded and initialised, with its optimizer (see module docstring)."""
    check_runnable_workload(w)
    device = torch.device(device)
    use_expandable_segments(device)
    rank, _ = _world()
    group = ring_group(w)
    model = _new_model(w, group)
    if not w.training:
        model = model.to(torch_dtype(w.settings.param_dtype)).to_empty(device=device)
        init_parameters(model, seed=seed, device=device)
        model.requires_grad_(False)
        return StackRun(workload=w, model=model, optimizer=None, device=device, rank=rank, loss_scale=1.0,
                        positions=_positions(w, rank, device))
    model = model.to(torch_dtype(w.settings.master_dtype))
    apply_fsdp(model, shard_mesh(w, device), w.settings)
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
        hidden = self.model(tokens, self.positions)
        loss_sum, n_local = lm_loss(self.model, hidden, labels, mode=s.loss, chunk_tokens=s.loss_chunk_tokens)
        del hidden
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
        """Forward-only: final-norm hidden states ``[B, n, E]`` of the local tokens (an inference tensor)."""
        self._require(False)
        with torch.inference_mode():
            return self.model(tokens.to(self.device), self.positions)

    def forward(self, tokens: torch.Tensor) -> None:
        """Forward-only prefill of the local tokens; the result is dropped."""
        self.hidden(tokens)
