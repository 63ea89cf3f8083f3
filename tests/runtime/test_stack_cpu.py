"""The whole stack (FSDP2 + ring attention) on CPU, gloo, against a dense float64 reference.

The reference (``dense_reference``) is written here from the definitions, independently of
``ringplan_runtime.transformer``: HF-style RMSNorm and rotate-half RoPE at positions 0..S−1, the
masked dense attention of ``ringplan_runtime.reference``, SwiGLU, mean cross-entropy over the
global batch, all in float64 on the full sequence, with the run's own initial weights (which
must equal a dense model's seeded init). One spawned group per world size (1, 2, 4) runs every
configuration of that size (``CONFIGS``); rank 0 returns the loss, the gathered initial weights,
every gradient (``DTensor.full_tensor()``) and the weights after one AdamW step, and the loss of
a second step; the test process computes the reference and asserts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringplan.models import ModelSpec, parameter_count
from ringplan.stack import StackSettings, StackWorkload
from ringplan.workload import RingLayout
from ringplan_runtime import shard_sequence, spawn
from ringplan_runtime.reference import reference_attention, relative_error
from ringplan_runtime.stack_parallel import LEARNING_RATE, build_stack, global_batch, local_batch

REL_TOL_LOSS = 1e-5     # fp32 run vs float64 reference, |Δloss| / loss
REL_TOL_GRAD = 1e-5     # norm-wise, per parameter, fp32 vs float64 (issue 9 brief)
REL_TOL_UPDATE = 1e-4   # norm-wise AdamW update Δθ (with ADAM_EPS below)
ADAM_EPS = 1e-3         # set on both optimizers: with the default 1e-8, Adam's first step is lr·g/|g|, which
                        # turns the rounding noise of near-zero gradients into ±lr (ill-conditioned to compare)
FP32_EPS = 2.0 ** -23   # plus fp32 rounding of θ + Δθ itself (norm weights are 1, Δθ ≈ lr = 1e-4)
REL_TOL_HIDDEN = 1e-5   # forward-only final hidden state
ROPE_THETA = 10_000.0   # what the runtime uses for a model name without a known family
NORM_EPS = 1e-5
SEQ_LEN = 32            # a multiple of 2P for P = 1, 2, 4
SEED, DATA_SEED = 7, 11
SPAWN_TIMEOUT_S = 240.0
TINY = ModelSpec(name="tiny", n_layers=2, embed_dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                 ffn_type="swiglu", vocab_size=128, norm="rmsnorm")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """One training run to compare with the reference; ``world`` ranks, rings of ``ring`` ranks."""

    name: str
    world: int
    ring: int
    layout: str = "contiguous"
    checkpointing: str = "none"
    offload: bool = False
    loss: str = "full"
    chunk_tokens: int = 12  # does not divide the local token count: a short last chunk
    tied: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    batch: int = 2
    sharding: str = "zero3"
    shard_group_size: int | None = None

    def workload(self, *, training: bool = True) -> StackWorkload:
        spec = dataclasses.replace(TINY, tied_embeddings=self.tied, qk_norm=self.qk_norm, qkv_bias=self.qkv_bias)
        settings = StackSettings(sharding=self.sharding, shard_group_size=self.shard_group_size,
                                 checkpointing=self.checkpointing, offload_checkpoints=self.offload, loss=self.loss,
                                 loss_chunk_tokens=self.chunk_tokens, param_dtype="fp32")
        return StackWorkload(model=spec, seq_len_tokens=SEQ_LEN, batch=self.batch, training=training,
                             world_size=self.world, layout=RingLayout(ring_size=self.ring, layout=self.layout),
                             settings=settings)


CONFIGS = [
    Config(name="w1_dense_none", world=1, ring=1, sharding="none"),
    Config(name="w1_selective_chunked_tied_qknorm", world=1, ring=1, checkpointing="selective", loss="chunked",
           tied=True, qk_norm=True),
    Config(name="w2_contiguous_qwen2_biases_qknorm", world=2, ring=2, qkv_bias=True, qk_norm=True),
    Config(name="w2_zigzag_selective_chunked_tied_qknorm", world=2, ring=2, layout="zigzag",
           checkpointing="selective", loss="chunked", tied=True, qk_norm=True),
    Config(name="w2_zigzag_full_offload_chunked", world=2, ring=2, layout="zigzag", checkpointing="full",
           offload=True, loss="chunked"),
    Config(name="w2_replicated_full_tied", world=2, ring=2, checkpointing="full", tied=True, sharding="none"),
    Config(name="w4_zigzag_selective_chunked_qknorm", world=4, ring=4, layout="zigzag", checkpointing="selective",
           loss="chunked", qk_norm=True),
    Config(name="w4_contiguous_full_tied", world=4, ring=4, checkpointing="full", tied=True),
    Config(name="w4_dp2_ring2_zigzag_chunked", world=4, ring=2, layout="zigzag", loss="chunked", batch=1),
    Config(name="w4_hsdp_g2_contiguous", world=4, ring=4, shard_group_size=2),
]
PREFILL = [Config(name="prefill_w2_zigzag_qknorm", world=2, ring=2, layout="zigzag", qk_norm=True),
           Config(name="prefill_w4_contiguous_tied", world=4, ring=4, tied=True)]


# ----------------------------------------------------------------------------- dense float64 reference


def _rms(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS))


def _rope(x, positions):
    half = x.shape[-1] // 2
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _linear(p, name, x):
    return F.linear(x, p[name + ".weight"], p.get(name + ".bias"))


def _block(p, prefix, spec, x, positions):
    b, s, _ = x.shape
    h = _rms(x, p[prefix + "input_layernorm.weight"])
    q = _linear(p, prefix + "self_attn.q_proj", h).view(b, s, spec.n_heads, spec.head_dim)
    k = _linear(p, prefix + "self_attn.k_proj", h).view(b, s, spec.n_kv_heads, spec.head_dim)
    v = _linear(p, prefix + "self_attn.v_proj", h).view(b, s, spec.n_kv_heads, spec.head_dim)
    if spec.qk_norm:
        q, k = _rms(q, p[prefix + "self_attn.q_norm.weight"]), _rms(k, p[prefix + "self_attn.k_norm.weight"])
    attn = reference_attention(_rope(q, positions), _rope(k, positions), v, causal=True)
    x = x + _linear(p, prefix + "self_attn.o_proj", attn.reshape(b, s, -1))
    h = _rms(x, p[prefix + "post_attention_layernorm.weight"])
    return x + _linear(p, prefix + "mlp.down_proj",
                       F.silu(_linear(p, prefix + "mlp.gate_proj", h)) * _linear(p, prefix + "mlp.up_proj", h))


def dense_reference(params: dict[str, torch.Tensor], spec: ModelSpec, tokens: torch.Tensor, labels: torch.Tensor):
    """(mean loss over labelled tokens, final-norm hidden ``[B, S, E]``) of the full batch, float64."""
    p = dict(params)
    x = p["embed_tokens.weight"][tokens]
    positions = torch.arange(tokens.shape[1])
    for layer in range(spec.n_layers):
        x = _block(p, f"layers.{layer}.", spec, x, positions)
    hidden = _rms(x, p["norm.weight"])
    head = p.get("lm_head.weight", p["embed_tokens.weight"])
    logits = F.linear(hidden, head)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), hidden


def reference_step(initial: dict[str, torch.Tensor], config: Config):
    """Reference loss, gradients, parameters after one AdamW step (float64), and the loss after it."""
    w = config.workload()
    tokens, labels = global_batch(w, DATA_SEED)
    params = {name: t.detach().double().clone().requires_grad_() for name, t in initial.items()}
    loss, _ = dense_reference(params, w.model, tokens, labels)
    loss.backward()
    grads = {name: t.grad.clone() for name, t in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=LEARNING_RATE, eps=ADAM_EPS, foreach=False)
    optimizer.step()
    with torch.no_grad():
        second, _ = dense_reference(params, w.model, tokens, labels)
    return loss.item(), grads, {name: t.detach() for name, t in params.items()}, second.item()


# ----------------------------------------------------------------------------- spawned ranks


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from the FSDP shards of every rank; a collective for DTensors)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _train(config: Config, *, loss_scale: float | None = None) -> dict:
    w = config.workload()
    run = build_stack(w, device="cpu", seed=SEED)
    if loss_scale is not None:
        run.loss_scale = loss_scale
    for group in run.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    tokens, labels = local_batch(*global_batch(w, DATA_SEED), dist.get_rank(), w)
    result = {"initial": {name: _full(p) for name, p in run.model.named_parameters()},
              "loss_scale": run.loss_scale, "loss": run.backward(tokens, labels)}
    result["grads"] = {name: _full(p.grad) for name, p in run.model.named_parameters()}
    run.optimizer_step()
    result["after"] = {name: _full(p) for name, p in run.model.named_parameters()}
    result["second_loss"] = run.backward(tokens, labels)
    return result


def _prefill(config: Config) -> torch.Tensor:
    w = config.workload(training=False)
    run = build_stack(w, device="cpu", seed=SEED)
    tokens, _ = local_batch(*global_batch(w, DATA_SEED), dist.get_rank(), w)
    run.forward(tokens)  # the measured path runs
    return run.hidden(tokens).clone()


def run_world(world: int) -> dict:
    """Spawned body: every training and prefill configuration of this world size, plus (W = 2) the
    loss-scale probe. Rank 0 returns everything; the other ranks their losses (which must agree)
    and their prefill hidden states."""
    torch.set_num_threads(1)
    results = {}
    for config in (c for c in CONFIGS if c.world == world):
        results[config.name] = _train(config)
    if world == 2:
        results["unscaled"] = _train(CONFIGS[2], loss_scale=1.0)
    for config in (c for c in PREFILL if c.world == world):
        results[config.name] = _prefill(config)
    if dist.get_rank() != 0:
        return {name: (r["loss"], r["second_loss"]) if isinstance(r, dict) else r for name, r in results.items()}
    return results


@pytest.fixture(scope="module", params=(1, 2, 4), ids=lambda w: f"W{w}")
def world_results(request):
    """(world size, per-rank results) of one spawned gloo group running that world's configurations."""
    return request.param, spawn(run_world, world_size=request.param, backend="gloo", args=(request.param,),
                                timeout_s=SPAWN_TIMEOUT_S)


