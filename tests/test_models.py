"""Model catalog: real shapes with sources, lookup and errors, config.json reading, parameter counts,
the `ringplan models` command and the shared model options."""

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from strategies import model_specs

from ringplan.cli import main
from ringplan.cli.common import OneLineErrorCommand, bad_input_exits_2
from ringplan.cli.options import model_from_options, model_options, model_requested, model_selection_options
from ringplan.models import (ModelSpec, embedding_parameter_count, load_model_catalog, model_from_hf_config,
                             parameter_count)

CONFIGS = Path(__file__).parent / "data" / "hf_configs"
PUBLISHED_TOLERANCE = 0.01  # the issue: parameter_count within 1% of the published size
SHAPE_FIELDS = ("n_layers", "embed_dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "ffn_type", "vocab_size",
                "norm", "position", "max_positions", "tied_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm")


@pytest.fixture(scope="module")
def catalog():
    return load_model_catalog()


def shape(spec: ModelSpec) -> dict:
    return {f: getattr(spec, f) for f in SHAPE_FIELDS}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------------- catalog contents

# name: (L, E, H, H_kv, D, F, V, ffn_type, norm, tied, qk_norm) from each model's config.json
REAL_SHAPES = {
    "llama-3-8b": (32, 4096, 32, 8, 128, 14336, 128256, "swiglu", "rmsnorm", False, False),
    "llama-3-70b": (80, 8192, 64, 8, 128, 28672, 128256, "swiglu", "rmsnorm", False, False),
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 151936, "swiglu", "rmsnorm", True, True),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, 151936, "swiglu", "rmsnorm", False, True),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, 151936, "swiglu", "rmsnorm", False, True),
    "mistral-7b-v0.1": (32, 4096, 32, 8, 128, 14336, 32000, "swiglu", "rmsnorm", False, False),
    "mistral-7b-v0.3": (32, 4096, 32, 8, 128, 14336, 32768, "swiglu", "rmsnorm", False, False),
    "gpt2": (12, 768, 12, 12, 64, 3072, 50257, "gelu", "layernorm", True, False),
    "gpt2-xl": (48, 1600, 25, 25, 64, 6400, 50257, "gelu", "layernorm", True, False),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_catalog_has_the_real_shapes(catalog, name):
    """Every model the issue names is in the catalog with its config.json shape."""
    m = catalog.model(name)
    assert (m.n_layers, m.embed_dim, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size, m.ffn_type,
            m.norm, m.tied_embeddings, m.qk_norm) == REAL_SHAPES[name]


def test_gpt2_has_learned_positions_and_biases(catalog):
    """GPT-2: a 1024-position learned table, biases on q/k/v, out and MLP; Llama none of these."""
    gpt2, llama = catalog.model("gpt2"), catalog.model("llama-3-8b")
    assert (gpt2.position, gpt2.max_positions, gpt2.qkv_bias, gpt2.out_bias, gpt2.mlp_bias) == (
        "learned", 1024, True, True, True)
    assert (llama.position, llama.qkv_bias, llama.out_bias, llama.mlp_bias) == ("rope", False, False, False)


def test_every_field_has_a_source(catalog):
    """Each shape field of each model carries a non-empty citation (a config.json URL or the paper)."""
    for spec in catalog.models:
        missing = [f for f in SHAPE_FIELDS if not spec.sources.get(f, "").strip()]
        assert not missing, f"{spec.name}: no source for {missing}"
        assert any("huggingface.co" in s for s in spec.sources.values()), spec.name


@pytest.mark.parametrize("query, canonical", [
    ("llama-3-8b", "llama-3-8b"), ("Llama 3.1 8B", "llama-3-8b"), ("LLAMA-3.1-70B", "llama-3-70b"),
    (" meta-llama/Meta-Llama-3-8B ", "llama-3-8b"), ("Qwen/Qwen3-0.6B", "qwen3-0.6b"), ("mistral-7b", "mistral-7b-v0.1"),
    ("Mistral_7B_v0.3", "mistral-7b-v0.3"), ("gpt2-small", "gpt2"), ("GPT-2-XL", "gpt2-xl"),
])
def test_lookup_is_case_insensitive_with_aliases(catalog, query, canonical):
    """Names and aliases resolve in any case, with spaces or underscores for dashes."""
    assert catalog.model(query).name == canonical


def test_unknown_model_lists_closest_names(catalog):
    """An unknown name raises ValueError naming it and the closest catalog names."""
    with pytest.raises(ValueError, match=r"unknown model 'llama-3-9b'; closest names: llama-3-8b") as info:
        catalog.model("llama-3-9b")
    assert "ringplan models" in str(info.value)
    with pytest.raises(ValueError, match=r"closest names: qwen3-8b"):
        catalog.model("qwen3-7b")


