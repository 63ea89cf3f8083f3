r"""Runtime performance benchmark (issues 6 and 19): single-GPU SDPA vs PyTorch context_parallel vs ringplan's
ring, all-gather and Ulysses context-parallel attention, in one launch.

Exact command (one launch on 2 H100s; the machine requires NVLink multicast to stay off)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 RINGPLAN_GIT_SHA=$(git rev-parse HEAD) \
      torchrun --standalone --nproc-per-node 2 benchmarks/bench_runtime.py --out benchmarks/results/runtime_h100x2

Issue 19's matrix (32x128 and 32q/8kv x128, causal zigzag and non-causal, 131K and 262K tokens, forward
and forward+backward; the cuDNN baseline where % of ideal is a target; its targets), as
benchmarks/two_gpu_run.sh runs it (the whole matrix is ~690 s on 2 H100s: --budget-s cuts the tail)::

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_runtime.py --grid issue19 --tokens 131072,262144 \
      --parts single,cp,ring,allgather,ulysses --kernels cudnn --single-at largest-fwd-bwd \
      --causal-layouts zigzag --warmup 1 --repeats 3 --budget-s 190 --out $OUT/bench_runtime

CPU smoke run (gloo, 2 ranks spawned by the script itself, tiny shapes, seconds; what CI runs)::

    python benchmarks/bench_runtime.py --cpu-smoke --out /tmp/bench_runtime_smoke

``--nproc-per-node 1`` times the single-GPU kernels only. Rank 0 writes ``DIR/bench_runtime.json``
(every case, provenance, method) and ``DIR/bench_runtime.md``, after every case (a crash keeps
what was measured); stdout ends with the compact markdown table.

Per configuration (heads, total tokens S, causal or not, forward or forward+backward; bf16, batch 1):
(a) ``single``: cuDNN, flash and efficient aten SDPA ops (with LSE) and ``F.scaled_dot_product_attention``
    default dispatch on the full sequence, on every rank at once; rank 0's times; the fastest is the
    baseline. Above ``--family-max-tokens`` only kernels within ``--family-keep-ratio`` (default 1.0:
    the winner only) of the winner at the group's smallest size run.
(b) ``context_parallel`` with rotate methods allgather and alltoall, load-balanced when causal (it
    refuses non-causal with load balancing: run without, and noted).
(c) ringplan's schemes, backend auto, contiguous (+ the ``--causal-layouts`` when causal): ``ring``
    (ringplan_runtime.ring_attention), ``allgather`` (allgather_attention) and ``ulysses``
    (ulysses_attention, U = world size); each with the planner's predicted per-rank peak bytes
    (``ringplan.memory.cp_terms``) and step time (the time model, when it knows the local GPU) next
    to the measured ones.
Plus ``ring_dilated`` cases against (dense ring time × density).
Timing: ``--warmup`` + ``--repeats`` steps, CUDA events, per step the slowest rank, median.
Extra peak = max_memory_allocated after a reset minus the bytes allocated at the reset (the inputs).
A global ``--budget-s`` skips the remaining cases (all ranks agree) and says so. No hangs: collectives
time out after ``--pg-timeout-s``; a watchdog ends the process after ``--hard-timeout-s`` (exit 124).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # torchrun puts benchmarks/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
KERNELS = ("cudnn", "flash", "efficient", "sdpa_default")
CP_ROTATE_METHODS = ("allgather", "alltoall")
#: ringplan's context-parallel schemes: part name -> ringplan_runtime function.
SCHEMES = {"ring": "ring_attention", "allgather": "allgather_attention", "ulysses": "ulysses_attention"}
PARTS = ("single", "cp", *SCHEMES, "dilated")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Planning estimates for the budget only (never reported): counted FLOP/s of the fastest kernel
# (ANCHORS.md: cuDNN fwd 535-600 TFLOP/s on H100, F.sdpa fwd+bwd 589 at 8K tokens; taken lower),
# and kernel slow-downs from ANCHORS.md's table (cuDNN 598, flash 343, efficient 177 TFLOP/s).
ASSUMED_FLOPS_PER_S = {False: 500e12, True: 420e12}
KERNEL_SLOWDOWN = {"cudnn": 1.0, "flash": 1.8, "efficient": 3.5, "sdpa_default": 1.0}
SETUP_ESTIMATE_S = 1.0
# Grid rows in priority order (the budget cuts from the end): (shape index, causal, training, which of
# the sorted token counts). Main shape forward first (issue 6 targets), then the dilated cases (they
# use the dense non-causal ring time as reference), training, GQA, and the most expensive last.
GRID = ((0, True, False, slice(None)), (0, False, False, slice(None)), ("dilated",),
        (0, True, True, slice(0, -1)), (1, True, False, slice(0, -1)), (1, False, False, slice(0, -1)),
        (1, True, True, slice(0, 1)), (0, False, True, slice(0, 1)), (1, False, True, slice(0, 1)),
        (1, True, False, slice(-1, None)), (1, False, False, slice(-1, None)), (1, True, True, slice(1, -1)),
        (0, True, True, slice(-1, None)))
# Issue 19's matrix (both shapes x causal/non-causal x fwd/fwd+bwd x every size), in
# priority order: main-shape causal forward, the 262K causal fwd+bwd (the >= 95%-of-ideal target), main
# non-causal forward, GQA forward, the rest of fwd+bwd, the dearest (non-causal fwd+bwd at 262K), then the
# dilated cases (only with ``dilated`` in --parts; the two-GPU run leaves them out).
GRID_ISSUE19 = ((0, True, False, slice(None)), (0, True, True, slice(-1, None)), (0, False, False, slice(None)),
                (1, True, False, slice(None)), (1, False, False, slice(None)), (0, True, True, slice(0, -1)),
                (1, True, True, slice(None)), (0, False, True, slice(0, -1)), (1, False, True, slice(0, -1)),
                (0, False, True, slice(-1, None)), (1, False, True, slice(-1, None)), ("dilated",))
GRIDS = {"issue6": GRID, "issue19": GRID_ISSUE19}


class SkipCase(Exception):
    """A case that cannot run here (reason in the message); recorded as ``skipped``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heads:
    """Query heads H, KV heads H_kv, head dim D; ``label`` is ``32x128`` or ``32/8x128`` (GQA)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def parse(cls, text: str) -> "Heads":
        try:
            heads, head_dim = text.lower().split("x")
            n_heads, _, n_kv = heads.partition("/")
            result = cls(n_heads=int(n_heads), n_kv_heads=int(n_kv or n_heads), head_dim=int(head_dim))
        except ValueError:
            raise ValueError(f"cannot read heads {text!r}; expected HxD or H/H_kvxD, e.g. 32x128, 32/8x128") from None
        if min(result.n_heads, result.n_kv_heads, result.head_dim) <= 0 or result.n_heads % result.n_kv_heads:
            raise ValueError(f"heads {text!r}: need positive sizes and H a multiple of H_kv")
        return result

    @property
    def label(self) -> str:
        kv = f"/{self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return f"{self.n_heads}{kv}x{self.head_dim}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """One attention problem: heads, total tokens S, causal, forward or forward+backward; batch 1."""

    heads: Heads
    seq_len_tokens: int
    causal: bool
    training: bool
    dilation: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (segment lengths, dilation rates)

    @property
    def group(self) -> tuple[str, bool, bool]:
        return (self.heads.label, self.causal, self.training)


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What to run and how (see ``main``'s options)."""

    out_dir: Path
    tokens: tuple[int, ...] = (65_536, 131_072, 262_144)
    heads: tuple[Heads, ...] = (Heads(n_heads=32, n_kv_heads=32, head_dim=128),
                                Heads(n_heads=32, n_kv_heads=8, head_dim=128))
    dilated: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
        ((16_384, 65_536, 262_144), (1, 2, 4)), ((8_192, 65_536, 262_144), (1, 4, 16)))
    parts: tuple[str, ...] = PARTS
    grid: str = "issue6"
    kernels: tuple[str, ...] = KERNELS
    causal_layouts: tuple[str, ...] = ("contiguous", "zigzag")
    single_at: str = "all"  # all | largest-fwd-bwd (the single-GPU baseline only where % of ideal is a target)
    dtype: str = "bf16"
    warmup: int = 2
    repeats: int = 5
    budget_s: float = 420.0
    pg_timeout_s: float = 180.0
    hard_timeout_s: float = 570.0
    family_max_tokens: int = 65_536
    family_keep_ratio: float = 1.0
    device: str = "auto"
    command: str = ""

    def __post_init__(self) -> None:
        if not self.tokens or min(self.tokens) <= 0 or not self.heads:
            raise ValueError(f"need positive token counts and at least one head shape, got {self.tokens}, {self.heads}")
        if unknown := set(self.parts) - set(PARTS):
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; choose from {', '.join(GRIDS)}")
        if not self.kernels or set(self.kernels) - set(KERNELS):
            raise ValueError(f"kernels {list(self.kernels)}: choose one or more of {', '.join(KERNELS)}")
        if self.single_at not in ("all", "largest-fwd-bwd"):
            raise ValueError(f"single_at {self.single_at!r}: choose all or largest-fwd-bwd")
        if not self.causal_layouts or set(self.causal_layouts) - {"contiguous", "zigzag"}:
            raise ValueError(f"causal layouts {list(self.causal_layouts)}: choose from contiguous, zigzag")
        if self.warmup < 0 or self.repeats < 1 or self.dtype not in DTYPES:
            raise ValueError(f"need warmup >= 0, repeats >= 1, dtype in {sorted(DTYPES)}; got "
                             f"{self.warmup}, {self.repeats}, {self.dtype!r}")


