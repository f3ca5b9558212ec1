"""The one registry of DeepSeek-V3 shapes that every benchmark uses.

Every size a benchmark allocates comes from here, so that a table row can be traced to a named place in the
model. :data:`V3` holds the model's dimensions (DeepSeek-V3 / R1, 671B; the same values as
``transformers.DeepseekV3Config()``'s defaults, which ``python_tests/test_benchmarks.py`` checks), and a
:class:`ShapeSet` adds the token counts a run uses:

* ``"v3"``: the real widths with the token counts of prefill (4096, 8192) and decode (128); for the GPU.
* ``"cpu"``: the real widths (so the kernels see the same row lengths and head counts) with token counts a
  2-core CPU runs in milliseconds; for ``benchmarks.run --device cpu`` and pytest-benchmark.
* ``"smoke"``: the fewest tokens that still exercise every case; for the CI smoke test.

Per kernel family, a function turns a ShapeSet into the list of named cases that family benchmarks
(:func:`norm_shapes`, :func:`rope_shapes`, :func:`moe_gate_shapes`, :func:`moe_layer_shapes`,
:func:`mla_decode_shapes`, :func:`mla_prefill_shapes`), :func:`model_shape` gives the model benchmark's batch
and :func:`mla_generate_shape` the generation benchmark's. The MoE layer shapes also name the other models
whose expert widths a benchmark uses (:data:`V2_LITE_MOE`, the tiny preset's :data:`TINY_MOE`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """DeepSeek-V3's dimensions (config.json of deepseek-ai/DeepSeek-V3, field names in brackets)."""

    hidden: int = 7168  # residual stream width [hidden_size]
    q_lora_rank: int = 1536  # MLA: compressed query width, normalised by q_a_layernorm [q_lora_rank]
    kv_lora_rank: int = 512  # MLA: latent c_kv width, normalised by kv_a_layernorm, cached [kv_lora_rank]
    qk_rope_head_dim: int = 64  # MLA: rotary part of each q / k head; k_pe is shared by all heads
    qk_nope_head_dim: int = 128  # MLA: non-rotary part of each q / k head
    v_head_dim: int = 128  # MLA: value head width
    heads: int = 128  # attention heads [num_attention_heads]
    vocab: int = 129280  # [vocab_size]
    moe_inter: int = 2048  # routed / shared expert FFN width [moe_intermediate_size]
    dense_inter: int = 18432  # FFN width of the first dense layers [intermediate_size]
    experts: int = 256  # routed experts [n_routed_experts]
    shared_experts: int = 1  # [n_shared_experts]
    top_k: int = 8  # experts per token [num_experts_per_tok]
    n_group: int = 8  # expert groups for group-limited routing [n_group]
    topk_group: int = 4  # groups kept per token [topk_group]
    layers: int = 61  # [num_hidden_layers]
    first_k_dense: int = 3  # layers before the first MoE layer [first_k_dense_replace]
    rms_norm_eps: float = 1e-6  # [rms_norm_eps]
    # RoPE with YaRN [rope_theta, rope_scaling]: 4K pre-training context stretched 40x to 160K.
    rope_theta: float = 10000.0
    yarn_factor: float = 40.0
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 1.0

    @property
    def qk_head_dim(self) -> int:
        """Width of one q / k head: nope + rope (192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


V3 = ModelDims()

# Token counts (rows of the activations a kernel sees), named by the phase they stand for.
TOKENS_DECODE = 128  # one decode step of a 128-sequence batch
TOKENS_PREFILL = 4096  # one 4K prefill chunk
TOKENS_PREFILL_LONG = 8192  # one 8K prefill chunk (the MLA prefill anchor's S)


@dataclass(frozen=True)
class ShapeSet:
    """Token counts of one run, by phase (phase name -> tokens). The dtype follows the device (harness)."""

    name: str
    dims: ModelDims
    tokens: tuple[tuple[str, int], ...]
    doc: str


SHAPE_SETS: dict[str, ShapeSet] = {
    s.name: s
    for s in (
        ShapeSet(
            "v3",
            V3,
            (("decode", TOKENS_DECODE), ("prefill", TOKENS_PREFILL), ("prefill8k", TOKENS_PREFILL_LONG)),
            "DeepSeek-V3 widths at decode (128 tokens) and prefill (4096, 8192 tokens): the GPU tables",
        ),
        ShapeSet(
            "cpu",
            V3,
            # 16 / 256 tokens: the same widths, a few milliseconds per call on 2 cores.
            (("decode", 16), ("prefill", 256)),
            "DeepSeek-V3 widths, token counts cut for a 2-core CPU (16 and 256)",
        ),
        ShapeSet(
            "smoke",
            V3,
            (("decode", 4),),
            "DeepSeek-V3 widths, 4 tokens: the CI smoke test",
        ),
    )
}


def shape_set(name: str) -> ShapeSet:
    try:
        return SHAPE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown shape set {name!r}; known: {', '.join(SHAPE_SETS)}") from None


# ------------------------------------------------------------------------------------------------------
# Per-family cases.


@dataclass(frozen=True)
class NormShape:
    """One RMSNorm call: ``rows`` tokens of width ``dim``; ``where`` names the norm in the model.

    ``row_stride`` is the distance between rows in the tensor the model hands the norm: ``dim`` when the
    input is its own tensor, wider when it is a column slice (c_kv is the first 512 columns of the
    kv_a_proj output, 576 wide), so the benchmark times the layout the model really has.
    """

    where: str
    phase: str
    rows: int
    dim: int
    row_stride: int

    @property
    def label(self) -> str:
        return f"{self.where} {self.phase}"

    @property
    def shape(self) -> str:
        s = f"[{self.rows}, {self.dim}]"
        return s if self.row_stride == self.dim else s + f" of [{self.rows}, {self.row_stride}]"


def norm_shapes(s: ShapeSet) -> list[NormShape]:
    """The three RMSNorms of a V3 layer at every token count of ``s``.

    * ``hidden``: input_layernorm / post_attention_layernorm (and the final norm) over [T, 7168];
    * ``q_a``: MLA's q_a_layernorm over the compressed query [T, 1536];
    * ``kv_a``: MLA's kv_a_layernorm over the latent c_kv [T, 512], a slice of [T, 512 + 64].
    """
    d = s.dims
    widths = (
        ("hidden", d.hidden, d.hidden),
        ("q_a", d.q_lora_rank, d.q_lora_rank),
        ("kv_a", d.kv_lora_rank, d.kv_lora_rank + d.qk_rope_head_dim),
    )
    return [NormShape(w, phase, t, dim, stride) for phase, t in s.tokens for w, dim, stride in widths]


@dataclass(frozen=True)
class RopeShape:
    """One apply_rope call on ``[tokens, heads, dim]``; ``where`` names the tensor in MLA.

    The model's rotary tensors are slices: channels ``[offset, offset + dim)`` of a ``[tokens, heads,
    parent_dim]`` tensor (q_pe: the last 64 of each 192-wide query head; k_pe: the last 64 of the 576-wide
    kv_a_proj output). The benchmark allocates the parent and rotates the slice, the layout the model has.
    """

    where: str
    phase: str
    tokens: int
    heads: int
    dim: int
    parent_dim: int
    offset: int

    @property
    def label(self) -> str:
        return f"{self.where} {self.phase}"

    @property
    def shape(self) -> str:
        return f"[{self.tokens}, {self.heads}, {self.dim}] of [.., {self.parent_dim}]"


def rope_shapes(s: ShapeSet) -> list[RopeShape]:
    """MLA's two rotary tensors at every token count of ``s`` (interleaved pairs, DeepSeek's layout).

    * ``q_pe``: the rotary slice of every query head, [T, 128, 64] of [T, 128, 192];
    * ``k_pe``: the one rotary key shared by all heads, [T, 1, 64] of [T, 1, 576] (what the cache stores).
    """
    d = s.dims
    cases = (
        ("q_pe", d.heads, d.qk_head_dim, d.qk_nope_head_dim),
        ("k_pe", 1, d.kv_lora_rank + d.qk_rope_head_dim, d.kv_lora_rank),
    )
    return [
        RopeShape(where, phase, t, heads, d.qk_rope_head_dim, parent, offset)
        for phase, t in s.tokens
        for where, heads, parent, offset in cases
    ]


@dataclass(frozen=True)
class ModelShape:
    """The model benchmark's input: ``batch`` sequences of ``seq`` tokens through the ``preset`` model."""

    preset: str
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def model_shape(s: ShapeSet) -> ModelShape:
    """Batch 4 x 128 tokens of the tiny model; the smoke set runs 1 x 16 so CI stays fast."""
    if s.name == "smoke":
        return ModelShape("tiny", 1, 16)
    return ModelShape("tiny", 4, 128)


