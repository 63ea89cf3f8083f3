"""Host time of a whole-model step: the kernels eager PyTorch launches one by one, and what each costs the host.

The runtime (``ringplan_runtime.transformer``, ``tiling``, ``stack_parallel``, ``ring_attention``) runs
eager PyTorch without CUDA graphs: every operator goes through Python, the dispatcher and autograd
before its kernel is queued. In the measured whole-model runs this host time is not hidden behind
the GPU: the step time grows by about the same few microseconds per launched kernel whatever the
kernels' sizes (``benchmarks/results/stack_accuracy.md``: the 28-layer qwen3-0.6b at S = 4,096
ran 28% longer than its kernels' GPU time). So the step pays

    host launch time = kernels launched in one step × host seconds per kernel

(``host_launch_s``), added to the device time. Counts are per operator call as the runtime's code
issues them (``KERNELS``), not per CUDA launch inside one call (a foreach op or an NCCL call that
launches several kernels from C++ costs the host about one dispatch). Pure Python: no numpy.
"""

from __future__ import annotations

from ringplan.stack import StackWorkload, tokens_per_rank

#: Host seconds per launched operator in eager PyTorch (Python + dispatcher + autograd + cudaLaunchKernel).
#: Source: stated public figure — PyTorch's performance tuning guide and the CUDA-graphs blog
#: (pytorch.org/blog/accelerating-pytorch-with-cuda-graphs: "the CPU overhead of launching each kernel,
#: ~ several microseconds … up to 10 µs with the Python framework") — taken at 10 µs. Checked, not fitted,
#: against the measured stack rows: a least-squares fit of (measured − predicted) step time on the kernel
#: count over the rows ``benchmarks/stack_accuracy.py`` fits memory on gives ``fitted_host_s_per_kernel``
#: (reported there next to this figure).
DEFAULT_HOST_S_PER_KERNEL = 10e-6

#: Operator calls (≈ kernels) of one use of each runtime piece, (forward, backward), counted from the code:
#: rms_norm — ``_RMSNorm``: forward _wide, pow, mean, add_, rsqrt, x32·rstd, .to, weight· (8); backward
#:   _wide(x), ·rstd, _wide(grad), grad·xhat, sum, .to, _wide(w), grad·w, g·xhat, mean, xhat·mean, −, rstd·,
#:   .to (14);
#: linear — one GEMM forward, input and weight gradient GEMMs backward;
#: rope — ``_RoPE`` per tensor: x·cos, neg, cat, addcmul_ (4); grad·cos, grad·sin, neg, cat, add (5);
#: swiglu — ``_SwiGLU``: silu, · (2); ·silu, silu, ·up, silu_backward (4);
#: residual — the two adds (2); backward the gradient sums of tensors with several users (5);
#: attention_step — one ring step's kernel call (2: the kernel and its lse), its merge (``merge_``:
#:   logaddexp, .to, ==, masked_fill, −, exp, −, exp, mul_, addcmul_, copy_: 11, the first step 2 copies)
#:   and the K/V exchange (send/recv, wait: 2); backward the kernel (3), dq/dk/dv adds (3), the K/V and
#:   dK/dV exchanges (4);
#: fsdp_unit — FSDP2 per unit: all-gather copy-in, all-gather, copy-out (3); backward the re-gather (3),
#:   reduce-scatter copy-in, reduce-scatter, divide, cast (4);
#: loss_chunk — per loss tile: head GEMM, fp32 cast, log_softmax, nll, sum (5); backward the recomputed
#:   forward is counted apart, then nll backward (2), log_softmax backward, cast, two head GEMMs (5);
#: adamw — one foreach AdamW step over all tensors (``torch.optim.adam._multi_tensor_adam``): step +1,
#:   mul_, lerp_, mul_, addcmul_, sqrt, div_, add_, addcdiv_, and the bias corrections (≈ 12 dispatches).
KERNELS: dict[str, tuple[int, int]] = {
    "rms_norm": (8, 14), "linear": (1, 2), "rope": (4, 5), "swiglu": (2, 4), "residual": (2, 5),
    "attention_step": (15, 10), "fsdp_unit": (3, 7), "loss_chunk": (5, 7), "adamw": (12, 0),
}


