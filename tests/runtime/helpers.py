"""Shared pieces of the runtime tests: case descriptions, seeded inputs, and the per-rank checks.

Every check runs the runtime on this rank's chunk, takes gradients with a random upstream
gradient, and compares the local output and gradients with the matching rows of the dense
float64 reference (``ringplan_runtime.reference``) computed on the full sequence. The workers
return errors; the test processes assert, so a failure names the case and the quantity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from ringplan_runtime import RingDilatedAttention, ring_attention, ring_dilated_attention, shard_sequence
from ringplan_runtime.reference import reference_attention, reference_module_forward, relative_error

REL_TOL_FP32 = 1e-5  # norm-wise relative error allowed for fp32 runs vs the float64 reference (issue 3)
REL_TOL_BF16 = 1e-2  # bf16 runs vs an fp32/float64 reference (issue 3, GPU)


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One attention call to check; ``kind`` is 'ring', 'dilated' or 'module'."""

    name: str
    kind: str = "ring"
    batch: int = 1
    seq_len_tokens: int = 64
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    causal: bool = False
    layout: str = "contiguous"
    segment_lengths: tuple[int, ...] = ()
    dilation_rates: tuple[int, ...] = ()
    hilbert: bool = False
    backend: str = "auto"
    seed: int = 0
    extra: dict = field(default_factory=dict)


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def full_inputs(case: Case, *, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Seeded full-sequence q, k, v and upstream gradient (the same on every rank; never zeros)."""
    gen = torch.Generator().manual_seed(1000 + case.seed)
    shapes = {"q": case.heads, "k": case.kv_heads, "v": case.kv_heads, "dout": case.heads}
    return {name: torch.randn(case.batch, case.seq_len_tokens, heads, case.head_dim, generator=gen)
            .to(device=device, dtype=dtype) for name, heads in shapes.items()}


def _run_runtime(case: Case, q, k, v):
    if case.kind == "dilated":
        return ring_dilated_attention(q, k, v, segment_lengths=case.segment_lengths,
                                      dilation_rates=case.dilation_rates, causal=case.causal,
                                      backend=case.backend, hilbert=case.hilbert)
    return ring_attention(q, k, v, causal=case.causal, layout=case.layout, backend=case.backend)


def attention_errors(case: Case, *, dtype=torch.float32, device="cpu") -> dict[str, float]:
    """Relative errors of this rank's out, dq, dk, dv against the reference rows of its chunk."""
    rank, world = rank_and_size()
    full = full_inputs(case, dtype=dtype, device=device)
    layout = "contiguous" if case.kind == "dilated" else case.layout

    def local(t):
        return shard_sequence(t, rank=rank, ring_size=world, layout=layout).contiguous()

    q, k, v = (local(full[name]).requires_grad_() for name in ("q", "k", "v"))
    out = _run_runtime(case, q, k, v)
    out.backward(local(full["dout"]))
    ref_in = {name: full[name].detach().double().requires_grad_() for name in ("q", "k", "v")}
    ref = reference_attention(ref_in["q"], ref_in["k"], ref_in["v"], causal=case.causal,
                              segment_lengths=case.segment_lengths, dilation_rates=case.dilation_rates)
    ref.backward(full["dout"].double())
    errors = {"out": relative_error(out, local(ref))}
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        errors["d" + name] = relative_error(tensor.grad, local(ref_in[name].grad))
    errors["dtype_ok"] = float(out.dtype == dtype and all(t.grad.dtype == dtype for t in (q, k, v)))
    return errors


def module_errors(case: Case) -> dict[str, float]:
    """Errors of ``RingDilatedAttention`` (local out, x grad, parameter grads summed over ranks) vs the reference."""
    rank, world = rank_and_size()
    torch.manual_seed(case.seed)  # identical weights on every rank
    module = RingDilatedAttention(case.heads * case.head_dim, case.heads, case.kv_heads, case.segment_lengths,
                                  case.dilation_rates, causal=case.causal, layout=case.layout, backend=case.backend,
                                  hilbert=case.hilbert, bias=case.extra.get("bias", True))
    gen = torch.Generator().manual_seed(2000 + case.seed)
    x = torch.randn(case.batch, case.seq_len_tokens, module.embed_dim, generator=gen)
    dout = torch.randn(case.batch, case.seq_len_tokens, module.embed_dim, generator=gen)
    x_run = x.clone().requires_grad_()
    if case.extra.get("already_split"):
        local_x = shard_sequence(x_run, rank=rank, ring_size=world, layout=case.layout)
        out = module(local_x, already_split=True)
    else:
        out = module(x_run)
    out.backward(shard_sequence(dout, rank=rank, ring_size=world, layout=case.layout))
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    grads["x"] = x_run.grad.clone()
    if world > 1:
        for tensor in grads.values():
            dist.all_reduce(tensor)  # the caller's DDP would do this
    module.zero_grad()
    x_ref = x.clone().double().requires_grad_()
    ref = reference_module_forward(module, x_ref)
    ref.backward(dout.double())
    errors = {"out": relative_error(out, shard_sequence(ref, rank=rank, ring_size=world, layout=case.layout))}
    errors["dx"] = relative_error(grads.pop("x"), x_ref.grad)
    # Per layer, weight and bias together: the k_proj bias gradient is 0 in exact arithmetic (softmax
    # is invariant to a shift of every key's score), so alone its relative error is meaningless.
    params = dict(module.named_parameters())
    for layer in ("q_proj", "k_proj", "v_proj", "out_proj"):
        names = [name for name in params if name.startswith(layer + ".")]
        errors["d" + layer] = relative_error(torch.cat([grads[n].flatten() for n in names]),
                                             torch.cat([params[n].grad.flatten() for n in names]))
    return errors


def with_seed(cases: list[Case]) -> list[Case]:
    """Give each case its own seed (fresh random inputs per case)."""
    return [replace(case, seed=index + 1) for index, case in enumerate(cases)]


def hilbert_errors(case: Case) -> dict[str, float]:
    """Relative differences between Hilbert order on and off (same inputs): rounding only."""
    rank, world = rank_and_size()
    full = full_inputs(case)
    runs = []
    for hilbert in (True, False):
        q, k, v = (shard_sequence(full[n], rank=rank, ring_size=world, layout="contiguous").contiguous()
                   .requires_grad_() for n in ("q", "k", "v"))
        out = ring_dilated_attention(q, k, v, segment_lengths=case.segment_lengths,
                                     dilation_rates=case.dilation_rates, hilbert=hilbert, backend=case.backend)
        out.backward(shard_sequence(full["dout"], rank=rank, ring_size=world, layout="contiguous"))
        runs.append((out, q.grad, k.grad, v.grad))
    return {name: relative_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), *runs)}


