"""The model catalog: the shape of each transformer the planner knows by name.

The numbers are data, not code: ``profiles/models.json`` keeps one entry per model, keyed by the
``ModelSpec`` field names, with a source (the model's Hugging Face ``config.json`` or its paper)
beside every number. A local Hugging Face ``config.json`` gives a custom shape
(``model_from_hf_config``).

Names are case-insensitive and have aliases (``llama-3.1-8b`` → ``llama-3-8b``); an unknown name
raises ``ValueError`` listing the closest names. Standard library only: the CLI imports this at start.

Notation (README): L layers, E hidden (model width), H query heads, H_kv KV heads, D head dim,
F FFN width, V vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ringplan.hardware import closest_names, normalise_name

MODEL_CATALOG_SCHEMA = "ringplan.models/1"
FFN_TYPES: tuple[str, ...] = ("swiglu", "gelu")
NORMS: tuple[str, ...] = ("rmsnorm", "layernorm")
POSITIONS: tuple[str, ...] = ("rope", "learned")
_SIZE_FIELDS = ("n_layers", "embed_dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")


def _require_positive_int(what: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{what}: {name} must be a positive integer, got {value!r}")


def _require_choice(what: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what}: {name} {value!r} is not one of {list(choices)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """One decoder-only transformer: L blocks of (norm → attention → residual; norm → MLP → residual).

    ``ffn_type`` ``swiglu``: gate, up and down projections (3·E·F weights); ``gelu``: up and down
    (2·E·F). ``norm`` ``rmsnorm`` has a weight of E; ``layernorm`` a weight and a bias. ``position``
    ``learned`` adds a ``max_positions`` × E table (GPT-2); for RoPE ``max_positions`` is
    informational. ``qkv_bias``: biases on q, k, v (Qwen2, GPT-2); ``out_bias``: on the attention
    output projection (GPT-2); ``mlp_bias``: on the MLP projections (GPT-2). ``qk_norm``: RMSNorm
    over D on q and k per head (Qwen3). ``sources`` maps a field to its citation; it and
    ``aliases`` do not take part in equality, so two specs of the same shape compare equal only if
    their names do too (and a spec is hashable).
    """

    name: str
    n_layers: int
    embed_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    ffn_type: str
    vocab_size: int
    norm: str
    position: str = "rope"
    max_positions: int = 0
    tied_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    aliases: tuple[str, ...] = field(default=(), compare=False)
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        what = f"model {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model name must be a non-empty string, got {self.name!r}")
        _require_positive_int(what, **{f: getattr(self, f) for f in _SIZE_FIELDS})
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{what}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        _require_choice(what, "ffn_type", self.ffn_type, FFN_TYPES)
        _require_choice(what, "norm", self.norm, NORMS)
        _require_choice(what, "position", self.position, POSITIONS)
        if not isinstance(self.max_positions, int) or isinstance(self.max_positions, bool) or self.max_positions < 0:
            raise ValueError(f"{what}: max_positions must be an integer >= 0, got {self.max_positions!r}")
        if self.position == "learned" and self.max_positions == 0:
            raise ValueError(f"{what}: learned positions need max_positions > 0 (the table size)")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"{what}: RoPE rotates pairs of dimensions, so head_dim must be even, got {self.head_dim}")
        for flag in ("tied_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{what}: {flag} must be true or false, got {getattr(self, flag)!r}")
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "sources", dict(self.sources))

    def with_layers(self, n_layers: int) -> ModelSpec:
        """The same block shape with ``n_layers`` blocks (scaled-down stacks for validation)."""
        if n_layers == self.n_layers:
            return self
        return replace(self, name=f"{self.name}@{n_layers}L", n_layers=n_layers, aliases=(),
                       sources={**self.sources, "n_layers": f"scaled down from {self.n_layers} layers"})

    @property
    def q_dim(self) -> int:
        """Query width H·D (equals E for most models; Qwen3-0.6B has 2048 against E = 1024)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Key (or value) width H_kv·D."""
        return self.n_kv_heads * self.head_dim


# ----------------------------------------------------------------------------- parameter counts


def norm_parameter_count(spec: ModelSpec, width: int) -> int:
    """Parameters of one norm over ``width`` features: RMSNorm ``width`` (weight), LayerNorm
    ``2·width`` (weight + bias)."""
    return width if spec.norm == "rmsnorm" else 2 * width


def attention_parameter_count(spec: ModelSpec) -> int:
    """Parameters of one attention block: q E·H·D, k and v 2·E·H_kv·D, out H·D·E, plus biases
    (q, k, v: (H + 2·H_kv)·D when ``qkv_bias``; out: E when ``out_bias``) and, for ``qk_norm``,
    two RMSNorm weights of D shared over heads (Qwen3 ``q_norm``/``k_norm``)."""
    weights = spec.embed_dim * (spec.q_dim + 2 * spec.kv_dim) + spec.q_dim * spec.embed_dim
    biases = (spec.q_dim + 2 * spec.kv_dim if spec.qkv_bias else 0) + (spec.embed_dim if spec.out_bias else 0)
    return weights + biases + (2 * spec.head_dim if spec.qk_norm else 0)


def mlp_parameter_count(spec: ModelSpec) -> int:
    """Parameters of one MLP: SwiGLU 3·E·F (gate, up, down), GELU 2·E·F (up, down); with
    ``mlp_bias`` F per up/gate projection and E for down."""
    n_in = 2 if spec.ffn_type == "swiglu" else 1
    weights = (n_in + 1) * spec.embed_dim * spec.ffn_dim
    return weights + ((n_in * spec.ffn_dim + spec.embed_dim) if spec.mlp_bias else 0)


def layer_parameter_count(spec: ModelSpec) -> int:
    """Parameters of one transformer block: attention + MLP + two norms over E (pre-attention and
    pre-MLP)."""
    return attention_parameter_count(spec) + mlp_parameter_count(spec) + 2 * norm_parameter_count(spec, spec.embed_dim)


def embedding_parameter_count(spec: ModelSpec) -> int:
    """Parameters outside the blocks that scale with the vocabulary or positions: the token table
    V·E, a learned position table max_positions·E, and the LM head V·E unless tied to the token table."""
    positions = spec.max_positions * spec.embed_dim if spec.position == "learned" else 0
    head = 0 if spec.tied_embeddings else spec.vocab_size * spec.embed_dim
    return spec.vocab_size * spec.embed_dim + positions + head


def parameter_count(spec: ModelSpec) -> int:
    """Total parameters Ψ = embeddings (token table, learned positions, untied LM head)
    + L · layer + final norm.

    Matches the published sizes (Llama-3-8B 8.03B, GPT-2 small 124.44M exactly). Ignores buffers
    that are not parameters (RoPE frequency tables, GPT-2's causal-mask buffer).
    """
    final_norm = norm_parameter_count(spec, spec.embed_dim)
    return embedding_parameter_count(spec) + spec.n_layers * layer_parameter_count(spec) + final_norm


# ----------------------------------------------------------------------------- catalog


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCatalog:
    """All catalog models, with case-insensitive name and alias lookup."""

    models: tuple[ModelSpec, ...]
    source_path: str = ""

    def model(self, name: str) -> ModelSpec:
        """The model called ``name`` (or one of its aliases, any case); ``ValueError`` listing the
        closest names otherwise."""
        key = normalise_model_name(name)
        for spec in self.models:
            if key == spec.name or key in spec.aliases:
                return spec
        names = [spec.name for spec in self.models] + [a for spec in self.models for a in spec.aliases]
        raise ValueError(f"unknown model {name!r}; closest names: {closest_names(key, names)} "
                         f"(run `ringplan models` for the full list)")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.models)


def normalise_model_name(name: str) -> str:
    """Lower case, surrounding space dropped, inner spaces and underscores as dashes
    (``Llama 3 8B`` → ``llama-3-8b``); the GPU catalog's rule."""
    return normalise_name(name)


def default_model_catalog_path() -> Path:
    """``profiles/models.json`` of the profiles directory (see ``ringplan.paths.profiles_dir``)."""
    from ringplan.paths import profiles_dir

    return profiles_dir() / "models.json"


@functools.lru_cache(maxsize=8)
def load_model_catalog(path: str | Path | None = None) -> ModelCatalog:
    """Read and validate the model catalog (cached per path). Bad data → ``ValueError`` naming the entry."""
    path = Path(path) if path is not None else default_model_catalog_path()
    data = _read_json(path, "model catalog")
    if not isinstance(data, dict) or data.get("schema") != MODEL_CATALOG_SCHEMA:
        raise ValueError(f"{path}: schema must be {MODEL_CATALOG_SCHEMA!r}")
    if not isinstance(data.get("models"), list):
        raise ValueError(f"{path}: 'models' must be a list of entries")
    models = tuple(_model_from_entry(entry, path, i) for i, entry in enumerate(data["models"]))
    seen: dict[str, str] = {}
    for spec in models:
        for key in (spec.name, *spec.aliases):
            if key in seen:
                raise ValueError(f"{path}: name {key!r} used by both {seen[key]!r} and {spec.name!r}")
            seen[key] = spec.name
    return ModelCatalog(models=models, source_path=str(path))


def _read_json(path: Path, what: str) -> Any:
    from ringplan.jsonfile import read_json_file

    return read_json_file(path, what)


def _model_from_entry(entry: Any, path: Path, index: int) -> ModelSpec:
    label = entry.get("name", f"#{index}") if isinstance(entry, dict) else f"#{index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: model entry {label} is not an object")
    entry = dict(entry)
    entry["name"] = normalise_model_name(entry.get("name", ""))
    entry["aliases"] = tuple(normalise_model_name(a) for a in entry.get("aliases", ()))
    try:
        return ModelSpec(**entry)
    except TypeError as exc:
        raise ValueError(f"{path}: model entry {label!r}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------- Hugging Face config.json

HF_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
_GATED_ACTS = ("silu", "swish")
_GPT2_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


def model_from_hf_config(path: str | Path, *, name: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a local Hugging Face ``config.json`` (llama, mistral, qwen2, qwen3, gpt2).

    ``name`` defaults to the folder name for a file called ``config.json``, else the file stem.
    Defaults follow the ``transformers`` config classes: ``num_key_value_heads`` = heads,
    ``head_dim`` = hidden / heads, GPT-2 ``n_inner`` = 4·``n_embd``, tied embeddings only for GPT-2
    unless ``tie_word_embeddings`` says. Bad JSON, a missing or ill-typed key or an unsupported
    ``model_type`` → ``ValueError`` naming the file and the key.
    """
    path = Path(path)
    data = _read_json(path, "config file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config.json must hold a JSON object")
    if name is None:
        name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    model_type = data.get("model_type")
    if model_type is None:
        raise ValueError(f"{path}: missing key 'model_type' (one of {list(HF_MODEL_TYPES)})")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: {list(HF_MODEL_TYPES)}")
    reader = _gpt2_fields if model_type == "gpt2" else _llama_fields
    fields, keys = reader(_HfKeys(path, data, model_type))
    sources = {f: f"{path}: {key}" for f, key in keys.items()}
    window = data.get("sliding_window")
    if window and data.get("use_sliding_window", True) is not False:
        sources["attention"] = f"{path}: sliding_window {window} ignored: planned as full causal attention"
    try:
        return ModelSpec(name=normalise_model_name(name), sources=sources, **fields)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


@dataclass(frozen=True, slots=True)
class _HfKeys:
    """Typed reads of one config's keys, each error naming the file and the key."""

    path: Path
    data: dict[str, Any]
    model_type: str

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{self.path}: missing key {key!r} ({self.model_type} config)")
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{self.path}: key {key!r} must be a positive integer, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.path}: key {key!r} must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            raise ValueError(f"{self.path}: key {key!r} is {value!r}; the {self.model_type} reader "
                             f"supports {list(choices)}")
        return value


def _llama_fields(cfg: _HfKeys) -> tuple[dict[str, Any], dict[str, str]]:
    """Llama / Mistral / Qwen2 / Qwen3: gated SiLU MLP, RMSNorm, RoPE."""
    heads = cfg.positive_int("num_attention_heads")
    hidden = cfg.positive_int("hidden_size")
    if cfg.data.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{cfg.path}: no key 'head_dim' and hidden_size={hidden} is not a multiple of "
                         f"num_attention_heads={heads}")
    cfg.choice("hidden_act", "silu", _GATED_ACTS)
    attention_bias = cfg.flag("attention_bias", False)
    fields = {
        "n_layers": cfg.positive_int("num_hidden_layers"), "embed_dim": hidden, "n_heads": heads,
        "n_kv_heads": cfg.positive_int("num_key_value_heads", heads), "head_dim": cfg.positive_int("head_dim", hidden // heads),
        "ffn_dim": cfg.positive_int("intermediate_size"), "ffn_type": "swiglu", "vocab_size": cfg.positive_int("vocab_size"),
        "norm": "rmsnorm", "position": "rope", "max_positions": cfg.positive_int("max_position_embeddings", 0),
        "tied_embeddings": cfg.flag("tie_word_embeddings", False),
        # Qwen2 always has q/k/v biases (transformers Qwen2Attention); Llama/Qwen3 attention_bias adds q/k/v/o.
        "qkv_bias": cfg.model_type == "qwen2" or attention_bias,
        "out_bias": attention_bias and cfg.model_type != "qwen2",
        "mlp_bias": cfg.flag("mlp_bias", False), "qk_norm": cfg.model_type == "qwen3",
    }
    keys = {"n_layers": "num_hidden_layers", "embed_dim": "hidden_size", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "ffn_dim": "intermediate_size",
            "ffn_type": "hidden_act", "vocab_size": "vocab_size", "norm": "model_type",
            "max_positions": "max_position_embeddings", "tied_embeddings": "tie_word_embeddings",
            "qkv_bias": "model_type, attention_bias", "qk_norm": "model_type"}
    return fields, keys


def _gpt2_fields(cfg: _HfKeys) -> tuple[dict[str, Any], dict[str, str]]:
    """GPT-2: GELU MLP, LayerNorm, learned positions, biases everywhere, tied LM head."""
    hidden = cfg.positive_int("n_embd")
    heads = cfg.positive_int("n_head")
    if hidden % heads:
        raise ValueError(f"{cfg.path}: n_embd={hidden} is not a multiple of n_head={heads}")
    cfg.choice("activation_function", "gelu_new", _GPT2_ACTS)
    fields = {
        "n_layers": cfg.positive_int("n_layer"), "embed_dim": hidden, "n_heads": heads, "n_kv_heads": heads,
        "head_dim": hidden // heads, "ffn_dim": cfg.positive_int("n_inner", 4 * hidden), "ffn_type": "gelu",
        "vocab_size": cfg.positive_int("vocab_size"), "norm": "layernorm", "position": "learned",
        "max_positions": cfg.positive_int("n_positions", 1024), "tied_embeddings": cfg.flag("tie_word_embeddings", True),
        "qkv_bias": True, "out_bias": True, "mlp_bias": True,
    }
    keys = {"n_layers": "n_layer", "embed_dim": "n_embd", "n_heads": "n_head", "n_kv_heads": "n_head",
            "head_dim": "n_embd / n_head", "ffn_dim": "n_inner (default 4 x n_embd)",
            "ffn_type": "activation_function", "vocab_size": "vocab_size", "norm": "model_type",
            "max_positions": "n_positions", "tied_embeddings": "tie_word_embeddings (default true)"}
    return fields, keys