def test_catalog_file_errors(tmp_path):
    """Missing file, wrong schema, bad entry, duplicate alias: ValueError naming the file."""
    path = tmp_path / "models.json"
    with pytest.raises(ValueError, match="not found"):
        load_model_catalog(path)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="schema must be 'ringplan.models/1'"):
        load_model_catalog(path)
    entry = {"name": "a", "n_layers": 2, "embed_dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
             "ffn_dim": 128, "ffn_type": "swiglu", "vocab_size": 100, "norm": "rmsnorm"}
    path.write_text(json.dumps({"schema": "ringplan.models/1", "models": [{**entry, "n_kv_heads": 3}]}))
    with pytest.raises(ValueError, match=r"models.json: model 'a': n_heads=4 is not a multiple of n_kv_heads=3"):
        load_model_catalog(path)
    path.write_text(json.dumps({"schema": "ringplan.models/1", "models": [{**entry, "colour": "red"}]}))
    with pytest.raises(ValueError, match="colour"):
        load_model_catalog(path)
    path.write_text(json.dumps({"schema": "ringplan.models/1", "models": [
        {**entry, "aliases": ["x"]}, {**entry, "name": "b", "aliases": ["X"]}]}))
    with pytest.raises(ValueError, match="name 'x' used by both 'a' and 'b'"):
        load_model_catalog(path)


@given(model_specs())
def test_catalog_round_trip(tmp_path_factory, spec):
    """Property: any valid spec written as a catalog entry loads back equal."""
    path = tmp_path_factory.mktemp("cat") / "models.json"
    path.write_text(json.dumps({"schema": "ringplan.models/1", "models": [asdict(spec)]}))
    assert load_model_catalog(path).model("hypothesis") == spec


# ----------------------------------------------------------------------------- ModelSpec validation

BASE = {"name": "m", "n_layers": 2, "embed_dim": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "ffn_dim": 128,
        "ffn_type": "swiglu", "vocab_size": 100, "norm": "rmsnorm"}


@pytest.mark.parametrize("change, message", [
    ({"n_layers": 0}, "n_layers must be a positive integer, got 0"),
    ({"embed_dim": -1}, "embed_dim must be a positive integer, got -1"),
    ({"vocab_size": 1.5}, "vocab_size must be a positive integer, got 1.5"),
    ({"n_kv_heads": 3}, "n_heads=4 is not a multiple of n_kv_heads=3"),
    ({"ffn_type": "relu"}, "ffn_type 'relu' is not one of \\['swiglu', 'gelu'\\]"),
    ({"norm": "batchnorm"}, "norm 'batchnorm' is not one of"),
    ({"position": "alibi"}, "position 'alibi' is not one of"),
    ({"position": "learned"}, "learned positions need max_positions > 0"),
    ({"max_positions": -2}, "max_positions must be an integer >= 0"),
    ({"qk_norm": 1}, "qk_norm must be true or false"),
    ({"name": ""}, "model name must be a non-empty string"),
])
def test_model_spec_rejects_bad_values(change, message):
    """Each invalid field raises ValueError naming the model, the field and the value."""
    with pytest.raises(ValueError, match=message):
        ModelSpec(**{**BASE, **change})


def test_with_layers_keeps_the_block_and_is_hashable(catalog):
    """with_layers changes L only (and the name); specs hash and compare by shape and name."""
    full = catalog.model("llama-3-8b")
    small = full.with_layers(8)
    assert small.n_layers == 8 and small.name == "llama-3-8b@8L"
    assert {k: v for k, v in shape(small).items() if k != "n_layers"} == {
        k: v for k, v in shape(full).items() if k != "n_layers"}
    assert full.with_layers(32) is full
    assert len({full, catalog.model("Llama 3.1 8B"), small}) == 2
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        full.with_layers(0)


# ----------------------------------------------------------------------------- parameter counts

