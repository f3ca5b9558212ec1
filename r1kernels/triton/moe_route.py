"""MoE routing gate and token alignment in Triton (semantics: ``r1kernels.reference.moe``).

Letters: T tokens, E routed experts, G expert groups (``n_group``), P = E / G experts per group,
K experts chosen per token, N = T * K routing slots (slot ``s = t * K + k``), BM the grouped GEMM's row
block, S_max the longest padded slot list.

``moe_route_fwd``: one program routes ``BLOCK_T`` tokens holding their whole rows in registers as a
``[BLOCK_T, BLOCK_G, BLOCK_P]`` tile (G and P each padded to a power of two, so groups of 20 or 48
experts need no special case: expert ``g * P + p`` sits at ``[:, g, p]``). Groups and experts are chosen
by K (resp. ``topk_group``) rounds of argmax, ties to the lower index, exactly the reference's stable
descending order. Per-expert counts come out of the same pass through integer atomics (exact and so
deterministic, whatever the order).

``moe_align_fwd``: a counting kernel (integer atomics) and a placement kernel with one program per expert
that scans the slots in order and writes its own, so the order within an expert is ascending by
construction. Every size comes from the shapes: no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import tile_budget

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_IDS = (torch.int32, torch.int64)

# The padded expert tile (BLOCK_G * BLOCK_P) one token occupies in registers, and the padded K the
# outputs are assembled in: past these the row tile no longer fits a program's registers on a GPU.
MAX_PADDED_E = 4096
MAX_TOP_K = 64
# An index larger than any expert or group index: the "no candidate" value of the lowest-index argmin.
_NO_INDEX = tl.constexpr(1 << 30)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    # On the GPU tl.exp is the fast ex2.approx path (a few ulps off); torch's fp32 exp is the accurate
    # one, and an ulp can reorder two nearly equal choices, so the GPU uses libdevice's expf. The
    # interpreter has no libdevice and computes tl.exp with numpy, which is accurate already.
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _moe_route_kernel(
    logits_ptr,  # [T, E] fp32 / fp16 / bf16, strides stride_lt, stride_le
    bias_ptr,  # [E] fp32 (contiguous); unused unless HAS_BIAS
    w_ptr,  # [T, K] fp32 out, contiguous
    ids_ptr,  # [T, K] int32 out, contiguous
    counts_ptr,  # [E] int32, zeroed by the launcher; += tokens routed to each expert
    T,
    E,
    G,
    P,  # experts per group, E / G
    K,
    TOPK_GROUP,
    stride_lt,
    stride_le,
    scale,  # routed_scaling_factor
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_G: tl.constexpr,  # power of two >= G
    BLOCK_P: tl.constexpr,  # power of two >= P
    BLOCK_K: tl.constexpr,  # power of two >= K
    HAS_BIAS: tl.constexpr,
    SOFTMAX: tl.constexpr,  # scores: softmax over E if True, else sigmoid
    GROUPED: tl.constexpr,  # G > 1: group-limited selection
    TOP2: tl.constexpr,  # group score: sum of the top 2 (needs P >= 2) if True, else max
    NORM: tl.constexpr,  # renormalise the K weights
    PRECISE: tl.constexpr,  # libdevice's accurate exp (GPU) rather than tl.exp (see _exp)
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    g = tl.arange(0, BLOCK_G)
    p = tl.arange(0, BLOCK_P)
    e_ok = (g[:, None] < G) & (p[None, :] < P)  # [BG, BP]
    # Padded positions get an index no expert has, so an "index == chosen" test never hits them.
    expert = tl.where(e_ok, g[:, None] * P + p[None, :], _NO_INDEX)  # [BG, BP]
    expert3 = expert[None, :, :]
    mask = row_ok[:, None, None] & e_ok[None, :, :]  # [BT, BG, BP]

    # int64 offsets: a transposed [T, E] view has stride_le = T, and E * T can pass 2^31.
    offs = rows.to(tl.int64)[:, None, None] * stride_lt + expert3.to(tl.int64) * stride_le
    x = tl.load(logits_ptr + tl.where(mask, offs, 0), mask=mask, other=0.0).to(tl.float32)

    if SOFTMAX:
        x = tl.where(mask, x, _NEG_INF)
        mx = tl.max(tl.max(x, axis=2), axis=1)
        mx = tl.where(row_ok, mx, 0.0)  # rows past T are all -inf: keep them NaN-free
        ex = _exp(x - mx[:, None, None], PRECISE)  # padded lanes: exp(-inf) = 0
        denom = tl.sum(tl.sum(ex, axis=2), axis=1)
        denom = tl.where(row_ok, denom, 1.0)
        # div_rn: IEEE division as torch's; Triton's `/` on fp32 is the approximate div.full.
        scores = tl.math.div_rn(ex, denom[:, None, None])
    else:
        # torch's formula for the fp32 sigmoid, 1 / (1 + exp(-x)).
        scores = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + _exp(-x, PRECISE))
    scores = tl.where(mask, scores, 0.0)

    if HAS_BIAS:
        b = tl.load(bias_ptr + tl.where(e_ok, expert, 0), mask=e_ok, other=0.0)
        choice = scores + b[None, :, :]
    else:
        choice = scores
    choice = tl.where(mask, choice, _NEG_INF)

    if GROUPED:
        top1 = tl.max(choice, axis=2)  # [BT, BG]
        if TOP2:
            # The second of torch.topk(2): the max once the first (lowest-index) maximum is removed, so
            # a tied maximum counts twice, as topk returns it twice.
            first = tl.min(tl.where(choice == top1[:, :, None], p[None, None, :], _NO_INDEX), axis=2)
            rest = tl.where(p[None, None, :] == first[:, :, None], _NEG_INF, choice)
            gscore = top1 + tl.max(rest, axis=2)
        else:
            gscore = top1
        # Candidates are tracked by a "live" mask rather than by overwriting picks with -inf, so that even
        # -inf scores are taken in the reference's order (by index) and a pick is never taken twice.
        glive = (g[None, :] < G) & (rows[:, None] >= 0)  # [BT, BG]; padded groups are never kept
        keep = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int32)
        for _ in range(TOPK_GROUP):
            gm = tl.max(tl.where(glive, gscore, _NEG_INF), axis=1)
            gi = tl.min(tl.where(glive & (gscore == gm[:, None]), g[None, :], _NO_INDEX), axis=1)
            hit = g[None, :] == gi[:, None]
            keep = tl.where(hit, 1, keep)
            glive = glive & (g[None, :] != gi[:, None])
        # Dropped groups' experts are masked with -inf, not 0.0: biased scores can be negative.
        choice = tl.where(keep[:, :, None] != 0, choice, _NEG_INF)

    kk = tl.arange(0, BLOCK_K)
    w_acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    id_acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    live = mask  # experts not yet picked (dropped groups' experts stay candidates at -inf, as in the reference)
    for k in range(K):
        m = tl.max(tl.max(tl.where(live, choice, _NEG_INF), axis=2), axis=1)  # [BT]
        idx = tl.min(tl.min(tl.where(live & (choice == m[:, None, None]), expert3, _NO_INDEX), axis=2), axis=1)
        hit = expert3 == idx[:, None, None]
        # The unbiased score of the chosen expert: a sum with one non-zero term, exact.
        wk = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=2), axis=1)
        live = live & (expert3 != idx[:, None, None])
        w_acc = tl.where(kk[None, :] == k, wk[:, None], w_acc)
        id_acc = tl.where(kk[None, :] == k, idx[:, None], id_acc)

    if NORM:
        # As the reference: w / (sum + 1e-20), then the scale.
        w_acc = tl.math.div_rn(w_acc, (tl.sum(w_acc, axis=1) + 1e-20)[:, None])
    w_acc = w_acc * scale

    out_mask = row_ok[:, None] & (kk[None, :] < K)
    out_offs = rows.to(tl.int64)[:, None] * K + kk[None, :]
    tl.store(w_ptr + out_offs, w_acc, mask=out_mask)
    tl.store(ids_ptr + out_offs, id_acc, mask=out_mask)
    # Integer atomics: the counts are exact whatever order the programs add in.
    tl.atomic_add(counts_ptr + tl.where(out_mask, id_acc, 0), tl.full((BLOCK_T, BLOCK_K), 1, tl.int32),
                  mask=out_mask, sem="relaxed")


def route_problem(logits: torch.Tensor, bias, top_k: int, n_group: int, topk_group: int) -> str | None:
    """Why ``moe_route_fwd`` cannot take these arguments (None if it can). Used by the ops layer's check."""
    if logits.dim() != 2 or logits.dtype not in _FLOATS:
        return f"router_logits must be a 2-d float32 / float16 / bfloat16 tensor, got {logits.dtype} {tuple(logits.shape)}"
    e = logits.shape[1]
    if e == 0 or n_group < 1 or e % n_group:
        return f"E={e} must be positive and divisible by n_group={n_group}"
    per = e // n_group
    padded = triton.next_power_of_2(n_group) * triton.next_power_of_2(per)
    if padded > MAX_PADDED_E:
        return (f"the Triton kernel holds a token's experts in a tile of at most {MAX_PADDED_E} (groups and "
                f"experts per group each padded to a power of two); E={e} in {n_group} groups needs {padded}")
    if not 1 <= top_k <= min(MAX_TOP_K, topk_group * per):
        return f"top_k={top_k} must be in [1, min({MAX_TOP_K}, topk_group * E / n_group = {topk_group * per})]"
    if not 1 <= topk_group <= n_group:
        return f"topk_group={topk_group} must be in [1, n_group={n_group}]"
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (e,) or bias.device != logits.device):
        return f"bias must be float32 [{e}] on {logits.device}, got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
    return None


