"""Spawned-rank body for ``test_cp_terms_tracker``: live-tensor peaks of the all-gather, Ulysses and
hybrid context-parallel schemes, measured the way ``ringplan_runtime.measure`` measures the ring.

Method (as ``measure.run_step``): this rank's q, k, v are made and passed to ``LiveTensorTracker.track``;
forward-only runs under ``torch.no_grad``; training drops the layer output before backward and makes
its gradient when backward needs it (``UpstreamGradient``). Peaks are per rank; the test takes the max.
"""

from __future__ import annotations

import torch

from ringplan_runtime.dtypes import torch_dtype
from ringplan_runtime.tracker import LiveTensorTracker
from runtime.cp_helpers import make_grid, scheme_call
from runtime.helpers import Case, full_inputs


class UpstreamGradient(torch.autograd.Function):
    """Scalar root whose gradient w.r.t. the layer output is a fresh tensor (``measure._UpstreamGradient``)."""

    @staticmethod
    def forward(ctx, out):
        ctx.out_shape, ctx.out_dtype = out.shape, out.dtype
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.ones(ctx.out_shape, dtype=ctx.out_dtype)


def tracked_peak(scheme: str, case: Case, training: bool, grid, *, detail: bool = False):
    """Peak live bytes of one step of ``scheme`` on this rank (inputs included; dtype ``case.extra["dtype"]``,
    fp32 by default), and optionally the storages live at the peak."""
    full = full_inputs(case, dtype=torch_dtype(case.extra.get("dtype", "fp32")))
    local, call = scheme_call(scheme, case, grid)
    q, k, v = (local(full[name]).clone().requires_grad_(training) for name in ("q", "k", "v"))
    with LiveTensorTracker(device="cpu", keep_peak_tensors=detail) as tracker:
        tracker.track(q, k, v)
        if training:
            root = UpstreamGradient.apply(call(q, k, v))
            root.backward()
        else:
            with torch.no_grad():
                call(q, k, v)
    if detail:
        return tracker.peak_bytes, [(t.n_bytes, t.shape, t.dtype, t.op) for t in tracker.peak_tensors]
    return tracker.peak_bytes


def run_peaks(runs: list[tuple[str, int, Case, bool]], detail: bool = False, repeats: int = 1) -> dict:
    """Body of every spawned rank: peak per (scheme, Ulysses degree (hybrid), case name, training), the
    smallest of ``repeats`` runs. gloo may hold a collective's send buffer a moment after the call
    returns (its worker thread drops it), so one run can show an extra buffer now and then; the
    smallest of a few runs is the runtime's own peak."""
    torch.set_num_threads(1)
    grids = {u: make_grid(u) for u in sorted({u for scheme, u, _, _ in runs if scheme == "hybrid"})}
    if detail:
        return {(scheme, u, case.name, training): tracked_peak(scheme, case, training, grids.get(u), detail=True)
                for scheme, u, case, training in runs}
    return {(scheme, u, case.name, training): min(tracked_peak(scheme, case, training, grids.get(u))
                                                   for _ in range(repeats))
            for scheme, u, case, training in runs}
