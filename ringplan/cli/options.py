"""Every option shared by more than one command, and the builders that turn options into the core's
dataclasses (issue 13: commands never import each other; what two commands share lives here).

Decorators:
- ``workload_options``: one attention layer's workload (``--batch`` … ``--backend``); ``build_workload``.
- ``shape_options`` / ``link_options``: the time model's attention shape and link overrides
  (``simulate``, ``overlap``); ``build_shape``, ``link_override``.
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
  ``--master-dtype`` for commands without a ``--dtype`` of their own; ``stack_query`` builds the
  whole-model query (``capacity --model``, ``plan``).
- ``runtime_options``: how ``profile`` and ``validate`` measure; ``measure_settings``.
- ``hardware_options``: ``--gpu-spec`` and ``--catalog`` (hardware outside the catalog, issue 17);
  ``gpu_from_options`` resolves the GPU a command plans for, ``catalog_from_options`` the catalog.

Builders raise ``ValueError`` on bad input (``bad_input_exits_2`` makes that exit code 2).
Inside a click command, an option left at its default never overrides a named or read model
(``capacity``'s ``--heads`` defaults to 32, which must not reshape Llama-3-70B); outside click,
every value that is not None is an override.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import click

from ringplan.cli.common import (BYTES, MAX_BATCH, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH,
                                 MAX_WORLD_SIZE, SEGMENT_LIST, TILE_TOKENS, TOKEN_LIST, TOKENS, BoundedInt, DtypeChoice, FiniteFloat,
                                 InputFile, IntListType, QuietAliasOption)
from ringplan.models import FFN_TYPES, NORMS, ModelSpec
from ringplan.stack import CHECKPOINTING, LOSS_MODES, SHARDINGS, StackSettings
from ringplan.workload import BACKENDS, CP_SCHEMES, DTYPE_BYTES, LAYOUTS

#: Most warm-up or timed steps per point, and the longest ring launch (a week).
MAX_STEPS = 10_000
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: Longest per-message latency or per-step overhead, in microseconds: one second (NCCL's are ~2-20 us).
MAX_LATENCY_US = 1e6

# ----------------------------------------------------------------------------- one attention layer


_WORKLOAD_OPTIONS = (
    click.option("--batch", type=BoundedInt(min=1, max=MAX_BATCH), default=1, show_default=True, help="Batch size B."),
    click.option("--heads", "n_heads", type=BoundedInt(min=1, max=MAX_HEADS), default=32, show_default=True,
                 help="Query heads H."),
    click.option("--kv-heads", "n_kv_heads", type=BoundedInt(min=1, max=MAX_HEADS), default=None,
                 help="KV heads H_kv (GQA/MQA); default: --heads."),
    click.option("--head-dim", type=BoundedInt(min=1, max=MAX_HEAD_DIM), default=128, show_default=True,
                 help="Head dim D."),
    click.option("--embed-dim", type=BoundedInt(min=1, max=MAX_WIDTH), default=None,
                 help="Model width E seen by the projections; default H x D."),
    click.option("--dtype", type=DtypeChoice(sorted(DTYPE_BYTES)), default="bf16", show_default=True,
                 help="Activation and weight dtype (accumulators are fp32 regardless); bfloat16, float16, "
                      "float32 also read."),
    click.option("--causal/--no-causal", default=False, show_default=True, help="Causal mask."),
    click.option("--segment-lengths", "segment_lengths", type=SEGMENT_LIST, default="",
                 help="Dilated attention segment lengths, comma-separated (e.g. 4096,8192,16384)."),
    click.option("--dilation-rates", "dilation_rates", type=TOKEN_LIST, default="",
                 help="Dilation rate per segment length, comma-separated (e.g. 1,2,4)."),
    click.option("--train/--forward", "--training/--forward-only", "training", default=False, show_default=True,
                 cls=QuietAliasOption, quiet_aliases=("--training", "--forward-only"),
                 help="Training (forward + backward) or forward only; with --model / --config: default forward "
                      "(prefill), give --train for a training step (`ringplan plan` defaults to --train)."),
    click.option("--projections/--no-projections", default=False, show_default=True,
                 help="Include the QKV and output projections (the seed's module)."),
    click.option("--layout", type=click.Choice(LAYOUTS), default="contiguous", show_default=True,
                 help="How the sequence is split over the ring (zigzag balances causal work)."),
    click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                 help="Local attention kernel; only 'math' adds an n x n score workspace."),
)


#: The context-parallel scheme (issue 14): ``capacity`` (one layer or a whole model), ``plan`` and ``validate``.
_CP_SCHEME_OPTIONS = (
    click.option("--cp", "cp_scheme", type=click.Choice(CP_SCHEMES), default="ring", show_default=True,
                 help="Context-parallel scheme: p2p ring, all-gather K/V, Ulysses all-to-all over heads (over all "
                      "GPUs: W must divide --heads), or hybrid (Ulysses of --ulysses-degree inside x a ring across)."),
    click.option("--ulysses-degree", type=BoundedInt(min=2, max=MAX_WORLD_SIZE), default=None,
                 help="With --cp hybrid: the Ulysses degree U (must divide --heads); plans use W = U x R GPUs, R > 1."),
)


def cp_scheme_options(func):
    """Decorate a command with ``--cp`` and ``--ulysses-degree`` (one attention layer's scheme)."""
    for option in reversed(_CP_SCHEME_OPTIONS):
        func = option(func)
    return func


def workload_options(func):
    """Decorate a command with every workload option (batch … backend)."""
    for option in reversed(_WORKLOAD_OPTIONS):
        func = option(func)
    return func


def build_workload(*, seq_len_tokens: int | None, batch: int, n_heads: int, n_kv_heads: int | None, head_dim: int,
                   embed_dim: int | None, dtype: str, causal: bool, segment_lengths: tuple[int, ...],
                   dilation_rates: tuple[int, ...], training: bool, projections: bool, **_ignored: Any):
    """The ``Workload`` the options describe; S defaults to the smallest length the pattern allows."""
    import math

    from ringplan.workload import AttentionPattern, AttentionShape, Workload

    shape = AttentionShape(batch=batch, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                           embed_dim=embed_dim, dtype=dtype)
    pattern = AttentionPattern(causal=causal, segment_lengths_tokens=segment_lengths, dilation_rates=dilation_rates)
    if seq_len_tokens is None:
        seq_len_tokens = math.lcm(1, *segment_lengths)
    return Workload(seq_len_tokens=seq_len_tokens, shape=shape, pattern=pattern, training=training,
                    projections=projections)


# ----------------------------------------------------------------------------- time model: shape and links


def shape_options(func: Callable) -> Callable:
    """Options that build an ``AttentionShape`` for the time model (``simulate``, ``overlap``)."""
    options = [
        click.option("--heads", "n_heads", type=BoundedInt(min=1, max=MAX_HEADS), default=32, show_default=True,
                     help="Query heads H."),
        click.option("--kv-heads", "n_kv_heads", type=BoundedInt(min=1, max=MAX_HEADS), default=None,
                     help="K/V heads H_kv (GQA); default H."),
        click.option("--head-dim", type=BoundedInt(min=1, max=MAX_HEAD_DIM), default=128, show_default=True,
                     help="Head dimension D."),
        click.option("--batch", type=BoundedInt(min=1, max=MAX_BATCH), default=1, show_default=True,
                     help="Batch size B."),
        click.option("--dtype", type=DtypeChoice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
                     help="Element type of Q/K/V (bfloat16, float16, float32 also read)."),
        click.option("--backend", type=click.Choice(["auto", "cudnn", "flash", "efficient", "math", "cpu"]),
                     default="auto", show_default=True, help="Local block kernel (auto: fastest with data)."),
        click.option("--causal/--no-causal", default=False, show_default=True, help="Causal attention."),
        click.option("--layout", type=click.Choice(["contiguous", "zigzag"]), default="contiguous",
                     show_default=True, help="How tokens are spread over the ring."),
        click.option("--timing-dir", type=click.Path(file_okay=False, exists=True), default=None,
                     help="Directory of measured timing profiles (default profiles/measured/timing)."),
        click.option("--step-overhead-us", type=FiniteFloat(max=MAX_LATENCY_US), default=None,
                     help="Fixed cost per ring step in microseconds (default: the model's)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_shape(n_heads: int, n_kv_heads: int | None, head_dim: int, batch: int, dtype: str,
                embed_dim: int | None = None):
    """The ``AttentionShape`` of the shape options."""
    from ringplan.workload import AttentionShape

    return AttentionShape(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, batch=batch, dtype=dtype,
                          embed_dim=embed_dim)


def link_override(name: str | None, bandwidth: int | None, latency_us: float | None, scope: str):
    """A catalog link name, a user link (bandwidth + latency), or None (the model's choice)."""
    if bandwidth is None and latency_us is None:
        return name
    if bandwidth is None or latency_us is None:
        raise ValueError(f"--{scope}-bandwidth and --{scope}-latency-us go together")
    from ringplan.time.links import LinkModel

    return LinkModel(name=f"{scope} (user)", latency_s=latency_us * 1e-6, bandwidth_bytes_per_s=float(bandwidth),
                     source="command line")


def link_options(func: Callable) -> Callable:
    """--intra-/--inter- link name, or bandwidth + latency, overriding the model's link choice."""
    example = {"intra": "nvlink-4", "inter": "infiniband-ndr-400"}
    options = []
    for scope in ("intra", "inter"):
        options += [
            click.option(f"--{scope}-link", default=None,
                         help=f"Catalog link for {scope}-node hops (e.g. {example[scope]})."),
            click.option(f"--{scope}-bandwidth", type=BYTES, default=None,
                         help=f"{scope}-node one-way bandwidth in bytes/s (e.g. 300GB); needs --{scope}-latency-us."),
            click.option(f"--{scope}-latency-us", type=FiniteFloat(max=MAX_LATENCY_US), default=None,
                         help=f"{scope}-node per-message latency in microseconds."),
        ]
    for option in reversed(options):
        func = option(func)
    return func


# ----------------------------------------------------------------------------- hardware outside the catalog


_HARDWARE_OPTIONS = (
    click.option("--gpu-spec", "gpu_spec", default=None, metavar="KEY=VALUE,...",
                 help="A GPU outside the catalog, e.g. memory=96GiB,bf16=989TF,hbm=3.35TB/s,link=450GB/s,"
                      "gpus-per-node=8 (keys: memory, bf16, fp16, fp32, hbm, link, inter-link, gpus-per-node, "
                      "name); with --gpu NAME: that GPU with these fields replaced. Fits come from measured GPUs "
                      "and say which."),
    click.option("--catalog", "catalog_path", type=InputFile(), default=None, metavar="FILE",
                 help="A GPU catalog JSON (the schema of profiles/gpus.json) merged over the bundled one; its "
                      "numbers' source is user-specified (FILE)."),
)


def hardware_options(func):
    """Decorate a command with --gpu-spec and --catalog (``gpu_from_options``, ``catalog_from_options``)."""
    return _apply(_HARDWARE_OPTIONS, func)


def catalog_from_options(catalog_path: str | None = None, **_: Any):
    """The bundled GPU catalog, or with --catalog FILE merged over it (``ringplan.hardware.catalog_with``)."""
    from ringplan.hardware import catalog_with, load_catalog

    return catalog_with(catalog_path) if catalog_path else load_catalog()


def gpu_from_options(gpu_name: str | None, gpu_spec: str | None = None, catalog_path: str | None = None):
    """The ``GpuSpec`` a command plans for: --gpu NAME from the (merged) catalog, or --gpu-spec (on
    --gpu NAME's entry when both are given). Neither → ``ValueError``."""
    catalog = catalog_from_options(catalog_path)
    if gpu_spec is None:
        if gpu_name is None:
            raise ValueError("give --gpu NAME (`ringplan gpus`) or --gpu-spec KEY=VALUE,...")
        return catalog.gpu(gpu_name)
    from ringplan.hardware import gpu_from_spec

    return gpu_from_spec(gpu_spec, base=catalog.gpu(gpu_name) if gpu_name else None, catalog=catalog)


# ----------------------------------------------------------------------------- whole models


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
    click.option("--embed-dim", "--hidden", "embed_dim", type=BoundedInt(min=1, max=MAX_WIDTH), default=None,
                 cls=QuietAliasOption, quiet_aliases=("--hidden",),
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
    click.option("--sharding", type=click.Choice(SHARDINGS), default="zero3",
                 help="Data-parallel sharding: none, zero1 (optimizer states), zero2 (+ gradients), "
                      "zero3 (+ parameters; FSDP). Searched when not given."),
    click.option("--shard-group", "shard_group_size", type=BoundedInt(min=1, max=MAX_WORLD_SIZE), default=None,
                 help="GPUs G that share one copy of the sharded state; default: the whole world."),
    click.option("--checkpointing", type=click.Choice(CHECKPOINTING), default="none",
                 help="Activation checkpointing: none, selective (recompute MLP and norms), full (each block). "
                      "Searched when not given."),
    click.option("--offload/--no-offload", "offload_checkpoints", default=False,
                 help="Keep the saved block inputs in pinned CPU memory (needs --checkpointing full). "
                      "Searched when not given."),
    click.option("--offload-params/--no-offload-params", "offload_params", default=False,
                 help="Keep the sharded master weights, their gradients and the AdamW states in pinned host "
                      "memory and step AdamW on the CPU (FSDP2 CPUOffloadPolicy: all three together; zero3 or "
                      "none). Searched when not given and --gpus is (training): asked for the fewest GPUs, "
                      "ringplan does not trade GPUs for a PCIe-bound step unless told to."),
    click.option("--loss", type=click.Choice(LOSS_MODES), default="chunked",
                 help="Loss over all logits at once (full) or a chunk of tokens at a time (chunked). "
                      "Searched when not given."),
    click.option("--loss-chunk", "loss_chunk_tokens", type=TOKENS, default=4096, show_default=True,
                 help="Tokens per loss chunk with --loss chunked (4096, 8Ki, ...): the loss tile."),
    click.option("--mlp-tile", "mlp_tile_tokens", type=TILE_TOKENS, default=None,
                 help="Run the MLP on this many tokens of each sequence at a time, each tile recomputed in "
                      "backward (must divide the tokens per GPU), or 'none'. Searched when not given "
                      "(untiled, or the model width in tokens rounded up to a power of two)."),
)

_DTYPE_OPTIONS = (
    click.option("--dtype", type=DtypeChoice(sorted(DTYPE_BYTES)), default="bf16", show_default=True,
                 help="Compute and gathered-weight dtype (bfloat16, float16, float32 also read)."),
    click.option("--master-dtype", type=DtypeChoice(sorted(DTYPE_BYTES)), default="fp32", show_default=True,
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


#: How a whole model's GPUs are split besides data parallelism (issue 14): ``capacity --model`` and ``plan``.
_PARALLEL_OPTIONS = (
    click.option("--tp", "tp_degrees", type=IntListType(min_value=1, max_value=MAX_WORLD_SIZE), default=None,
                 help="With --model: tensor-parallel degrees T to consider (Megatron-style with sequence "
                      "parallelism; W = DP x CP x TP), e.g. 8 or 1,2,4,8. Searched when not given: the powers "
                      "of two up to one node's GPUs that divide the heads and FFN."),
    click.option("--allow-cross-node", is_flag=True, default=False,
                 help="With --model: let tensor parallelism (and Ulysses) span nodes; by default T and T x U "
                      "stay inside one node."),
)


def stack_parallel_options(func):
    """Decorate a whole-model planning command with --tp and --allow-cross-node."""
    return _apply(_PARALLEL_OPTIONS, func)


def host_memory_option(func):
    """Decorate a whole-model planning command with --host-memory (host RAM per node)."""
    return click.option(
        "--host-memory", "host_memory_bytes_per_node", type=BYTES, default=None,
        help="Host RAM of one node (2TB, 512GiB, ...); a plan whose host memory per node (offloaded "
             "checkpoints and states) exceeds it is infeasible. Default: the GPU's host system "
             "(DGX H100/H200/B200: 2 TB; ringplan.memory.host_memory).")(func)


def stack_dtype_options(func):
    """Decorate a command with --dtype and --master-dtype (skip where the command has its own --dtype)."""
    return _apply(_DTYPE_OPTIONS, func)


# whole models: builders

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
            "master_dtype", "offload_params", "mlp_tile_tokens")
    values = {k: kw[k] for k in keys if kw.get(k) is not None}
    if values.get("mlp_tile_tokens") == 0:  # --mlp-tile none
        values["mlp_tile_tokens"] = None
    dtype = kw.get("param_dtype") or kw.get("dtype")
    if dtype is not None:
        values["param_dtype"] = dtype
    return StackSettings(**values)


def explicit_setting_fields(**kw: Any) -> frozenset[str]:
    """``StackSettings`` fields the user fixed on the command line (a plan search varies the rest)."""
    names = {"dtype": "param_dtype"}
    fields = set(StackSettings.__dataclass_fields__)
    return frozenset(names.get(k, k) for k in explicit_options(kw) if names.get(k, k) in fields)


#: Settings options whose value, when given, is pinned instead of searched.
_SETTING_KEYS = ("sharding", "shard_group_size", "checkpointing", "offload_checkpoints", "loss", "loss_chunk_tokens",
                 "master_dtype", "dtype", "offload_params", "mlp_tile_tokens")


def stack_step_time_hook():
    """``fn(workload, gpu) -> step_time_s | None`` from ``ringplan.time.stack_time`` (imported on the
    first call; None when the time model cannot time the workload), each workload timed once (a plan
    search asks again for the rows it shows)."""
    seconds: dict[tuple, float | None] = {}

    def step_time(w, gpu):
        from ringplan.time.stack_time import step_time as predict_step_time

        key = (w, gpu.name)  # one hook serves one query, hence one GPU spec
        if key not in seconds:
            try:
                seconds[key] = predict_step_time(w, gpu).step_time_s
            except ValueError:
                seconds[key] = None
        return seconds[key]

    return step_time


def base_settings(kw: dict[str, Any]):
    """(``StackSettings`` of the options the user gave, the searched fields they fixed). A given
    --offload without --checkpointing implies full checkpointing; the rest keep the defaults."""
    given = explicit_options({k: kw.get(k) for k in _SETTING_KEYS})
    if given.get("offload_checkpoints") and "checkpointing" not in given:
        given["checkpointing"] = "full"
    fixed = explicit_setting_fields(**{k: kw.get(k) for k in _SETTING_KEYS})
    return settings_from_options(**given), fixed


def stack_query(*, gpu_name: str | None, training: bool, batch: int, layout: str, backend: str,
                ring_size: int | None, safety_margin: float, max_world_size: int, step_time: bool,
                gpus_given: bool = True, **kw: Any):
    """The ``StackQuery`` the options describe (model, GPU, pinned and searched settings).

    Parameter + optimizer-state offload is searched only when the GPUs are given (``gpus_given``):
    asked for the fewest GPUs, the search would always trade GPUs for a step an order of magnitude
    slower (every weight over PCIe, AdamW on the CPU); ``--offload-params`` asks for it there."""
    from ringplan.capacity.parallelism import parallelism_space
    from ringplan.capacity.candidates import model_mlp_tiles, settings_space
    from ringplan.capacity.stack import StackQuery

    gpu = gpu_from_options(gpu_name, kw.get("gpu_spec"), kw.get("catalog_path"))
    model = model_from_options(**kw)
    base, fixed = base_settings(kw)
    if not gpus_given:
        fixed = fixed | {"offload_params"}
    given = explicit_options({k: kw.get(k) for k in ("tp_degrees", "cp_scheme", "ulysses_degree")})
    parallelisms = parallelism_space(model, gpu.gpus_per_node, tp=given.get("tp_degrees"),
                                     schemes=(given["cp_scheme"],) if "cp_scheme" in given else None,
                                     ulysses_degree=given.get("ulysses_degree"))
    candidates = settings_space(training=training, base=base, fixed=fixed, mlp_tiles=model_mlp_tiles(model))
    return StackQuery(model=model, gpu=gpu, training=training, batch=batch, layout=layout, backend=backend,
                      candidates=candidates, ring_size=ring_size, data_parallel=None if ring_size else 1,
                      safety_margin=safety_margin, max_world_size=max_world_size,
                      step_time=stack_step_time_hook() if step_time else None,
                      host_memory_bytes_per_node=kw.get("host_memory_bytes_per_node"),
                      parallelisms=parallelisms, allow_cross_node=bool(kw.get("allow_cross_node")))


# ----------------------------------------------------------------------------- measurement (profile, validate)


def runtime_options(func):
    """Options shared by ``profile`` and ``validate``: how each point is measured and where it runs."""
    options = (
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="cuda: one GPU per rank (NCCL); cpu: gloo processes; auto: CUDA when present."),
        click.option("--warmup", "warmup_steps", type=BoundedInt(min=0, max=MAX_STEPS), default=2, show_default=True,
                     help="Warm-up steps before the memory step is read."),
        click.option("--steps", "timed_steps", type=BoundedInt(min=1, max=MAX_STEPS), default=5, show_default=True,
                     help="Timed steps; the step time is their median."),
        click.option("--timeout", "timeout_s", type=FiniteFloat(min=1.0, max=MAX_TIMEOUT_S), default=600.0,
                     show_default=True,
                     help="Seconds one ring launch (all its points) may run before it is killed; the point it "
                          "was on is recorded as failed and a fresh ring measures the rest."),
    )
    for option in reversed(options):
        func = option(func)
    return func


def measure_settings(warmup_steps: int, timed_steps: int):
    """The runtime's ``MeasureSettings`` (imports torch through ``ringplan_runtime``: call inside a command)."""
    from ringplan_runtime.measure import MeasureSettings

    return MeasureSettings(warmup_steps=warmup_steps, timed_steps=timed_steps)
