"""Whole-model workloads: every validation path of StackSettings / StackWorkload, the helpers,
the shared stack-settings options, and invariants over random valid workloads."""

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from strategies import stack_workloads

from ringplan.cli.common import OneLineErrorCommand, bad_input_exits_2
from ringplan.cli.options import (explicit_setting_fields, settings_from_options, stack_dtype_options,
                                        stack_settings_options)
from ringplan.models import load_model_catalog
from ringplan.stack import (StackSettings, StackWorkload, attention_workload, data_parallel_size, shard_group_size,
                            tokens_per_rank)
from ringplan.workload import RingLayout, check_layout_fits


@pytest.fixture(scope="module")
def llama():
    return load_model_catalog().model("llama-3-8b")


def workload(model, **kw):
    args = {"model": model, "seq_len_tokens": 1 << 20, "world_size": 8, "layout": RingLayout(ring_size=8)}
    return StackWorkload(**{**args, **kw})


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kw, message", [
    ({"sharding": "fsdp"}, r"sharding 'fsdp' is not one of \['none', 'zero1', 'zero2', 'zero3'\]"),
    ({"checkpointing": "some"}, r"checkpointing 'some' is not one of \['none', 'selective', 'full'\]"),
    ({"loss": "fused"}, r"loss 'fused' is not one of \['full', 'chunked'\]"),
    ({"param_dtype": "fp8"}, r"param_dtype 'fp8' is not one of"),
    ({"master_dtype": "int8"}, r"master_dtype 'int8' is not one of"),
    ({"loss_chunk_tokens": 0}, r"loss chunk must be a positive number of tokens, got 0"),
    ({"loss_chunk_tokens": -5}, r"loss chunk must be a positive number of tokens, got -5"),
    ({"shard_group_size": 0}, r"shard_group_size must be a positive integer, got 0"),
    ({"sharding": "none", "shard_group_size": 4}, r"a sharding group of 4 GPUs needs a sharding"),
    ({"offload_checkpoints": True}, r"offloading checkpoints to CPU needs full checkpointing, got checkpointing 'none'"),
    ({"offload_checkpoints": True, "checkpointing": "selective"}, r"needs full checkpointing, got checkpointing 'selective'"),
    ({"offload_checkpoints": "yes"}, r"offload_checkpoints must be true or false"),
])
def test_settings_reject_bad_values(kw, message):
    """Each invalid setting raises ValueError that names the value and, for enums, the choices."""
    with pytest.raises(ValueError, match=message):
        StackSettings(**kw)


@pytest.mark.parametrize("kw, message", [
    ({"world_size": 6, "layout": RingLayout(ring_size=4)}, r"^world size 6 is not a multiple of the ring size 4$"),
    ({"settings": StackSettings(shard_group_size=16)}, r"^sharding group of 16 GPUs is larger than the world size 8$"),
    ({"settings": StackSettings(shard_group_size=3)}, r"^world size 8 is not a multiple of the sharding group of 3 GPUs$"),
    ({"seq_len_tokens": 1001}, r"sequence of 1,001 tokens does not split over 8 ranks .* nearest valid lengths: 1,000 or 1,008"),
    ({"seq_len_tokens": 1000, "layout": RingLayout(ring_size=8, layout="zigzag")}, r"needs a multiple of 16"),
    ({"seq_len_tokens": 0}, r"seq_len_tokens must be a positive integer, got 0"),
    ({"batch": 0}, r"batch must be a positive integer, got 0"),
    ({"world_size": 0}, r"world_size must be a positive integer, got 0"),
    ({"training": "yes"}, r"training must be true or false"),
    ({"layout": 8}, r"layout must be a RingLayout, got int"),
    ({"settings": {"sharding": "zero3"}}, r"settings must be a StackSettings, got dict"),
])
def test_workload_rejects_bad_values(llama, kw, message):
    """Each invalid whole-model workload raises ValueError with the documented message."""
    with pytest.raises(ValueError, match=message):
        workload(llama, **kw)


def test_workload_rejects_a_non_model():
    """The model must be a ModelSpec."""
    with pytest.raises(ValueError, match="model must be a ModelSpec, got str"):
        StackWorkload(model="llama-3-8b", seq_len_tokens=8, world_size=1, layout=RingLayout(ring_size=1))


# ----------------------------------------------------------------------------- helpers


def test_helpers_by_hand(llama):
    """1M tokens on 16 GPUs in rings of 8: n = 131,072, DP = 2, G = 16 (or the setting, or 1 unsharded)."""
    w = workload(llama, world_size=16, layout=RingLayout(ring_size=8, layout="zigzag"))
    assert (tokens_per_rank(w), data_parallel_size(w), shard_group_size(w)) == (131_072, 2, 16)
    assert shard_group_size(workload(llama, world_size=16, settings=StackSettings(shard_group_size=8))) == 8
    assert shard_group_size(workload(llama, settings=StackSettings(sharding="none"))) == 1
    assert StackSettings().param_dtype_bytes == 2 and StackSettings().master_dtype_bytes == 4