@dataclass(slots=True, kw_only=True)
class Env:
    """This process's place in the launch and the state every rank keeps identically."""

    rank: int
    world_size: int
    device: torch.device
    start_s: float
    mesh: Any = None
    family_s: dict = field(default_factory=dict)  # group -> {kernel: median s} at the group's first size
    gpu: str | None = None  # the local GPU's catalog name (time predictions), None off GPU or not in the catalog
    records: list = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A ready-to-time step and the bytes of the inputs it keeps allocated."""

    step: Callable[[], None]
    input_bytes: int
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- version shims, collectives

def cp_api() -> Any:
    """``context_parallel``, ``set_rotate_method`` and ``_cp_options`` on torch 2.6-2.13.

    torch >= 2.9 moved them to ``experimental._context_parallel._attention`` and kept
    ``experimental._attention`` as a re-exporting stub (the device's 2.11 has the stub, probe_ops).
    """
    try:
        from torch.distributed.tensor.experimental import _attention as module
        module.set_rotate_method, module._cp_options, module.context_parallel  # noqa: B018
    except (ImportError, AttributeError):
        from torch.distributed.tensor.experimental._context_parallel import _attention as module
    return module


def gather(env: Env, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (one ``all_gather_object``); ``[obj]`` without a process group."""
    if env.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sync(env: Env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def release_memory(env: Env) -> None:
    """Give a failed or finished case's blocks back (gc: exception frames hold tensors); GPU only."""
    if env.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- timing

def sdpa_kernels_used(step: Callable[[], None]) -> list[str]:
    """Which aten SDPA kernels one call of ``step`` reaches (``cudnn``, ``flash``, ...), forward ops only.

    A ``TorchDispatchMode`` sees each aten op before any tensor subclass (DTensor) handles it, so
    this also names the kernel that F.scaled_dot_product_attention's default dispatch picked.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class _Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = func.__name__.split(".")[0]
            if name.startswith("_scaled_dot_product_") and not name.endswith("backward"):
                kernel = name.removeprefix("_scaled_dot_product_").removesuffix("_attention")
                seen.extend([] if kernel in seen else [kernel])
            return func(*args, **(kwargs or {}))

    with _Spy():
        step()
    return seen


def timed_steps(step: Callable[[], None], env: Env, options: Options,
                spy: bool = False) -> tuple[list[float], int | None, list[str] | None, int | None]:
    """Seconds of each timed step (CUDA events on GPU), extra peak bytes over what was allocated, kernels
    seen, and the bytes allocated when the peak was reset (None off GPU).

    Warm-up steps first (the first one under ``sdpa_kernels_used`` when ``spy``); then every rank
    lines up (one small collective) so that ring steps start together; the allocator peak is reset
    after warm-up, so it covers the timed steps only.
    """
    kernels = None
    for i in range(options.warmup):
        if spy and i == 0:
            kernels = sdpa_kernels_used(step)
        else:
            step()
    sync(env)
    gather(env, 0)
    on_gpu = env.device.type == "cuda"
    if on_gpu:
        base_bytes = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(options.repeats)]
        for start, end in events:
            start.record()
            step()
            end.record()
        sync(env)
        peak = torch.cuda.max_memory_allocated(env.device) - base_bytes
        return [s.elapsed_time(e) / 1e3 for s, e in events], peak, kernels, base_bytes
    times_s = []
    for _ in range(options.repeats):
        t0 = time.perf_counter()
        step()
        times_s.append(time.perf_counter() - t0)
    return times_s, None, kernels, None


def make_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
              grad_out: torch.Tensor | None) -> Callable[[], None]:
    """Forward under no_grad, or forward + backward of ``grad_out`` with the leaves' grads cleared first."""
    if grad_out is None:
        def step() -> None:
            with torch.no_grad():
                forward()
        return step

    def train_step() -> None:
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_out)
    return train_step


def _randn(shape: tuple[int, ...], env: Env, options: Options, grad: bool = False) -> torch.Tensor:
    return torch.randn(shape, device=env.device, dtype=DTYPES[options.dtype], requires_grad=grad)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


# ---------------------------------------------------------------- formulas

def attention_flops(*, seq_len_tokens: int, n_heads: int, head_dim: int, causal: bool, training: bool,
                    batch: int = 1) -> float:
    """FLOPs of one attention layer over the whole sequence (all ranks together).

    Forward: 4·B·S²·H·D (QKᵀ and PV, 2 FLOPs per multiply-add), halved when causal; forward +
    backward: 3.5× forward (backward = 5 matmuls incl. the QKᵀ recompute). Source: the
    FlashAttention benchmark convention, as in ANCHORS.md. Ignores softmax/exp work, masking,
    the LSE merge, and the diagonal blocks' extra half (causal counts exactly S²/2 pairs).
    """
    forward = 4.0 * batch * seq_len_tokens**2 * n_heads * head_dim / (2 if causal else 1)
    return forward * (3.5 if training else 1.0)


def dilated_attended_pairs(*, seq_len_tokens: int, segment_lengths: tuple[int, ...],
                           dilation_rates: tuple[int, ...]) -> int:
    """(query, key) pairs one head computes in LongNet dilated attention, summed over branches.

    Branch i: S/w_i segments, each keeping w_i/r_i tokens as queries and keys → S·w_i/r_i² pairs.
    Source: LongNet (Ding et al. 2023), microsoft/torchscale. Pairs two branches share are counted
    twice (both are computed); the density is pairs / S².
    """
    return sum(seq_len_tokens * w // (r * r) for w, r in zip(segment_lengths, dilation_rates))


def config_flops(cfg: Config) -> float:
    """FLOPs of ``cfg``: dense via ``attention_flops``, dilated as 4·B·H·D·pairs (×3.5 with backward)."""
    h = cfg.heads
    if cfg.dilation is None:
        return attention_flops(seq_len_tokens=cfg.seq_len_tokens, n_heads=h.n_heads, head_dim=h.head_dim,
                               causal=cfg.causal, training=cfg.training)
    pairs = dilated_attended_pairs(seq_len_tokens=cfg.seq_len_tokens, segment_lengths=cfg.dilation[0],
                                   dilation_rates=cfg.dilation[1])
    return 4.0 * h.n_heads * h.head_dim * pairs * (3.5 if cfg.training else 1.0)


def dilated_density(cfg: Config) -> float:
    """Attended pairs / S² of a dilated config (1.0 for dense)."""
    if cfg.dilation is None:
        return 1.0
    pairs = dilated_attended_pairs(seq_len_tokens=cfg.seq_len_tokens, segment_lengths=cfg.dilation[0],
                                   dilation_rates=cfg.dilation[1])
    return pairs / cfg.seq_len_tokens**2


# ---------------------------------------------------------------- the three contenders

def kernel_forward(kernel: str, causal: bool, gqa: bool) -> Callable[..., torch.Tensor]:
    """The output of one SDPA kernel on [B, H, S, D] views; the aten ops compute the LSE as a ring needs."""
    aten = torch.ops.aten
    if kernel == "cudnn":
        return lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[0]
    if kernel == "flash":
        return lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]
    if kernel == "efficient":
        return lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[0]
    extra = {"enable_gqa": True} if gqa else {}
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **extra)


