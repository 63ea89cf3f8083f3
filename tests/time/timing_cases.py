"""Shared inputs of the time-model tests: attention workloads and synthetic H100 timing profiles
synthesised from known coefficients (α, β, F, kernel overhead, merge rate), so a prediction's
numbers can be computed by hand."""

import json

from ringplan.time import kernels as cp
from ringplan.workload import AttentionPattern, AttentionShape, Workload

H100 = "NVIDIA H100 80GB HBM3"
H100_PEAK_FLOPS = 989.5e12
PROVENANCE = {"gpu_driver_name": H100, "driver_version": "580", "torch_version": "2.11", "nccl_version": "2.28",
              "cuda_version": "13.0", "git_sha": "abc", "date": "2026-11-25T00:00:00+00:00", "command": "synthetic",
              "method": "synthesised from known coefficients"}
ALPHA, BETA, TFLOPS, KERNEL_OVERHEAD = 50e-6, 200e9, 400e12, 20e-6
MERGE_OVERHEAD_S, MERGE_BYTES_PER_S = 5e-6, 2e12
SIZES = (4096, 16384, 65536)


def attention_workload(seq, *, heads=32, head_dim=128, kv_heads=None, causal=False, training=False, **pattern):
    """A bf16 batch-1 workload of ``seq`` tokens (32×128 heads unless told)."""
    return Workload(seq_len_tokens=seq, shape=AttentionShape(n_heads=heads, head_dim=head_dim, n_kv_heads=kv_heads),
                    pattern=AttentionPattern(causal=causal, **pattern), training=training)


def write_timing_profiles(directory):
    """Synthetic p2p + kernel profiles of the H100 from known α, β, F and overheads (cudnn, 32×128,
    ``SIZES`` tokens, forward and 2.5× backward, causal and not, and the merge)."""
    p2p = [{"message_bytes": 2**k, "seconds_median": ALPHA + 2**k / BETA, "repeats": 5} for k in range(12, 31, 2)]
    kernels = []
    for n in SIZES:
        for causal in (False, True):
            flops = cp.attention_forward_flops(batch=1, n_heads=32, head_dim=128, q_tokens=n, kv_tokens=n, causal=causal)
            for pass_name, factor in (("forward", 1.0), ("backward", 2.5)):
                kernels.append({"op": "attention", "backend": "cudnn", "pass": pass_name, "causal": causal, "dtype": "bf16",
                                "batch": 1, "n_heads": 32, "n_kv_heads": 32, "head_dim": 128, "q_tokens": n,
                                "kv_tokens": n, "seconds_median": KERNEL_OVERHEAD + factor * flops / TFLOPS, "repeats": 5})
        moved = cp.merge_bytes(batch=1, n_heads=32, head_dim=128, q_tokens=n, dtype_bytes=2)
        kernels.append({"op": "merge", "dtype": "bf16", "batch": 1, "n_heads": 32, "head_dim": 128, "q_tokens": n,
                        "seconds_median": MERGE_OVERHEAD_S + moved / MERGE_BYTES_PER_S, "repeats": 5})
    (directory / "p2p.json").write_text(json.dumps({"schema": "ringplan.p2p/1", "provenance": PROVENANCE, "rows": p2p,
                                                    "link": {"scope": "intra_node", "world_size": 2}}))
    (directory / "kernels.json").write_text(json.dumps({"schema": "ringplan.kernels/1", "provenance": PROVENANCE,
                                                        "rows": kernels}))
    return directory
