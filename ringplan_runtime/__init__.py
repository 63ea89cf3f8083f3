"""ringplan_runtime: exact ring and ring-dilated attention on torch.distributed, and measurement.

Public API (docs/CONTRACTS.md): ``ring_attention``, ``allgather_attention``, ``ulysses_attention``,
``hybrid_attention``, ``ring_dilated_attention``, ``RingDilatedAttention``,
``shard_sequence`` / ``unshard_sequence``, ``select_backend``, ``spawn`` / ``init_from_env`` /
``RankFailure``, ``RingComm``; dense references in ``ringplan_runtime.reference``.
"""

from ringplan_runtime.allgather_attention import allgather_attention
from ringplan_runtime.backends import select_backend
from ringplan_runtime.comm import RingComm
from ringplan_runtime.dilated import ring_dilated_attention
from ringplan_runtime.hybrid_attention import hybrid_attention
from ringplan_runtime.launch import RankContext, RankFailure, init_from_env, spawn
from ringplan_runtime.layouts import shard_sequence, unshard_sequence
from ringplan_runtime.module import RingDilatedAttention
from ringplan_runtime.ring_attention import ring_attention
from ringplan_runtime.ulysses_attention import ulysses_attention

__all__ = [
    "RankContext", "RankFailure", "RingComm", "RingDilatedAttention", "allgather_attention", "hybrid_attention",
    "init_from_env", "ring_attention", "ring_dilated_attention", "select_backend", "shard_sequence", "spawn",
    "ulysses_attention", "unshard_sequence",
]