@contextlib.contextmanager
def single_gpu_case(cfg: Config, kernel: str, env: Env, options: Options) -> Iterator[Prepared]:
    """(a) One kernel on the full sequence on this GPU; [B, S, H, D] storage seen as [B, H, S, D]."""
    if kernel != "sdpa_default" and env.device.type != "cuda":
        raise SkipCase(f"aten {kernel} attention op needs CUDA")
    h, s = cfg.heads, cfg.seq_len_tokens
    q = _randn((1, s, h.n_heads, h.head_dim), env, options, cfg.training)
    k, v = (_randn((1, s, h.n_kv_heads, h.head_dim), env, options, cfg.training) for _ in range(2))
    grad_out = _randn((1, s, h.n_heads, h.head_dim), env, options).transpose(1, 2) if cfg.training else None
    op = kernel_forward(kernel, cfg.causal, h.n_kv_heads != h.n_heads)
    forward = lambda: op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # noqa: E731
    yield Prepared(step=make_step(forward, [q, k, v], grad_out), input_bytes=_nbytes(q, k, v, grad_out))


@contextlib.contextmanager
def context_parallel_case(cfg: Config, rotate: str, env: Env, options: Options,
                          expand_kv: bool = False) -> Iterator[Prepared]:
    """(b) PyTorch's context_parallel: F.scaled_dot_product_attention (default dispatch) on [B, H, n, D] shards.

    Full-sequence buffers are sharded in place by ``context_parallel`` (their storage keeps its
    full size: that is counted in the inputs, not in the extra peak). Load balancing (head-tail,
    = zigzag) is on for causal; non-causal runs without it, which context_parallel requires.
    """
    if env.device.type != "cuda":
        raise SkipCase("context_parallel dispatches to the CUDA SDPA ops only")
    cp = cp_api()
    if env.mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        env.mesh = init_device_mesh("cuda", (env.world_size,))
    saved = (cp._cp_options.rotate_method, cp._cp_options.enable_load_balance)
    h, s = cfg.heads, cfg.seq_len_tokens
    kv_heads = h.n_heads if expand_kv else h.n_kv_heads
    q = _randn((1, h.n_heads, s, h.head_dim), env, options)
    k, v = (_randn((1, kv_heads, s, h.head_dim), env, options) for _ in range(2))
    notes = ["load balancing on" if cfg.causal else "load balancing off (refused for non-causal)"]
    if expand_kv:
        notes.append(f"K/V given {h.n_heads} heads, as repeat_interleave before SDPA would (not timed)")
    extra = {"enable_gqa": True} if kv_heads != h.n_heads else {}
    try:
        cp.set_rotate_method(rotate)
        cp._cp_options.enable_load_balance = cfg.causal
        buffers = [q, k, v]
        with cp.context_parallel(env.mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2],
                                 no_restore_buffers=set(buffers)):
            grad_out = None
            if cfg.training:
                for t in buffers:
                    t.requires_grad_(True)
                grad_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)
            # Looked up at call time: context_parallel patches F.scaled_dot_product_attention.
            forward = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, **extra)  # noqa: E731
            yield Prepared(step=make_step(forward, buffers, grad_out), input_bytes=_nbytes(q, k, v, grad_out),
                           notes=tuple(notes))
    finally:
        cp._cp_options.rotate_method, cp._cp_options.enable_load_balance = saved


def _runtime_fn(name: str) -> Callable[..., torch.Tensor]:
    import ringplan_runtime

    fn = getattr(ringplan_runtime, name, None)
    fn = getattr(fn, name, None) if inspect.ismodule(fn) else fn  # submodule of the same name
    if fn is None:
        raise SkipCase(f"ringplan_runtime.{name} is not available in this checkout")
    return fn


def _local_qkv(cfg: Config, env: Env, options: Options) -> tuple[torch.Tensor, ...]:
    """This rank's [B, n, H, D] query and [B, n, H_kv, D] key/value chunks (random: values don't set the time)."""
    h, n = cfg.heads, cfg.seq_len_tokens // env.world_size
    q = _randn((1, n, h.n_heads, h.head_dim), env, options, cfg.training)
    k, v = (_randn((1, n, h.n_kv_heads, h.head_dim), env, options, cfg.training) for _ in range(2))
    grad_out = _randn((1, n, h.n_heads, h.head_dim), env, options) if cfg.training else None
    return q, k, v, grad_out


@contextlib.contextmanager
def scheme_case(cfg: Config, scheme: str, layout: str, env: Env, options: Options) -> Iterator[Prepared]:
    """(c) ringplan_runtime's ``scheme`` (ring, allgather, ulysses over every rank) on this rank's chunk,
    backend auto, the default cross-rank input check on (what a caller gets)."""
    attention = _runtime_fn(SCHEMES[scheme])
    q, k, v, grad_out = _local_qkv(cfg, env, options)
    notes: tuple[str, ...] = ()
    with contextlib.suppress(Exception):
        notes = (f"backend {_runtime_fn('select_backend')(q.device, q.dtype, cfg.heads.head_dim, 'auto')}",)
    forward = lambda: attention(q, k, v, group=None, causal=cfg.causal, layout=layout,  # noqa: E731
                                backend="auto")
    yield Prepared(step=make_step(forward, [q, k, v], grad_out), input_bytes=_nbytes(q, k, v, grad_out), notes=notes)


def ring_case(cfg: Config, layout: str, env: Env, options: Options) -> contextlib.AbstractContextManager:
    """(c) ringplan_runtime.ring_attention on this rank's chunk (``scheme_case`` of the ring)."""
    return scheme_case(cfg, "ring", layout, env, options)


@contextlib.contextmanager
def dilated_case(cfg: Config, env: Env, options: Options) -> Iterator[Prepared]:
    """ringplan_runtime.ring_dilated_attention (contiguous, non-causal) on this rank's chunk."""
    from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload, check_layout_fits

    segments, rates = cfg.dilation
    h = cfg.heads
    try:
        shape = AttentionShape(n_heads=h.n_heads, n_kv_heads=h.n_kv_heads, head_dim=h.head_dim)
        pattern = AttentionPattern(segment_lengths_tokens=segments, dilation_rates=rates)
        check_layout_fits(Workload(seq_len_tokens=cfg.seq_len_tokens, shape=shape, pattern=pattern),
                          RingLayout(ring_size=env.world_size))
    except ValueError as exc:
        raise SkipCase(f"invalid dilated case: {exc}") from None
    dilated = _runtime_fn("ring_dilated_attention")
    q, k, v, grad_out = _local_qkv(cfg, env, options)
    forward = lambda: dilated(q, k, v, segment_lengths=segments, dilation_rates=rates,  # noqa: E731
                              group=None, causal=cfg.causal, backend="auto")
    yield Prepared(step=make_step(forward, [q, k, v], grad_out), input_bytes=_nbytes(q, k, v, grad_out))


# ---------------------------------------------------------------- plan and variants

@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    """One contender on one config: how to prepare it, how ranks' times combine, its cost estimate."""

    part: str  # single | context_parallel | ring | allgather | ulysses | ring_dilated
    method: str
    prepare: Callable[[], contextlib.AbstractContextManager]
    reduce: str  # "rank0" (single GPU: rank 0's times) or "max" (per step, the slowest rank)
    cost_factor: float  # estimated step time / single-GPU baseline step time
    fallback: "Variant | None" = None