def _dense_initial(config: Config) -> dict[str, torch.Tensor]:
    from ringplan_runtime.transformer import Transformer, init_parameters

    model = Transformer(config.workload().model)
    init_parameters(model, seed=SEED, device="cpu")
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worst(actual: dict, expected: dict, skip=()) -> tuple[float, str]:
    errors = {name: relative_error(actual[name], expected[name]) for name in expected if name not in skip}
    name = max(errors, key=errors.get)
    return errors[name], name


def check_training(config, per_rank: list, *, init: bool = True, ranks: bool = True) -> None:
    """Rank 0's loss, every gathered gradient, the AdamW update and the next loss against the float64
    dense model (``reference_step``); ``init``: the sharded init equals the dense seeded init; ``ranks``:
    every other rank reports rank 0's two losses."""
    got = per_rank[0][config.name]
    initial = _dense_initial(config)
    if init:
        assert set(got["initial"]) == set(initial), config.name
        assert all(torch.equal(got["initial"][n], initial[n]) for n in initial), f"{config.name}: init differs"
    loss, grads, after, second = reference_step(initial, config)
    assert abs(got["loss"] - loss) <= REL_TOL_LOSS * loss, f"{config.name}: loss {got['loss']} vs {loss}"
    error, name = _worst(got["grads"], grads)
    assert error <= REL_TOL_GRAD, f"{config.name}: gradient of {name} off by {error:.2e}"
    for name in initial:
        update = got["after"][name].double() - initial[name].double()
        reference_update = after[name] - initial[name].double()
        allowed = REL_TOL_UPDATE * reference_update.norm() + FP32_EPS * after[name].norm()
        assert (update - reference_update).norm() <= allowed, f"{config.name}: AdamW update of {name}"
    assert abs(got["second_loss"] - second) <= REL_TOL_LOSS * second, f"{config.name}: loss after the step"
    for rank, losses in enumerate(per_rank[1:] if ranks else (), start=1):
        assert losses[config.name] == (got["loss"], got["second_loss"]), f"{config.name}: rank {rank} loss"


