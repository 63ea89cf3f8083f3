"""Click options shared by the whole-model commands, and the builders that turn them into dataclasses.

Decorators:
- ``model_options``: the model by name (``--model``), from a Hugging Face ``config.json``
  (``--config``) or from shape options (``--layers``, ``--hidden``, ``--heads``, ``--kv-heads``,
  ``--head-dim``, ``--ffn``, ``--ffn-type``, ``--vocab``, ``--norm``, ...), the shape options also
  overriding fields of a named or read model.
- ``model_selection_options``: only ``--model``, ``--config``, ``--layers``, ``--ffn``, ``--vocab``,
  for a command that already has ``--heads`` / ``--kv-heads`` / ``--head-dim`` / ``--embed-dim``
  (``ringplan capacity``); ``model_from_options`` reads those names (``n_heads``, ``n_kv_heads``,
  ``head_dim``, ``embed_dim``) as overrides too.
- ``stack_settings_options``: ``--sharding``, ``--shard-group``, ``--checkpointing``,
  ``--offload/--no-offload``, ``--loss``, ``--loss-chunk``; ``stack_dtype_options``: ``--dtype``,
  ``--master-dtype`` for commands without a ``--dtype`` of their own.

Builders raise ``ValueError`` on bad input (``bad_input_exits_2`` makes that exit code 2).
Inside a click command, an option left at its default never overrides a named or read model
(``capacity``'s ``--heads`` defaults to 32, which must not reshape Llama-3-70B); outside click,
every value that is not None is an override.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from ringplan.cli.common import (MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, MAX_WORLD_SIZE, TOKENS,
                                 BoundedInt, InputFile)
from ringplan.models import FFN_TYPES, NORMS, ModelSpec
from ringplan.stack import CHECKPOINTING, LOSS_MODES, SHARDINGS, StackSettings
from ringplan.workload import DTYPE_BYTES

_SELECTION_OPTIONS = (
    click.option("--model", "model_name", default=None, metavar="NAME",
                 help="Model from the catalog (`ringplan models`), e.g. llama-3-8b, qwen3-0.6b; any case, aliases."),
    click.option("--config", "config_path", type=InputFile(), default=None, metavar="PATH",
                 help="A local Hugging Face config.json (llama, mistral, qwen2, qwen3, gpt2) instead of --model."),
    click.option("--layers", "n_layers", type=BoundedInt(min=1, max=MAX_LAYERS), default=None,
                 help="Number of transformer blocks L (overrides the model's; scaled-down stacks)."),
    click.option("--ffn", "ffn_dim", type=BoundedInt(min=1, max=MAX_WIDTH), default=None,
                 help="FFN (intermediate) width F (overrides the model's)."),
    click.option("--vocab", "vocab_size", type=BoundedInt(min=1, max=MAX_VOCAB), default=None,
                 help="Vocabulary size V (overrides the model's)."),
)

_SHAPE_OPTIONS = (
    click.option("--hidden", "embed_dim", type=BoundedInt(min=1, max=MAX_WIDTH), default=None,
                 help="Model width E (hidden size); custom shapes default to heads x head dim."),
    click.option("--heads", "n_heads", type=BoundedInt(min=1, max=MAX_HEADS), default=None, help="Query heads H."),
    click.option("--kv-heads", "n_kv_heads", type=BoundedInt(min=1, max=MAX_HEADS), default=None,
                 help="KV heads H_kv (GQA/MQA); custom shapes default to --heads."),
    click.option("--head-dim", "head_dim", type=BoundedInt(min=1, max=MAX_HEAD_DIM), default=None,
                 help="Head dim D; custom shapes default to hidden / heads."),
    click.option("--ffn-type", type=click.Choice(FFN_TYPES), default=None,
                 help="MLP form: swiglu (gate, up, down) or gelu (up, down); custom shapes default to swiglu."),
    click.option("--norm", type=click.Choice(NORMS), default=None,
                 help="Norm type; custom shapes default to rmsnorm."),
    click.option("--qk-norm/--no-qk-norm", "qk_norm", default=None,
                 help="RMSNorm on q and k per head (Qwen3); custom shapes default to off."),
    click.option("--tied-embeddings/--untied-embeddings", "tied_embeddings", default=None,
                 help="LM head shares the token embedding; custom shapes default to untied."),
)

_SETTINGS_OPTIONS = (
    click.option("--sharding", type=click.Choice(SHARDINGS), default="zero3", show_default=True,
                 help="Data-parallel sharding: none, zero1 (optimizer states), zero2 (+ gradients), "
                      "zero3 (+ parameters; FSDP)."),
    click.option("--shard-group", "shard_group_size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
                 help="GPUs G that share one copy of the sharded state; default: the whole world."),
    click.option("--checkpointing", type=click.Choice(CHECKPOINTING), default="none", show_default=True,
                 help="Activation checkpointing: none, selective (recompute MLP and norms), full (each block)."),
    click.option("--offload/--no-offload", "offload_checkpoints", default=False, show_default=True,
                 help="Keep the saved block inputs in pinned CPU memory (needs --checkpointing full)."),
    click.option("--loss", type=click.Choice(LOSS_MODES), default="chunked", show_default=True,
                 help="Loss over all logits at once (full) or a chunk of tokens at a time (chunked)."),
    click.option("--loss-chunk", "loss_chunk_tokens", type=TOKENS, default=4096, show_default=True,
                 help="Tokens per loss chunk with --loss chunked (4096, 8Ki, ...)."),
)

_DTYPE_OPTIONS = (
    click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default="bf16", show_default=True,
                 help="Compute and gathered-weight dtype."),
    click.option("--master-dtype", type=click.Choice(sorted(DTYPE_BYTES)), default="fp32", show_default=True,
                 help="Dtype of the sharded master weights, gradients and Adam states."),
)


def _apply(options: tuple, func):
    for option in reversed(options):
        func = option(func)
    return func


def model_selection_options(func):
    """Decorate a command with --model, --config, --layers, --ffn, --vocab (no attention-shape names)."""
    return _apply(_SELECTION_OPTIONS, func)


def model_options(func):
    """Decorate a command with every model option: selection plus --hidden, --heads, --kv-heads,
    --head-dim, --ffn-type, --norm, --qk-norm, --tied-embeddings."""
    return _apply(_SELECTION_OPTIONS + _SHAPE_OPTIONS, func)


def stack_settings_options(func):
    """Decorate a command with --sharding, --shard-group, --checkpointing, --offload, --loss, --loss-chunk."""
    return _apply(_SETTINGS_OPTIONS, func)


def stack_dtype_options(func):
    """Decorate a command with --dtype and --master-dtype (skip where the command has its own --dtype)."""
    return _apply(_DTYPE_OPTIONS, func)


# ----------------------------------------------------------------------------- builders

#: Option keys that override ``ModelSpec`` fields of the same name.
OVERRIDE_FIELDS: tuple[str, ...] = ("n_layers", "embed_dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                                    "ffn_type", "vocab_size", "norm", "qk_norm", "tied_embeddings")
_CUSTOM_REQUIRED = {"n_layers": "--layers", "n_heads": "--heads", "ffn_dim": "--ffn", "vocab_size": "--vocab"}


def explicit_options(kw: dict[str, Any]) -> dict[str, Any]:
    """The options in ``kw`` that the user gave: not None, and (inside a click command) not
    filled in from the option's default."""
    ctx = click.get_current_context(silent=True)
    given = {}
    for key, value in kw.items():
        if value is None:
            continue
        if ctx is not None and key in ctx.params:
            source = ctx.get_parameter_source(key)
            if source in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP):
                continue
        given[key] = value
    return given