def plan(options: Options, world_size: int) -> list[Config]:
    """Configs in priority order (``GRID``): the budget drops the last ones first."""
    tokens = sorted(set(options.tokens))
    configs: list[Config] = []
    for row in GRIDS[options.grid]:
        if row[0] == "dilated":
            if world_size > 1 and "dilated" in options.parts:
                configs += [Config(heads=options.heads[0], seq_len_tokens=tokens[-1], causal=False, training=False,
                                   dilation=(tuple(seg), tuple(rates))) for seg, rates in options.dilated]
            continue
        index, causal, training, which = row
        if index < len(options.heads):
            configs += [Config(heads=options.heads[index], seq_len_tokens=s, causal=causal, training=training)
                        for s in tokens[which]]
    return list(dict.fromkeys(configs))


def family_kernels(cfg: Config, env: Env, options: Options) -> list[str]:
    """All ``--kernels`` up to ``family_max_tokens``; above, those within ``family_keep_ratio`` of the group's
    winner."""
    family = env.family_s.get(cfg.group)
    if cfg.seq_len_tokens <= options.family_max_tokens or not family:
        return list(options.kernels)
    best = min(family.values())
    return [k for k in options.kernels if k in family and family[k] <= options.family_keep_ratio * best]


def variants(cfg: Config, env: Env, options: Options) -> list[Variant]:
    """The contenders for ``cfg`` on this launch, single-GPU kernels first (they set the baseline)."""
    p = env.world_size
    if cfg.dilation is not None:
        return [Variant(part="ring_dilated", method="contiguous", prepare=lambda: dilated_case(cfg, env, options),
                        reduce="max", cost_factor=1.3 * dilated_density(cfg) / p)]
    out = []
    if "single" in options.parts and (options.single_at == "all" or (
            cfg.training and cfg.seq_len_tokens == max(options.tokens))):
        out += [Variant(part="single", method=k, prepare=(lambda k=k: single_gpu_case(cfg, k, env, options)),
                        reduce="rank0", cost_factor=KERNEL_SLOWDOWN[k]) for k in family_kernels(cfg, env, options)]
    if p > 1 and "cp" in options.parts:
        gqa = cfg.heads.n_kv_heads != cfg.heads.n_heads
        for rotate in CP_ROTATE_METHODS:
            method = f"{rotate} {'lb' if cfg.causal else 'no-lb'}"
            fallback = Variant(part="context_parallel", method=method + " kv-repeated", reduce="max",
                               cost_factor=1.2 / p,
                               prepare=lambda r=rotate: context_parallel_case(cfg, r, env, options, expand_kv=True))
            out.append(Variant(part="context_parallel", method=method, reduce="max", cost_factor=1.15 / p,
                               prepare=lambda r=rotate: context_parallel_case(cfg, r, env, options),
                               fallback=fallback if gqa else None))
    for scheme in (s for s in SCHEMES if p > 1 and s in options.parts):
        for layout in options.causal_layouts if cfg.causal else ("contiguous",):
            # Contiguous causal: the last rank computes P - 1/2 of the P²/2 blocks (Ulysses: balanced).
            share = (2 * p - 1) / p**2 if cfg.causal and layout == "contiguous" and scheme != "ulysses" \
                else (1.1 if scheme == "ulysses" else 1.05) / p
            out.append(Variant(part=scheme, method=layout, reduce="max", cost_factor=share,
                               prepare=lambda s=scheme, lay=layout: scheme_case(cfg, s, lay, env, options)))
    return out


def baseline_s(records: list[dict], cfg: Config) -> float | None:
    """Median time of the fastest single-GPU kernel measured for ``cfg``'s dense problem."""
    times = [r["time_median_s"] for r in records if r["part"] == "single" and r["status"] == "ok"
             and _key(r) == (cfg.heads.label, cfg.seq_len_tokens, cfg.causal, _mode(cfg.training))]
    return min(times) if times else None


def estimate_s(variant: Variant, cfg: Config, env: Env, options: Options) -> float:
    """Estimated wall seconds of one case: setup + steps × (baseline, measured or assumed) × factor."""
    dense = dataclasses.replace(cfg, dilation=None)
    base = baseline_s(env.records, dense) or config_flops(dense) / ASSUMED_FLOPS_PER_S[cfg.training]
    return SETUP_ESTIMATE_S + (options.warmup + options.repeats) * base * variant.cost_factor


# ---------------------------------------------------------------- planner predictions

def local_catalog_gpu(env: Env) -> str | None:
    """Catalog name of this rank's GPU by its driver name, or None (CPU, or not in the catalog)."""
    if env.device.type != "cuda":
        return None
    with contextlib.suppress(Exception):
        from ringplan.hardware import load_catalog

        spec = load_catalog().gpu_by_driver_name(torch.cuda.get_device_name(env.device))
        return spec.name if spec else None
    return None


@functools.lru_cache(maxsize=256)
def predict(scheme: str, layout: str, *, n_heads: int, n_kv_heads: int, head_dim: int, seq_len_tokens: int,
            causal: bool, training: bool, world_size: int, dtype: str, gpu: str | None) -> dict:
    """The planner's per-rank peak bytes (Σ of ``ringplan.memory.cp_terms`` at θ = 1: the analytic terms,
    no fitted allocator slack) and step time (``ringplan.time``, for the catalog ``gpu``; None without
    one) of one attention layer under ``scheme``; a failure is named in ``prediction_note``."""
    out: dict = {"predicted_peak_bytes": None, "predicted_step_s": None, "prediction_note": ""}
    notes = []
    try:
        from ringplan.memory.cp_terms import memory_terms
        from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload

        workload = Workload(seq_len_tokens=seq_len_tokens, training=training,
                            shape=AttentionShape(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                                                 dtype=dtype),
                            pattern=AttentionPattern(causal=causal))
        ring = RingLayout(ring_size=world_size, layout=layout, cp_scheme=scheme)
        out["predicted_peak_bytes"] = sum(memory_terms(workload, ring).values())
    except Exception as exc:  # noqa: BLE001 - a prediction that cannot be made is noted, never fatal
        notes.append(f"memory: {type(exc).__name__}: {str(exc)[:160]}")
    if gpu is not None and out["predicted_peak_bytes"] is not None:
        try:
            if scheme == "ring":
                from ringplan.time.attention_time import step_time_prediction

                out["predicted_step_s"] = step_time_prediction(workload, ring, gpu).step_time_s
            else:
                from ringplan.time.cp_time import cp_step_time

                out["predicted_step_s"] = cp_step_time(workload, ring, gpu).step_time_s
        except Exception as exc:  # noqa: BLE001
            notes.append(f"time: {type(exc).__name__}: {str(exc)[:160]}")
    elif gpu is None:
        notes.append("time: no catalog GPU here")
    out["prediction_note"] = "; ".join(notes)
    return out


def prediction_fields(cfg: Config, variant: "Variant", env: Env, options: Options) -> dict:
    """``predict`` for ringplan's schemes (empty for the other parts)."""
    if variant.part not in SCHEMES:
        return {}
    h = cfg.heads
    return dict(predict(variant.part, variant.method, n_heads=h.n_heads, n_kv_heads=h.n_kv_heads,
                        head_dim=h.head_dim, seq_len_tokens=cfg.seq_len_tokens, causal=cfg.causal,
                        training=cfg.training, world_size=env.world_size, dtype=options.dtype, gpu=env.gpu))


# ---------------------------------------------------------------- running one case

def _failure(exc: BaseException) -> dict:
    lines = str(exc).strip().splitlines() or [""]
    if isinstance(exc, SkipCase):
        return {"status": "skipped", "reason": lines[0]}
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"status": "oom", "reason": lines[0][:240]}
    return {"status": "error", "reason": f"{type(exc).__name__}: {lines[0][:240]}"}


def empty_outcome(status: str = "ok", reason: str = "") -> dict:
    return {"status": status, "reason": reason, "times_s": [], "extra_peak_bytes": None, "input_bytes": None,
            "peak_allocated_bytes": None, "notes": []}