def test_attention_workload_is_one_causal_layer(llama):
    """The attention workload has the model's H, H_kv, D, E, the batch, causal, the stack's mode and
    param dtype, and no projections."""
    w = workload(llama, batch=2, training=False, settings=StackSettings(param_dtype="fp16"))
    a = attention_workload(w)
    assert (a.seq_len_tokens, a.shape.n_heads, a.shape.n_kv_heads, a.shape.head_dim, a.shape.embed_dim) == (
        1 << 20, 32, 8, 128, 4096)
    assert (a.shape.batch, a.shape.dtype, a.pattern.causal, a.training, a.projections) == (2, "fp16", True, False, False)
    qwen = load_model_catalog().model("qwen3-0.6b")
    assert attention_workload(workload(qwen)).shape.embed_dim == 1024  # E, not H·D = 2048


def test_defaults_and_hashing(llama):
    """Defaults follow docs/STACK.md; workloads hash (usable as cache keys) and compare by value."""
    s = StackSettings()
    assert (s.sharding, s.shard_group_size, s.checkpointing, s.offload_checkpoints, s.loss, s.loss_chunk_tokens,
            s.param_dtype, s.master_dtype) == ("zero3", None, "none", False, "chunked", 4096, "bf16", "fp32")
    w = workload(llama)
    assert w.batch == 1 and w.training and hash(w) == hash(workload(llama)) and w == workload(llama)


@given(stack_workloads())
def test_valid_workloads_satisfy_the_invariants(w):
    """Property: for any valid workload, n·P = S, DP·P = W, G divides W, and the attention workload
    fits the ring."""
    p = w.layout.ring_size
    assert tokens_per_rank(w) * p == w.seq_len_tokens
    assert data_parallel_size(w) * p == w.world_size
    assert w.world_size % shard_group_size(w) == 0
    check_layout_fits(attention_workload(w), w.layout)


# ----------------------------------------------------------------------------- shared settings options


def test_settings_from_options():
    """Option values become StackSettings; --dtype becomes param_dtype; absent keys keep defaults."""
    s = settings_from_options(sharding="zero2", shard_group_size=4, checkpointing="full", offload_checkpoints=True,
                              loss="full", loss_chunk_tokens=128, dtype="fp16", master_dtype="fp32", other=1)
    assert (s.sharding, s.shard_group_size, s.checkpointing, s.offload_checkpoints, s.loss, s.loss_chunk_tokens,
            s.param_dtype) == ("zero2", 4, "full", True, "full", 128, "fp16")
    assert settings_from_options() == StackSettings()
    with pytest.raises(ValueError, match="needs full checkpointing"):
        settings_from_options(offload_checkpoints=True)


def _settings_command():
    @click.command(cls=OneLineErrorCommand)
    @stack_settings_options
    @stack_dtype_options
    @bad_input_exits_2
    def cmd(**kw):
        s = settings_from_options(**kw)
        click.echo(f"{s.sharding} {s.checkpointing} {s.offload_checkpoints} {s.loss_chunk_tokens} {s.param_dtype} "
                   f"{sorted(explicit_setting_fields(**kw))}")

    return cmd


def test_settings_options_through_click():
    """The options parse (token counts accepted), explicit fields are reported, bad combinations exit 2."""
    cmd = _settings_command()
    out = CliRunner().invoke(cmd, ["--checkpointing", "full", "--offload", "--loss-chunk", "8Ki"]).output.strip()
    assert out == "zero3 full True 8192 bf16 ['checkpointing', 'loss_chunk_tokens', 'offload_checkpoints']"
    assert CliRunner().invoke(cmd, ["--dtype", "fp16"]).output.strip().endswith("fp16 ['param_dtype']")
    bad = CliRunner().invoke(cmd, ["--offload"])
    assert bad.exit_code == 2 and bad.output.strip() == (
        "Error: offloading checkpoints to CPU needs full checkpointing, got checkpointing 'none'")
    assert CliRunner().invoke(cmd, ["--sharding", "fsdp"]).exit_code == 2
    opts = sorted(o for p in cmd.params for o in (*p.opts, *p.secondary_opts))
    assert opts == ["--checkpointing", "--dtype", "--loss", "--loss-chunk", "--master-dtype", "--mlp-tile", "--no-offload",
                    "--no-offload-params", "--offload", "--offload-params", "--shard-group", "--sharding"]
    assert all(p.help for p in cmd.params)
