"""Every attention family the runtime can run gets its workspace and slack from a fit — its own or the
nearest measured family's, with a stated extra ± — and so a residual bound > 0 (issue 20 item 2)."""

from __future__ import annotations

import itertools

import pytest

from ringplan.hardware import load_catalog
from ringplan.memory.attention_model import default_memory_model
from ringplan.memory.family_borrow import (BORROWED_COMPONENT_BYTES, borrowed_bound_bytes, family_distance,
                                           nearest_family)
from ringplan.units import MIB
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload

SEGMENTS = AttentionPattern(segment_lengths_tokens=(4096, 8192, 16384), dilation_rates=(1, 2, 4))


def runnable_workloads():
    """One workload and layout per family the runtime runs: dense or dilated, forward or training, with
    or without projections, tiled or math kernels, one GPU or a ring of 2, in bf16 and fp32."""
    for dilated, training, projections, backend, ring, dtype in itertools.product(
            (False, True), (False, True), (False, True), ("auto", "math"), (1, 2), ("bf16", "fp32")):
        shape = AttentionShape(n_heads=12, head_dim=64, embed_dim=768, dtype=dtype)
        yield (Workload(seq_len_tokens=65_536, shape=shape, training=training, projections=projections,
                        pattern=SEGMENTS if dilated else AttentionPattern()),
               RingLayout(ring_size=ring, backend=backend))


@pytest.mark.parametrize("gpu", ["h100", "h200", "a100-80gb"])
def test_every_runnable_family_has_a_bounded_fit(gpu):
    """Workspace and slack are fitted (own or borrowed) and the residual bound is > 0 for every family."""
    model, spec = default_memory_model(), load_catalog().gpu(gpu)
    for workload, layout in runnable_workloads():
        chosen = model.parts_for(workload, layout, spec)
        assert chosen.workspace is not None and chosen.slack is not None, (workload, layout)
        prediction = model.predict(workload, layout, spec)
        assert prediction.residual_bound_bytes > 0, (workload, layout)


def test_fp32_dense_projections_borrows_the_cublas_workspace():
    """The fp32 dense forward with projections (no measured rows) takes the dilated-with-projections
    workspace (its cuBLAS workspace, ~33 MiB) and one component's extra ± (the pattern differs)."""
    model, spec = default_memory_model(), load_catalog().gpu("h100")
    shape = AttentionShape(n_heads=12, head_dim=64, embed_dim=768, dtype="fp32")
    workload = Workload(seq_len_tokens=524_288, shape=shape, projections=True)
    chosen = model.parts_for(workload, RingLayout(ring_size=1), spec)
    assert chosen.workspace.family == "dilated/forward/projections/tiled"
    assert chosen.extra_bound_bytes >= BORROWED_COMPONENT_BYTES
    prediction = model.predict(workload, RingLayout(ring_size=1), spec)
    assert prediction.terms_bytes["workspace_bytes"] > 32 * MIB
    assert "borrowed from" in prediction.provenance


def test_nearest_family_prefers_the_mode_then_projections():
    """Hand-checked ranking: a training family never borrows a forward fit while a training one exists;
    among forward fits, the one with the same projections wins over the same pattern."""
    fitted = ["dense/forward/no-projections/tiled", "dense/training/no-projections/tiled",
              "dilated/forward/projections/tiled"]
    assert nearest_family("dense/forward/projections/tiled", fitted) == "dilated/forward/projections/tiled"
    assert nearest_family("dilated/training/projections/math", fitted) == "dense/training/no-projections/tiled"
    assert nearest_family("dense/forward/projections/tiled", []) is None
    assert family_distance("dense/forward/projections/tiled", "dense/forward/projections/tiled") == 0
    assert borrowed_bound_bytes("dense/forward/projections/tiled", "dilated/forward/no-projections/math") == \
        3 * BORROWED_COMPONENT_BYTES


def test_a_bad_family_name_is_refused():
    with pytest.raises(ValueError, match="not a row family"):
        family_distance("dense/forward", "dense/forward/projections/tiled")