def _attempt_local(variant: Variant, env: Env, options: Options) -> dict:
    """This rank's outcome; ranks agree after setup (one small collective) so that none waits alone."""
    outcome = empty_outcome()
    try:
        with contextlib.ExitStack() as stack:
            prepared = None
            try:
                prepared = stack.enter_context(variant.prepare())
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, the launch goes on
                outcome.update(_failure(exc))
            if any(status != "ok" for status in gather(env, outcome["status"])):
                if outcome["status"] == "ok":
                    outcome.update(status="skipped", reason="setup failed on another rank")
                return outcome
            spy = variant.part == "context_parallel" or variant.method == "sdpa_default"
            times_s, peak, kernels, base = timed_steps(prepared.step, env, options, spy=spy)
            outcome.update(times_s=times_s, extra_peak_bytes=peak, input_bytes=prepared.input_bytes,
                           peak_allocated_bytes=None if peak is None else base + peak,
                           notes=list(prepared.notes) + ([f"dispatched to {'+'.join(kernels)}"] if kernels else []))
    except Exception as exc:  # noqa: BLE001
        outcome.update(_failure(exc), times_s=[])
    return outcome


def merge_outcomes(outcomes: list[dict], reduce: str) -> dict:
    """One outcome from every rank's: a failure anywhere fails the case; times per step by ``reduce``."""
    bad = [(rank, o) for rank, o in enumerate(outcomes) if o["status"] != "ok"]
    if bad:
        statuses = {o["status"] for _, o in bad}
        status = next(s for s in ("oom", "error", "skipped") if s in statuses)
        reasons = {o["reason"] for _, o in bad}
        reason = reasons.pop() if len(reasons) == 1 else "; ".join(f"rank {r}: {o['reason']}" for r, o in bad)
        return {**outcomes[0], "status": status, "reason": reason, "times_s": [], "extra_peak_bytes": None,
                "peak_allocated_bytes": None}
    if reduce == "rank0" or len(outcomes) == 1:
        return dict(outcomes[0])
    peaks = [o["extra_peak_bytes"] for o in outcomes]
    totals = [o.get("peak_allocated_bytes") for o in outcomes]
    return {**outcomes[0], "times_s": [max(step) for step in zip(*(o["times_s"] for o in outcomes))],
            "extra_peak_bytes": None if None in peaks else max(peaks),
            "peak_allocated_bytes": None if None in totals else max(totals),
            "rank_median_s": [statistics.median(o["times_s"]) for o in outcomes]}


def attempt(variant: Variant, env: Env, options: Options) -> dict:
    outcome = _attempt_local(variant, env, options)
    release_memory(env)
    return merge_outcomes(gather(env, outcome), variant.reduce)


def base_record(cfg: Config, variant: Variant, env: Env, options: Options) -> dict:
    ring_size = 1 if variant.part == "single" else env.world_size
    h = cfg.heads
    return {"part": variant.part, "method": variant.method, "heads": h.label, "n_heads": h.n_heads,
            "n_kv_heads": h.n_kv_heads, "head_dim": h.head_dim, "batch": 1, "dtype": options.dtype,
            "seq_len_tokens": cfg.seq_len_tokens, "ring_size": ring_size,
            "tokens_per_rank": cfg.seq_len_tokens // ring_size, "causal": cfg.causal, "mode": _mode(cfg.training),
            "segment_lengths": list(cfg.dilation[0]) if cfg.dilation else None,
            "dilation_rates": list(cfg.dilation[1]) if cfg.dilation else None,
            "density": dilated_density(cfg), "flops": config_flops(cfg)}


def run_variant(variant: Variant, cfg: Config, env: Env, options: Options) -> dict:
    """One case, isolated: within budget (rank 0 decides for all), failures recorded, fallback tried once."""
    record = base_record(cfg, variant, env, options)
    estimate = estimate_s(variant, cfg, env, options)
    elapsed = time.monotonic() - env.start_s
    if not gather(env, elapsed + estimate <= options.budget_s)[0]:
        outcome = empty_outcome("skipped", f"time budget: {elapsed:.0f} s used of {options.budget_s:.0f} s, "
                                f"case estimated at {estimate:.0f} s")
    else:
        outcome = attempt(variant, env, options)
    if outcome["status"] == "error" and variant.fallback is not None:
        first = outcome["reason"]
        outcome = attempt(variant.fallback, env, options)
        record["method"] = variant.fallback.method
        outcome["notes"] = [f"native attempt failed: {first}", *outcome["notes"]]
    times = outcome["times_s"]
    stats = {"time_median_s": statistics.median(times), "time_min_s": min(times), "time_max_s": max(times)} \
        if times else {"time_median_s": None, "time_min_s": None, "time_max_s": None}
    return {**record, **outcome, **stats, **prediction_fields(cfg, variant, env, options),
            "case_wall_s": round(time.monotonic() - env.start_s - elapsed, 3)}


def _mode(training: bool) -> str:
    return "fwd+bwd" if training else "fwd"


def _key(record: dict) -> tuple:
    return (record["heads"], record["seq_len_tokens"], record["causal"], record["mode"])


# ---------------------------------------------------------------- derived metrics and targets

def derive(records: list[dict]) -> list[dict]:
    """Records with TFLOP/s per GPU, speedup over the best single-GPU kernel, % of ideal, dilated ratio.

    % of ideal = (single-GPU time / ring size) / time. Dilated: ratio = time / (dense ring time ×
    density), dense ring = ring contiguous, same heads and S, non-causal forward, same launch.
    """
    best: dict[tuple, dict] = {}
    for r in records:
        if r["part"] == "single" and r["status"] == "ok":
            if _key(r) not in best or r["time_median_s"] < best[_key(r)]["time_median_s"]:
                best[_key(r)] = r
    dense_ring = {_key(r): r for r in records if r["part"] == "ring" and r["method"] == "contiguous"
                  and r["status"] == "ok"}
    out = []
    for r in records:
        d = {**r, "tflops_per_gpu": None, "speedup_vs_single": None, "pct_of_ideal": None, "baseline": None}
        base = best.get(_key(r))
        if r["status"] == "ok":
            d["tflops_per_gpu"] = r["flops"] / r["ring_size"] / r["time_median_s"] / 1e12
        if r["status"] == "ok" and base is not None and r["part"] != "ring_dilated":
            d["baseline"] = f"single {base['method']}"
            d["is_baseline"] = r is base
            d["speedup_vs_single"] = base["time_median_s"] / r["time_median_s"]
            d["pct_of_ideal"] = 100.0 * d["speedup_vs_single"] / r["ring_size"]
        dense = dense_ring.get(_key(r))
        if r["part"] == "ring_dilated" and r["status"] == "ok" and dense is not None:
            d["dense_ring_time_s"] = dense["time_median_s"]
            d["time_over_dense_x_density"] = r["time_median_s"] / (dense["time_median_s"] * r["density"])
        if r["status"] == "ok" and r.get("predicted_peak_bytes") and r.get("peak_allocated_bytes"):
            measured = r["peak_allocated_bytes"]
            d["peak_error_pct"] = 100.0 * (r["predicted_peak_bytes"] - measured) / measured
        if r["status"] == "ok" and r.get("predicted_step_s"):
            d["time_error_pct"] = 100.0 * (r["predicted_step_s"] - r["time_median_s"]) / r["time_median_s"]
        out.append(d)
    return out