# published sizes: model cards / checkpoint metadata (profiles/models.json sources.parameter_count)
PUBLISHED = {"llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9, "qwen3-0.6b": 0.596e9, "qwen3-8b": 8.19e9,
             "qwen3-32b": 32.8e9, "mistral-7b-v0.1": 7.24e9, "mistral-7b-v0.3": 7.25e9, "gpt2": 124e6, "gpt2-xl": 1.56e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published_sizes(catalog, name):
    """parameter_count is within 1% of each model's published size."""
    assert parameter_count(catalog.model(name)) == pytest.approx(PUBLISHED[name], rel=PUBLISHED_TOLERANCE)


def test_parameter_count_exact_checkpoints(catalog):
    """Hand-checked totals: Llama-3-8B 8,030,261,248 and GPT-2 124,439,808 (checkpoint tensor sums),
    GPT-2 XL 1,557,611,200; Qwen3-0.6B 0.44B without embeddings (model card)."""
    assert parameter_count(catalog.model("llama-3-8b")) == 8_030_261_248
    assert parameter_count(catalog.model("gpt2")) == 124_439_808
    assert parameter_count(catalog.model("gpt2-xl")) == 1_557_611_200
    qwen = catalog.model("qwen3-0.6b")
    assert parameter_count(qwen) - embedding_parameter_count(qwen) == pytest.approx(0.44e9, rel=PUBLISHED_TOLERANCE)


def test_parameter_count_hand_example():
    """A 2-layer SwiGLU/RMSNorm toy by hand: embed 100·64, per layer q 64·64 + kv 2·64·32 + o 64·64
    + MLP 3·64·128 + norms 2·64, final norm 64, untied head 100·64."""
    spec = ModelSpec(**BASE)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert parameter_count(spec) == 2 * 100 * 64 + 2 * per_layer + 64
    assert parameter_count(replace(spec, tied_embeddings=True)) == parameter_count(spec) - 100 * 64


# ----------------------------------------------------------------------------- Hugging Face config.json


@pytest.mark.parametrize("fixture, name", [("llama-3-8b.json", "llama-3-8b"), ("qwen3-0.6b.json", "qwen3-0.6b"),
                                           ("gpt2.json", "gpt2"), ("mistral-7b-v0.1.json", "mistral-7b-v0.1")])
def test_hf_config_matches_the_catalog(catalog, fixture, name):
    """Reading a model's real config.json gives the catalog entry's shape (max_positions included)."""
    spec = model_from_hf_config(CONFIGS / fixture)
    assert spec.name == name
    assert shape(spec) == shape(catalog.model(name))
    assert spec.sources["n_layers"].endswith(("num_hidden_layers", "n_layer"))


def test_hf_config_qwen2_biases():
    """Qwen2 has q/k/v biases but no output bias; Qwen2-0.5B totals 494,032,768 parameters."""
    spec = model_from_hf_config(CONFIGS / "qwen2-0.5b.json")
    assert (spec.qkv_bias, spec.out_bias, spec.qk_norm, spec.tied_embeddings, spec.head_dim) == (
        True, False, False, True, 64)
    assert parameter_count(spec) == 494_032_768


def test_hf_config_notes_an_ignored_sliding_window():
    """Mistral-7B-v0.1's sliding window is recorded as ignored (planned as full causal attention)."""
    spec = model_from_hf_config(CONFIGS / "mistral-7b-v0.1.json")
    assert "sliding_window 4096 ignored" in spec.sources["attention"]
    assert "attention" not in model_from_hf_config(CONFIGS / "qwen3-0.6b.json").sources


def test_hf_config_named_after_its_folder(tmp_path):
    """A file called config.json takes its folder's name; ``name=`` overrides."""
    folder = tmp_path / "My_Model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-3-8b.json").read_text())
    assert model_from_hf_config(folder / "config.json").name == "my-model"
    assert model_from_hf_config(folder / "config.json", name="x").name == "x"