# ------------------------------------------------------------------------------------------------------
# MoE: the routing gate and the routed-expert layer.


@dataclass(frozen=True)
class MoEDims:
    """One model's routed-expert layer and router (config.json field names in brackets)."""

    name: str
    hidden: int  # D [hidden_size]
    inter: int  # I, one expert's FFN width [moe_intermediate_size]
    experts: int  # E [n_routed_experts]
    top_k: int  # K [num_experts_per_tok]
    n_group: int  # [n_group] (1: no group limit)
    topk_group: int  # [topk_group]
    score_func: str  # "sigmoid" (V3) or "softmax" (V2) [scoring_func]
    group_score: str  # "top2_sum" (V3) or "max" (V2)
    norm_topk_prob: bool  # [norm_topk_prob]
    routed_scaling_factor: float  # [routed_scaling_factor]

    def weight_bytes(self, experts: int, elem_bytes: int) -> int:
        """Bytes of ``experts`` experts' W1, W3 and W2 (3 I D elements each)."""
        return experts * 3 * self.inter * self.hidden * elem_bytes


V3_MOE = MoEDims("v3", V3.hidden, V3.moe_inter, V3.experts, V3.top_k, V3.n_group, V3.topk_group,
                 "sigmoid", "top2_sum", True, 2.5)