def test_training_matches_dense_reference(world_results):
    """Loss, every gathered gradient, the AdamW update and the next loss equal the float64 dense model's,
    for every configuration of this world size; the sharded init equals the dense seeded init."""
    world, per_rank = world_results
    for config in (c for c in CONFIGS if c.world == world):
        check_training(config, per_rank)


def test_prefill_hidden_matches_reference(world_results):
    """Forward-only (replicated weights, inference mode): each rank's final hidden rows equal the dense
    model's rows at that rank's global positions."""
    world, per_rank = world_results
    for config in (c for c in PREFILL if c.world == world):
        w = config.workload(training=False)
        tokens, labels = global_batch(w, DATA_SEED)
        initial = {n: t.double() for n, t in _dense_initial(config).items()}
        _, hidden = dense_reference(initial, w.model, tokens, labels)
        for rank in range(world):
            local = shard_sequence(hidden, rank=rank, ring_size=config.ring, layout=config.layout)
            error = relative_error(per_rank[rank][config.name], local)
            assert error <= REL_TOL_HIDDEN, f"{config.name}: rank {rank} hidden off by {error:.2e}"


def test_loss_scale_undoes_fsdp_average(world_results):
    """Each rank back-propagates W × (local loss sum / global token count): FSDP2 averages gradients over
    the W ranks, so without the factor the gradients are 1/W of the dense ones (W = 2 probe), and the
    matching gradients of ``test_training_matches_dense_reference`` need exactly this factor."""
    world, per_rank = world_results
    for config in (c for c in CONFIGS if c.world == world):
        assert per_rank[0][config.name]["loss_scale"] == float(world), config.name
    if world != 2:
        return
    scaled, unscaled = per_rank[0][CONFIGS[2].name], per_rank[0]["unscaled"]
    _, grads, _, _ = reference_step(_dense_initial(CONFIGS[2]), CONFIGS[2])
    for name, reference in grads.items():
        assert relative_error(scaled["grads"][name], reference) <= REL_TOL_GRAD, name
        assert relative_error(unscaled["grads"][name], reference / world) <= REL_TOL_GRAD, name
        assert relative_error(unscaled["grads"][name], reference) >= 0.4, f"{name}: scaling made no difference"
    assert unscaled["loss"] == pytest.approx(scaled["loss"], rel=REL_TOL_LOSS), "the reported loss is unscaled"


