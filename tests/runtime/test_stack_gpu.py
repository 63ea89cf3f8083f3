"""GPU check (issue 9): the whole stack on NCCL, FSDP2 + ring attention in bf16, against a float64 dense model.

Run on two GPUs (the ranks are spawned; P = the world size, 2 there)::

    python -m pytest -m gpu tests/runtime/test_stack_gpu.py -s -q

Each training configuration builds the stack with ``param_dtype="bf16"`` (fp32 master weights,
fp32 gradient reduction), runs forward + backward of one seeded batch, and returns from rank 0 the
loss, the gathered initial weights and every gathered gradient (``DTensor.full_tensor()``). The test
process computes the float64 dense reference (``runtime.test_stack_cpu.dense_reference``, written
independently of the runtime) from those initial weights on CPU, prints one row per configuration,
then asserts. A forward-only (prefill) configuration compares every rank's final hidden rows.

Tolerances (bf16 has a unit roundoff of 2^-9 ≈ 2e-3; weights are rounded to bf16 once per use and
every matmul output once more, two blocks deep, the ring merges in fp32):
- loss: relative 2e-2 — the mean cross-entropy (≈ ln V) is an average over all tokens, so per-token
  rounding largely cancels; 2e-2 is ten times the roundoff and far below any real error (a wrong
  position or mask moves the loss by > 5%);
- each gradient: cosine similarity > 0.99 and norm-wise relative error < 5e-2 — a single bf16 ring
  attention call is within 1e-2 of float64 (tests/runtime/test_gpu_ring.py); a gradient crosses
  several such products (attention backward, two blocks of projections, RMSNorm and SwiGLU
  backward), so a few times that is expected, while a real error (a missed loss factor, a wrong
  RoPE position, a lost shard) gives cosine ≪ 0.99 or relative errors ≥ 0.5;
- prefill hidden state: norm-wise relative 3e-2 (bf16 weights and activations end to end).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from runtime.test_stack_cpu import dense_reference
from tabulate import tabulate

from ringplan.models import ModelSpec
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout
from ringplan_runtime import shard_sequence, spawn
from ringplan_runtime.reference import relative_error
from ringplan_runtime.stack_parallel import build_stack, global_batch, local_batch

pytestmark = pytest.mark.gpu

REL_TOL_LOSS_BF16 = 2e-2
MIN_GRAD_COSINE_BF16 = 0.99
REL_TOL_GRAD_BF16 = 5e-2
REL_TOL_HIDDEN_BF16 = 3e-2
SEQ_LEN = 1024
SEED, DATA_SEED = 3, 5
GPU_SPEC = ModelSpec(name="gpu-check", n_layers=2, embed_dim=512, n_heads=8, n_kv_heads=2, head_dim=64,
                     ffn_dim=1024, ffn_type="swiglu", vocab_size=2048, norm="rmsnorm")


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuConfig:
    """One bf16 run on every GPU of the spawned group (P = W)."""

    name: str
    layout: str = "zigzag"
    checkpointing: str = "none"
    offload: bool = False
    loss: str = "chunked"
    tied: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    training: bool = True

    def workload(self, world: int) -> StackWorkload:
        spec = dataclasses.replace(GPU_SPEC, tied_embeddings=self.tied, qk_norm=self.qk_norm, qkv_bias=self.qkv_bias)
        settings = StackSettings(checkpointing=self.checkpointing, offload_checkpoints=self.offload, loss=self.loss,
                                 loss_chunk_tokens=700, param_dtype="bf16")
        return StackWorkload(model=spec, seq_len_tokens=SEQ_LEN, batch=1, training=self.training, world_size=world,
                             layout=RingLayout(ring_size=world, layout=self.layout), settings=settings)


GPU_CONFIGS = [
    GpuConfig(name="zigzag_selective_chunked_qknorm", checkpointing="selective", qk_norm=True),
    GpuConfig(name="contiguous_full_offload_fullloss_tied", layout="contiguous", checkpointing="full", offload=True,
              loss="full", tied=True),
    GpuConfig(name="zigzag_none_chunked_qkv_bias", qkv_bias=True),
]
PREFILL_CONFIG = GpuConfig(name="prefill_zigzag_qknorm", qk_norm=True, training=False)


def _full_cpu(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().float().cpu()


def run_gpu_stack() -> dict:
    """Spawned NCCL body: every training configuration (rank 0 returns weights and gradients) and the
    prefill configuration (every rank returns its hidden rows)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    results = {}
    for config in GPU_CONFIGS:
        w = config.workload(world)
        run = build_stack(w, device=device, seed=SEED)
        initial = {name: _full_cpu(p) for name, p in run.model.named_parameters()}
        tokens, labels = local_batch(*global_batch(w, DATA_SEED), rank, w)
        loss = run.backward(tokens, labels)
        grads = {name: _full_cpu(p.grad) for name, p in run.model.named_parameters()}
        results[config.name] = {"loss": loss, "initial": initial, "grads": grads} if rank == 0 else {"loss": loss}
        del run
        torch.cuda.empty_cache()
    w = PREFILL_CONFIG.workload(world)
    run = build_stack(w, device=device, seed=SEED)
    tokens, _ = local_batch(*global_batch(w, DATA_SEED), rank, w)
    results[PREFILL_CONFIG.name] = run.hidden(tokens).float().cpu()
    results["device"] = torch.cuda.get_device_name(device)
    return results


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def _reference(config: GpuConfig, initial: dict[str, torch.Tensor], world: int):
    w = config.workload(world)
    tokens, labels = global_batch(w, DATA_SEED)
    params = {name: t.double().requires_grad_() for name, t in initial.items()}
    loss, hidden = dense_reference(params, w.model, tokens, labels)
    loss.backward()
    return loss.item(), {name: t.grad for name, t in params.items()}, hidden.detach()