# DeepSeek-V2-Lite (15.7B; r1kernels.ModelConfig.preset("v2-lite")): softmax scores, no group limit, top-6
# of 64, weights not renormalised.
V2_LITE_MOE = MoEDims("v2-lite", 2048, 1408, 64, 6, 1, 1, "softmax", "max", False, 1.0)
# r1kernels.ModelConfig.preset("tiny"): the model the CPU tests and the model benchmark run.
TINY_MOE = MoEDims("tiny", 256, 128, 16, 4, 4, 2, "sigmoid", "top2_sum", True, 2.5)

# Gate token counts (the issue's): one token, a decode batch, a 4K and a 16K prefill chunk.
GATE_TOKENS = (1, TOKENS_DECODE, TOKENS_PREFILL, 16384)


@dataclass(frozen=True)
class MoEGateShape:
    """One routing call: ``ops.moe_route`` of fp32 router logits ``[tokens, E]`` with ``dims``' rules."""

    dims: MoEDims
    tokens: int

    @property
    def label(self) -> str:
        return f"gate {self.dims.name} T={self.tokens}"

    @property
    def shape(self) -> str:
        d = self.dims
        return f"[{self.tokens}, {d.experts}] top-{d.top_k} groups {d.n_group}/{d.topk_group}"


@dataclass(frozen=True)
class MoELayerShape:
    """One routed-expert layer call: ``ops.moe_experts`` of ``[tokens, D]`` through ``dims``' experts."""

    dims: MoEDims
    tokens: int

    @property
    def label(self) -> str:
        return f"{self.dims.name} T={self.tokens}"

    @property
    def shape(self) -> str:
        d = self.dims
        return f"T={self.tokens} D={d.hidden} I={d.inter} E={d.experts} top-{d.top_k}"


def moe_gate_shapes(s: ShapeSet) -> list[MoEGateShape]:
    """V3's router (E=256, groups 8/4, top-8) at every gate token count (the smoke set: 4 tokens)."""
    tokens = (4,) if s.name == "smoke" else GATE_TOKENS
    return [MoEGateShape(V3_MOE, t) for t in tokens]


def moe_layer_shapes(s: ShapeSet) -> list[MoELayerShape]:
    """The routed-expert layers of a run.

    * ``v3`` (GPU): V3 (D=7168, I=2048, E=256, top-8; 22.5 GB of bf16 weights) and V2-Lite (D=2048, I=1408,
      E=64, top-6) at decode (128) and prefill (4096) token counts.
    * ``cpu``: the tiny preset's experts at 1 and 16 tokens (decode) and 512 (the model benchmark's 4 x 128
      batch). V3's weights (45 GB in fp32) and V2-Lite's (2.2 GB) are not for a 2-core CPU, and at real
      widths the loop reference's backward alone takes seconds there (it builds a full-size weight
      gradient per expert).
    * ``smoke``: the tiny preset's experts at 4 tokens.
    """
    if s.name == "smoke":
        return [MoELayerShape(TINY_MOE, 4)]
    if s.name == "cpu":
        return [MoELayerShape(TINY_MOE, t) for t in (1, 16, 512)]
    return [MoELayerShape(d, t) for d in (V3_MOE, V2_LITE_MOE) for t in (TOKENS_DECODE, TOKENS_PREFILL)]


# ------------------------------------------------------------------------------------------------------
# MLA: absorbed decode over the paged latent cache, prefill attention, and generation on the tiny model.

# FlashMLA's benchmark (and DESIGN's anchor): b=128 requests of s cached tokens, h query heads, Sq new tokens.
MLA_DECODE_BATCH = 128
MLA_DECODE_SEQLENS = (4096, 8192, 16384)
MLA_DECODE_HEADS = (16, 128)  # 128: V3's heads on one GPU; 16: the per-GPU share under 8-way tensor parallelism
MLA_DECODE_SQ = (1, 2)  # 2: a speculative step verifying one drafted token
MLA_PAGE = 64  # FlashMLA's page (block) size
# The MLA prefill anchor: one causal sequence of S tokens, 128 heads, q/k head 192 (128 nope + 64 rope), v 128.
MLA_PREFILL_SEQLENS = (1024, TOKENS_PREFILL_LONG)