CHECKS = {"ring": attention_errors, "dilated": attention_errors, "module": module_errors,
          "hilbert": hilbert_errors}


def run_cases(cases: list[Case]) -> dict[str, dict[str, float]]:
    """Body of every spawned rank: errors per case (one thread per rank: CI has 2 cores)."""
    torch.set_num_threads(1)
    return {case.name: CHECKS[case.kind](case) for case in cases}


def worst_over_ranks(per_rank: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Largest error of each quantity over the ranks (``dtype_ok``: the smallest)."""
    merged: dict[str, dict[str, float]] = {}
    for result in per_rank:
        for name, errors in result.items():
            slot = merged.setdefault(name, {})
            for key, value in errors.items():
                pick = min if key == "dtype_ok" else max
                slot[key] = pick(slot.get(key, value), value)
    return merged


def bad_input_calls(rank: int, world: int):
    """(label, call) pairs that must raise ``ValueError`` before any communication, on every rank."""
    from ringplan_runtime import RingDilatedAttention as Module

    def qkv(n, heads=4, kv_heads=4, kv_tokens=None, dtype=torch.float32):
        return (torch.randn(1, n, heads, 8, dtype=dtype), torch.randn(1, kv_tokens or n, kv_heads, 8, dtype=dtype),
                torch.randn(1, kv_tokens or n, kv_heads, 8, dtype=dtype))

    def dilated(n, segments, rates, heads=4, kv_heads=4, **kw):
        return lambda: ring_dilated_attention(*qkv(n, heads, kv_heads), segment_lengths=segments,
                                              dilation_rates=rates, **kw)

    calls = [
        ("heads not a multiple of kv heads", lambda: ring_attention(*qkv(8, heads=3, kv_heads=2))),
        ("k and q token counts differ", lambda: ring_attention(*qkv(8, kv_tokens=6))),
        ("zigzag needs an even local chunk", lambda: ring_attention(*qkv(7), causal=True, layout="zigzag")),
        ("unknown layout", lambda: ring_attention(*qkv(8), layout="striped")),
        ("forced flash on CPU", lambda: ring_attention(*qkv(8), backend="flash")),
        ("forced cudnn on CPU", lambda: ring_dilated_attention(*qkv(16), segment_lengths=(8,), dilation_rates=(1,),
                                                               backend="cudnn")),
        ("segment does not divide the sequence", dilated(10, (16,), (1,))),
        ("segment/rate lists differ in length", dilated(16, (8, 16), (1,))),
        ("rate does not divide the heads", dilated(16, (16,), (3,), heads=6, kv_heads=6)),
        ("rate does not divide the kv heads", dilated(16, (16,), (2,), heads=4, kv_heads=1)),
        ("segment not a multiple of its rate", dilated(16, (6,), (4,))),
        ("hilbert with causal", dilated(16, (8,), (1,), causal=True, hilbert=True)),
        ("empty segment list", dilated(16, (), ())),
        ("module: embed_dim not a multiple of heads", lambda: Module(30, 4)),
        ("module: hilbert without segments", lambda: Module(32, 4, hilbert=True)),
        ("module: dilated with the zigzag layout", lambda: Module(32, 4, 4, (8,), (1,), layout="zigzag")),
    ]
    if world > 1:
        calls += [
            ("sequence not divisible by the ring", lambda: shard_sequence(torch.randn(1, 4 * world + 1, 2),
                                                                          rank=rank, ring_size=world,
                                                                          layout="contiguous")),
            ("module: sequence not divisible by 2P (zigzag)",
             lambda: Module(32, 4, layout="zigzag")(torch.randn(1, 2 * world + world, 32))),
            ("segments and local chunk do not nest", dilated(12, (8,), (1,))),
        ]
    return calls


def run_bad_inputs() -> list[tuple[str, str, str, int]]:
    """Body of every spawned rank: (label, exception type, message, P2P batches started) per bad call."""
    torch.set_num_threads(1)
    rank, world = rank_and_size()
    started = [0]
    original = dist.batch_isend_irecv

    def counting(ops):
        started[0] += 1
        return original(ops)

    dist.batch_isend_irecv = counting
    outcomes = []
    try:
        for label, call in bad_input_calls(rank, world):
            started[0] = 0
            try:
                call()
                outcomes.append((label, "none", "", started[0]))
            except Exception as error:  # noqa: BLE001 -- the test checks the type
                outcomes.append((label, type(error).__name__, str(error), started[0]))
    finally:
        dist.batch_isend_irecv = original
    return outcomes


def rank_and_args(*args):
    """Spawned body: (rank, world size, args) -- checks results come back in rank order."""
    rank, world = rank_and_size()
    return rank, world, args


def raise_on_rank_one_else_block():
    """Spawned body: rank 1 raises at once; the others block in a barrier that rank 1 never joins."""
    if dist.get_rank() == 1:
        raise KeyError("injected failure on rank 1")
    dist.barrier()
    return "unreachable"


def exit_on_last_rank():
    """Spawned body: the last rank dies without a Python exception (os._exit)."""
    import os

    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(3)
    dist.barrier()


def sleep_forever():
    import time

    time.sleep(3600)


def ring_exchange_roundtrip() -> list[float]:
    """Spawned body: pass each rank's id around the whole ring with RingComm; every rank sees every id."""
    from ringplan_runtime.comm import RingBuffers, RingComm

    rank, world = rank_and_size()
    comm = RingComm(range(world))
    current = torch.full((3,), float(rank))
    buffers = RingBuffers([current], 2)
    seen = [current[0].item()]
    for _ in range(world - 1):
        (incoming,) = buffers.next_set()
        comm.send_recv(current, incoming)
        comm.commit()
        comm.wait()
        current = incoming
        seen.append(current[0].item())
    return seen


def run_gpu_cases(cases: list[Case], backends: tuple[str, ...]) -> dict:
    """Body of every spawned NCCL rank: bf16 errors per (case, backend) vs the float64 reference.

    A backend this GPU cannot run is reported as skipped (with the reason); an exception in a case
    is recorded as that case's error text (the test prints the table, then fails).
    """
    from ringplan_runtime import select_backend
    from ringplan_runtime.kernels import native_gqa

    rank, _ = rank_and_size()
    device = torch.device("cuda", torch.cuda.current_device())
    report = {"auto": select_backend(device, torch.bfloat16, cases[0].head_dim), "skipped": {}, "gqa": {},
              "errors": {}}
    for backend in backends:
        try:
            select_backend(device, torch.bfloat16, cases[0].head_dim, backend)
        except ValueError as error:
            report["skipped"][backend] = str(error)
            continue
        report["gqa"][backend] = {direction: native_gqa(backend, str(device), torch.bfloat16, direction)
                                  for direction in ("forward", "backward")}
        for case in cases:
            try:
                errors = attention_errors(replace(case, backend=backend), dtype=torch.bfloat16, device=device)
            except Exception as error:  # noqa: BLE001 -- reported in the table, then the test fails
                errors = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            report["errors"][(case.name, backend)] = errors
        torch.cuda.synchronize()
    report["rank"] = rank
    return report


def sleep_after_writing_pid(directory: str):
    """Spawned body: write ``rank{r}.pid`` (this process's pid) into ``directory``, then sleep."""
    import os
    import time

    rank, _ = rank_and_size()
    path = os.path.join(directory, f"rank{rank}.pid")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(3600)


def store_listen_addresses() -> dict:
    """Spawned body: ``MASTER_ADDR``, the local addresses of the sockets listening on ``MASTER_PORT``
    (the spawner's store) and those of this rank's own listening sockets (gloo's), read from
    ``/proc/net/tcp`` and ``/proc/net/tcp6`` (one network namespace)."""
    import os

    port = int(os.environ["MASTER_PORT"])
    own = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            own.add(link[len("socket:["):-1])
    store, mine = [], []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table, encoding="utf-8") as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                address, port_hex = fields[1].split(":")
                if fields[3] != "0A":  # 0A: LISTEN
                    continue
                if int(port_hex, 16) == port:
                    store.append(_proc_net_address(address))
                if fields[9] in own:
                    mine.append(_proc_net_address(address))
    return {"master_addr": os.environ["MASTER_ADDR"], "listening": store, "rank_listening": sorted(set(mine))}