# ----------------------------------------------------------------------------- single process


def test_rope_positions_are_global():
    """Zigzag rank p of P holds chunks p and 2P−1−p of 2P; contiguous rank p holds [p·n, (p+1)·n);
    every layout covers 0..S−1 exactly once."""
    from ringplan_runtime.transformer import rope_positions

    assert rope_positions(16, 1, 4, "zigzag").tolist() == [2, 3, 12, 13]
    assert rope_positions(16, 0, 2, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert rope_positions(16, 1, 4, "contiguous").tolist() == [4, 5, 6, 7]
    for layout in ("contiguous", "zigzag"):
        every = torch.cat([rope_positions(24, r, 3, layout) for r in range(3)])
        assert sorted(every.tolist()) == list(range(24)), layout


def test_rope_scores_depend_on_relative_position_only():
    """⟨RoPE(q, i), RoPE(k, j)⟩ is the same for every (i, j) with the same i − j (what makes local
    chunks at global positions exact), and differs for another offset."""
    from ringplan_runtime.transformer import apply_rope, rope_tables

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=gen,
                                                                                       dtype=torch.float64)

    def score(i, j):
        cos_i, sin_i = rope_tables(torch.tensor([i]), 16, ROPE_THETA, torch.float64)
        cos_j, sin_j = rope_tables(torch.tensor([j]), 16, ROPE_THETA, torch.float64)
        return (apply_rope(q, cos_i, sin_i) * apply_rope(k, cos_j, sin_j)).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-5)  # angles are fp32 (HF): ~1e-7 · position
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_custom_autograd_functions_gradcheck():
    """RoPE, RMSNorm and SwiGLU backward formulas equal finite differences (float64)."""
    from ringplan_runtime.transformer import _RMSNorm, _RoPE, _SwiGLU, rope_tables

    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    cos, sin = rope_tables(torch.tensor([3, 9, 40]), 8, ROPE_THETA, torch.float64)
    assert torch.autograd.gradcheck(lambda x: _RoPE.apply(x, cos, sin), (rand(2, 3, 2, 8),))
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, NORM_EPS), (rand(2, 3, 8), rand(8)))
    assert torch.autograd.gradcheck(_SwiGLU.apply, (rand(2, 3, 5), rand(2, 3, 5)))


def test_parameter_count_matches_planner():
    """The runtime model holds exactly ``ringplan.models.parameter_count`` parameters (tied, qk-norm,
    biases included), built on the meta device from catalog shapes."""
    from ringplan.models import load_model_catalog
    from ringplan_runtime.transformer import Transformer

    catalog = load_model_catalog()
    specs = [catalog.model(name).with_layers(2) for name in ("llama-3-8b", "qwen3-0.6b", "mistral-7b-v0.3")]
    specs.append(dataclasses.replace(TINY, qkv_bias=True, out_bias=True, mlp_bias=True, tied_embeddings=True))
    for spec in specs:
        with torch.device("meta"):
            model = Transformer(spec)
        assert sum(p.numel() for p in model.parameters()) == parameter_count(spec), spec.name


