"""A decoder-only transformer (Llama / Qwen / Mistral family) with context-parallel attention.

``Transformer(spec, group=..., layout=..., backend=...)``: token embedding, L pre-norm blocks
(RMSNorm → q/k/v projections (optional qk RMSNorm over D, Qwen3) → RoPE at the rank's GLOBAL
positions → causal attention over the context-parallel ``group`` by ``cp_scheme`` (ring, all-gather,
Ulysses or hybrid: ``context_parallel_attention``) → output projection →
residual; RMSNorm → SwiGLU → residual), final RMSNorm, LM head (tied to the embedding or not).
``forward(tokens_local [B, n], positions_local [n]) -> hidden [B, n, E]`` (after the final norm);
the loss is separate: ``lm_loss(model, hidden, labels_local, mode=..., chunk_tokens=...)``.
Only ``ffn_type="swiglu"``, ``norm="rmsnorm"``, ``position="rope"`` run (GPT-2 shapes are
planned, not run). Conventions follow Hugging Face's Llama/Qwen3: rotate-half RoPE with
cos/sin computed in fp32 and cast to the activation dtype, ``weight * (x·rstd).to(dtype)``.

Memory plan (what autograd keeps; T = B·n local tokens, e = activation bytes (param_dtype),
"shared" = a tensor that exists anyway and is only referenced):

Per block, checkpointing ``none``:
  x (block input, the previous block's output) T·E·e; rstd of both norms 2·T·4 (fp32);
  attention-norm output T·E·e (saved by the q/k/v linears); q, k after RoPE and v
  T·(H + 2·H_kv)·D·e and the attention output T·H·D·e and its LSE B·H·n·4 (ring attention,
  fp32 LSE); the output projection reuses the attention output (shared); h = x + attn
  T·E·e (saved by the MLP norm); MLP-norm output T·E·e; gate and up T·2F·e (SwiGLU saves
  its inputs only, silu is recomputed in backward); the SwiGLU product T·F·e (down projection).
  With qk_norm add the pre-norm q, k T·(H + H_kv)·D·e and their rstd T·(H + H_kv)·4.
  Not saved: RoPE (its backward needs only cos/sin), residual adds, the RMSNorm fp32 copy of x
  (recomputed in backward), silu(gate).
``selective``: x (shared by both checkpointed segments) T·E·e; q, k, v, attention output and
  LSE as above (ring attention is not recomputed). Recomputed in backward: both norms, the
  q/k/v projections, qk norm, RoPE, the output projection and the MLP.
``full``: x only (T·E·e); the block's ``none`` set exists for one block at a time during its
  backward (ring attention runs again there). With ``offload_checkpoints`` x goes to pinned
  CPU memory (``save_on_cpu`` around the blocks; with full checkpointing the block inputs are
  the only tensors saved there), nothing per block stays on the device.
Outside the blocks: the embedding saves the token ids (int64, B·n·8); the final norm saves
  its input (the last block's output) and rstd; cos/sin tables 2·n·D·e (shared by every block).
Tiled MLP (``mlp_tile_tokens`` t, ``ringplan_runtime.tiling``): the block saves the MLP norm's
  output only (no gate, up or product); forward and backward run B·t tokens at a time, each tile
  recomputed in backward; the MLP's output and input gradient T·E·e are allocated once.
Loss ``full``: logits T·V·e, cast to fp32 (a T·V·4 copy when e < 4; the param-dtype logits are
  then freed), log-softmax output T·V·4 saved for backward. ``chunked``: each chunk of
  ``chunk_tokens`` tokens runs the LM head and fp32 cross-entropy under ``checkpoint``; only the
  (shared) hidden rows are saved, one chunk's logits live at a time (forward and backward).
Transients not listed: the fp32 copies inside RMSNorm, RoPE's rotate-half temporary, and the
attention plan's buffers (``docs/runtime.md``, "Memory plan"). Under tensor parallelism (T > 1) the
same model runs on DTensors: what each rank keeps is in ``ringplan_runtime.tensor_parallel``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ringplan_runtime.allgather_attention import allgather_attention
from ringplan_runtime.hybrid_attention import hybrid_attention
from ringplan_runtime.layouts import token_positions
from ringplan_runtime.ring_attention import ring_attention
# init_parameters, initial_value and INIT_STD are re-exported (they lived here before tensor parallelism).
from ringplan_runtime.tensor_parallel import INIT_STD, init_parameters, initial_value, local_norm_call  # noqa: F401
from ringplan_runtime.tiling import check_tile_rows, tiled_mlp
from ringplan_runtime.ulysses_attention import ulysses_attention

IGNORE_INDEX = -100
CHECKPOINTING = ("none", "selective", "full")
LOSS_MODES = ("full", "chunked")
NORM_EPS = 1e-5  # Llama-3 rms_norm_eps (Qwen3 uses 1e-6: pass norm_eps)
# RoPE base by model-name prefix (first match), each from the model's config.json ``rope_theta``.
ROPE_THETA_BY_NAME = (
    ("llama-3", 500_000.0),          # meta-llama/Meta-Llama-3-8B config.json
    ("qwen3", 1_000_000.0),          # Qwen/Qwen3-8B config.json
    ("mistral-7b-v0.1", 10_000.0),   # mistralai/Mistral-7B-v0.1 config.json
    ("mistral", 1_000_000.0),        # mistralai/Mistral-7B-v0.3 config.json
)
DEFAULT_ROPE_THETA = 10_000.0        # RoFormer (Su et al., 2021) / Llama-2


def default_rope_theta(spec) -> float:
    """RoPE base: ``spec.rope_theta`` when the spec has one, else by model-name prefix, else 10,000."""
    theta = getattr(spec, "rope_theta", None)
    if theta:
        return float(theta)
    name = spec.name.lower()
    return next((value for prefix, value in ROPE_THETA_BY_NAME if name.startswith(prefix)), DEFAULT_ROPE_THETA)


def check_runnable(spec) -> None:
    """Raise ``ValueError`` unless the spec is of the family this runtime runs (SwiGLU, RMSNorm, RoPE)."""
    wanted = {"ffn_type": "swiglu", "norm": "rmsnorm", "position": "rope"}
    wrong = {name: getattr(spec, name) for name, value in wanted.items() if getattr(spec, name) != value}
    if wrong:
        raise ValueError(f"model {spec.name!r}: the runtime runs {wanted} only (Llama/Qwen/Mistral family), "
                         f"got {wrong}; such shapes are planned, not run")


def rope_positions(seq_len: int, rank: int, ring_size: int, layout: str) -> torch.Tensor:
    """Global positions (int64 ``[n]``) of the tokens ring index ``rank`` holds, in local order.

    Contiguous: rank·n … rank·n + n − 1; zigzag: chunk ``rank`` then chunk 2P − 1 − rank of 2P chunks.
    """
    return token_positions(rank=rank, ring_size=ring_size, layout=layout, seq_len_tokens=seq_len)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``[n, 1, D]`` for ``positions``: angles in fp32 (HF Llama), then cast to ``dtype``.

    inv_freq_i = θ^(−2i/D), i < D/2; angle = position · inv_freq, repeated for both halves.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(y: torch.Tensor) -> torch.Tensor:
    half = y.shape[-1] // 2
    return torch.cat((y[..., half:], -y[..., :half]), dim=-1)


class _RoPE(torch.autograd.Function):
    """x·cos + rotate_half(x)·sin; saves only cos/sin (shared tables), not x."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        out = x * cos
        return out.addcmul_(_rotate_half(x), sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return grad * cos + _rotate_half_transposed(grad * sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, n, heads, D]`` by the position tables ``[n, 1, D]`` (rotate-half convention)."""
    return _RoPE.apply(x, cos, sin)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or as it is when already fp32 / fp64 (no copy then)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    """weight · (x · rstd).to(x.dtype), rstd = 1/sqrt(mean(x²) + eps) in fp32; saves x, weight, rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = _wide(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = _wide(x) * rstd
        grad32 = _wide(grad)
        grad_weight = (grad32 * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = grad32 * _wide(weight)
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; the mean of squares and the scaling are computed in fp32."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under tensor parallelism the weight is a replicated DTensor: the norm runs on local tensors.
        return local_norm_call(_RMSNorm.apply, x, self.weight, self.eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up; saves gate and up only (silu is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)); with ``tile_tokens`` t, B·t local tokens at a time, each
    tile recomputed in backward (``ringplan_runtime.tiling``)."""

    def __init__(self, spec, tile_tokens: int | None = None) -> None:
        super().__init__()
        if tile_tokens is not None:
            check_tile_rows(tile_tokens)
        self.gate_proj = nn.Linear(spec.embed_dim, spec.ffn_dim, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.embed_dim, spec.ffn_dim, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.ffn_dim, spec.embed_dim, bias=spec.mlp_bias)
        self.tile_tokens = tile_tokens

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The untiled MLP of ``x`` (autograd saves gate and up, and the product for down)."""
        return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile_tokens is None:
            return self.dense(x)
        return tiled_mlp(x, self, x.shape[0] * self.tile_tokens if x.dim() == 3 else self.tile_tokens)


#: The context-parallel schemes that take one group (``hybrid`` takes a (Ulysses, ring) pair of groups).
CP_ATTENTION = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scheme: str, group,
                               layout: str, backend: str) -> torch.Tensor:
    """Causal attention of the local queries over the CP group's whole sequence by ``scheme``
    (``ringplan.workload.CP_SCHEMES``); ``group`` is the CP group, or for ``hybrid`` the pair
    (Ulysses group, ring group) through this rank. The ranks' inputs are not compared (every rank runs
    the same model on equal chunks)."""
    if scheme == "hybrid":
        ulysses_group, ring_group = group
        return hybrid_attention(q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, causal=True,
                                layout=layout, backend=backend, check_consistency=False)
    if scheme not in CP_ATTENTION:
        raise ValueError(f"context-parallel scheme {scheme!r} is not one of {[*CP_ATTENTION, 'hybrid']}")
    return CP_ATTENTION[scheme](q, k, v, group=group, causal=True, layout=layout, backend=backend,
                                check_consistency=False)


class Attention(nn.Module):
    """q/k/v projections (+ optional qk RMSNorm over D), RoPE, causal context-parallel attention (ring,
    all-gather, Ulysses or hybrid), output projection. Under tensor parallelism ``n_heads`` and
    ``n_kv_heads`` are the rank's local head counts (``tensor_parallel.apply_tp`` sets them)."""

    def __init__(self, spec, *, group, layout: str, backend: str, norm_eps: float, cp_scheme: str = "ring") -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.embed_dim, spec.n_heads * spec.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.embed_dim, spec.n_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.embed_dim, spec.n_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.embed_dim, bias=spec.out_bias)
        self.q_norm = RMSNorm(spec.head_dim, norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, norm_eps) if spec.qk_norm else None
        self.group, self.layout, self.backend, self.cp_scheme = group, layout, backend, cp_scheme

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(q ``[B, n, H, D]``, k, v ``[B, n, H_kv, D]``) of the local tokens, q and k rotated."""
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, n, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the local queries over the CP group's keys -> ``[B, n, H, D]``."""
        return context_parallel_attention(q, k, v, scheme=self.cp_scheme, group=self.group, layout=self.layout,
                                          backend=self.backend)


class Block(nn.Module):
    """Pre-norm block; ``checkpointing`` ('none' | 'selective' | 'full') decides what backward keeps."""

    def __init__(self, spec, *, group, layout: str, backend: str, norm_eps: float, cp_scheme: str = "ring",
                 checkpointing: str = "none", mlp_tile_tokens: int | None = None) -> None:
        super().__init__()
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing {checkpointing!r} is not one of {list(CHECKPOINTING)}")
        self.input_layernorm = RMSNorm(spec.embed_dim, norm_eps)
        self.self_attn = Attention(spec, group=group, layout=layout, backend=backend, norm_eps=norm_eps,
                                   cp_scheme=cp_scheme)
        self.post_attention_layernorm = RMSNorm(spec.embed_dim, norm_eps)
        self.mlp = MLP(spec, mlp_tile_tokens)
        self.checkpointing = checkpointing

    def _qkv(self, x, *, cos, sin):
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def _rest(self, x, attn):
        h = x + self.self_attn.o_proj(attn.flatten(2))
        return h + self.mlp(self.post_attention_layernorm(h))

    def _block(self, x, *, cos, sin):
        return self._rest(x, self.self_attn.core(*self._qkv(x, cos=cos, sin=sin)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # cos/sin are bound by partial, not passed as checkpoint inputs: only x is saved (and offloaded).
        if self.checkpointing == "full":
            return checkpoint(functools.partial(self._block, cos=cos, sin=sin), x, use_reentrant=False,
                              preserve_rng_state=False)
        if self.checkpointing == "selective":
            q, k, v = checkpoint(functools.partial(self._qkv, cos=cos, sin=sin), x, use_reentrant=False,
                                 preserve_rng_state=False)
            attn = self.self_attn.core(q, k, v)
            return checkpoint(self._rest, x, attn, use_reentrant=False, preserve_rng_state=False)
        return self._block(x, cos=cos, sin=sin)


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 cross-entropy over ``logits`` ``[T, V]`` (any dtype) and ``labels`` ``[T]`` (−100 ignored)."""
    return F.cross_entropy(_wide(logits), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class LMHead(nn.Module):
    """Logits = hidden · Wᵀ and the summed fp32 cross-entropy; W is its own ``[V, E]`` or the embedding's.

    A tied head registers no parameter (the embedding module is held outside the module tree, so
    FSDP sees the table once); it reads the table at call time (sharded or gathered, as FSDP left it).
    """

    def __init__(self, spec, tied_to: nn.Embedding | None = None) -> None:
        super().__init__()
        self._tied_to = (tied_to,) if tied_to is not None else None  # a tuple: not a submodule
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(spec.vocab_size, spec.embed_dim))

    @property
    def table(self) -> torch.Tensor:
        return self._tied_to[0].weight if self._tied_to is not None else self.weight

    def _chunk_loss(self, hidden_rows: torch.Tensor, labels_rows: torch.Tensor) -> torch.Tensor:
        return _token_loss_sum(F.linear(hidden_rows, self.table), labels_rows)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, *, mode: str = "full",
                chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, fp32 scalar; valid-token count, int64 scalar) of this rank's tokens."""
        if mode not in LOSS_MODES:
            raise ValueError(f"loss mode {mode!r} is not one of {list(LOSS_MODES)}")
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
        if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        rows, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        n_tokens = (targets != IGNORE_INDEX).sum()
        if mode == "full":
            return self._chunk_loss(rows, targets), n_tokens
        total = None
        for start in range(0, rows.shape[0], chunk_tokens):
            part = checkpoint(self._chunk_loss, rows[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                              use_reentrant=False, preserve_rng_state=False)
            total = part if total is None else total + part
        return total, n_tokens


class Transformer(nn.Module):
    """Embedding, L pre-norm blocks with context-parallel attention, final RMSNorm, LM head (module docstring).

    ``group``/``layout``/``backend``/``cp_scheme`` go to every ``context_parallel_attention`` call; ``positions`` given
    to ``forward`` must be the rank's global positions for that layout (``rope_positions``).
    """

    def __init__(self, spec, *, group=None, layout: str = "contiguous", backend: str = "auto", cp_scheme: str = "ring",
                 rope_theta: float | None = None, norm_eps: float = NORM_EPS, checkpointing: str = "none",
                 offload_checkpoints: bool = False, mlp_tile_tokens: int | None = None) -> None:
        super().__init__()
        check_runnable(spec)
        if offload_checkpoints and checkpointing != "full":
            raise ValueError(f"offload_checkpoints needs full checkpointing, got checkpointing {checkpointing!r}")
        self.spec = spec
        self.rope_theta = float(rope_theta) if rope_theta is not None else default_rope_theta(spec)
        self.offload_checkpoints = bool(offload_checkpoints)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.embed_dim)
        self.layers = nn.ModuleList(
            Block(spec, group=group, layout=layout, backend=backend, norm_eps=norm_eps, cp_scheme=cp_scheme,
                  checkpointing=checkpointing, mlp_tile_tokens=mlp_tile_tokens)
            for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.embed_dim, norm_eps)
        self.lm_head = LMHead(spec, tied_to=self.embed_tokens if spec.tied_embeddings else None)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``[B, n, E]`` of the local tokens ``[B, n]`` at global ``positions`` ``[n]``."""
        if tokens.dim() != 2 or positions.shape != tokens.shape[1:]:
            raise ValueError(f"tokens must be [B, n] and positions [n], got {tuple(tokens.shape)} and "
                             f"{tuple(positions.shape)}")
        x = self.embed_tokens(tokens)
        cos, sin = rope_tables(positions.to(x.device), self.spec.head_dim, self.rope_theta, x.dtype)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if self.offload_checkpoints \
            else contextlib.nullcontext()
        with offload:
            for layer in self.layers:
                x = layer(x, cos, sin)
        return self.norm(x)


def lm_loss(model: Transformer, hidden: torch.Tensor, labels: torch.Tensor, *, mode: str = "full",
            chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 next-token cross-entropy over the local tokens, number of labelled local tokens).

    ``labels`` ``[B, n]`` are the GLOBAL next-token targets sharded like the tokens (the last global
    token is −100). ``full``: all local logits at once; ``chunked``: ``chunk_tokens`` at a time under
    ``checkpoint`` (one chunk's logits alive). Calls ``model.lm_head`` as a module, so FSDP hooks run.
    """
    return model.lm_head(hidden, labels, mode=mode, chunk_tokens=chunk_tokens)
