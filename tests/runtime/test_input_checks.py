"""What the runtime cannot compute is refused with a ValueError that names the cause: non-floating
dtypes, inputs on different devices, and inputs that differ between the ranks of a ring (compared
once before the first exchange; gloo would abort, NCCL would hang)."""

from __future__ import annotations

import pytest
import torch

from ringplan_runtime import ring_attention, ring_dilated_attention, spawn
from runtime.helpers import INCONSISTENT_INPUTS, inconsistent_calls

SPAWN_TIMEOUT_S = 120.0
#: Words the message must hold for each inconsistency: the field that differs, or the rank that refused.
EXPECTED_WORDS = {"tokens": "q.shape", "kv_heads": "k.shape", "dtype": "q.dtype", "causal": "causal",
                  "int64 on one rank": "rank 1 rejected", "segments": "segment_lengths"}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("dilated", [False, True])
def test_non_floating_dtypes_are_refused(dtype, dilated):
    """Integer, boolean and complex q/k/v raise ValueError naming the dtype (they used to run, truncated)."""
    q = torch.ones(1, 8, 2, 4).to(dtype)
    with pytest.raises(ValueError, match="floating point") as info:
        if dilated:
            ring_dilated_attention(q, q, q, segment_lengths=(8,), dilation_rates=(1,))
        else:
            ring_attention(q, q, q)
    assert str(dtype).removeprefix("torch.") in str(info.value)


def test_device_mismatch_names_the_devices():
    """q on the CPU and k, v on the meta device: the message names the devices, not the dtypes."""
    q = torch.ones(1, 8, 2, 4)
    k = torch.ones(1, 8, 2, 4, device="meta")
    with pytest.raises(ValueError, match="one device") as info:
        ring_attention(q, k, k)
    assert "cpu" in str(info.value) and "meta" in str(info.value)


@pytest.fixture(scope="module")
def inconsistent_outcomes() -> dict[str, list[tuple[str, str]]]:
    """Per inconsistency, both ranks' outcomes (one spawned gloo ring of 2 runs them all, in turn:
    each refused call must leave the group usable for the next)."""
    per_rank = spawn(inconsistent_calls, world_size=2, backend="gloo", args=(sorted(INCONSISTENT_INPUTS),),
                     timeout_s=SPAWN_TIMEOUT_S)
    return {which: [outcomes[which] for outcomes in per_rank] for which in INCONSISTENT_INPUTS}


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(INCONSISTENT_INPUTS))
def test_inputs_that_differ_between_ranks_raise_alike_on_every_rank(inconsistent_outcomes, which):
    """Rank 1 passes another length, KV-head count, dtype, causal flag, an int64 tensor, or other
    segments: every rank raises the SAME ValueError, naming what differs (no gloo abort, no hang)."""
    outcomes = inconsistent_outcomes[which]
    assert {kind for kind, _ in outcomes} == {"ValueError"}, outcomes
    assert outcomes[0][1] == outcomes[1][1]
    assert EXPECTED_WORDS[which] in outcomes[0][1], outcomes[0][1]