def _saved_activation_bytes(model, tokens, labels, mode: str) -> int:
    """Bytes of distinct storages autograd keeps from forward + loss, parameters excluded."""
    from ringplan_runtime.transformer import lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.numel() > 1:  # scalars (nll_loss's total weight) left out
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    positions = torch.arange(tokens.shape[1])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(tokens, positions)
        lm_loss(model, hidden, labels, mode=mode, chunk_tokens=7)
    return sum(seen.values())


def expected_saved_bytes(spec, checkpointing: str, batch: int, seq: int, e: int = 4) -> int:
    """The module docstring's memory plan (fp32, P = 1, no qk-norm), written out."""
    t, E, F_, D, H, H_kv = batch * seq, spec.embed_dim, spec.ffn_dim, spec.head_dim, spec.n_heads, spec.n_kv_heads
    attention = t * (2 * H + 2 * H_kv) * D * e + batch * H * seq * 4  # q, k, v, out; lse
    per_block = {"none": t * 4 * E * e + 2 * t * 4 + attention + 3 * t * F_ * e,
                 "selective": t * E * e + attention, "full": t * E * e, "offload": 0}[checkpointing]
    tables = 2 * seq * D * e if checkpointing == "none" else 0  # cos/sin, shared by the blocks
    outside = t * 8 + tables + (t * E * e + t * 4) + t * E * e + t * 8  # ids; final norm in, rstd; hidden; labels
    return spec.n_layers * per_block + outside


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full", "offload"])
def test_saved_tensors_follow_memory_plan(checkpointing):
    """What autograd keeps per block equals the documented memory plan (checked byte for byte on CPU,
    fp32, P = 1); the full loss adds its fp32 log-probabilities T·V·4, the chunked loss nothing."""
    from ringplan_runtime.transformer import Transformer, init_parameters

    offload = checkpointing == "offload"
    model = Transformer(TINY, checkpointing="full" if offload else checkpointing, offload_checkpoints=offload)
    init_parameters(model, seed=SEED, device="cpu")
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, 1)
    expected = expected_saved_bytes(TINY, checkpointing, 2, 16)
    assert _saved_activation_bytes(model, tokens, labels, "chunked") == expected
    assert _saved_activation_bytes(model, tokens, labels, "full") == expected + 2 * 16 * TINY.vocab_size * 4


def test_prefill_without_process_group():
    """A one-rank forward-only run needs no process group and equals the dense reference."""
    config = Config(name="prefill_w1", world=1, ring=1)
    w = config.workload(training=False)
    run = build_stack(w, device="cpu", seed=SEED)
    tokens, labels = global_batch(w, DATA_SEED)
    _, hidden = dense_reference({n: t.double() for n, t in _dense_initial(config).items()}, w.model, tokens, labels)
    assert relative_error(run.hidden(tokens), hidden) <= REL_TOL_HIDDEN
    with pytest.raises(ValueError, match="forward-only"):
        run.step(tokens, labels)


def test_bad_inputs_raise_value_error():
    """Unsupported sharding, a world that does not match, training without a process group, a GPT-2
    shape, offload without full checkpointing, an unknown loss mode: ``ValueError`` naming the problem."""
    from ringplan.models import load_model_catalog
    from ringplan_runtime.transformer import Transformer

    with pytest.raises(ValueError, match="zero3"):
        build_stack(dataclasses.replace(Config(name="z1", world=1, ring=1).workload(),
                                        settings=StackSettings(sharding="zero1")), device="cpu")
    with pytest.raises(ValueError, match="world size 2"):
        build_stack(Config(name="w2", world=2, ring=2).workload(training=False), device="cpu")
    with pytest.raises(ValueError, match="torch.distributed"):
        build_stack(Config(name="w1", world=1, ring=1).workload(), device="cpu")
    with pytest.raises(ValueError, match="swiglu"):
        Transformer(load_model_catalog().model("gpt2"))
    with pytest.raises(ValueError, match="full checkpointing"):
        Transformer(TINY, checkpointing="selective", offload_checkpoints=True)
    model = Transformer(TINY)
    with pytest.raises(ValueError, match="loss mode"):
        from ringplan_runtime.transformer import lm_loss

        lm_loss(model, torch.zeros(1, 4, TINY.embed_dim), torch.zeros(1, 4, dtype=torch.long), mode="sum")