def model_requested(**kw: Any) -> bool:
    """True when the options name a model (--model or --config): whole-model planning."""
    return kw.get("model_name") is not None or kw.get("config_path") is not None


def model_from_options(**kw: Any) -> ModelSpec:
    """The ``ModelSpec`` the options describe: --model or --config, else a custom shape; then
    every explicit shape option (``OVERRIDE_FIELDS``) overrides the model's field.

    A custom shape needs --layers, --heads, --ffn, --vocab and --hidden or --head-dim. Extra keys
    (the command's other options) are ignored. Bad input → ``ValueError``.
    """
    name, config = kw.get("model_name"), kw.get("config_path")
    if name is not None and config is not None:
        raise ValueError("give --model NAME or --config PATH, not both")
    if name is None and config is None:
        return _custom_model({k: v for k, v in kw.items() if k in OVERRIDE_FIELDS and v is not None})
    if name is not None:
        from ringplan.models import load_model_catalog

        base = load_model_catalog().model(name)
    else:
        from ringplan.models import model_from_hf_config

        base = model_from_hf_config(config)
    overrides = {k: v for k, v in explicit_options(kw).items() if k in OVERRIDE_FIELDS}
    return _overridden(base, overrides)


def _overridden(base: ModelSpec, overrides: dict[str, Any]) -> ModelSpec:
    """``base`` with ``overrides``; layers through ``with_layers``, other changes named in the model name."""
    n_layers = overrides.pop("n_layers", base.n_layers)
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    spec = base
    if changed:
        label = ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
        sources = {**base.sources, **{k: "command-line option" for k in changed}}
        spec = replace(base, name=f"{base.name}({label})", aliases=(), sources=sources, **changed)
    return spec.with_layers(n_layers)


def _custom_model(given: dict[str, Any]) -> ModelSpec:
    missing = [flag for key, flag in _CUSTOM_REQUIRED.items() if key not in given]
    if "embed_dim" not in given and "head_dim" not in given:
        missing.append("--hidden or --head-dim")
    if missing:
        raise ValueError(f"give --model NAME, --config PATH, or a custom shape; the custom shape lacks "
                         f"{', '.join(missing)}")
    heads = given["n_heads"]
    if "embed_dim" in given and "head_dim" not in given and given["embed_dim"] % heads:
        raise ValueError(f"hidden size {given['embed_dim']} is not a multiple of {heads} heads; give --head-dim")
    head_dim = given.get("head_dim") or given["embed_dim"] // heads
    fields = {"n_kv_heads": heads, "embed_dim": heads * head_dim, "head_dim": head_dim, "ffn_type": "swiglu",
              "norm": "rmsnorm", **given}
    return ModelSpec(name="custom", sources={k: "command-line option" for k in given}, **fields)


def settings_from_options(**kw: Any) -> StackSettings:
    """The ``StackSettings`` the options describe (``dtype`` → ``param_dtype``); missing keys keep
    the dataclass defaults. Bad input → ``ValueError``."""
    keys = ("sharding", "shard_group_size", "checkpointing", "offload_checkpoints", "loss", "loss_chunk_tokens",
            "master_dtype")
    values = {k: kw[k] for k in keys if kw.get(k) is not None}
    dtype = kw.get("param_dtype") or kw.get("dtype")
    if dtype is not None:
        values["param_dtype"] = dtype
    return StackSettings(**values)


def explicit_setting_fields(**kw: Any) -> frozenset[str]:
    """``StackSettings`` fields the user fixed on the command line (a plan search varies the rest)."""
    names = {"dtype": "param_dtype"}
    fields = set(StackSettings.__dataclass_fields__)
    return frozenset(names.get(k, k) for k in explicit_options(kw) if names.get(k, k) in fields)
