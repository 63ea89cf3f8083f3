"""Optional plot (``pip install -e ".[plot]"``): per-GPU memory against tokens, one line per world size.

matplotlib is imported only here, only when a plot is asked for, with the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from ringplan.units import GIB


def token_grid(query, world_size: int, points: int = 48) -> list[int]:
    """Valid sequence lengths for ``world_size`` spaced evenly in log scale over two and a half
    decades up to twice the largest feasible length (or 64 token units when nothing fits)."""
    from ringplan.capacity.attention import max_tokens, token_unit

    unit = token_unit(query, world_size)
    best = max_tokens(query, world_size).best
    top_units = max(2, 2 * (best.tokens_per_rank // unit)) if best else 64
    start = max(1.0, top_units / 300)
    ratio = (top_units / start) ** (1.0 / max(points - 1, 1))
    grid, m = [], start
    while m <= top_units * (1 + 1e-9):
        grid.append(int(round(m)) * unit * world_size)
        m *= ratio
    return sorted(set(grid))


def plot_capacity(path: str | Path, query, *, world_sizes: list[int]) -> Path:
    """Draw predicted per-GPU memory (GiB) against global tokens for each world size, with the
    usable-memory line, the budget line (usable less the safety margin) and the feasible region
    shaded. Raises ``ValueError`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError('--plot needs matplotlib: pip install -e ".[plot]"') from None
    from ringplan.capacity.attention import evaluate

    fig, ax = plt.subplots(figsize=(8, 5))
    for world_size in world_sizes:
        grid = token_grid(query, world_size)
        memory = [evaluate(query, s, world_size).prediction.total_bytes / GIB for s in grid]
        ax.plot(grid, memory, marker=".", label=f"{world_size} GPU" + ("s" if world_size > 1 else ""))
    usable = query.gpu.usable_memory_bytes / GIB
    budget = query.budget_bytes / GIB
    ax.axhline(usable, color="black", linewidth=1.2, label=f"usable {usable:,.1f} GiB")
    ax.axhline(budget, color="black", linestyle="--", linewidth=1.0,
               label=f"budget ({query.safety_margin:.0%} margin)")
    ax.axhspan(0, budget, color="tab:green", alpha=0.08, label="feasible")
    ax.set_xscale("log")
    ax.set_ylim(0, usable * 1.6)
    ax.set_xlabel("sequence length S (tokens, all GPUs)")
    ax.set_ylabel("predicted memory per GPU (GiB)")
    ax.set_title(f"ring attention on {query.gpu.name}: per-GPU memory")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
