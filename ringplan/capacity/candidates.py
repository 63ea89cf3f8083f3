"""The candidate settings of a whole-model search: which fields are searched, their space, the order
without a time model (``preference_key``) and how a setting is described.

Searched (``settings_space``): sharding {none, zero1, zero2, zero3} × checkpointing {none, selective, full}
× checkpoint offload (full only) × loss {full, chunked} × parameter + optimizer-state offload (training,
zero3 or none) × MLP tile {none, the model's tile: ``stack.default_mlp_tile_tokens``}; options the user
fixed stay fixed. Forward (prefill) runs hold bf16 weights replicated on every rank with nothing saved for
a backward pass, so only the loss and the tile vary. How the GPUs are split (tensor parallelism, the
context-parallel scheme) is the other axis of a candidate: ``ringplan.capacity.parallelism``.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ringplan.models import ModelSpec
from ringplan.stack import CHECKPOINTING, LOSS_MODES, SHARDINGS, StackSettings, default_mlp_tile_tokens

SEARCHED_FIELDS: tuple[str, ...] = ("sharding", "checkpointing", "offload_checkpoints", "loss", "offload_params",
                                    "mlp_tile_tokens")


#: Shardings in the order ``capacity`` prefers them without a time model (measured ones first).
SHARDING_PREFERENCE: tuple[str, ...] = ("none", "zero3", "zero1", "zero2")


def preference_key(settings: StackSettings) -> tuple[int, int, int, int, int]:
    """Order without a time model: parameter offload last (PCIe traffic and a CPU optimizer step),
    then an MLP tile (its recomputation), then recomputation (none, selective, full, full + offload),
    then sharding — what the runtime runs and was measured with (none, zero3) before the ZeRO-1/2
    stages planned from the paper's formulas — then loss (full before chunked)."""
    recompute = CHECKPOINTING.index(settings.checkpointing) + int(settings.offload_checkpoints)
    return (int(settings.offload_params), int(settings.mlp_tile_tokens is not None), recompute,
            SHARDING_PREFERENCE.index(settings.sharding), LOSS_MODES.index(settings.loss))


def settings_space(*, training: bool, base: StackSettings | None = None,
                   fixed: frozenset[str] | set[str] = frozenset(),
                   mlp_tiles: tuple[int | None, ...] = (None,)) -> tuple[StackSettings, ...]:
    """Every valid combination of the searched fields not in ``fixed`` (those keep ``base``'s
    values, as do the dtypes, loss chunk and shard group), in ``preference_key`` order.
    ``mlp_tiles``: the MLP tiles tried (None = untiled; ``model_mlp_tiles`` for a model).
    Forward: sharding none (a shard group only where fixed), no checkpointing, no offload unless
    fixed (nothing is sharded or saved for a backward pass)."""
    base = base if base is not None else StackSettings()
    forward = {"sharding": ("none",), "checkpointing": ("none",), "offload_checkpoints": (False,),
               "offload_params": (False,)}
    if not training and "shard_group_size" in fixed:
        forward["sharding"] = (base.sharding,)
    elif not training and "sharding" not in fixed:
        base = replace(base, shard_group_size=None)
    choices = {"sharding": SHARDINGS, "checkpointing": CHECKPOINTING, "offload_checkpoints": (False, True),
               "loss": LOSS_MODES, "offload_params": (False, True), "mlp_tile_tokens": mlp_tiles}
    if not training:
        choices.update(forward)
    axes = [(getattr(base, name),) if name in fixed else choices[name] for name in SEARCHED_FIELDS]
    space = []
    for values in itertools.product(*axes):
        try:
            space.append(replace(base, **dict(zip(SEARCHED_FIELDS, values))))
        except ValueError:  # offload without full checkpointing, a shard group without sharding, offload + zero1/2
            continue
    if not space:
        raise ValueError(f"no valid settings with {', '.join(f'{n}={getattr(base, n)!r}' for n in sorted(fixed))}")
    return tuple(sorted(dict.fromkeys(space), key=preference_key))


def model_mlp_tiles(model: ModelSpec) -> tuple[int | None, ...]:
    """The MLP tiles searched for ``model``: untiled, and ``stack.default_mlp_tile_tokens``."""
    return None, default_mlp_tile_tokens(model)


def describe_settings(settings: StackSettings) -> str:
    """``zero3 sharding, full checkpointing + CPU offload, chunked loss (4,096 tokens)`` (+ parameter offload
    and the MLP tile when used)."""
    sharding = settings.sharding + (f" over {settings.shard_group_size} GPUs" if settings.shard_group_size else "")
    ckpt = f"{settings.checkpointing} checkpointing" + (" + CPU offload" if settings.offload_checkpoints else "")
    loss = "chunked loss" + f" ({settings.loss_chunk_tokens:,} tokens)" if settings.loss == "chunked" else "full loss"
    extra = (", parameters + optimizer states on the host" if settings.offload_params else "") + \
        (f", MLP tile {settings.mlp_tile_tokens:,} tokens" if settings.mlp_tile_tokens else "")
    return f"{sharding} sharding, {ckpt}, {loss}{extra}"