@pytest.mark.parametrize("fixture, message", [
    ("broken.json", r"broken.json: not valid JSON"),
    ("missing-key.json", r"missing-key.json: missing key 'num_hidden_layers' \(llama config\)"),
    ("unsupported.json", r"unsupported.json: model_type 'mamba' is not supported; supported: \['llama'"),
    ("bad-kv-heads.json", r"bad-kv-heads.json: .*n_heads=32 is not a multiple of n_kv_heads=6"),
    ("absent.json", r"absent.json: config file not found"),
])
def test_hf_config_errors_name_file_and_key(fixture, message):
    """Bad JSON, a missing key, an unsupported model_type, bad head counts, no file: ValueError."""
    with pytest.raises(ValueError, match=message):
        model_from_hf_config(CONFIGS / fixture)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "4096"}, r"key 'hidden_size' must be a positive integer, got '4096'"),
    ({"tie_word_embeddings": "no"}, r"key 'tie_word_embeddings' must be true or false"),
    ({"hidden_act": "gelu"}, r"key 'hidden_act' is 'gelu'; the llama reader supports \['silu', 'swish'\]"),
    ({"model_type": None}, r"missing key 'model_type'"),
    ({"num_attention_heads": 30}, r"no key 'head_dim' and hidden_size=4096 is not a multiple of num_attention_heads=30"),
])
def test_hf_config_bad_values(tmp_path, change, message):
    """Ill-typed or unsupported values name the key and the value."""
    data = {**json.loads((CONFIGS / "llama-3-8b.json").read_text()), **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        model_from_hf_config(path)


def _hf_config(spec: ModelSpec) -> dict:
    if spec.ffn_type == "gelu":
        return {"model_type": "gpt2", "n_layer": spec.n_layers, "n_embd": spec.embed_dim, "n_head": spec.n_heads,
                "n_inner": spec.ffn_dim, "vocab_size": spec.vocab_size, "n_positions": spec.max_positions,
                "tie_word_embeddings": spec.tied_embeddings}
    return {"model_type": "qwen3" if spec.qk_norm else "llama", "num_hidden_layers": spec.n_layers,
            "hidden_size": spec.embed_dim, "num_attention_heads": spec.n_heads,
            "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "intermediate_size": spec.ffn_dim,
            "vocab_size": spec.vocab_size, "tie_word_embeddings": spec.tied_embeddings,
            "attention_bias": spec.qkv_bias, "max_position_embeddings": spec.max_positions or None}


@given(model_specs())
def test_hf_config_round_trip(tmp_path_factory, spec):
    """Property: a valid shape written as a config.json reads back with the same shape (GPT-2 configs
    have H_kv = H and D = E / H, so those are fixed first)."""
    if spec.ffn_type == "gelu":
        spec = replace(spec, n_kv_heads=spec.n_heads, embed_dim=spec.n_heads * spec.head_dim,
                       qkv_bias=True, out_bias=True, mlp_bias=True)
    elif spec.qkv_bias:
        spec = replace(spec, out_bias=True)  # Llama/Qwen3 attention_bias puts biases on q, k, v and o
    path = tmp_path_factory.mktemp("hf") / "hypothesis.json"
    path.write_text(json.dumps(_hf_config(spec)))
    assert shape(model_from_hf_config(path)) == shape(spec)


# ----------------------------------------------------------------------------- `ringplan models`


def test_models_command_lists_the_catalog(catalog):
    """The table has one row per model with its parameter count in billions; exit 0."""
    result = run("models")
    assert result.exit_code == 0, result.output
    for spec in catalog.models:
        assert f"| {spec.name} " in result.output
    assert "|     8.03 |" in result.output and "|     0.12 |" in result.output


def test_models_command_json_and_one_model_with_sources():
    """JSON carries fields, counts and sources; a NAME (alias, any case) shows its sources."""
    data = json.loads(run("models", "--format", "json").output)
    llama = next(r for r in data if r["name"] == "llama-3-8b")
    assert llama["parameter_count"] == 8_030_261_248 and llama["n_kv_heads"] == 8 and llama["sources"]["ffn_dim"]
    result = run("models", "Llama-3.1-8B")
    assert result.exit_code == 0
    assert "ffn_dim: https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json" in result.output
    csv_out = run("models", "--format", "csv").output.splitlines()
    assert csv_out[0].startswith("name,aliases,n_layers") and len(csv_out) == 1 + len(data)


def test_models_command_reads_a_config():
    """--config shows the model a local config.json describes."""
    result = run("models", "--config", str(CONFIGS / "qwen3-0.6b.json"), "--format", "json")
    assert result.exit_code == 0 and json.loads(result.output)[0]["head_dim"] == 128


@pytest.mark.parametrize("args, message", [
    (("models", "llama-3-9b"), "unknown model 'llama-3-9b'; closest names: llama-3-8b"),
    (("models", "--config", str(CONFIGS / "broken.json")), "broken.json: not valid JSON"),
    (("models", "gpt2", "--config", str(CONFIGS / "gpt2.json")), "not both"),
])
def test_models_command_bad_input_exits_2(args, message):
    """Bad input prints one `Error:` line and exits 2."""
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_models_option_set():
    """Golden option set of `ringplan models`; every option has help."""
    cmd = main.get_command(None, "models")
    assert sorted(o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")) == [
        "--config", "--format", "--sources"]
    assert all(p.help for p in cmd.params if isinstance(p, click.Option))


def test_planner_modules_stay_light():
    """models, stack and the option module import neither numpy, scipy nor torch (fast CLI start)."""
    code = ("import sys, ringplan.models, ringplan.stack, ringplan.cli.options, ringplan.cli.models; "
            "print(sorted(m for m in ('numpy', 'scipy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- shared model options


def test_model_from_options_catalog_config_and_overrides(catalog):
    """--model, --config, and overrides (attention option names included) build the right spec."""
    assert model_from_options(model_name="qwen3-8b") == catalog.model("qwen3-8b")
    assert model_from_options(config_path=str(CONFIGS / "gpt2.json"), n_layers=2).n_layers == 2
    spec = model_from_options(model_name="llama-3-8b", n_layers=4, ffn_dim=8192, n_kv_heads=4, unrelated=1)
    assert (spec.n_layers, spec.ffn_dim, spec.n_kv_heads, spec.n_heads) == (4, 8192, 4, 32)
    assert spec.name == "llama-3-8b(ffn_dim=8192, n_kv_heads=4)@4L" and spec.sources["ffn_dim"] == "command-line option"
    assert model_requested(model_name="x") and not model_requested(n_heads=32)


def test_model_from_options_custom_shape():
    """Without --model/--config the shape options make a custom model; E defaults to H·D, D to E/H."""
    spec = model_from_options(n_layers=2, n_heads=8, head_dim=64, ffn_dim=1024, vocab_size=1000)
    assert (spec.name, spec.embed_dim, spec.n_kv_heads, spec.ffn_type, spec.norm) == ("custom", 512, 8, "swiglu", "rmsnorm")
    assert model_from_options(n_layers=2, n_heads=8, embed_dim=512, ffn_dim=1024, vocab_size=10).head_dim == 64


@pytest.mark.parametrize("kw, message", [
    ({"model_name": "gpt2", "config_path": "x.json"}, "give --model NAME or --config PATH, not both"),
    ({"n_heads": 8}, "the custom shape lacks --layers, --ffn, --vocab, --hidden or --head-dim"),
    ({"n_layers": 1, "n_heads": 3, "embed_dim": 64, "ffn_dim": 8, "vocab_size": 8},
     "hidden size 64 is not a multiple of 3 heads"),
    ({"model_name": "llama-3-8b", "n_kv_heads": 5}, "n_heads=32 is not a multiple of n_kv_heads=5"),
    ({"model_name": "llama-3-9b"}, "unknown model 'llama-3-9b'"),
])
def test_model_from_options_errors(kw, message):
    """Bad option combinations raise ValueError with the reason."""
    with pytest.raises(ValueError, match=message):
        model_from_options(**kw)


def _capacity_like_command():
    """A command shaped like `ringplan capacity`: its own --heads (default 32) plus the selection options."""
    @click.command(cls=OneLineErrorCommand)
    @click.option("--heads", "n_heads", type=int, default=32, help="H.")
    @model_selection_options
    @bad_input_exits_2
    def cmd(**kw):
        spec = model_from_options(**kw)
        click.echo(f"{spec.name} {spec.n_layers} {spec.n_heads}")

    return cmd


def test_selection_options_on_a_command_with_heads():
    """Defaults of the host command never reshape a named model; explicit values do; errors exit 2."""
    cmd = _capacity_like_command()
    assert CliRunner().invoke(cmd, ["--model", "llama-3-70b"]).output.strip() == "llama-3-70b 80 64"
    assert CliRunner().invoke(cmd, ["--model", "llama-3-70b", "--layers", "2"]).output.strip() == "llama-3-70b@2L 2 64"
    assert CliRunner().invoke(cmd, ["--model", "llama-3-70b", "--heads", "16"]).output.strip().endswith(" 80 16")
    bad = CliRunner().invoke(cmd, ["--model", "lama"])
    assert bad.exit_code == 2 and "closest names" in bad.output


def test_full_model_options_golden_set():
    """model_options adds exactly the documented options, each with help."""
    @click.command()
    @model_options
    def cmd(**kw):
        click.echo(model_from_options(**kw).name)

    opts = sorted(o for p in cmd.params for o in (*p.opts, *p.secondary_opts))
    assert opts == ["--config", "--embed-dim", "--ffn", "--ffn-type", "--head-dim", "--heads", "--hidden", "--kv-heads",
                    "--layers",
                    "--model", "--no-qk-norm", "--norm", "--qk-norm", "--tied-embeddings", "--untied-embeddings",
                    "--vocab"]
    assert all(p.help for p in cmd.params)
    result = CliRunner().invoke(cmd, ["--layers", "2", "--hidden", "256", "--heads", "4", "--ffn", "512", "--vocab",
                                      "100", "--tied-embeddings"])
    assert result.output.strip() == "custom"
