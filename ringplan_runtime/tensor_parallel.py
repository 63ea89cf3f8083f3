"""Megatron-style tensor parallelism with sequence parallelism for the stack, and the seeded init of
parameters under any sharding.

``apply_tp(model, tp_mesh)`` mirrors torchtitan's ``apply_tp`` (``models/llama3/infra/parallelize.py``):
DTensor's ``parallelize_module`` over the T ranks of the tensor-parallel mesh, activations between the
blocks sharded over the sequence (``Shard(1)``):

* ``embed_tokens``: ``RowwiseParallel`` (vocab-parallel table ``Shard(0)``; the partial sums are
  reduce-scattered to sequence shards ``[B, n/T, E]``);
* per block, ``input_layernorm`` / ``post_attention_layernorm``: ``SequenceParallel`` (replicated
  weight, ``[B, n/T, E]`` in) and their output all-gathered to the whole local sequence as a
  replicated DTensor ``[B, n, E]`` (``PrepareModuleOutput``: one all-gather shared by q, k, v — or by
  gate and up — and, in backward, one reduce-scatter of their summed partial input gradients);
* ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``: ``ColwiseParallel`` (local heads H/T
  and H_kv/T, local FFN width F/T, plain local tensors out); ``o_proj``, ``down_proj``:
  ``RowwiseParallel(output_layouts=Shard(1))`` (reduce-scatter to ``[B, n/T, E]``);
* ``q_norm`` / ``k_norm`` (Qwen3): replicated weights used on the local heads;
* T > H_kv (H_kv | T): ``k_proj`` / ``v_proj`` replicated whole, each rank computing the one KV head of
  its query heads (``KVHeadLinear``, Megatron's KV-head replication);
* ``norm``: ``SequenceParallel``; ``lm_head``: input all-gathered to ``[B, n, E]``, weight (or the tied
  embedding table) vocab-parallel ``Shard(0)``, so the logits are ``Shard(-1)`` ``[B·n, V/T]`` and the
  cross-entropy runs under ``loss_parallel`` (``loss_context``): vocabulary-parallel, no full logits.

The attention core (RoPE and the context-parallel scheme) works on the local heads as plain tensors.

Memory per rank (checked with ``stack_measure.tracked_stack_peak``; n = S/P tokens of the CP chunk,
the same on every rank of a TP group; e = activation bytes), checkpointing ``none``, per block: the
block input x and h = x + attn ``[B, n/T, E]`` and both norms' rstd ``[B, n/T]`` fp32; ONE all-gathered
attention-norm output ``[B, n, E]`` saved by q, k and v together, and one MLP-norm output ``[B, n, E]``
saved by gate and up; q, k, v, out and LSE of the scheme with H/T and H_kv/T heads; gate, up and their
product ``[B·n, F/T]``. Transients: the o_proj / down_proj partial sums ``[B·n, E]`` before their
reduce-scatter, and the embedding's ``[B, n, E]``. Outside the blocks: token ids ``[B, n]``, the final
norm's input ``[B, n/T, E]``, its all-gathered output ``[B, n, E]`` (the LM head's input) and
vocab-parallel logits ``[B·n, V/T]`` (fp32 copy and log-softmax ``[B·n, V/T]``).
A replicated weight's local gradient is a partial sum over the TP ranks (``Partial``); FSDP2
redistributes it to ``Replicate`` (an all-reduce over TP) before its reduce-scatter.
Not run under T > 1 (``check_tensor_parallel`` raises ``ValueError``): T and H_kv not dividing one
another, T not dividing the n tokens per rank (sequence parallelism), the tiled MLP and parameter offload.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

INIT_STD = 0.02  # Hugging Face initializer_range of Llama-3 / Qwen3 config.json
TP_DIM, CP_DIM, DP_DIM = "tp", "cp", "dp"  # the stack mesh's dims, outermost DP, innermost TP


def check_tensor_parallel(w) -> None:
    """``ValueError`` (before any communication) for a T > 1 the runtime does not run (module docstring)."""
    from ringplan.stack import tokens_per_rank

    t, m, s = w.tp_degree, w.model, w.settings
    if t == 1:
        return
    if m.n_kv_heads % t and t % m.n_kv_heads:
        raise ValueError(f"tensor parallel {t} and {m.name}'s {m.n_kv_heads} KV heads: one must divide the other")
    n = tokens_per_rank(w)
    if n % t:
        raise ValueError(f"sequence parallelism splits the {n:,} tokens per rank over tensor parallel {t}: "
                         f"needs a multiple of {t}")
    if s.mlp_tile_tokens is not None or s.offload_params:
        raise ValueError("the tiled MLP and parameter offload are not run with tensor parallelism (T > 1)")
    u = w.layout.ulysses_size
    if (m.n_heads // t) % u:
        raise ValueError(f"{m.n_heads // t} local heads (H / T = {m.n_heads} / {t}) do not split over a Ulysses "
                         f"degree of {u}")


def stack_mesh(w, device_type: str):
    """One DeviceMesh of all W ranks, dims (dp, cp, tp) = (W / (P·T), P, T): TP ranks consecutive, then
    CP, then DP (rank = (dp·P + cp)·T + tp)."""
    from torch.distributed.device_mesh import init_device_mesh
    from ringplan.stack import data_parallel_size

    shape = (data_parallel_size(w), w.layout.ring_size, w.tp_degree)
    return init_device_mesh(device_type, shape, mesh_dim_names=(DP_DIM, CP_DIM, TP_DIM))


def fsdp_mesh(root, w):
    """FSDP2's mesh: the dp × cp ranks of one TP coordinate flattened (torchtitan's ``dp_shard_cp``), or
    with a sharding group G < W / T the HSDP mesh (W / (T·G) replicas × G shards); G = 1 for none."""
    from ringplan.stack import shard_group_size

    holders, g = w.world_size // w.tp_degree, shard_group_size(w)
    flat = root[DP_DIM, CP_DIM]._flatten("dp_shard_cp")
    if g == holders:
        return flat
    if not hasattr(flat, "_unflatten"):  # torch's DeviceMesh._unflatten (2.13 has it)
        raise ValueError(f"a sharding group of {g} < W / T = {holders} with tensor parallelism needs "
                         f"DeviceMesh._unflatten, which torch {torch.__version__} lacks")
    return flat._unflatten(0, (holders // g, g), ("dp_replicate", "dp_shard"))


def _block_plan(kv_colwise: bool) -> dict:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {name: SequenceParallel() for name in ("input_layernorm", "post_attention_layernorm")}
    projections = ("q_proj", "k_proj", "v_proj") if kv_colwise else ("q_proj",)
    plan |= {f"self_attn.{name}": ColwiseParallel() for name in projections}
    plan |= {f"mlp.{name}": ColwiseParallel() for name in ("gate_proj", "up_proj")}
    plan |= {name: RowwiseParallel(output_layouts=Shard(1)) for name in ("self_attn.o_proj", "mlp.down_proj")}
    return plan


def _gathered_output():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleOutput

    return PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False)


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Parallelize ``model`` (a ``transformer.Transformer``, on any device) over ``tp_mesh`` (module docstring)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import (PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    t = tp_mesh.size()
    parallelize_module(model, tp_mesh, {"embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                                                        output_layouts=Shard(1)),
                                        "norm": SequenceParallel()})
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan(kv_colwise=block.self_attn.n_kv_heads >= t))
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            parallelize_module(norm, tp_mesh, _gathered_output())
        attn = block.self_attn
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                distribute_module(norm, tp_mesh)  # replicated weight
        if attn.n_kv_heads < t:  # each TP rank computes its one KV head from replicated k/v weights
            head = tp_mesh.get_local_rank() // (t // attn.n_kv_heads)
            for name in ("k_proj", "v_proj"):
                setattr(attn, name, KVHeadLinear.replacing(getattr(attn, name), head=head, head_dim=attn.head_dim))
                distribute_module(getattr(attn, name), tp_mesh)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // t, max(1, attn.n_kv_heads // t)

    def vocab_rows(name, module, mesh):
        if name == "" and module.weight is not None:  # untied head: its own table, vocab-parallel
            module.register_parameter("weight", nn.Parameter(distribute_tensor(module.weight, mesh, [Shard(0)])))

    distribute_module(model.lm_head, tp_mesh, vocab_rows)
    parallelize_module(model.lm_head, tp_mesh, PrepareModuleInput(
        input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None), use_local_output=False))


class KVHeadLinear(nn.Linear):
    """k or v projection when T > H_kv (Megatron's KV-head replication): the weight (and bias) stay whole
    and replicated on every TP rank, each rank computes only KV head ``head`` (= TP index // (T / H_kv),
    the group of its query heads). Input and weight are used as local tensors whose gradients are
    partial sums over the TP ranks (each rank covers its own query heads): summed by the reduce-scatter
    of the norm's input gradient and by FSDP2's redistribution of the weight gradient."""

    head: int
    head_dim: int

    @classmethod
    def replacing(cls, linear: nn.Linear, *, head: int, head_dim: int) -> "KVHeadLinear":
        """A ``KVHeadLinear`` holding ``linear``'s own parameters (same names, same tensors)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.head, module.head_dim = head, head_dim
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        rows = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
        bias = None if self.bias is None else partial_local(self.bias)[rows]
        return F.linear(partial_local(x), partial_local(self.weight)[rows], bias)


def partial_local(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor as its local tensor whose gradient is a partial sum over the mesh (``Partial``);
    a plain tensor as it is."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(tensor, DTensor):
        return tensor
    if any(p != Replicate() for p in tensor.placements):
        tensor = tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim)
    return tensor.to_local(grad_placements=[Partial()] * tensor.device_mesh.ndim)


def local_norm_call(norm_fn, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``norm_fn(x, weight, eps)``, on local tensors when ``weight`` is a replicated DTensor (tensor
    parallel): its local gradient is then a partial sum over the TP ranks (``Partial``), and a DTensor
    ``x`` (a sequence shard) gives a DTensor of the same placements. Otherwise the plain call."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        return norm_fn(x, weight, eps)
    local_weight = partial_local(weight)
    if not isinstance(x, DTensor):
        return norm_fn(x, local_weight, eps)
    out = norm_fn(x.to_local(), local_weight, eps)
    return DTensor.from_local(out, x.device_mesh, x.placements, run_check=False)


def loss_context(tp_degree: int):
    """``loss_parallel()`` (vocabulary-parallel cross-entropy on ``Shard(-1)`` logits, forward and
    backward) when T > 1, else a null context."""
    if tp_degree == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor as the whole tensor on this rank (replicated first: a sequence-sharded hidden state is
    all-gathered; a replicated loss is only unwrapped), else the tensor."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim).to_local()


# ----------------------------------------------------------------------------- seeded init, any sharding


def initial_value(name: str, shape: torch.Size, generator: torch.Generator, device) -> torch.Tensor:
    """fp32 initial value of parameter ``name``: norms 1, biases 0, weights N(0, INIT_STD²) (HF Llama init)."""
    if name.endswith("norm.weight"):  # every RMSNorm: layernorm.weight, q_norm/k_norm, the final norm
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    return torch.randn(shape, generator=generator, device=device).mul_(INIT_STD)


def local_part(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` for a (DTensor) parameter: FSDP2's dim-0 shards (torch.chunk) on a
    mesh without TP; with a TP dim, DTensor's own split of ``full`` by the placements (no communication)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    if TP_DIM in (param.device_mesh.mesh_dim_names or ()):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    local = full
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"only dim-0 sharding is supported, got {param.placements}")
            pieces = local.chunk(param.device_mesh.size(mesh_dim), dim=0)
            index = param.device_mesh.get_local_rank(mesh_dim)
            local = pieces[index] if index < len(pieces) else local[:0]
    return local


@torch.no_grad()
def init_parameters(model: nn.Module, *, seed: int, device) -> None:
    """Fill every parameter deterministically from ``seed``, whatever the sharding.

    One generator on ``device`` draws each FULL parameter in ``named_parameters`` order (identical on
    every rank and equal to an unsharded model's draw on the same device type); each rank keeps its
    shard. Memory: one full fp32 parameter at a time.
    """
    from torch.distributed.tensor import DTensor

    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        full = initial_value(name, param.shape, generator, device)
        target = param.to_local() if isinstance(param, DTensor) else param
        local = local_part(param, full)
        if tuple(target.shape) != tuple(local.shape):
            raise ValueError(f"parameter {name}: local shard {tuple(target.shape)} != expected {tuple(local.shape)}")
        target.copy_(local)