def _proc_net_address(hex_address: str) -> str:
    """``0100007F`` → ``127.0.0.1`` (IPv4, little-endian words); IPv6 as its 32 hex digits."""
    if len(hex_address) == 8:
        return ".".join(str(int(hex_address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return hex_address


def stack_sweep_runs(argvs: list[list[str]]) -> None:
    """Spawned body: ``python -m ringplan_runtime.stack_sweep`` as torchrun runs it (``RANK`` is set),
    once per argv, in one job; the process group the spawner made outlives each run."""
    from ringplan_runtime import stack_sweep

    torch.set_num_threads(1)
    original = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        for argv in argvs:
            stack_sweep.main(argv)
    finally:
        dist.destroy_process_group = original


#: One input rank 1 changes in ``inconsistent_call``: name -> what rank 1 passes instead.
INCONSISTENT_INPUTS = {
    "tokens": {"n": 16}, "kv_heads": {"kv_heads": 4}, "dtype": {"dtype": torch.float64}, "causal": {"causal": True},
    "int64 on one rank": {"dtype": torch.int64}, "segments": {"segments": (16,)},
}


def inconsistent_calls(whiches: list[str]) -> dict[str, tuple[str, str]]:
    """Spawned body: per name in ``whiches``, a ring attention call where rank 1's input of that name
    differs from rank 0's (``INCONSISTENT_INPUTS``), in one group one after the other (a refused call
    leaves the group usable); the (exception type, message) this rank got, ("none", "") without one."""
    torch.set_num_threads(1)
    rank, _ = rank_and_size()
    outcomes = {}
    for which in whiches:
        given = {"n": 8, "kv_heads": 2, "dtype": torch.float32, "causal": False, "segments": (8,)}
        if rank == 1:
            given.update(INCONSISTENT_INPUTS[which])
        q, k, v = (torch.ones(1, given["n"], heads, 8).to(given["dtype"])
                   for heads in (4, given["kv_heads"], given["kv_heads"]))
        try:
            if which == "segments":
                ring_dilated_attention(q, k, v, segment_lengths=given["segments"], dilation_rates=(1,))
            else:
                ring_attention(q, k, v, causal=given["causal"])
            outcomes[which] = ("none", "")
        except Exception as error:  # noqa: BLE001 -- the test checks the type and the words
            outcomes[which] = (type(error).__name__, str(error))
    return outcomes
