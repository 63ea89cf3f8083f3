"""ringplan: how many GPUs ring attention needs for N tokens, from measured models.

The planner imports numpy/scipy only; torch lives in ``ringplan_runtime``.
"""

from ringplan.units import parse_bytes, parse_tokens
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload, tokens_per_rank

__all__ = [
    "AttentionPattern", "AttentionShape", "RingLayout", "Workload", "parse_bytes", "parse_tokens",
    "tokens_per_rank",
]
