"""Probe the GPU machine's torch build: SDPA ops that return the LSE, their schemas, LSE units and
shapes, GQA support, strided-input support, backward ops, NCCL/NVML/context-parallel availability.

Run: python3 benchmarks/probe/probe_ops.py  (one GPU is enough). Prints a report; touches no files.
"""
import math
import traceback

import torch

aten = torch.ops.aten
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0), "count", torch.cuda.device_count(), "cap", torch.cuda.get_device_capability(0))
try:
    print("nccl", torch.cuda.nccl.version())
except Exception as exc:
    print("nccl ?", exc)
for name in ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_flash_attention_for_cpu"]:
    try:
        print("SCHEMA", getattr(aten, name).default._schema)
    except Exception as exc:
        print("SCHEMA", name, "missing", exc)

torch.manual_seed(0)
dev = "cuda"
B, S, H, Hkv, D = 2, 1024, 8, 2, 128


def ref_lse(q, k, scale):
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    return torch.logsumexp(s, -1)


def try_op(label, fn):
    try:
        res = fn()
        print(label, "OK", res)
    except Exception as exc:
        print(label, "FAIL", type(exc).__name__, str(exc).splitlines()[0][:200])


q = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # strided [B,H,S,D]
k = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
v = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
scale = 1 / math.sqrt(D)
lse_ref = ref_lse(q, k, scale)


def describe(out, lse):
    lse2 = lse.float()
    if lse2.dim() == 4:
        lse2 = lse2.squeeze(-1)
    lse2 = lse2[..., :S]
    err_ln = (lse2 - lse_ref).abs().max().item()
    err_log2 = (lse2 - lse_ref / math.log(2)).abs().max().item()
    return f"out {tuple(out.shape)} {out.dtype} stride {out.stride()} lse {tuple(lse.shape)} {lse.dtype} stride {lse.stride()} err_vs_ln {err_ln:.3g} err_vs_log2 {err_log2:.3g}"


try_op("cudnn strided", lambda: describe(*aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]))
try_op("cudnn contig", lambda: describe(*aten._scaled_dot_product_cudnn_attention(q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, False, False)[:2]))
try_op("flash strided", lambda: describe(*aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False)[:2]))
try_op("efficient strided", lambda: describe(*aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]))
# causal with Sq != Sk (which diagonal?)
qh = q[:, :, : S // 2]
try_op("cudnn causal Sq<Sk", lambda: tuple(aten._scaled_dot_product_cudnn_attention(qh, k, v, None, True, 0.0, True, False)[0].shape))
# GQA
kg = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
vg = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
try_op("cudnn gqa", lambda: tuple(aten._scaled_dot_product_cudnn_attention(q, kg, vg, None, True, 0.0, False, False)[0].shape))
try_op("flash gqa", lambda: tuple(aten._scaled_dot_product_flash_attention(q, kg, vg, 0.0, False)[0].shape))
try_op("efficient gqa", lambda: tuple(aten._scaled_dot_product_efficient_attention(q, kg, vg, None, True, 0.0, False)[0].shape))
# backward ops
try:
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    out, lse = res[0], res[1]
    go = torch.randn_like(out)
    print("cudnn fwd returns", len(res), [getattr(t, "shape", t) for t in res])
    g = aten._scaled_dot_product_cudnn_attention_backward(go, q, k, v, out, lse, res[6], res[7], None, res[2], res[3], res[4], res[5], 0.0, False)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr)
    o.backward(go.float())
    for name, a, b in zip("qkv", g, (qr.grad, kr.grad, vr.grad)):
        print("cudnn bwd d" + name, tuple(a.shape), "rel err", ((a.float() - b).norm() / b.norm()).item())
except Exception:
    print("cudnn bwd FAIL", traceback.format_exc()[-600:])
try:
    res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False)
    print("flash fwd returns", len(res), [getattr(t, "shape", t) for t in res])
except Exception:
    print("flash FAIL", traceback.format_exc()[-400:])
try:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    print("nvml", pynvml.nvmlDeviceGetName(h), pynvml.nvmlSystemGetDriverVersion(), pynvml.nvmlDeviceGetMemoryInfo(h).used)
except Exception as exc:
    print("nvml FAIL", exc)
try:
    from torch.distributed.tensor.experimental import context_parallel
    import torch.distributed.tensor.experimental._attention as att
    import inspect
    print("context_parallel", inspect.signature(context_parallel))
    print("attention module names", [n for n in dir(att) if not n.startswith("__")][:80])
except Exception as exc:
    print("context_parallel FAIL", exc)
