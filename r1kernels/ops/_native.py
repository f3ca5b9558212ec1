"""The compiled extension's kernels as ``torch.library`` custom ops, and their entries in the dispatch tables.

Letters: N rows (all leading dims flattened), D the normalised (last) dim; the MoE section spells out its own.

``r1kernels._C`` knows nothing about torch (DESIGN "The compiled extension"): it takes addresses, sizes,
row strides in elements and dtype codes. This module turns tensors into those arguments and registers
each kernel as a custom op with a fake (meta) implementation and an autograd formula, so that
``torch.compile`` traces through it and ``backward`` works. The ops are registered when this module is
imported, whether or not ``_C`` was built; calling one without ``_C`` raises a RuntimeError that says why.
"""

from typing import Optional

import torch

from .. import _native as _loader
from .._dispatch import Impl, on_device
from ..reference.norm import rms_norm_backward

# torch dtype -> the dtype code of the native boundary (csrc/common.h, enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_OP = "r1kernels::rms_norm_native"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rms_norm_problem(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why (x, weight) is not an input the native RMSNorm takes, or None. Shared by the op and the checks."""
    if x.dim() < 1:
        return "x must have at least 1 dim, got a scalar"
    if x.dtype not in DTYPE_CODES:
        return f"x must be float32 / float16 / bfloat16, got {_dtype_name(x.dtype)}"
    if weight.dtype not in DTYPE_CODES:
        return f"weight must be float32 / float16 / bfloat16, got {_dtype_name(weight.dtype)}"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return f"weight must have shape [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}"
    if weight.device != x.device:
        return f"weight is on {weight.device} but x is on {x.device}"
    return None


def _eps_problem(eps: float) -> Optional[str]:
    if not (0.0 <= eps < float("inf")):  # also rejects NaN
        return f"eps must be a finite number >= 0, got {eps}"
    return None