@pytest.fixture(scope="module")
def gpu_results():
    """(world size, per-rank results) of one spawned NCCL group over min(2, GPUs) GPUs."""
    world = min(2, torch.cuda.device_count())
    return world, spawn(run_gpu_stack, world_size=world, backend="nccl", timeout_s=600)


def test_gpu_stack_bf16_matches_dense_reference(gpu_results):
    """bf16 FSDP2 + ring stack on NCCL: loss within REL_TOL_LOSS_BF16, every gradient with cosine >
    MIN_GRAD_COSINE_BF16 and norm-wise error < REL_TOL_GRAD_BF16 of the float64 dense model."""
    world, per_rank = gpu_results
    rows, failures = [], []
    for config in GPU_CONFIGS:
        got = per_rank[0][config.name]
        loss, grads, _ = _reference(config, got["initial"], world)
        loss_error = abs(got["loss"] - loss) / loss
        errors = {name: relative_error(got["grads"][name], grads[name]) for name in grads}
        cosines = {name: _cosine(got["grads"][name], grads[name]) for name in grads}
        worst, least = max(errors, key=errors.get), min(cosines, key=cosines.get)
        rows.append((config.name, f"{got['loss']:.5f}", f"{loss:.5f}", f"{loss_error:.1e}",
                     f"{errors[worst]:.1e} ({worst})", f"{cosines[least]:.5f} ({least})"))
        failures += [f"{config.name}: loss off by {loss_error:.2e}"] if loss_error > REL_TOL_LOSS_BF16 else []
        failures += [f"{config.name}: {n} rel {errors[n]:.2e}, cos {cosines[n]:.4f}" for n in grads
                     if errors[n] >= REL_TOL_GRAD_BF16 or cosines[n] <= MIN_GRAD_COSINE_BF16]
        failures += [f"{config.name}: rank {r} loss differs" for r in range(1, world)
                     if per_rank[r][config.name]["loss"] != got["loss"]]
    print(f"\nstack on {world} x {per_rank[0]['device']}, torch {torch.__version__}, bf16 vs float64")
    print(tabulate(rows, headers=("config", "loss", "reference", "loss rel", "worst grad rel", "least cosine")))
    assert not failures, "\n".join(failures)


def test_gpu_prefill_bf16_matches_dense_reference(gpu_results):
    """Forward-only bf16 (replicated weights, inference mode): every rank's final hidden rows within
    REL_TOL_HIDDEN_BF16 of the float64 dense model's rows at its global positions."""
    world, per_rank = gpu_results
    initial = per_rank[0][GPU_CONFIGS[0].name]["initial"]  # same seed, same spec shape: same fp32 draw
    _, _, hidden = _reference(PREFILL_CONFIG, initial, world)
    for rank in range(world):
        expected = shard_sequence(hidden, rank=rank, ring_size=world, layout=PREFILL_CONFIG.layout)
        error = relative_error(per_rank[rank][PREFILL_CONFIG.name], expected)
        print(f"prefill rank {rank}: hidden rel {error:.2e}")
        assert error <= REL_TOL_HIDDEN_BF16, f"rank {rank}: prefill hidden off by {error:.2e}"