def _find(records: list[dict], **match: Any) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def targets(records: list[dict], heads_label: str, world_size: int) -> list[str]:
    """Issue 6's targets, each PASS / MISS (by how much) / not measured, from this launch's records."""
    if world_size != 2:
        return [f"targets are defined for 2 GPUs; this launch had {world_size}"]
    lines = []
    s_max = max((r["seq_len_tokens"] for r in records if r["heads"] == heads_label), default=0)
    common = {"heads": heads_label, "seq_len_tokens": s_max, "mode": "fwd"}
    zig, cps = _find(records, part="ring", method="zigzag", causal=True, **common), \
        _find(records, part="context_parallel", causal=True, **common)
    if zig and cps:
        fast = min(cps, key=lambda r: r["time_median_s"])
        peaks = [r["extra_peak_bytes"] for r in cps if r["extra_peak_bytes"] is not None]
        ok_t = zig[0]["time_median_s"] < fast["time_median_s"]
        ring_peak = zig[0]["extra_peak_bytes"]
        ok_m = bool(peaks) and ring_peak is not None and ring_peak <= 0.75 * min(peaks)
        mem = f"{_gb(ring_peak)} vs 75% of {_gb(min(peaks) if peaks else None)}"
        lines.append(f"{_verdict(ok_t and ok_m)} causal zigzag fwd {s_max:,} tokens: {_ms(zig[0])} vs context_parallel "
                     f"{fast['method']} {_ms(fast)}; extra peak {mem} GB")
    else:
        lines.append(f"NOT MEASURED causal zigzag fwd {s_max:,} tokens vs context_parallel")
    for r in _find(records, part="ring", method="contiguous", causal=False, **common) or [None]:
        if r is None or r["speedup_vs_single"] is None:
            lines.append("NOT MEASURED non-causal ring fwd at the largest size")
        else:
            lines.append(f"{_verdict(r['speedup_vs_single'] >= 1.95)} non-causal fwd {s_max:,} tokens: "
                         f"{r['speedup_vs_single']:.2f}x single GPU ({r['baseline']}), target >= 1.95x")
    for r in _find(records, part="ring", method="zigzag", causal=True, mode="fwd+bwd", heads=heads_label):
        if r["pct_of_ideal"] is not None:
            lines.append(f"{_verdict(r['pct_of_ideal'] >= 90)} causal zigzag fwd+bwd {r['seq_len_tokens']:,} tokens: "
                         f"{r['pct_of_ideal']:.1f}% of ideal, target >= 90%")
    for r in _find(records, part="ring", tokens_per_rank=131_072, mode="fwd", heads=heads_label):
        if r["extra_peak_bytes"] is not None:
            lines.append(f"{_verdict(r['extra_peak_bytes'] <= 6 * 2**30)} ring {r['method']} fwd "
                         f"{'causal' if r['causal'] else 'non-causal'}, 131,072 tokens/GPU: extra peak "
                         f"{r['extra_peak_bytes'] / 2**30:.2f} GiB, target <= 6 GiB")
    for r in _find(records, part="ring_dilated"):
        if r.get("time_over_dense_x_density") is not None:
            lines.append(f"{_verdict(r['time_over_dense_x_density'] <= 1.25)} dilated {r['segment_lengths']}/"
                         f"{r['dilation_rates']} (density {r['density']:.4f}): {r['time_over_dense_x_density']:.2f}x "
                         f"dense time x density, target <= 1.25x")
    return lines


def _fastest(rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r["time_median_s"]) if rows else None


def targets_issue19(records: list[dict], world_size: int) -> list[str]:
    """Issue 19's targets per ringplan scheme over the cases both it and context_parallel measured:
    at least as fast as the fastest context_parallel setting in every case; >= 10% faster somewhere;
    extra peak <= 50% of the smaller context_parallel extra peak in every case; fwd+bwd >= 95% of
    ideal at the largest size (causal and non-causal, where measured). Then the planner's error."""
    if world_size != 2:
        return [f"targets are defined for 2 GPUs; this launch had {world_size}"]
    cases = sorted({_key(r) for r in _find(records, part="context_parallel")}, key=str)
    s_max = max((r["seq_len_tokens"] for r in records), default=0)
    lines, best_gain = [], None
    for scheme in SCHEMES:
        rows = []  # (key, ringplan's fastest layout, fastest cp, smallest cp extra peak)
        for key in cases:
            match = dict(zip(("heads", "seq_len_tokens", "causal", "mode"), key))
            mine, cps = _fastest(_find(records, part=scheme, **match)), _find(records, part="context_parallel", **match)
            if mine is not None:
                peaks = [r["extra_peak_bytes"] for r in cps if r["extra_peak_bytes"] is not None]
                rows.append((key, mine, _fastest(cps), min(peaks) if peaks else None))
        if not rows:
            lines.append(f"NOT MEASURED {scheme}: no case with both it and context_parallel")
            continue
        ratios = [(mine["time_median_s"] / cp["time_median_s"], key) for key, mine, cp, _ in rows]
        worst, best = max(ratios), min(ratios)
        if best_gain is None or best[0] < best_gain[0]:
            best_gain = (best[0], best[1], scheme)
        lines.append(f"{_verdict(worst[0] <= 1.0)} {scheme} at least as fast as the fastest context_parallel in "
                     f"{sum(r <= 1.0 for r, _ in ratios)}/{len(ratios)} cases; worst {worst[0]:.3f}x its time "
                     f"({_case(worst[1])}), best {best[0]:.3f}x ({_case(best[1])})")
        mem = [(mine["extra_peak_bytes"] / peak, key) for key, mine, _, peak in rows
               if peak and mine["extra_peak_bytes"] is not None]
        if mem:
            top = max(mem)
            lines.append(f"{_verdict(top[0] <= 0.5)} {scheme} extra peak <= 50% of context_parallel's in "
                         f"{sum(m <= 0.5 for m, _ in mem)}/{len(mem)} cases; worst {100 * top[0]:.0f}% "
                         f"({_case(top[1])})")
        else:
            lines.append(f"NOT MEASURED {scheme} extra peak vs context_parallel (no GPU memory figures)")
        for r in _find(records, part=scheme, mode="fwd+bwd", seq_len_tokens=s_max):
            if r["pct_of_ideal"] is not None:
                lines.append(f"{_verdict(r['pct_of_ideal'] >= 95)} {scheme} {r['method']} fwd+bwd "
                             f"{_case(_key(r))}: {r['pct_of_ideal']:.1f}% of ideal, target >= 95%")
    if best_gain is not None:
        ratio, key, scheme = best_gain
        lines.insert(0, f"{_verdict(ratio <= 1 / 1.1)} >= 10% faster than the fastest context_parallel somewhere: "
                        f"best {100 * (1 / ratio - 1):.1f}% faster ({scheme}, {_case(key)})")
    for label, name in (("peak memory", "peak_error_pct"), ("step time", "time_error_pct")):
        errs = [abs(r[name]) for r in records if r["part"] in SCHEMES and r.get(name) is not None]
        if errs:
            lines.append(f"planner {label} error over {len(errs)} ringplan cases: median "
                         f"{statistics.median(errs):.1f}%, max {max(errs):.1f}% (indicative; validate is the gauge)")
    return lines


def _case(key: tuple) -> str:
    heads, tokens, causal, mode = key
    return f"{heads} {tokens:,} {'causal' if causal else 'non-causal'} {mode}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ms(r: dict) -> str:
    return f"{r['time_median_s'] * 1e3:,.1f} ms"


def _gb(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 1e9:.2f}"


# ---------------------------------------------------------------- output

PART_LABELS = {"single": "1gpu", "context_parallel": "cp", "ring": "ring", "allgather": "rp allgather",
               "ulysses": "rp ulysses", "ring_dilated": "dilated"}
SHORT_WORDS = (("allgather", "ag"), ("alltoall", "a2a"), ("contiguous", "contig"), ("sdpa_default", "sdpa"),
               ("kv-repeated", "kvH"), ("efficient", "eff"))


def _skipped_by_budget(r: dict) -> bool:
    return r["status"] == "skipped" and r["reason"].startswith("time budget")


