"""How fast the ring simulator is: wall time of ``step_time_prediction`` at 8 .. 1,024 ranks.

Run: ``python benchmarks/simulate_speed.py [--repeats 5]`` (CPU only, no torch). Goal (issue 5): a
1,024-rank ring simulated in under a second, for forward and training, causal zigzag and contiguous.
Prints the median seconds per prediction (the simulation plus costing; profiles are loaded once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringplan.time.attention_time import step_time_prediction  # noqa: E402
from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload  # noqa: E402

CASES = [  # (label, causal, layout, training)
    ("forward non-causal", False, "contiguous", False),
    ("forward causal zigzag", True, "zigzag", False),
    ("training causal contiguous", True, "contiguous", True),
    ("training causal zigzag", True, "zigzag", True),
]


def seconds_per_prediction(ring_size: int, causal: bool, layout: str, training: bool, repeats: int) -> float:
    workload = Workload(seq_len_tokens=8192 * ring_size, shape=AttentionShape(n_heads=32, head_dim=128),
                        pattern=AttentionPattern(causal=causal), training=training)
    ring = RingLayout(ring_size=ring_size, layout=layout)
    step_time_prediction(workload, ring, "h100")  # loads the catalog and profiles once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step_time_prediction(workload, ring, "h100")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ring-sizes", default="8,64,256,1024")
    args = parser.parse_args()
    sizes = [int(x) for x in args.ring_sizes.split(",")]
    print(f"{'case':<28}" + "".join(f"{p:>12,}" for p in sizes) + "   (seconds per prediction, median)")
    worst = 0.0
    for label, causal, layout, training in CASES:
        row = [seconds_per_prediction(p, causal, layout, training, args.repeats) for p in sizes]
        worst = max(worst, row[-1])
        print(f"{label:<28}" + "".join(f"{t:>12.4f}" for t in row))
    print(f"slowest at {sizes[-1]:,} ranks: {worst:.3f} s (goal < 1 s): {'met' if worst < 1.0 else 'NOT met'}")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