@dataclass(frozen=True)
class MLADecodeShape:
    """One ``ops.mla_decode`` call: ``batch`` requests with ``seqlen`` cached tokens each (the ``sq`` new ones
    included, already appended), ``heads`` query heads of width ``latent`` (L + R), values the first
    ``dv`` (= L) columns of each cached row, pages of ``page`` rows."""

    batch: int
    seqlen: int
    heads: int
    sq: int
    latent: int  # C = kv_lora_rank + qk_rope_head_dim (576)
    dv: int  # kv_lora_rank (512)
    page: int

    @property
    def label(self) -> str:
        return f"decode s={self.seqlen} h={self.heads} sq={self.sq}"

    @property
    def shape(self) -> str:
        return (f"b={self.batch} s={self.seqlen} h={self.heads} sq={self.sq} C={self.latent} Dv={self.dv} "
                f"page {self.page}")


@dataclass(frozen=True)
class MLAPrefillShape:
    """One ``ops.mla_attention`` call over ``batch`` causal sequences of ``seqlen`` tokens (packed),
    ``heads`` heads, q/k head width ``dqk``, value head width ``dv``."""

    batch: int
    seqlen: int
    heads: int
    dqk: int
    dv: int

    @property
    def label(self) -> str:
        return f"prefill S={self.seqlen} H={self.heads}"

    @property
    def shape(self) -> str:
        return f"B={self.batch} S={self.seqlen} H={self.heads} Dqk={self.dqk} Dv={self.dv} causal"


@dataclass(frozen=True)
class GenerateShape:
    """Greedy generation on the ``preset`` model: ``batch`` prompts of ``prompt`` tokens, then ``new`` tokens
    (the first from the prompt's forward, the other ``new - 1`` from one-token decode steps)."""

    preset: str
    batch: int
    prompt: int
    new: int

    @property
    def label(self) -> str:
        return f"{self.preset} generate"

    @property
    def shape(self) -> str:
        return f"B={self.batch} prompt {self.prompt} + {self.new} new"

    @property
    def max_len(self) -> int:
        return self.prompt + self.new


def mla_decode_shapes(s: ShapeSet) -> list[MLADecodeShape]:
    """``v3``: FlashMLA's grid (b=128; s 4096 / 8192 / 16384; h 16 / 128; Sq 1 / 2), 12 calls. ``cpu``: b=4,
    s=256, h=16 (V3's row widths, a millisecond-scale reference call on 2 cores). ``smoke``: b=2, s=96 (one
    full page and half of a second), h=4."""
    d = s.dims
    c, dv = d.kv_lora_rank + d.qk_rope_head_dim, d.kv_lora_rank
    if s.name == "smoke":
        grid = [(2, 96, 4, sq) for sq in MLA_DECODE_SQ]
    elif s.name == "cpu":
        grid = [(4, 256, 16, sq) for sq in MLA_DECODE_SQ]
    else:
        grid = [(MLA_DECODE_BATCH, sl, h, sq)
                for sl in MLA_DECODE_SEQLENS for h in MLA_DECODE_HEADS for sq in MLA_DECODE_SQ]
    return [MLADecodeShape(b, sl, h, sq, c, dv, MLA_PAGE) for b, sl, h, sq in grid]


def mla_prefill_shapes(s: ShapeSet) -> list[MLAPrefillShape]:
    """``v3``: one sequence of 1024 and of 8192 tokens, 128 heads (the anchor's 8192). ``cpu``: S=256, H=4.
    ``smoke``: S=64, H=2. Head widths are V3's everywhere (192 / 128)."""
    d = s.dims
    if s.name == "smoke":
        grid = [(64, 2)]
    elif s.name == "cpu":
        grid = [(256, 4)]
    else:
        grid = [(sl, d.heads) for sl in MLA_PREFILL_SEQLENS]
    return [MLAPrefillShape(1, sl, h, d.qk_head_dim, d.v_head_dim) for sl, h in grid]


def mla_generate_shape(s: ShapeSet) -> GenerateShape:
    """The tiny preset: 4 prompts of 64 tokens then 64 new tokens; the smoke set 1 prompt of 8, 4 new."""
    if s.name == "smoke":
        return GenerateShape("tiny", 1, 8, 4)
    return GenerateShape("tiny", 4, 64, 64)