def _check_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    why = _rms_norm_problem(x, weight) or _eps_problem(eps)
    if why is not None:
        raise ValueError(f"{_OP}: {why}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[N, D]`` rows with unit column stride: a view when the leading dims collapse to one row
    stride (contiguous tensors, slices along the last dim, broadcast rows), else a contiguous copy."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@torch.library.custom_op(_OP, mutates_args=())
def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm forward by the compiled kernel of x's device: ``[..., D]`` in, same shape and dtype out,
    contiguous. Differentiable; the backward is :func:`r1kernels.reference.norm.rms_norm_backward`."""
    _check_rms_norm(x, weight, eps)
    mod = _loader.module()
    if mod is None:
        raise RuntimeError(f"{_OP}: {_loader.cpu_reason()}")
    out = x.new_empty(x.shape)
    if out.numel() == 0:
        return out
    rows = _as_rows(x)
    w = weight.contiguous()
    n, d = rows.shape
    args = (out.data_ptr(), rows.data_ptr(), w.data_ptr(), n, d, rows.stride(0), d,
            DTYPE_CODES[x.dtype], DTYPE_CODES[w.dtype], eps)
    if x.device.type == "cpu":
        # torch's intra-op thread count, so that torch.set_num_threads governs this kernel too.
        mod.rms_norm_cpu(*args, num_threads=torch.get_num_threads())
    elif x.device.type == "cuda":
        if not mod.built_with_cuda:
            raise RuntimeError(f"{_OP}: {_loader.cuda_reason()}")
        stream = torch.cuda.current_stream(x.device).cuda_stream
        mod.rms_norm_cuda(*args, device=x.device.index, stream=stream)
    else:
        raise ValueError(f"{_OP}: the compiled extension has no kernels for device type {x.device.type!r}")
    return out


@rms_norm_native.register_fake
def _rms_norm_native_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_rms_norm(x, weight, eps)
    return x.new_empty(x.shape)


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy: torch.Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x, weight, ctx.eps)
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None)


rms_norm_native.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


# ----------------------------------------------------------------------------------------------------
# Dispatch-table entries (r1kernels._dispatch.Impl): the check says why a backend cannot run a call, so
# that "auto" passes over it and a forced backend raises BackendUnavailable with that reason.

_on_cpu = on_device("cpu")
_on_cuda = on_device("cuda")


def _rms_norm_cpu_check(x, weight, eps=1e-6) -> Optional[str]:
    return _on_cpu(x, weight, eps) or _rms_norm_problem(x, weight) or _eps_problem(eps)


def _rms_norm_cuda_check(x, weight, eps=1e-6) -> Optional[str]:
    why = _on_cuda(x, weight, eps) or _rms_norm_problem(x, weight) or _eps_problem(eps)
    if why is not None:
        return why
    n_rows = x.numel() // max(x.shape[-1], 1)
    if n_rows >= 2**31:
        return f"x has {n_rows} rows; the CUDA kernel takes fewer than 2^31"
    return _loader.cuda_device_reason(x.device)


RMS_NORM_CPU = Impl(rms_norm_native, _rms_norm_cpu_check)
RMS_NORM_CUDA = Impl(rms_norm_native, _rms_norm_cuda_check)


# ----------------------------------------------------------------------------------------------------
# MoE routing gate (CPU and CUDA kernels) and token alignment (CUDA kernel). Letters: T tokens, E experts,
# G groups (n_group), P = E / G, K experts per token, N = T * K routing slots, BM the block size.

_ROUTE_OP = "r1kernels::moe_route_native"
_ALIGN_OP = "r1kernels::moe_align_native"

# Limits of the CUDA kernels (csrc/ops.h, kMoeRouteCuda* / kMoeAlignCudaMaxE).
ROUTE_CUDA_MAX_E, ROUTE_CUDA_MAX_P, ROUTE_CUDA_MAX_K = 512, 64, 32
ALIGN_CUDA_MAX_E = 4096


def forward_only_reason(op: str, x: torch.Tensor) -> Optional[str]:
    """Why a forward-only kernel must not take this call: autograd would need a graph through ``x``."""
    if x.requires_grad and torch.is_grad_enabled():
        return (f"requires_grad inputs: {op}'s kernels are forward-only; the reference backend differentiates "
                "(call it under torch.no_grad() or with a detached input to use a kernel)")
    return None


def _route_problem(logits, bias, top_k, n_group, topk_group, score_func, group_score) -> Optional[str]:
    """Why these are not arguments the native routing kernels take, or None. Shared by the op and the checks."""
    if logits.dim() != 2:
        return f"router_logits must be [T, E], got shape {tuple(logits.shape)}"
    if logits.dtype not in DTYPE_CODES:
        return f"router_logits must be float32 / float16 / bfloat16, got {_dtype_name(logits.dtype)}"
    e = logits.shape[1]
    if e < 1 or n_group < 1 or e % n_group:
        return f"E={e} (router_logits.shape[1]) must be positive and divisible by n_group={n_group}"
    if not 1 <= topk_group <= n_group:
        return f"topk_group={topk_group} must be in [1, n_group={n_group}]"
    if not 1 <= top_k <= topk_group * (e // n_group):
        return f"top_k={top_k} must be in [1, topk_group * E / n_group = {topk_group * (e // n_group)}]"
    if score_func not in ("sigmoid", "softmax"):
        return f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}"
    if group_score not in ("top2_sum", "max"):
        return f"group_score must be 'top2_sum' or 'max', got {group_score!r}"
    if bias is not None:
        if bias.dtype != torch.float32 or bias.shape != (e,):
            return f"bias must be float32 [{e}], got {_dtype_name(bias.dtype)} {tuple(bias.shape)}"
        if bias.device != logits.device:
            return f"bias is on {bias.device} but router_logits is on {logits.device}"
    return None


def _route_cuda_problem(logits, top_k, n_group) -> Optional[str]:
    e = logits.shape[1]
    if e > ROUTE_CUDA_MAX_E:
        return f"the CUDA kernel holds a token's experts in one warp: E <= {ROUTE_CUDA_MAX_E}, got E={e}"
    if e // n_group > ROUTE_CUDA_MAX_P:
        return f"the CUDA kernel takes at most {ROUTE_CUDA_MAX_P} experts per group, got E / n_group = {e // n_group}"
    if top_k > ROUTE_CUDA_MAX_K:
        return f"the CUDA kernel takes top_k <= {ROUTE_CUDA_MAX_K} (one chosen expert per lane), got {top_k}"
    return None


def _check_route(logits, bias, top_k, n_group, topk_group, score_func, group_score) -> None:
    why = _route_problem(logits, bias, top_k, n_group, topk_group, score_func, group_score)
    if why is None and logits.device.type == "cuda":
        why = _route_cuda_problem(logits, top_k, n_group)
    if why is not None:
        raise ValueError(f"{_ROUTE_OP}: {why}")


@torch.library.custom_op(_ROUTE_OP, mutates_args=())
def moe_route_native(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
                     score_func: str, group_score: str, norm: bool, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing by the compiled kernel of the logits' device (semantics:
    ``r1kernels.reference.moe_route``): ``(weights [T, K] fp32, expert_ids [T, K] int32, counts [E] int32)``.
    ``logits [T, E]`` any float dtype and strides, read in place. Forward only (no autograd formula)."""
    _check_route(logits, bias, top_k, n_group, topk_group, score_func, group_score)
    mod = _loader.module()
    if mod is None:
        raise RuntimeError(f"{_ROUTE_OP}: {_loader.cpu_reason()}")
    t, e = logits.shape
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    counts = torch.zeros(e, dtype=torch.int32, device=logits.device)  # the kernels add to it
    if t == 0:
        return weights, ids, counts
    b = bias.contiguous() if bias is not None else None
    args = (logits.data_ptr(), b.data_ptr() if b is not None else 0, weights.data_ptr(), ids.data_ptr(),
            counts.data_ptr(), t, e, logits.stride(0), logits.stride(1), n_group, topk_group, top_k,
            DTYPE_CODES[logits.dtype], score_func == "softmax", group_score == "top2_sum", bool(norm), float(scale))
    if logits.device.type == "cpu":
        mod.moe_route_cpu(*args, num_threads=torch.get_num_threads())
    elif logits.device.type == "cuda":
        if not mod.built_with_cuda:
            raise RuntimeError(f"{_ROUTE_OP}: {_loader.cuda_reason()}")
        stream = torch.cuda.current_stream(logits.device).cuda_stream
        mod.moe_route_cuda(*args, device=logits.device.index, stream=stream)
    else:
        raise ValueError(f"{_ROUTE_OP}: the compiled extension has no kernels for device type {logits.device.type!r}")
    return weights, ids, counts


@moe_route_native.register_fake
def _moe_route_native_fake(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    _check_route(logits, bias, top_k, n_group, topk_group, score_func, group_score)
    t, e = logits.shape
    return (logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t, top_k), dtype=torch.int32),
            logits.new_empty((e,), dtype=torch.int32))