def table_rows(records: list[dict], compact: bool = False) -> list[dict]:
    """One row per case (ms, GB = 10⁹ bytes). Compact (stdout): short names, median only, of the
    single-GPU kernels only the baseline, no reasons, no cases the budget skipped."""
    rows, with_baseline = [], {_key(r) for r in records if r.get("is_baseline")}
    for r in records:
        if compact and (_skipped_by_budget(r) or (r["part"] == "single" and not r.get("is_baseline")
                                                 and _key(r) in with_baseline)):
            continue
        ok = r["status"] == "ok"
        name = f"{PART_LABELS[r['part']]} {r['method']}" + ("*" if r.get("is_baseline") else "")
        if r["part"] == "ring_dilated":
            name += f" d={r['density']:.3f}"
        for word, short in SHORT_WORDS if compact else ():
            name = name.replace(word, short)
        ratio = r.get("speedup_vs_single") or r.get("time_over_dense_x_density")
        row = {"contender": name, "heads": r["heads"], "tokens": f"{r['seq_len_tokens']:,}",
               "case": f"{'c' if r['causal'] else 'nc'} {r['mode']}"}
        if compact:
            row["ms"] = f"{r['time_median_s'] * 1e3:,.1f}" if ok else r["status"]
        else:
            row["ms (min-max)"] = f"{r['time_median_s'] * 1e3:,.1f} ({r['time_min_s'] * 1e3:,.1f}-" \
                                  f"{r['time_max_s'] * 1e3:,.1f})" if ok else ""
        row.update({"TFLOP/s": f"{r['tflops_per_gpu']:.0f}" if ok else "",
                    "x 1gpu": f"{ratio:.2f}" + ("/dense" if r["part"] == "ring_dilated" else "") if ratio else "",
                    "% ideal": f"{r['pct_of_ideal']:.0f}" if r.get("pct_of_ideal") and r["part"] != "single" else "",
                    "+GB": _gb(r.get("extra_peak_bytes")) if ok else ""})
        if not compact:
            pred, err_m, err_t = r.get("predicted_peak_bytes"), r.get("peak_error_pct"), r.get("time_error_pct")
            row.update({"pred GB": _gb(pred) if pred else "", "mem err %": f"{err_m:+.1f}" if err_m is not None else "",
                        "time err %": f"{err_t:+.1f}" if err_t is not None else ""})
            row["status"] = "ok" if ok else f"{r['status']}: {r['reason'][:60]}"
        rows.append(row)
    return rows


def markdown_table(records: list[dict], compact: bool = False) -> str:
    from tabulate import tabulate

    rows = table_rows(records, compact)
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) if rows else "(no cases)"


def method_text(options: Options) -> str:
    """How every number was taken, for the provenance."""
    return (f"{options.dtype}, batch 1, random normal inputs; {options.warmup} warm-up + {options.repeats} timed steps "
            "(CUDA events), per step the slowest rank (context_parallel, ring) or rank 0 (single GPU, run on every "
            "rank at once); median, min, max. Extra peak = torch.cuda.max_memory_allocated after "
            "reset_peak_memory_stats (after warm-up) minus memory_allocated then (inputs, and grad_out for "
            "fwd+bwd), max over ranks. FLOPs 4*S^2*H*D forward, causal halved, fwd+bwd 3.5x; per GPU = / ring size. "
            f"Kernel family complete up to {options.family_max_tokens:,} tokens; above, only kernels within "
            f"{options.family_keep_ratio}x of the winner at the group's first size (1.0: the winner only). "
            "context_parallel: F.scaled_dot_product_attention default dispatch (kernel named in notes), "
            "load-balanced when causal, GQA through enable_gqa (else K/V with H heads, noted). "
            "ringplan schemes (ring, rp allgather, rp ulysses): the public functions with backend auto and their "
            "default cross-rank input check; predicted peak = the planner's analytic per-rank terms "
            "(ringplan.memory.cp_terms, theta = 1) against the measured peak allocated (max over ranks); predicted "
            "time = ringplan.time for the local catalog GPU. "
            f"Grid {options.grid}; time budget {options.budget_s:.0f} s.")


def provenance(env: Env, options: Options) -> dict:
    """Hardware, versions, git sha (env RINGPLAN_GIT_SHA first, else git), UTC date, exact command, method."""
    from ringplan_runtime.provenance import current_provenance

    index = env.device.index if env.device.type == "cuda" else None
    prov = current_provenance(method=method_text(options), gpu_count=env.world_size if index is not None else 0,
                              device_index=index, command=options.command or None).as_dict()
    prov["git_sha"] = os.environ.get("RINGPLAN_GIT_SHA") or prov["git_sha"]
    prov["cudnn_version"] = torch.backends.cudnn.version() if index is not None else None
    prov["world_size"] = env.world_size
    prov["environment"] = {name: os.environ.get(name) for name in MULTICAST_OFF_ENV}
    prov["machine"] = machine_info()
    return prov


def machine_info() -> dict:
    """Host, OS, CPU count and every visible GPU (name, memory) of the machine that ran the launch."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "total_memory_bytes": props.total_memory,
                         "multi_processor_count": props.multi_processor_count})
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "gpus": gpus}


def write_outputs(env: Env, options: Options, prov: dict, complete: bool) -> tuple[list[str], str]:
    """Rank 0 writes DIR/bench_runtime.json and DIR/bench_runtime.md atomically; returns (targets, compact table)."""
    records = derive(env.records)
    issue = "19" if options.grid == "issue19" else "6"
    goal_lines = targets_issue19(records, env.world_size) if issue == "19" else \
        targets(records, options.heads[0].label, env.world_size)
    skipped = sum(_skipped_by_budget(r) for r in records)
    notes = [f"{skipped} case(s) skipped by the time budget of {options.budget_s:.0f} s"] if skipped else []
    if not complete:
        notes.append("partial: the launch had not finished when this was written")
    table = markdown_table(records)
    options_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()}
    payload = {"benchmark": "bench_runtime", "complete": complete, "provenance": prov, "options": options_dict,
               "elapsed_s": round(time.monotonic() - env.start_s, 1), "targets": goal_lines, "notes": notes,
               "records": records}
    text = "\n".join([
        "# Runtime benchmark: single GPU vs context_parallel vs ringplan's ring, all-gather and Ulysses", "",
        f"{prov['gpu_name']} x{env.world_size}, driver {prov['driver_version']}, torch {prov['torch_version']}, "
        f"CUDA {prov['cuda_version']}, NCCL {prov['nccl_version']}, git {prov['git_sha'][:12]}, {prov['date_utc']}", "",
        f"Command: `{prov['command']}`", "", f"Method: {prov['method']}", "",
        "`*` marks the single-GPU baseline (fastest kernel); `lb` = context_parallel load balancing; "
        "TFLOP/s per GPU; `x 1gpu` = speedup over the baseline (dilated: time / (dense ring time x density)); "
        "`+GB` = extra peak memory over the inputs, GB = 10^9 bytes, max over ranks; `rp` = ringplan_runtime; "
        "`pred GB` = the planner's per-rank peak, `mem err %` / `time err %` = predicted vs measured peak "
        "allocated and median step time.", "",
        table, "", f"## Targets (issue {issue})", "", *[f"- {line}" for line in goal_lines],
        *(["", "## Notes", "", *[f"- {n}" for n in notes]] if notes else []), ""])
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("bench_runtime.json", json.dumps(payload, indent=1, default=str)),
                          ("bench_runtime.md", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, out / name)
    return goal_lines, markdown_table(records, compact=True)


# ---------------------------------------------------------------- launch

def init_env(options: Options) -> Env:
    """Rank, world size and device from torchrun's environment; NCCL on GPUs, gloo on CPU, with a timeout."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    use_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=options.pg_timeout_s))
    return Env(rank=rank, world_size=world_size, device=device, start_s=time.monotonic())


def run(options: Options) -> tuple[list[dict], list[str], str]:
    """The whole launch on this rank; returns (derived records, target lines, markdown table) on every rank."""
    for name, value in MULTICAST_OFF_ENV.items():
        os.environ.setdefault(name, value)
    watchdog = threading.Timer(options.hard_timeout_s, _hard_exit, args=(options.hard_timeout_s,))
    watchdog.daemon = True
    watchdog.start()
    env = init_env(options)
    env.gpu = local_catalog_gpu(env)
    prov = provenance(env, options) if env.rank == 0 else {}
    goal_lines, table = [], ""
    try:
        for cfg in plan(options, env.world_size):
            for variant in variants(cfg, env, options):
                record = run_variant(variant, cfg, env, options)
                env.records.append(record)
                if variant.part == "single" and cfg.group not in env.family_s and \
                        len(family_kernels(cfg, env, options)) == len(options.kernels) and \
                        variant.method == options.kernels[-1]:
                    env.family_s[cfg.group] = {r["method"]: r["time_median_s"]
                                               for r in env.records[-len(options.kernels):] if r["status"] == "ok"}
                if env.rank == 0:
                    result = _ms(record) if record["times_s"] else record["reason"]
                    print(f"[{time.monotonic() - env.start_s:6.1f} s] {record['part']} {record['method']} "
                          f"{cfg.heads.label} {cfg.seq_len_tokens:,} {'c' if cfg.causal else 'nc'} "
                          f"{_mode(cfg.training)}: {record['status']} {result}", flush=True)
                    write_outputs(env, options, prov, complete=False)
        if env.rank == 0:
            goal_lines, table = write_outputs(env, options, prov, complete=True)
    finally:
        watchdog.cancel()
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return derive(env.records), goal_lines, table