def block_kernels(w: StackWorkload) -> tuple[int, int, int]:
    """(forward, backward, recomputed-forward) operator calls of one block of ``w`` (``KERNELS``).

    A block: two RMSNorms (and two q/k norms when the model has them), q, k, v, o and the MLP's
    linears (tiled MLP: per tile), RoPE on q and k, the SwiGLU product, two residual adds, and the
    ring attention's P steps. Checkpointing runs the forward again in backward: ``full`` all of it,
    ``selective`` all but the attention core (``ringplan_runtime.transformer.Block``). A tiled MLP's
    backward recomputes its tiles' forward too."""
    model, s, p = w.model, w.settings, w.layout.ring_size
    tiles = 1 if s.mlp_tile_tokens is None else -(-tokens_per_rank(w) // s.mlp_tile_tokens)
    norms = 2 + (2 if model.qk_norm else 0)
    mlp = tuple(tiles * (3 * lin + act) for lin, act in zip(KERNELS["linear"], KERNELS["swiglu"]))
    rest = tuple(norms * n + 4 * lin + 2 * rope + res for n, lin, rope, res in
                 zip(KERNELS["rms_norm"], KERNELS["linear"], KERNELS["rope"], KERNELS["residual"]))
    attention = tuple(p * k for k in KERNELS["attention_step"])
    forward, backward = rest[0] + mlp[0] + attention[0], rest[1] + mlp[1] + attention[1]
    again = {"none": 0, "selective": forward - attention[0], "full": forward}[s.checkpointing]
    tile_again = tiles * (3 + 2) if s.mlp_tile_tokens is not None and s.checkpointing == "none" else 0
    return forward, backward, again + tile_again


def step_kernels(w: StackWorkload) -> int:
    """Operator calls the host issues in one step of ``w``: L blocks (``block_kernels``), the FSDP2
    units' collectives and copies (L blocks, embedding, head, root), the embedding and final norm,
    and in training the loss tiles (chunked: each recomputed in backward) and one foreach AdamW step.
    Prefill runs the forward only (no FSDP, no loss). Ignores the handful of host syncs and scalar ops."""
    forward, backward, again = block_kernels(w)
    layers, norm = w.model.n_layers, KERNELS["rms_norm"]
    if not w.training:
        return layers * forward + 1 + norm[0]
    units = layers + 3
    chunk = min(w.settings.loss_chunk_tokens, w.batch * tokens_per_rank(w))
    chunks = -(-w.batch * tokens_per_rank(w) // chunk) if w.settings.loss == "chunked" else 1
    loss_fwd, loss_bwd = KERNELS["loss_chunk"]
    loss = chunks * (loss_fwd + loss_bwd + (loss_fwd if w.settings.loss == "chunked" else 0))
    fsdp = units * sum(KERNELS["fsdp_unit"])
    return layers * (forward + backward + again) + fsdp + loss + 2 + sum(norm) + KERNELS["adamw"][0]


def host_launch_s(kernels: int, host_s_per_kernel: float = DEFAULT_HOST_S_PER_KERNEL) -> float:
    """Seconds the host spends launching ``kernels`` operators, ``kernels × host_s_per_kernel``, all of it
    exposed (eager PyTorch, no CUDA graphs; see the module docstring). Negative input: ValueError."""
    if kernels < 0 or not host_s_per_kernel >= 0:
        raise ValueError(f"kernels and host seconds per kernel must be >= 0, got {kernels}, {host_s_per_kernel}")
    return kernels * float(host_s_per_kernel)


#: Extra step time, as a fraction of the step's device time, when the peak allocation is above the
#: memory model's ``PRESSURE_FRACTION`` of usable memory: PyTorch's caching allocator then fails cudaMalloc,
#: synchronises the device, frees its cached blocks and retries (``release_cached_blocks``), again at every
#: allocation that does not fit — host stalls the GPU waits through. Source: fitted, the mean of
#: (measured − predicted without it) / device time over the pressure rows that ``benchmarks/stack_accuracy.py``
#: fits on (2nd, 4th, … row of each series held out): h100 llama-3-8b@4L S=32,768 and @8L S=24,576, h200
#: llama-3-8b@4L S=163,840 and @8L S=147,456, all ``full`` loss, full checkpointing (0.19, 0.15, 0.14, 0.07; mean 0.138).
#: The held-out pressure rows (h100 @4L S=36,864, @8L S=28,672) check it. Ignores how many retries a step makes.
ALLOCATOR_RETRY_FRACTION = 0.14


def allocator_retry_s(device_s: float, fraction: float = ALLOCATOR_RETRY_FRACTION) -> float:
    """Seconds the caching allocator's retries add to a step of ``device_s`` seconds of device time whose
    peak allocation is at the capacity boundary: ``fraction × device_s`` (``ALLOCATOR_RETRY_FRACTION``)."""
    if device_s < 0 or not fraction >= 0:
        raise ValueError(f"device seconds and fraction must be >= 0, got {device_s}, {fraction}")
    return fraction * device_s