def align_s_max(n: int, num_experts: int, block_size: int) -> int:
    """S_max of ``reference.moe_align``: the longest padded slot list, from the shapes alone."""
    return -(-(n + min(num_experts, n) * (block_size - 1)) // block_size) * block_size


def _align_problem(expert_ids, num_experts, block_size) -> Optional[str]:
    if expert_ids.dim() != 2 or expert_ids.dtype not in (torch.int32, torch.int64):
        return f"expert_ids must be a [T, K] int32 / int64 tensor, got {_dtype_name(expert_ids.dtype)} {tuple(expert_ids.shape)}"
    if not 1 <= num_experts <= ALIGN_CUDA_MAX_E:
        return f"the CUDA kernel takes 1 <= num_experts <= {ALIGN_CUDA_MAX_E}, got {num_experts}"
    if block_size < 1:
        return f"block_size must be >= 1, got {block_size}"
    if expert_ids.numel() >= 2**31 - 1 or align_s_max(expert_ids.numel(), num_experts, block_size) >= 2**31 - block_size:
        return f"expert_ids has {expert_ids.numel()} slots; the padded list must stay below 2^31 rows"
    return None


@torch.library.custom_op(_ALIGN_OP, mutates_args=())
def moe_align_native(expert_ids: torch.Tensor, num_experts: int, block_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots sorted by expert, runs padded to ``block_size``, by the CUDA kernels (semantics:
    ``r1kernels.reference.moe_align``): ``(sorted_slots [S_max], block_expert [S_max / BM], num_padded [1],
    counts [E])``, all int32. CUDA tensors only (there is no C++ CPU kernel for this op)."""
    why = _align_problem(expert_ids, num_experts, block_size)
    if why is None and expert_ids.device.type != "cuda":
        why = f"the compiled moe_align kernel runs on CUDA tensors only, got a {expert_ids.device.type} tensor"
    if why is not None:
        raise ValueError(f"{_ALIGN_OP}: {why}")
    mod = _loader.module()
    if mod is None or not mod.built_with_cuda:
        raise RuntimeError(f"{_ALIGN_OP}: {_loader.cuda_reason()}")
    flat = expert_ids.reshape(-1).contiguous()
    n = flat.numel()
    s_max = align_s_max(n, num_experts, block_size)
    i32 = dict(dtype=torch.int32, device=expert_ids.device)
    # Every output is written by the kernels, so nothing is zeroed or filled here.
    sorted_slots = torch.empty(s_max, **i32)
    block_expert = torch.empty(s_max // block_size, **i32)
    num_padded = torch.empty(1, **i32)
    counts = torch.empty(num_experts, **i32)
    workspace = torch.empty(num_experts, **i32)
    stream = torch.cuda.current_stream(expert_ids.device).cuda_stream
    mod.moe_align_cuda(flat.data_ptr(), flat.dtype == torch.int64, n, num_experts, block_size, s_max,
                       sorted_slots.data_ptr(), block_expert.data_ptr(), num_padded.data_ptr(), counts.data_ptr(),
                       workspace.data_ptr(), device=expert_ids.device.index, stream=stream)
    return sorted_slots, block_expert, num_padded, counts


@moe_align_native.register_fake
def _moe_align_native_fake(expert_ids, num_experts, block_size):
    why = _align_problem(expert_ids, num_experts, block_size)
    if why is not None:
        raise ValueError(f"{_ALIGN_OP}: {why}")
    s_max = align_s_max(expert_ids.numel(), num_experts, block_size)
    return (expert_ids.new_empty((s_max,), dtype=torch.int32),
            expert_ids.new_empty((s_max // block_size,), dtype=torch.int32),
            expert_ids.new_empty((1,), dtype=torch.int32), expert_ids.new_empty((num_experts,), dtype=torch.int32))


def _moe_route_cpu_check(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    return (_on_cpu(logits, bias) or _route_problem(logits, bias, top_k, n_group, topk_group, score_func, group_score)
            or forward_only_reason("moe_route", logits))


def _moe_route_cuda_check(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    why = (_on_cuda(logits, bias) or _route_problem(logits, bias, top_k, n_group, topk_group, score_func, group_score)
           or _route_cuda_problem(logits, top_k, n_group) or forward_only_reason("moe_route", logits))
    return why or _loader.cuda_device_reason(logits.device)


def _moe_align_cuda_check(expert_ids, num_experts, block_size):
    why = _on_cuda(expert_ids) or _align_problem(expert_ids, num_experts, block_size)
    return why or _loader.cuda_device_reason(expert_ids.device)


MOE_ROUTE_CPU = Impl(moe_route_native, _moe_route_cpu_check)
MOE_ROUTE_CUDA = Impl(moe_route_native, _moe_route_cuda_check)
MOE_ALIGN_CUDA = Impl(moe_align_native, _moe_align_cuda_check)


# ----------------------------------------------------------------------------------------------------
# MLA decode (CUDA kernel, csrc/cuda/mla.cu): absorbed MQA over the paged latent cache. Letters: B requests,
# Sq new tokens per request, H heads, C latent row width, Dv value width, N pages, P page size, M pages per
# request, S KV splits.

_MLA_DECODE_OP = "r1kernels::mla_decode_native"

# What the CUDA kernel takes (csrc/ops.h, kMlaCuda*): C = 576, Dv = 512 (DeepSeek-V3 / R1), float16 or
# bfloat16, any page size, B <= 65535, Sq * H < 2^30.
MLA_DECODE_CUDA_HEAD_DIM, MLA_DECODE_CUDA_HEAD_DIM_V, MLA_DECODE_CUDA_MAX_SPLITS = 576, 512, 64
MLA_DECODE_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _mla_decode_problem(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v) -> Optional[str]:
    """Why these are not arguments the CUDA MLA decode kernel takes, or None. Looks at shapes, dtypes,
    devices and strides only (never at data), so it also runs on fake tensors."""
    if q.dim() != 4:
        return f"q must be [B, Sq, H, C], got shape {tuple(q.shape)}"
    if q.dtype not in MLA_DECODE_CUDA_DTYPES:
        return f"the CUDA kernel takes float16 / bfloat16, got q of dtype {_dtype_name(q.dtype)}"
    b, sq, h, c = q.shape
    if c != MLA_DECODE_CUDA_HEAD_DIM:
        return f"the CUDA kernel takes C = {MLA_DECODE_CUDA_HEAD_DIM} (q.shape[-1]), got C={c}"
    if head_dim_v != MLA_DECODE_CUDA_HEAD_DIM_V:
        return f"the CUDA kernel takes head_dim_v = {MLA_DECODE_CUDA_HEAD_DIM_V}, got {head_dim_v}"
    if kv_cache.dim() != 3 or kv_cache.shape[2] != c:
        return f"kv_cache must be [N, P, {c}], got shape {tuple(kv_cache.shape)}"
    if kv_cache.dtype != q.dtype:
        return f"kv_cache must have q's dtype {_dtype_name(q.dtype)}, got {_dtype_name(kv_cache.dtype)}"
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        return (f"block_table must be int32 [{b}, M], got {_dtype_name(block_table.dtype)} "
                f"{tuple(block_table.shape)}")
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype != torch.int32:
        return f"cache_seqlens must be int32 [{b}], got {_dtype_name(cache_seqlens.dtype)} {tuple(cache_seqlens.shape)}"
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            return f"{name} is on {t.device} but q is on {q.device}"
    if b > 65535:
        return f"the CUDA kernel takes at most 65535 requests (grid limit), got B={b}"
    if sq * h >= 2**30:
        return f"the CUDA kernel takes Sq * H < 2^30 query rows per request, got {sq * h}"
    n, p, _ = kv_cache.shape
    if n >= 2**31 or p * block_table.shape[1] >= 2**31:
        return f"the CUDA kernel takes N < 2^31 pages and M * P < 2^31 positions, got N={n}, M={block_table.shape[1]}, P={p}"
    # The kernel copies 16-byte pieces of each latent row: unit column stride, rows 16-byte aligned.
    if kv_cache.stride(2) != 1 or kv_cache.storage_offset() % 8 or (p > 1 and (kv_cache.stride(1) % 8 or kv_cache.stride(1) < c)) \
            or (n > 1 and kv_cache.stride(0) % 8):
        return (f"the CUDA kernel takes kv_cache rows of unit column stride starting on 16-byte boundaries (strides "
                f"multiples of 8 elements), got strides {tuple(kv_cache.stride())} and storage offset "
                f"{kv_cache.storage_offset()}")
    if not abs(softmax_scale) < float("inf"):
        return f"softmax_scale must be finite, got {softmax_scale}"
    return None


def _check_mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, num_splits) -> None:
    why = _mla_decode_problem(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v)
    if why is None and not 0 <= num_splits <= MLA_DECODE_CUDA_MAX_SPLITS:
        why = f"num_splits must be in [0, {MLA_DECODE_CUDA_MAX_SPLITS}] (0: chosen from the shapes), got {num_splits}"
    if why is not None:
        raise ValueError(f"{_MLA_DECODE_OP}: {why}")


@torch.library.custom_op(_MLA_DECODE_OP, mutates_args=())
def mla_decode_native(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                      softmax_scale: float, causal: bool, head_dim_v: int, num_splits: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode by the CUDA kernel (semantics: ``r1kernels.reference.mla_decode``):
    ``(out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] fp32)``. CUDA tensors only; forward only.
    ``num_splits``: KV splits (0: chosen from the shapes and the SM count; tests force others). Never reads
    ``cache_seqlens`` on the host (no synchronisation)."""
    _check_mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, num_splits)
    if q.device.type != "cuda":
        raise ValueError(f"{_MLA_DECODE_OP}: the compiled MLA decode kernel runs on CUDA tensors only, "
                         f"got a {q.device.type} tensor")
    mod = _loader.module()
    if mod is None or not mod.built_with_cuda:
        raise RuntimeError(f"{_MLA_DECODE_OP}: {_loader.cuda_reason()}")
    b, sq, h, c = q.shape
    n, p, _ = kv_cache.shape
    m = block_table.shape[1]
    out = q.new_empty((b, sq, h, head_dim_v))
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if b * sq * h == 0:
        return out, lse
    if n == 0 or p == 0 or m == 0:  # no position is addressable: every row sees nothing
        return out.zero_(), lse.fill_(float("-inf"))
    qc = q.contiguous()
    if qc.data_ptr() % 16:
        qc = qc.clone()
    bt = block_table.contiguous()
    lens = cache_seqlens.contiguous()
    rows = sq * h
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    splits = num_splits or mod.mla_decode_cuda_num_splits(b, rows, m * p, dev)
    if splits > 1:
        ws_out = torch.empty((splits, b, rows, head_dim_v), dtype=torch.float32, device=q.device)
        ws_lse = torch.empty((splits, b, rows), dtype=torch.float32, device=q.device)
        ws = (ws_out.data_ptr(), ws_lse.data_ptr())
    else:
        ws = (0, 0)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    mod.mla_decode_cuda(qc.data_ptr(), kv_cache.data_ptr(), bt.data_ptr(), lens.data_ptr(), out.data_ptr(),
                        lse.data_ptr(), *ws, b, sq, h, c, head_dim_v, n, p, m,
                        kv_cache.stride(0) if n > 1 else 0, kv_cache.stride(1) if p > 1 else c, m, splits,
                        DTYPE_CODES[q.dtype], bool(causal), float(softmax_scale), device=dev, stream=stream)
    return out, lse


@mla_decode_native.register_fake
def _mla_decode_native_fake(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v, num_splits=0):
    _check_mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, num_splits)
    b, sq, h, _ = q.shape
    return q.new_empty((b, sq, h, head_dim_v)), q.new_empty((b, h, sq), dtype=torch.float32)


def _mla_decode_cuda_check(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v):
    why = (_on_cuda(q, kv_cache, block_table, cache_seqlens)
           or _mla_decode_problem(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v)
           or forward_only_reason("mla_decode", q) or forward_only_reason("mla_decode", kv_cache))
    return why or _loader.cuda_device_reason(q.device)


MLA_DECODE_CUDA = Impl(mla_decode_native, _mla_decode_cuda_check)
