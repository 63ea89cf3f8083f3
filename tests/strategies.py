"""Hypothesis strategies that build only valid planner inputs (shapes, patterns, workloads, rings)."""

from __future__ import annotations

from hypothesis import strategies as st

from ringplan.workload import AttentionPattern, AttentionShape, RingLayout, Workload, check_layout_fits

HEADS = (1, 2, 4, 8, 12, 16, 32, 64)
HEAD_DIMS = (16, 32, 64, 80, 128, 256)
DTYPES = ("fp32", "fp16", "bf16")
ALL_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "cpu")
#: Dilated patterns in the LongNet style: geometric segments, rates 1, 2, 4 …
DILATED_PATTERNS = (((256,), (1,)), ((256, 512), (1, 2)), ((128, 256, 512), (1, 2, 4)), ((512,), (2,)))


@st.composite
def shapes(draw, *, max_batch: int = 4) -> AttentionShape:
    """A valid attention shape: H_kv divides H, E defaults to H·D or is drawn."""
    n_heads = draw(st.sampled_from(HEADS))
    n_kv_heads = draw(st.sampled_from([d for d in HEADS if n_heads % d == 0]))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    embed_dim = draw(st.one_of(st.none(), st.sampled_from([256, 768, 1024, 4096])))
    return AttentionShape(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, embed_dim=embed_dim,
                          batch=draw(st.integers(1, max_batch)), dtype=draw(st.sampled_from(DTYPES)))


@st.composite
def patterns(draw, *, dilated: bool | None = None) -> AttentionPattern:
    """Dense (optionally causal) or one of ``DILATED_PATTERNS``."""
    use_dilated = draw(st.booleans()) if dilated is None else dilated
    causal = draw(st.booleans())
    if not use_dilated:
        return AttentionPattern(causal=causal)
    segments, rates = draw(st.sampled_from(DILATED_PATTERNS))
    return AttentionPattern(causal=causal, segment_lengths_tokens=segments, dilation_rates=rates)


@st.composite
def workload_templates(draw, *, dilated: bool | None = None) -> Workload:
    """A workload whose sequence length is a placeholder (the lcm of its segments); callers set S."""
    pattern = draw(patterns(dilated=dilated))
    placeholder = max(pattern.segment_lengths_tokens, default=1)
    return Workload(seq_len_tokens=placeholder, shape=draw(shapes()), pattern=pattern,
                    training=draw(st.booleans()), projections=draw(st.booleans()))


@st.composite
def layouts(draw, *, dilated: bool = False, ring_sizes=st.integers(1, 16)) -> RingLayout:
    """A ring: dilated patterns use the contiguous layout (the runtime's constraint)."""
    layout = "contiguous" if dilated else draw(st.sampled_from(("contiguous", "zigzag")))
    return RingLayout(ring_size=draw(ring_sizes), layout=layout, backend=draw(st.sampled_from(ALL_BACKENDS)))


@st.composite
def planned(draw, *, dilated: bool | None = None, max_units: int = 64):
    """(workload, layout) where the sequence splits: n = m · unit tokens per rank."""
    import math

    template = draw(workload_templates(dilated=dilated))
    layout = draw(layouts(dilated=template.pattern.dilated))
    unit = layout.chunks_per_rank
    for value in (*template.pattern.segment_lengths_tokens, *template.pattern.dilation_rates):
        unit = math.lcm(unit, value)
    if template.pattern.dilated and draw(st.booleans()):
        # a rank holding part of a segment: n divides the segments, the segment group forms a ring
        n = max(1, unit // 2 ** draw(st.integers(1, 4)))
        workload = template.with_seq_len(unit * max(1, layout.ring_size * n // unit) if layout.ring_size * n % unit
                                         else layout.ring_size * n)
        try:
            check_layout_fits(workload, layout)
            return workload, layout
        except ValueError:
            pass
    n = unit * draw(st.integers(1, max_units))
    return template.with_seq_len(n * layout.ring_size), layout


# ----------------------------------------------------------------------------- whole models (issue 9)


@st.composite
def model_specs(draw, *, max_layers: int = 8):
    """A valid ``ModelSpec``: H_kv divides H, any D (not tied to E / H), SwiGLU/RMSNorm/RoPE or
    GELU/LayerNorm/learned with biases (GPT-2 style), small sizes."""
    from ringplan.models import ModelSpec

    n_heads = draw(st.sampled_from(HEADS))
    n_kv_heads = draw(st.sampled_from([d for d in HEADS if n_heads % d == 0]))
    gpt2_like = draw(st.booleans())
    return ModelSpec(
        name="hypothesis", n_layers=draw(st.integers(1, max_layers)),
        embed_dim=draw(st.sampled_from([64, 128, 256, 768, 1024, 4096])), n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=draw(st.sampled_from(HEAD_DIMS)), ffn_dim=draw(st.integers(1, 16_384)),
        ffn_type="gelu" if gpt2_like else "swiglu", vocab_size=draw(st.integers(1, 200_000)),
        norm="layernorm" if gpt2_like else "rmsnorm", position="learned" if gpt2_like else "rope",
        max_positions=draw(st.integers(1, 8192)) if gpt2_like else draw(st.integers(0, 131_072)),
        tied_embeddings=draw(st.booleans()), qkv_bias=gpt2_like or draw(st.booleans()), out_bias=gpt2_like,
        mlp_bias=gpt2_like, qk_norm=not gpt2_like and draw(st.booleans()))


@st.composite
def stack_workloads(draw, *, models=None, max_ring: int = 8, max_replicas: int = 4, max_units: int = 64):
    """A valid ``StackWorkload``: W = DP·P, G a divisor of W (or None), S splitting over the ring,
    offload only with full checkpointing."""
    from ringplan.stack import CHECKPOINTING, LOSS_MODES, SHARDINGS, StackSettings, StackWorkload

    ring = draw(st.integers(1, max_ring))
    layout = RingLayout(ring_size=ring, layout=draw(st.sampled_from(("contiguous", "zigzag"))))
    world = ring * draw(st.integers(1, max_replicas))
    sharding = draw(st.sampled_from(SHARDINGS))
    group = None if sharding == "none" else draw(st.one_of(
        st.none(), st.sampled_from([g for g in range(1, world + 1) if world % g == 0])))
    checkpointing = draw(st.sampled_from(CHECKPOINTING))
    settings = StackSettings(sharding=sharding, shard_group_size=group, checkpointing=checkpointing,
                             offload_checkpoints=checkpointing == "full" and draw(st.booleans()),
                             loss=draw(st.sampled_from(LOSS_MODES)), loss_chunk_tokens=draw(st.integers(1, 8192)),
                             param_dtype=draw(st.sampled_from(("bf16", "fp16", "fp32"))))
    seq = ring * layout.chunks_per_rank * draw(st.integers(1, max_units))
    return StackWorkload(model=draw(models if models is not None else model_specs()), seq_len_tokens=seq,
                         batch=draw(st.integers(1, 4)), training=draw(st.booleans()), world_size=world,
                         layout=layout, settings=settings)
