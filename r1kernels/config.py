"""``ModelConfig``: the one configuration dataclass of a DeepSeek-V2 / V3 / R1 model.

A leaf module (imports nothing from the package) so that every layer, nn and model alike, can take it.

Field names follow the Hugging Face ``config.json`` of DeepSeek's checkpoints, so that a reader of either
finds the other; ``from_hf`` reads those files (and the ones transformers writes), ``to_hf_dict`` writes
them back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V2 / V3 / R1 model.

    Sizes (letters used across the code base in brackets):
        vocab_size (V), hidden_size (D), num_hidden_layers, num_attention_heads (H).
        intermediate_size: inner size of the dense MLPs of the first ``first_k_dense_replace`` layers.
    Multi-head latent attention (MLA):
        q_lora_rank: rank of the query down-projection W_DQ (None: a full W_Q, as in V2-Lite).
        kv_lora_rank (L): width of the cached latent c_kv (512).
        qk_nope_head_dim / qk_rope_head_dim (R) / v_head_dim: per-head widths of the position-free query/key
            part, the decoupled RoPE part (shared by all heads on the key side) and the value.
        attention_bias: bias on q_a / kv_a / o projections (False in every released checkpoint).
    Rotary embedding:
        rope_theta, rope_scaling (None or a dict with ``type``/``rope_type`` ``"yarn"``, ``factor``,
        ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``),
        rope_interleave (rotate channel pairs (2i, 2i+1), DeepSeek's layout; False: (i, i + R/2)),
        max_position_embeddings.
    Mixture of experts (a layer i is MoE when ``n_routed_experts`` is set, ``i >= first_k_dense_replace``
    and ``i % moe_layer_freq == 0``):
        n_routed_experts (E), n_shared_experts, num_experts_per_tok (K), moe_intermediate_size (I),
        n_group, topk_group: group-limited routing (keep the best ``topk_group`` of ``n_group`` groups),
        topk_method: ``"noaux_tc"`` (V3: selection on sigmoid scores + ``e_score_correction_bias``, group
            score = sum of the group's top 2), ``"group_limited_greedy"`` (V2: group score = max),
            ``"greedy"`` (no groups),
        scoring_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2),
        norm_topk_prob: renormalise the chosen weights to sum to 1,
        routed_scaling_factor: multiplies the routed experts' weights (the shared expert is unscaled),
        mlp_bias: biases in the MLPs (V2 configs carry the flag; False in released checkpoints).
    Other:
        rms_norm_eps, tie_word_embeddings, num_nextn_predict_layers (multi-token-prediction modules, stored
        after the main layers), hidden_act (only ``"silu"``), model_type (``"deepseek_v3"`` / ``"deepseek_v2"``),
        dtype (the checkpoint's dtype name), bos/eos/pad token ids.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(
        default_factory=lambda: {
            "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True
    max_position_embeddings: int = 163840
    n_routed_experts: Optional[int] = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    model_type: str = "deepseek_v3"
    dtype: str = "bfloat16"
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[Union[int, list]] = 1
    pad_token_id: Optional[int] = None
    # Attention variant of every layer: "mla" (dense MLA), "mla_dsa" (MLA over the tokens DeepSeek Sparse
    # Attention's lightning indexer selects, V3.2) or "nsa" (Native Sparse Attention, GQA).
    attention: str = "mla"
    # DSA (V3.2's config.json names): indexer heads, indexer head width, tokens selected per query.
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # NSA (arXiv 2502.11089 section 3): GQA KV heads and head width; compression block l and stride d,
    # selection block l', selected blocks n (counting the first and the 2 local ones), sliding window w.
    nsa_num_kv_heads: int = 4
    nsa_head_dim: int = 128
    nsa_compress_block: int = 32
    nsa_compress_stride: int = 16
    nsa_select_block: int = 64
    nsa_num_selected: int = 16
    nsa_window: int = 512

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_nope_head_dim < 0:
            problems.append(f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.topk_method not in _TOPK_METHODS:
            problems.append(f"topk_method must be one of {_TOPK_METHODS}, got {self.topk_method!r}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            problems.append(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.n_routed_experts is not None:
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                problems.append(f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.n_routed_experts}]")
            elif self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                problems.append("num_experts_per_tok exceeds the experts in the kept groups")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "yarn"):
                problems.append(f"rope_scaling type {kind!r} is not supported (default, yarn)")
        if self.attention not in ("mla", "mla_dsa", "nsa"):
            problems.append(f"attention must be 'mla', 'mla_dsa' or 'nsa', got {self.attention!r}")
        if self.attention == "nsa":
            if self.nsa_num_kv_heads < 1 or self.num_attention_heads % self.nsa_num_kv_heads:
                problems.append(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                                f"nsa_num_kv_heads={self.nsa_num_kv_heads}")
            if self.nsa_compress_block % self.nsa_compress_stride or self.nsa_select_block % self.nsa_compress_stride:
                problems.append(f"nsa_compress_block={self.nsa_compress_block} and nsa_select_block="
                                f"{self.nsa_select_block} must be multiples of nsa_compress_stride={self.nsa_compress_stride}")
            if self.nsa_head_dim < self.qk_rope_head_dim:
                problems.append(f"nsa_head_dim={self.nsa_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
        if self.attention == "mla_dsa" and min(self.index_n_heads, self.index_head_dim, self.index_topk) < 1:
            problems.append("index_n_heads, index_head_dim and index_topk must be positive")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))

    # ---------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Dqk = qk_nope_head_dim + qk_rope_head_dim (192 in V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``rope_inv_freq`` for this config (rotary dim = qk_rope_head_dim)."""
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind in (None, "default"):
            return {"scaling_type": None}
        return {
            "scaling_type": "yarn",
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs.get("original_max_position_embeddings") or self.max_position_embeddings),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": rs.get("mscale"),
            "mscale_all_dim": rs.get("mscale_all_dim"),
            "attention_factor": rs.get("attention_factor"),
            "truncate": bool(rs.get("truncate", True)),
        }

    @property
    def softmax_scale(self) -> float:
        """Dqk^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3)."""
        scale = self.qk_head_dim ** -0.5
        kw = self.rope_kwargs
        if kw["scaling_type"] == "yarn" and kw["mscale_all_dim"]:
            factor = kw["factor"]
            m = 0.1 * kw["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
            scale = scale * m * m
        return scale

    @property
    def group_score(self) -> str:
        """How a group of experts is scored for group-limited routing."""
        return "top2_sum" if self.topk_method == "noaux_tc" else "max"

    @property
    def routing_groups(self) -> tuple[int, int]:
        """``(n_group, topk_group)`` as routing uses them (greedy routing has one group)."""
        return (1, 1) if self.topk_method == "greedy" else (self.n_group, self.topk_group)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def num_parameters(self) -> int:
        """Parameter count of ``Transformer(self)`` (main layers + MTP modules; a tied head counted once)."""
        d, h = self.hidden_size, self.num_attention_heads

        def attn() -> int:
            if self.attention == "nsa":  # r1kernels.nn.sparse.NSAttention
                hkv, dh, blk = self.nsa_num_kv_heads, self.nsa_head_dim, self.nsa_compress_block
                n = d * h * dh + 2 * d * hkv * dh + h * dh * d + d * h * 3  # q, k, v, o, gate projections
                n += 2 * (blk * dh + blk * dh * dh + dh * dh)  # compress_k / compress_v: pos_emb, fc1, fc2
                return n + ((h * dh + 2 * hkv * dh + d + 3 * h) if self.attention_bias else 0)
            q = d * h * self.qk_head_dim if self.q_lora_rank is None else (
                d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim)
            kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
            idx = 0 if self.attention != "mla_dsa" else ((self.q_lora_rank or d) * self.index_n_heads * self.index_head_dim
                                                        + d * self.index_head_dim + 2 * self.index_head_dim
                                                        + d * self.index_n_heads)  # DSA's lightning indexer
            return q + kv + h * self.v_head_dim * d + idx

        def mlp(i: int) -> int:
            if not self.is_moe_layer(i):
                return 3 * d * self.intermediate_size
            e, inter = self.n_routed_experts, self.moe_intermediate_size
            return e * 3 * d * inter + 3 * d * inter * self.n_shared_experts + e * d  # + router; its bias is a buffer

        layers = sum(attn() + mlp(i) + 2 * d for i in range(self.num_hidden_layers))
        mtp = sum(attn() + mlp(self.num_hidden_layers + k) + 2 * d + 3 * d + 2 * d * d
                  for k in range(self.num_nextn_predict_layers))
        emb = self.vocab_size * d
        return layers + mtp + emb + d + (0 if self.tie_word_embeddings else emb)

    # ---------------------------------------------------------------- presets and HF files
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Named configurations.

        ``"tiny"``: ~8M parameters, V3 semantics (MLA with q_lora, 16 experts in 4 groups, top-4, YaRN,
        one MTP module), fast on a CPU. 8 heads over an 80-wide latent row keep V3's point of MLA: the latent
        cache (80 numbers per token and layer) is 8x smaller than per-head keys and values (8 x 80). ``"v2-lite"``: DeepSeek-V2-Lite (15.7B). ``"v3"`` / ``"r1"``:
        DeepSeek-V3 / R1 (671B; build it under ``torch.device("meta")``). ``"tiny-nsa"`` / ``"tiny-dsa"``: the
        tiny model with NSA / DSA attention. ``"micro"``: 2 layers of width 64 and a 128-token vocabulary, for
        smoke tests.
        """
        if name == "tiny":
            return cls(
                vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
                num_experts_per_tok=4, moe_intermediate_size=128, n_group=4, topk_group=2,
                first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=4096,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                num_nextn_predict_layers=1, dtype="float32",
            )
        if name in ("v3", "r1"):
            return cls()
        if name == "v2-lite":
            return cls(
                vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
                num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1, topk_group=1,
                topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                routed_scaling_factor=1.0, first_k_dense_replace=1, max_position_embeddings=163840,
                rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                num_nextn_predict_layers=0, model_type="deepseek_v2", bos_token_id=100000,
                eos_token_id=100001,
            )
        if name == "micro":  # smoke tests: the tiny model's structure at a fraction of its cost
            return cls(
                vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024,
                rope_scaling=None, num_nextn_predict_layers=1, dtype="float32",
            )
        if name == "tiny-nsa":  # the tiny model with NSA attention, blocks scaled to its 4k context
            return dataclasses.replace(cls.preset("tiny"), attention="nsa", nsa_num_kv_heads=2, nsa_head_dim=32,
                                       nsa_compress_block=16, nsa_compress_stride=8, nsa_select_block=32,
                                       nsa_num_selected=8, nsa_window=128)
        if name == "tiny-dsa":  # the tiny model with DeepSeek Sparse Attention over the latent cache
            return dataclasses.replace(cls.preset("tiny"), attention="mla_dsa", index_n_heads=4, index_head_dim=32,
                                       index_topk=256)
        raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; known: tiny, micro, tiny-nsa, tiny-dsa, v2-lite, v3, r1")

    @classmethod
    def from_hf(cls, config: Union[dict, str, os.PathLike]) -> "ModelConfig":
        """Read a DeepSeek-V2 / V2-Lite / V3 / R1 ``config.json`` (a dict, the file, or its directory).

        Accepts DeepSeek's own files (``rope_scaling``, ``rope_theta``) and those transformers 5 writes
        (``rope_parameters``). Notes on semantics that differ between implementations:
        * ``deepseek_v2``: scores are softmax and the RoPE is interleaved. transformers' DeepseekV2 ignores
          ``norm_topk_prob``; we follow it (every released V2 checkpoint has it False) and warn when a V2
          config sets it True.
        * ``moe_layer_freq`` is honoured (transformers ignores it; every released checkpoint has 1).
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        c = dict(config)
        model_type = c.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"ModelConfig.from_hf: model_type {model_type!r} is not a DeepSeek-V2/V3 model")
        v2 = model_type == "deepseek_v2"
        rope = c.get("rope_scaling") or c.get("rope_parameters") or None
        rope_theta = c.get("rope_theta")
        if rope is not None:
            rope = dict(rope)
            rope_theta = rope.pop("rope_theta", rope_theta)
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind in (None, "default"):
                rope = None
        n_group = c.get("n_group") or 1
        topk_method = c.get("topk_method") or ("greedy" if v2 else "noaux_tc")
        scoring_func = "softmax" if v2 else c.get("scoring_func", "sigmoid")
        if not v2 and (topk_method, scoring_func) != ("noaux_tc", "sigmoid"):
            # DeepSeek-V3's code and transformers' DeepseekV3 implement only this routing.
            warnings.warn(f"ModelConfig.from_hf: deepseek_v3 routes with noaux_tc + sigmoid; the config's "
                          f"topk_method={topk_method!r}, scoring_func={scoring_func!r} are ignored", stacklevel=2)
            topk_method, scoring_func = "noaux_tc", "sigmoid"
        norm_topk_prob = bool(c.get("norm_topk_prob", not v2))
        if v2 and norm_topk_prob:
            warnings.warn("ModelConfig.from_hf: a deepseek_v2 config sets norm_topk_prob=True; like "
                          "transformers' DeepseekV2 the weights are not renormalised", stacklevel=2)
            norm_topk_prob = False
        eos = c.get("eos_token_id", 1)
        kw = dict(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], q_lora_rank=c.get("q_lora_rank"),
            kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
            qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
            attention_bias=bool(c.get("attention_bias", False)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0), rope_scaling=rope,
            rope_interleave=True if v2 else bool(c.get("rope_interleave", True)),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            n_routed_experts=c.get("n_routed_experts"), n_shared_experts=c.get("n_shared_experts") or 0,
            num_experts_per_tok=c.get("num_experts_per_tok") or 1,
            moe_intermediate_size=c.get("moe_intermediate_size") or 0, n_group=n_group,
            topk_group=c.get("topk_group") or 1, topk_method=topk_method,
            scoring_func=scoring_func,
            norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=c.get("first_k_dense_replace", 0), moe_layer_freq=c.get("moe_layer_freq", 1),
            mlp_bias=bool(c.get("mlp_bias", False)), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0,
            hidden_act=c.get("hidden_act", "silu"), model_type=model_type,
            dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
            bos_token_id=c.get("bos_token_id"), eos_token_id=eos, pad_token_id=c.get("pad_token_id"),
        )
        # the sparse-attention fields (V3.2's index_* names; our nsa_*), when the file has them
        sparse = ("attention", "index_n_heads", "index_head_dim", "index_topk", "nsa_num_kv_heads", "nsa_head_dim",
                  "nsa_compress_block", "nsa_compress_stride", "nsa_select_block", "nsa_num_selected", "nsa_window")
        kw.update({k: c[k] for k in sparse if c.get(k) is not None})
        if "attention" not in c and "index_topk" in c:  # DeepSeek-V3.2's config.json: DSA
            kw["attention"] = "mla_dsa"
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' DeepseekV3Config / DeepseekV2Config and ``from_hf`` read."""
        d = dataclasses.asdict(self)
        d["torch_dtype"] = d.pop("dtype")
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        if self.n_routed_experts is None:
            d.pop("n_routed_experts")
        return d