def moe_route_fwd(logits, bias, top_k, n_group, topk_group, score_func, group_score, norm, scale):
    """``(weights [T, K] fp32, expert_ids [T, K] int32, counts [E] int32)``; the reference's semantics.

    ``logits [T, E]`` in any float dtype and strides; ``bias [E]`` fp32 or None. Forward only.
    """
    why = route_problem(logits, bias, top_k, n_group, topk_group)
    if why is None and score_func not in ("sigmoid", "softmax"):
        why = f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}"
    if why is None and group_score not in ("top2_sum", "max"):
        why = f"group_score must be 'top2_sum' or 'max', got {group_score!r}"
    if why is not None:
        raise ValueError(f"r1kernels.triton.moe_route.moe_route_fwd: {why}")
    t, e = logits.shape
    dev = logits.device
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=dev)
    counts = torch.zeros(e, dtype=torch.int32, device=dev)
    if t == 0:
        return weights, ids, counts
    per = e // n_group
    block_g, block_p = triton.next_power_of_2(n_group), triton.next_power_of_2(per)
    block_k = triton.next_power_of_2(top_k)
    tile_e = block_g * block_p
    # On a GPU about 16 elements of the row tile per thread (4 warps, 2048 elements: ~130 registers, no
    # spills for E = 256 on sm_90); several tiles live at once (scores, choices, indices), which is why
    # this is half of the element-wise kernels' budget. The interpreter takes the largest tiles it can.
    budget = 2048 if dev.type == "cuda" else tile_budget(dev)
    block_t = max(1, min(triton.next_power_of_2(t), budget // tile_e))
    num_warps = max(4, min(16, block_t * tile_e // 512))
    b = bias if bias is not None else weights  # any pointer: never read without HAS_BIAS
    _moe_route_kernel[(triton.cdiv(t, block_t),)](
        logits, b, weights, ids, counts,
        t, e, n_group, per, top_k, topk_group,
        logits.stride(0), logits.stride(1), float(scale),
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_P=block_p, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, SOFTMAX=score_func == "softmax", GROUPED=n_group > 1,
        TOP2=group_score == "top2_sum" and per >= 2, NORM=bool(norm), PRECISE=dev.type == "cuda",
        num_warps=num_warps,
    )
    return weights, ids, counts


# ----------------------------------------------------------------------------------------------------
# moe_align


@triton.jit
def _align_count_kernel(
    ids_ptr,  # [N] int32 / int64 expert ids (expert_ids [T, K] flattened, contiguous)
    counts_ptr,  # [E] int32, zeroed by the launcher
    N,
    E,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    e = tl.load(ids_ptr + offs, mask=in_range, other=0)
    ok = in_range & (e >= 0) & (e < E)  # ids outside [0, E) are not counted (nor placed)
    e32 = tl.where(ok, e, 0).to(tl.int32)
    tl.atomic_add(counts_ptr + e32, tl.full((BLOCK,), 1, tl.int32), mask=ok, sem="relaxed")


@triton.jit
def _align_place_kernel(
    ids_ptr,  # [N] int32 / int64 expert ids
    counts_ptr,  # [E] int32, complete (from _align_count_kernel)
    sorted_ptr,  # [S_max] int32, sentinel-filled by the launcher
    block_expert_ptr,  # [S_max / BM] int32, -1-filled by the launcher
    num_padded_ptr,  # [1] int32 out
    N,
    E,
    BM,
    BLOCK_E: tl.constexpr,  # experts per step of the offset sum
    BLOCK_S: tl.constexpr,  # slots per step of the scan (and blocks per step of the block_expert fill)
):
    e = tl.program_id(0)
    # Where this expert's run starts: the padded counts of the experts before it, summed here rather than
    # in a separate prefix-sum kernel (E is small, and each program needs only its own offset).
    start = 0
    total = 0
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        c = tl.load(counts_ptr + cols, mask=cols < E, other=0)
        padded = (c + BM - 1) // BM * BM
        start += tl.sum(tl.where(cols < e, padded, 0), axis=0)
        total += tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total, mask=e == 0)

    cnt = tl.load(counts_ptr + e)
    n_blocks = (cnt + BM - 1) // BM
    first_block = start // BM
    for b0 in range(0, n_blocks, BLOCK_S):
        blk = b0 + tl.arange(0, BLOCK_S)
        tl.store(block_expert_ptr + first_block + blk, tl.full((BLOCK_S,), 0, tl.int32) + e, mask=blk < n_blocks)

    # Scan the slots in order; a cumulative sum of the matches gives each one its place, so slots keep
    # their ascending order within the expert. The loop ends at the expert's last slot.
    placed = 0
    s0 = 0
    while placed < cnt:
        offs = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
        hit = v == e
        hit32 = hit.to(tl.int32)
        pos = start + placed + tl.cumsum(hit32, axis=0) - 1
        tl.store(sorted_ptr + pos, offs, mask=hit)
        placed += tl.sum(hit32, axis=0)
        s0 += BLOCK_S


def align_sizes(n: int, num_experts: int, block_size: int) -> int:
    """S_max: the longest the padded list can be, from the shapes alone (see ``reference.moe_align``)."""
    return -(-(n + min(num_experts, n) * (block_size - 1)) // block_size) * block_size


def moe_align_fwd(expert_ids: torch.Tensor, num_experts: int, block_size: int):
    """``(sorted_slots [S_max], block_expert [S_max / BM], num_padded [1], counts [E])``, all int32,
    equal to ``reference.moe_align``. Ids outside ``[0, E)`` are neither counted nor placed."""
    if expert_ids.dim() != 2 or expert_ids.dtype not in _IDS:
        raise ValueError(f"r1kernels.triton.moe_route.moe_align_fwd: expert_ids must be a 2-d int32 / int64 tensor, "
                         f"got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if num_experts <= 0 or block_size <= 0:
        raise ValueError(f"r1kernels.triton.moe_route.moe_align_fwd: num_experts and block_size must be positive, "
                         f"got {num_experts}, {block_size}")
    n = expert_ids.numel()
    dev = expert_ids.device
    s_max = align_sizes(n, num_experts, block_size)
    sorted_slots = torch.full((s_max,), n, dtype=torch.int32, device=dev)
    block_expert = torch.full((s_max // block_size,), -1, dtype=torch.int32, device=dev)
    num_padded = torch.zeros(1, dtype=torch.int32, device=dev)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    if n == 0:
        return sorted_slots, block_expert, num_padded, counts
    flat = expert_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    block = min(1024, triton.next_power_of_2(n))
    _align_count_kernel[(triton.cdiv(n, block),)](flat, counts, n, num_experts, BLOCK=block, num_warps=4)
    _align_place_kernel[(num_experts,)](
        flat, counts, sorted_slots, block_expert, num_padded, n, num_experts, block_size,
        BLOCK_E=min(1024, triton.next_power_of_2(num_experts)), BLOCK_S=block, num_warps=4,
    )
    return sorted_slots, block_expert, num_padded, counts
