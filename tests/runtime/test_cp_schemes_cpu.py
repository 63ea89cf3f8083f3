"""All-gather, Ulysses and hybrid (Ulysses × ring) context-parallel attention on CPU (gloo, spawned ranks).

One spawned group per world size W = 1, 2, 4 runs every case of every scheme that fits W (fresh
seeded inputs per case): all-gather and Ulysses over the whole group (CP = W), hybrid on every
U × R grid of W (U 2 × R 2 at W = 4). Output AND gradients of q, k, v must match the dense
float64 reference within ``REL_TOL_FP32``; dtypes are kept. Bad inputs raise ``ValueError`` on every
rank before any collective or point-to-point exchange.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from ringplan_runtime import spawn
from runtime.cp_helpers import run_world
from runtime.helpers import REL_TOL_FP32, Case, with_seed, worst_over_ranks

WORLD_SIZES = (1, 2, 4)
SPAWN_TIMEOUT_S = 240.0
BAD_INPUT_GRIDS = (2, 1)  # at W = 4: U 2 × R 2, and U 1 × R 4 (any head count splits over U = 1)
#: The tracker's shape at W = 2 (B = 1, S = 256, H = 4, H_kv = 2, D = 32, fp32): non-causal and causal zigzag.
PEAK_CASES = tuple(replace(Case(name=name, seq_len_tokens=256, heads=4, kv_heads=2, head_dim=32, **flags), seed=7)
                   for name, flags in (("dense_gqa", {}), ("causal_zigzag_gqa", dict(causal=True, layout="zigzag"))))

#: ``python -m ringplan_runtime.cp_check`` argument lists run in-process (its torchrun body) at W = 2 and 4.
ENTRY_ARGS = ("--tokens", "256", "--heads", "4", "--kv-heads", "1", "--head-dim", "16", "--dtype", "fp32",
              "--steps", "1", "--causal", "--layout", "zigzag")
ENTRY_ARGVS = {2: (("--scheme", "allgather") + ENTRY_ARGS, ("--scheme", "ulysses") + ENTRY_ARGS),
               4: (("--scheme", "hybrid", "--ulysses-size", "2") + ENTRY_ARGS,)}

CASES = with_seed([
    Case(name="dense"),
    Case(name="causal_contiguous", causal=True),
    Case(name="causal_zigzag", causal=True, layout="zigzag"),
    Case(name="noncausal_zigzag", layout="zigzag"),
    Case(name="gqa_causal_zigzag_batch2", causal=True, layout="zigzag", kv_heads=2, batch=2),
    Case(name="mqa_causal_contiguous", causal=True, kv_heads=1),
    Case(name="mqa_noncausal_zigzag", layout="zigzag", kv_heads=1),
    Case(name="math_backend_gqa_causal_zigzag", causal=True, layout="zigzag", kv_heads=2, backend="math"),
])


def runs_for(world: int) -> list[tuple[str, int, Case]]:
    """(scheme, Ulysses degree of the hybrid (0: not hybrid), case): all-gather and Ulysses at CP = W,
    hybrid on every U × R = W grid."""
    runs = [(scheme, 0, case) for scheme in ("allgather", "ulysses") for case in CASES]
    return runs + [("hybrid", u, case) for u in range(1, world + 1) if world % u == 0 for case in CASES]


@functools.cache
def world_results(world: int) -> dict:
    """Everything one spawned group of ``world`` ranks measures: worst errors over ranks, and per rank
    the bad-input outcomes (W = 4) and tracker peaks (W = 2)."""
    per_rank = spawn(run_world, world_size=world, backend="gloo", timeout_s=SPAWN_TIMEOUT_S,
                     args=(runs_for(world), BAD_INPUT_GRIDS if world == 4 else (), PEAK_CASES if world == 2 else (),
                           ENTRY_ARGVS.get(world, ())))
    return {"errors": worst_over_ranks([r["errors"] for r in per_rank]), "bad": [r["bad"] for r in per_rank],
            "peaks": [r["peaks"] for r in per_rank], "entry": [r["entry"] for r in per_rank]}


def run_id(world_and_run) -> str:
    world, (scheme, u, case) = world_and_run
    grid = f"U{u}xR{world // u}-" if scheme == "hybrid" else ""
    return f"W{world}-{scheme}-{grid}{case.name}"


@pytest.mark.parametrize("world_and_run", [(w, run) for w in WORLD_SIZES for run in runs_for(w)], ids=run_id)
def test_matches_dense_reference(world_and_run):
    """Output and every gradient agree with the dense float64 reference within REL_TOL_FP32; dtypes kept."""
    world, (scheme, u, case) = world_and_run
    errors = dict(world_results(world)["errors"][(scheme, u, case.name)])
    label = run_id(world_and_run)
    assert errors.pop("dtype_ok") == 1.0, f"{label}: output/gradient dtype differs from the input dtype"
    too_large = {name: value for name, value in errors.items() if not value <= REL_TOL_FP32}
    assert not too_large, f"{label}: relative errors above {REL_TOL_FP32}: {too_large}"


@pytest.mark.parametrize("ulysses_size", BAD_INPUT_GRIDS, ids=lambda u: f"U{u}xR{4 // u}")
def test_bad_inputs_raise_before_communication(ulysses_size):
    """Each bad input raises ValueError (with a message) on every rank of a 4-rank grid, before any
    all-to-all, all-gather, reduce-scatter or ring exchange; a bad head split names valid values."""
    for rank, by_grid in enumerate(world_results(4)["bad"]):
        outcomes = by_grid[ulysses_size]
        assert len(outcomes) >= 8
        for label, kind, message, started in outcomes:
            if ulysses_size == 1 and label.startswith("hybrid: ") and "layout" not in label:
                assert kind == "none", f"rank {rank}, {label}: U = 1 splits any head count, yet {kind}"
                continue
            assert kind == "ValueError", f"rank {rank}, {label}: raised {kind} ({message})"
            assert message, f"rank {rank}, {label}: empty error message"
            assert started == 0, f"rank {rank}, {label}: {started} collectives started before the error"
            if "divide the heads" in label:
                assert "nearest valid degrees" in message, message


def test_tracker_peaks_at_two_ranks():
    """Live-tensor peaks at W = 2 (``PEAK_CASES``): training peaks are at least the forward peaks, and
    all-gather's forward holds the whole sequence's K/V beside the local inputs."""
    case = PEAK_CASES[0]
    kv_full_bytes = 2 * case.batch * case.seq_len_tokens * case.kv_heads * case.head_dim * 4
    for rank, by_case in enumerate(world_results(2)["peaks"]):
        for name, peaks in by_case.items():
            print(f"W=2 rank {rank} {name} peak bytes: {peaks}")
            for scheme, peak in peaks.items():
                assert peak["training"] >= peak["forward"] > 0, (rank, name, scheme, peak)
            assert peaks["allgather"]["forward"] >= kv_full_bytes, peaks


@pytest.mark.parametrize("world_and_argv", [(w, argv) for w, argvs in ENTRY_ARGVS.items() for argv in argvs],
                         ids=lambda wa: f"W{wa[0]}-{wa[1][1]}")
def test_cp_check_entry_point(world_and_argv):
    """``ringplan_runtime.cp_check`` (the torchrun entry of these schemes) finds every error within tolerance."""
    world, argv = world_and_argv
    for rank, by_argv in enumerate(world_results(world)["entry"]):
        errors = by_argv[argv]
        assert errors is not None and max(errors.values()) <= REL_TOL_FP32, (rank, argv, errors)