def _hard_exit(limit_s: float) -> None:
    print(f"bench_runtime: hard timeout of {limit_s:g} s reached; results so far are in --out", flush=True)
    os._exit(124)


def _int_list(text: str) -> tuple[int, ...]:
    from ringplan.units import parse_tokens

    return tuple(parse_tokens(part) for part in text.split(",") if part.strip())


def _launch_command() -> str:
    prefix = " ".join(f"{name}={os.environ.get(name, '')}" for name in MULTICAST_OFF_ENV)
    if "LOCAL_WORLD_SIZE" in os.environ:
        return f"{prefix} torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']} {shlex.join(sys.argv)}"
    return f"{prefix} python {shlex.join(sys.argv)}"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for bench_runtime.json and bench_runtime.md (rank 0 writes).")
@click.option("--tokens", default="65536,131072,262144", show_default=True, help="Total tokens S, comma-separated.")
@click.option("--heads", default="32x128,32/8x128", show_default=True,
              help="Head shapes H[/H_kv]xD, comma-separated; the first is the main one (targets, dilated).")
@click.option("--dilated", multiple=True, help="Dilated case 'w1,w2,..:r1,r2,..' at the largest S (repeatable; "
              "default 16384,65536,262144:1,2,4 and 8192,65536,262144:1,4,16).")
@click.option("--parts", default=",".join(PARTS), show_default=True, help="Which contenders to run.")
@click.option("--grid", type=click.Choice(sorted(GRIDS)), default="issue6", show_default=True,
              help="Case matrix and targets: issue6 (with dilated cases) or issue19 (scheme comparison).")
@click.option("--kernels", default=",".join(KERNELS), show_default=True,
              help="Single-GPU kernels to time (the fastest is the baseline), comma-separated.")
@click.option("--causal-layouts", default="contiguous,zigzag", show_default=True,
              help="Layouts of ringplan's schemes for causal cases (non-causal: contiguous).")
@click.option("--single-at", type=click.Choice(["all", "largest-fwd-bwd"]), default="all", show_default=True,
              help="Where the single-GPU baseline runs: every case, or only fwd+bwd at the largest size (the "
                   "%-of-ideal target; saves a third of the launch).")
@click.option("--cpu-smoke", is_flag=True, help="CI smoke run: tiny shapes, fp32, gloo, issue-19 grid; without "
              "torchrun it spawns its 2 ranks itself. Overrides the size and timing options.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True, help="Input dtype.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Warm-up steps per case.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed steps per case.")
@click.option("--budget-s", type=float, default=420.0, show_default=True,
              help="Wall-clock budget from start; cases estimated to overrun it are skipped (and say so).")
@click.option("--pg-timeout-s", type=float, default=180.0, show_default=True, help="Process-group timeout.")
@click.option("--hard-timeout-s", type=float, default=570.0, show_default=True,
              help="Watchdog: the process exits (code 124) after this many seconds, whatever it is doing.")
@click.option("--family-max-tokens", type=int, default=65_536, show_default=True,
              help="Up to this S every SDPA kernel runs; above, only those near the group's winner.")
@click.option("--family-keep-ratio", type=click.FloatRange(1.0), default=1.0, show_default=True,
              help="Above --family-max-tokens, time the kernels within this factor of the group's winner.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="cuda with NCCL, cpu with gloo (CI smoke test).")
def main(out_dir: Path, tokens: str, heads: str, dilated: tuple[str, ...], parts: str, grid: str, kernels: str,
         causal_layouts: str, single_at: str, cpu_smoke: bool, dtype: str, warmup: int, repeats: int, budget_s: float,
         pg_timeout_s: float, hard_timeout_s: float, family_max_tokens: int, family_keep_ratio: float,
         device: str) -> None:
    """Time single-GPU SDPA, PyTorch context_parallel and ringplan's ring, all-gather and Ulysses attention
    in one launch."""
    for name, value in MULTICAST_OFF_ENV.items():
        os.environ.setdefault(name, value)
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    try:
        options = Options(out_dir=out_dir, tokens=_int_list(tokens),
                          heads=tuple(Heads.parse(h) for h in split(heads)), parts=split(parts), grid=grid,
                          kernels=split(kernels), causal_layouts=split(causal_layouts), single_at=single_at,
                          dtype=dtype,
                          warmup=warmup, repeats=repeats, budget_s=budget_s, pg_timeout_s=pg_timeout_s,
                          hard_timeout_s=hard_timeout_s, family_max_tokens=family_max_tokens,
                          family_keep_ratio=family_keep_ratio, device=device, command=_launch_command(),
                          **({"dilated": tuple(_dilated_spec(d) for d in dilated)} if dilated else {}))
        if cpu_smoke:
            options = smoke_options(out_dir, parts=options.parts, command=options.command)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if cpu_smoke and "WORLD_SIZE" not in os.environ:
        spawn_smoke(options)
        payload = json.loads((Path(out_dir) / "bench_runtime.json").read_text())
        print("\n".join(payload["targets"]) + "\n\n" + markdown_table(payload["records"], compact=True), flush=True)
        return
    records, goal_lines, table = run(options)
    if goal_lines or table:
        skipped = sum(_skipped_by_budget(r) for r in records)
        note = f"{skipped} case(s) skipped by the time budget (listed in bench_runtime.md)\n" if skipped else ""
        print("\n" + "\n".join(goal_lines) + "\n\n" + note + table, flush=True)


SMOKE_WORLD_SIZE = 2


def smoke_options(out_dir: Path, **overrides: Any) -> Options:
    """The CPU smoke run: issue 19's grid (+ one dilated case) at 128 tokens, GQA 4/2x16 heads (the GQA
    paths; the second shape of the grid is left out to keep CI short), fp32, gloo, the default SDPA
    dispatch as the single-device baseline; seconds on two idle cores."""
    base = dict(out_dir=Path(out_dir), tokens=(128,), heads=(Heads.parse("4/2x16"),),
                dilated=(((32, 64, 128), (1, 2, 4)),), grid="issue19", kernels=("sdpa_default",),
                causal_layouts=("zigzag",), dtype="fp32", warmup=1, repeats=1, budget_s=120.0, pg_timeout_s=60.0,
                hard_timeout_s=170.0, device="cpu")
    return Options(**{**base, **overrides})


def _smoke_worker(rank: int, world_size: int, port: int, options: Options) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run(options)


def spawn_smoke(options: Options, nprocs: int = SMOKE_WORLD_SIZE) -> None:
    """Run ``options`` on ``nprocs`` spawned gloo ranks on this machine (no torchrun needed)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The spawned interpreters take this process's sys.path and unpickle the worker and Options by module
    # name: imported as ``bench_runtime`` (tests), that needs benchmarks/ on the path (appended: no shadowing).
    for path in (str(REPO), str(Path(__file__).resolve().parent)):
        if path not in sys.path:
            sys.path.append(path)
    mp.start_processes(_smoke_worker, args=(nprocs, port, options), nprocs=nprocs, start_method="spawn")


def _dilated_spec(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    segments, _, rates = text.partition(":")
    result = (_int_list(segments), _int_list(rates))
    if not result[0] or len(result[0]) != len(result[1]):
        raise ValueError(f"dilated case {text!r}: expected 'w1,w2:r1,r2' with as many rates as segments")
    return result


if __name__ == "__main__":
    main()
