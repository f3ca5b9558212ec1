"""Public training losses: fused linear cross entropy, fused linear log-probabilities, the GRPO loss and fused
linear distillation losses. Validation, backend dispatch, autograd.

Letters: T tokens, D hidden width, V vocabulary, C tokens per chunk, B sequences, S positions per sequence.

The fused linear ops never hold the ``[T, V]`` logits. Tokens are taken C at a time; for each chunk
``logits [C, V] = hidden[chunk] @ weight^T`` (a torch matmul, fp32 accumulation, rounded to hidden's dtype
like ``F.linear``) goes into one reused buffer, a row kernel computes each row's logsumexp, loss and, in
the same pass, overwrites the logits with d loss / d logits; then ``grad_hidden[chunk] = dlogits @ weight``
and ``grad_weight += dlogits^T @ hidden[chunk]``. Cross entropy and distillation compute their gradients
in the forward (the upstream gradient of a scalar loss only scales them; the backward multiplies in place);
log-probabilities, whose upstream gradient is a vector, save each row's logsumexp and recompute the chunk
logits in the backward.

Chunk size (:func:`logits_chunk_rows`): the chunk's logits, ``C * V`` elements of hidden's dtype, stay within
a byte budget of 1/8 of the weight's bytes (so at most 1/8 of the weight gradient the op returns anyway),
clamped to [4 MiB, 128 MiB]; C is rounded down to a multiple of 64 rows when it is at least 64 (matmul
tiles). DeepSeek-V3's head (V = 129,280, D = 7168, bf16): 512 tokens, 126 MiB of logits. The vocabulary is
not split: a row's gradient needs its full normalisation, so splitting V would mean computing the logits
twice (a third more matmul work); instead the row kernels walk the vocabulary in blocks (any V fits).

Backends: ``reference`` (full logits, autograd), ``triton`` (Triton row kernels; GPU, or CPU under the
interpreter) and ``cpu`` (the same chunking with the row math in torch, for CPU tensors). The weight gradient
is accumulated over the chunks in the weight's dtype (fp32 within each chunk's matmul): with bf16 weights
that is one bf16 rounding per chunk, as in Liger-Kernel.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .._dispatch import Impl, Op, always, triton_check
from ..reference import loss as ref
from ._validate import FLOAT_DTYPES, check_tensor

_INT_DTYPES = (torch.int64, torch.int32)

# The chunk's logits budget (see the module docstring): 1/8 of the weight's bytes, within these bounds.
LOGITS_CHUNK_WEIGHT_FRACTION = 8
LOGITS_CHUNK_MIN_BYTES = 4 << 20
LOGITS_CHUNK_MAX_BYTES = 128 << 20
CHUNK_ROW_MULTIPLE = 64


def logits_chunk_rows(tokens: int, vocab: int, hidden_dim: int, elem_bytes: int) -> int:
    """Tokens per chunk C for ``[tokens, hidden_dim] @ [vocab, hidden_dim]^T`` logits of ``elem_bytes`` each."""
    budget = vocab * hidden_dim * elem_bytes // LOGITS_CHUNK_WEIGHT_FRACTION
    budget = min(max(budget, LOGITS_CHUNK_MIN_BYTES), LOGITS_CHUNK_MAX_BYTES)
    rows = max(1, budget // max(vocab * elem_bytes, 1))
    if rows >= CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, tokens))


# ------------------------------------------------------------------------------------------------------
# Row math of the ``cpu`` backend: the contract of r1kernels.triton.loss's launchers, written in torch.


def _softmax_grad_(logits: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, inv_temp: float,
                   targets: torch.Tensor, coef: torch.Tensor) -> None:
    """``logits <- coef_r * (softmax(x * inv_temp) - onehot(target))``; ``x`` is fp32 ``[R, V]`` (it may be
    ``logits`` itself) and is consumed."""
    if inv_temp != 1.0:
        x.mul_(inv_temp)
    x.sub_(lse[:, None]).exp_()  # [R, V] probabilities
    x.scatter_add_(1, targets[:, None], torch.full((x.shape[0], 1), -1.0, device=x.device))
    x.mul_(coef[:, None])
    if x is not logits:
        logits.copy_(x)


class _TorchRows:
    """Per-chunk row math in torch (the ``cpu`` backend); same signatures as ``r1kernels.triton.loss``."""

    @staticmethod
    def ce_rows_(logits, labels, ignore_index, scale, logp_out, write_grad):
        x = logits.float()  # [R, V]; the buffer itself when it is fp32 (overwritten by the gradient anyway)
        lse = torch.logsumexp(x, dim=1)
        keep = labels != ignore_index
        safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
        zero = torch.zeros((), device=x.device)
        logp_out.copy_(torch.where(keep, x.gather(1, safe[:, None]).squeeze(1) - lse, zero))
        if write_grad:
            _softmax_grad_(logits, x, lse, 1.0, safe, torch.where(keep, scale.float(), zero))

    @staticmethod
    def logprob_rows(logits, tokens, inv_temp, logp_out, lse_out):
        x = logits.float() * inv_temp  # [R, V]
        lse = torch.logsumexp(x, dim=1)
        lse_out.copy_(lse)
        logp_out.copy_(x.gather(1, tokens.long()[:, None]).squeeze(1) - lse)

    @staticmethod
    def logprob_grad_rows_(logits, tokens, inv_temp, lse, grad_logp):
        _softmax_grad_(logits, logits.float(), lse, inv_temp, tokens.long(), -grad_logp.float() * inv_temp)

    @staticmethod
    def kd_rows_(student, teacher, weights, kind, inv_temp, beta, loss_out, write_grad):
        ls = torch.log_softmax(student.float() * inv_temp, dim=1)  # [R, V]
        lt = torch.log_softmax(teacher.float() * inv_temp, dim=1)
        ps, pt = ls.exp(), lt.exp()
        zero = torch.zeros((), device=ls.device)
        if kind == "forward_kl":
            row = torch.where(pt > 0, pt * (lt - ls), zero).sum(1)
            grad = ps - pt
        elif kind == "reverse_kl":
            row = torch.where(ps > 0, ps * (ls - lt), zero).sum(1)
            grad = torch.where(ps > 0, ps * ((ls - lt) - row[:, None]), zero)
        else:
            lm = torch.log(beta * pt + (1.0 - beta) * ps)
            kl_t = torch.where((pt > 0) & (beta > 0), pt * (lt - lm), zero).sum(1)
            kl_s = torch.where((ps > 0) & (beta < 1), ps * (ls - lm), zero).sum(1)
            row = beta * kl_t + (1.0 - beta) * kl_s
            grad = torch.where((ps > 0) & (beta < 1), (1.0 - beta) * ps * ((ls - lm) - kl_s[:, None]), zero)
        live = weights != 0
        loss_out.copy_(torch.where(live, weights * row, zero))
        if write_grad:
            student.copy_(torch.where(live[:, None], (weights * inv_temp)[:, None] * grad, zero))

    @staticmethod
    def scale_(x, g):
        return x.mul_(g)


def _triton_rows():
    from ..triton import loss as rows  # imported on first use: `import r1kernels` never imports triton

    return rows


# ------------------------------------------------------------------------------------------------------
# The chunk loop shared by the fused linear ops and backends.


def _head_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_fn: Callable[[torch.Tensor, int, int], None],
    need_h: bool,
    need_w: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """For each chunk of tokens [a, b): ``logits = hidden[a:b] @ weight^T`` into one reused buffer, then
    ``row_fn(logits, a, b)``, which overwrites them with d loss / d logits when a gradient is wanted; then
    ``grad_hidden[a:b] = dlogits @ weight`` and ``grad_weight += dlogits^T @ hidden[a:b]``.
    Returns ``(grad_hidden [T, D] or None, grad_weight [V, D] or None)``, contiguous, in the inputs' dtype."""
    t, d = hidden.shape
    v = weight.shape[0]
    c = logits_chunk_rows(t, v, d, hidden.element_size())
    buf = torch.empty((min(c, t), v), dtype=hidden.dtype, device=hidden.device)  # [C, V]
    gh = torch.empty((t, d), dtype=hidden.dtype, device=hidden.device) if need_h else None
    gw = None
    if need_w:  # the first chunk's matmul writes it whole; zeros only when there is no chunk
        gw = torch.empty((v, d), dtype=weight.dtype, device=weight.device) if t else torch.zeros(
            (v, d), dtype=weight.dtype, device=weight.device)
    wt = weight.t()  # [D, V]
    # The inputs' dtype decides the matmuls' (as documented); an ambient autocast region does not.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for a in range(0, t, c):
            b = min(a + c, t)
            h = hidden[a:b]  # [c, D]
            logits = buf[: b - a]  # [c, V]
            torch.mm(h, wt, out=logits)
            row_fn(logits, a, b)
            if gh is not None:
                torch.mm(logits, weight, out=gh[a:b])
            if gw is not None:
                if a == 0:
                    torch.mm(logits.t(), h, out=gw)
                else:
                    gw.addmm_(logits.t(), h)
    return gh, gw


def _take_saved(ctx, op: str):
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            f"r1kernels.ops.{op}: its gradients are computed in the forward and handed out by the first backward; "
            "a second backward through the same graph (retain_graph=True) needs the forward run again"
        )
    ctx.grads = None
    return grads


class _FusedLinearCE(torch.autograd.Function):
    """Cross entropy with the gradients computed in the forward (for an upstream gradient of 1)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, rows, need_h, need_w):
        t = hidden.shape[0]
        kept = (labels != ignore_index).sum()  # a device tensor: no host sync
        if reduction == "mean":
            scale = 1.0 / kept.clamp(min=1).float()
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        logp = torch.empty(t, dtype=torch.float32, device=hidden.device)  # [T], 0 on ignored tokens
        write = need_h or need_w

        def row_fn(logits, a, b):
            rows.ce_rows_(logits, labels[a:b], ignore_index, scale, logp[a:b], write)

        gh, gw = _head_chunks(hidden, weight, row_fn, need_h, need_w)
        ctx.rows = rows
        ctx.grads = (gh, gw)
        return -(logp.sum() * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        grads = _take_saved(ctx, "fused_linear_cross_entropy")
        out = [None if x is None else ctx.rows.scale_(x, g) for x in grads]
        return out[0], out[1], None, None, None, None, None, None


class _FusedLinearLogprobs(torch.autograd.Function):
    """Log-probabilities of given tokens; the backward recomputes each chunk's logits from the saved lse."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, inv_temp, rows):
        t = hidden.shape[0]
        logp = torch.empty(t, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(t, dtype=torch.float32, device=hidden.device)

        def row_fn(logits, a, b):
            rows.logprob_rows(logits, tokens[a:b], inv_temp, logp[a:b], lse[a:b])

        _head_chunks(hidden, weight, row_fn, False, False)
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        hidden, weight, tokens, lse = ctx.saved_tensors
        rows, inv_temp = ctx.rows, ctx.inv_temp

        def row_fn(logits, a, b):
            rows.logprob_grad_rows_(logits, tokens[a:b], inv_temp, lse[a:b], g[a:b])

        gh, gw = _head_chunks(hidden, weight, row_fn, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gh, gw, None, None, None


class _FusedLinearKD(torch.autograd.Function):
    """Distillation loss with the student's gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, mask, kind, inv_temp, beta, rows, need_h, need_w):
        t = hidden.shape[0]
        if mask is None:
            weights = torch.full((t,), 1.0 / max(t, 1), dtype=torch.float32, device=hidden.device)
        else:
            m = mask.float()
            weights = m / m.sum().clamp(min=1.0)  # [T]: the mean over the masked tokens, no host sync
        loss_rows = torch.empty(t, dtype=torch.float32, device=hidden.device)
        write = need_h or need_w

        def row_fn(logits, a, b):
            rows.kd_rows_(logits, teacher[a:b], weights[a:b], kind, inv_temp, beta, loss_rows[a:b], write)

        gh, gw = _head_chunks(hidden, weight, row_fn, need_h, need_w)
        ctx.rows = rows
        ctx.grads = (gh, gw)
        return loss_rows.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        grads = _take_saved(ctx, "fused_linear_kd_loss")
        out = [None if x is None else ctx.rows.scale_(x, g) for x in grads]
        return (out[0], out[1]) + (None,) * 8


class _GRPOTriton(torch.autograd.Function):
    """GRPO loss: one Triton pass computes the loss sums, the metrics and d loss / d logprobs."""

    @staticmethod
    def forward(ctx, logprobs, old, ref_lp, adv, mask, epsilon, epsilon_high, beta, loss_type, max_tokens, need_grad):
        from ..triton.loss import grpo_fwd_bwd

        b, s = logprobs.shape
        n_seq = mask.sum(-1, dtype=torch.float32)  # [B] tokens (or mask weight) per sequence
        n_all = n_seq.sum()
        if loss_type == "grpo":
            seq_scale = 1.0 / (b * n_seq.clamp(min=1.0))
        elif loss_type == "dapo":
            seq_scale = (1.0 / n_all.clamp(min=1.0)).expand(b)
        else:  # dr_grpo
            seq_scale = torch.full((), 1.0 / (b * max_tokens), dtype=torch.float32, device=logprobs.device).expand(b)
        grad, part = grpo_fwd_bwd(logprobs, old, ref_lp, adv, mask, seq_scale, epsilon, epsilon_high, beta,
                                  beta != 0, need_grad)
        denom = n_all.clamp(min=1.0)
        kl, clip = part[1].sum() / denom, part[2].sum() / denom
        ctx.mark_non_differentiable(kl, clip)
        ctx.grad = grad
        ctx.lp_dtype = logprobs.dtype
        return part[0].sum(), kl, clip

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_kl, _g_clip):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("r1kernels.ops.grpo_loss: no gradient was computed in the forward (grad mode was off)")
        return ((grad * g).to(ctx.lp_dtype),) + (None,) * 10


# ------------------------------------------------------------------------------------------------------
# Backend implementations (each takes the op's positional arguments) and their checks.


def _needs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    on = torch.is_grad_enabled()
    return on and hidden.requires_grad, on and weight.requires_grad


def _ce_fused(rows_fn):
    def fn(hidden, weight, labels, ignore_index, reduction):
        need_h, need_w = _needs(hidden, weight)
        return _FusedLinearCE.apply(hidden, weight, labels, ignore_index, reduction, rows_fn(), need_h, need_w)

    return fn


def _logprobs_fused(rows_fn):
    def fn(hidden, weight, tokens, temperature):
        return _FusedLinearLogprobs.apply(hidden, weight, tokens, 1.0 / temperature, rows_fn())

    return fn


def _kd_fused(rows_fn):
    def fn(hidden, weight, teacher, kind, temperature, beta, mask):
        need_h, need_w = _needs(hidden, weight)
        return _FusedLinearKD.apply(hidden, weight, teacher, mask, kind, 1.0 / temperature, beta, rows_fn(),
                                    need_h, need_w)

    return fn


def _grpo_triton(logprobs, old, ref_lp, adv, mask, epsilon, epsilon_high, beta, loss_type, max_tokens):
    need = torch.is_grad_enabled() and logprobs.requires_grad
    loss, kl, clip = _GRPOTriton.apply(logprobs, old, ref_lp, adv, mask, epsilon, epsilon_high, beta, loss_type,
                                       max_tokens, need)
    return loss, {"kl": kl, "clip_fraction": clip}


def _grpo_ref(logprobs, old, ref_lp, adv, mask, epsilon, epsilon_high, beta, loss_type, max_tokens):
    return ref.grpo_loss(logprobs, old, ref_lp, adv, mask, epsilon, epsilon_high, beta, loss_type, max_tokens)


def _kd_ref(hidden, weight, teacher, kind, temperature, beta, mask):
    return ref.fused_linear_kd_loss(hidden, weight, teacher, kind, temperature, beta, mask)


def _cpu_device_reason(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "runs on CPU tensors only (the chunked torch path)"


def _cpu_check(hidden, *_args) -> Optional[str]:
    return _cpu_device_reason(hidden.device)


_CPU = dict(check=_cpu_check, device_check=_cpu_device_reason)

FUSED_LINEAR_CROSS_ENTROPY = Op("fused_linear_cross_entropy", {
    "reference": Impl(ref.fused_linear_cross_entropy, always),
    "triton": Impl(_ce_fused(_triton_rows), triton_check),
    "cpu": Impl(_ce_fused(lambda: _TorchRows), **_CPU),
})
FUSED_LINEAR_LOGPROBS = Op("fused_linear_logprobs", {
    "reference": Impl(ref.fused_linear_logprobs, always),
    "triton": Impl(_logprobs_fused(_triton_rows), triton_check),
    "cpu": Impl(_logprobs_fused(lambda: _TorchRows), **_CPU),
})
GRPO_LOSS = Op("grpo_loss", {
    "reference": Impl(_grpo_ref, always),
    "triton": Impl(_grpo_triton, triton_check),
})
FUSED_LINEAR_KD_LOSS = Op("fused_linear_kd_loss", {
    "reference": Impl(_kd_ref, always),
    "triton": Impl(_kd_fused(_triton_rows), triton_check),
    "cpu": Impl(_kd_fused(lambda: _TorchRows), **_CPU),
})


# ------------------------------------------------------------------------------------------------------
# Validation and the public functions


def _fail(op: str, msg: str, kind: type = ValueError):
    raise kind(f"r1kernels.ops.{op}: {msg}")


def _check_head(op: str, hidden, weight, h_name: str = "hidden", w_name: str = "weight") -> tuple[int, int, int]:
    """hidden ``[T, D]`` float, weight ``[V, D]`` of hidden's dtype and device, V >= 1; returns (T, D, V)."""
    check_tensor(op, h_name, hidden, ndim=2, dtypes=FLOAT_DTYPES)
    t, d = hidden.shape
    check_tensor(op, w_name, weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_tensor(op, w_name, weight, shape=(None, d))
    if weight.dtype != hidden.dtype:
        _fail(op, f"{w_name} must have {h_name}'s dtype ({str(hidden.dtype).replace('torch.', '')}), "
                  f"got {str(weight.dtype).replace('torch.', '')}", TypeError)
    if weight.shape[0] < 1:
        _fail(op, f"{w_name} must have at least one row (a vocabulary of V >= 1), got shape {tuple(weight.shape)}")
    return t, d, weight.shape[0]


def _positive(op: str, name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        _fail(op, f"{name} must be a number > 0, got {value!r}")
    return float(value)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross entropy of ``softmax(hidden @ weight^T)`` against ``labels`` without the ``[T, V]`` logits.

    Args:
        hidden: ``[T, D]`` fp32 / fp16 / bf16, any strides (the final hidden states, tokens flattened).
        weight: ``[V, D]`` the output head, hidden's dtype and device, any strides.
        labels: ``[T]`` int64 (or int32) in ``[0, V)``, or ``ignore_index`` to drop the token. Values are not
            checked (that would need a host sync); the reference and ``cpu`` backends raise on bad ones.
        ignore_index: the label of dropped tokens.
        reduction: ``"mean"`` over the kept tokens (every token dropped: 0, with zero gradients) or ``"sum"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpu"``.
    Returns:
        0-d fp32. Logits are ``hidden @ weight^T`` rounded to hidden's dtype (see ``reference.loss``), the
        softmax runs in fp32. Differentiable in hidden and weight; the fused backends compute the gradients
        in the forward (the backward only scales them), so the graph supports one backward per forward.
    """
    op = "fused_linear_cross_entropy"
    t, _, _ = _check_head(op, hidden, weight)
    check_tensor(op, "labels", labels, shape=(t,), dtypes=_INT_DTYPES, device=hidden.device)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        _fail(op, f"ignore_index must be an int, got {ignore_index!r}", TypeError)
    if reduction not in ("mean", "sum"):
        _fail(op, f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return FUSED_LINEAR_CROSS_ENTROPY(backend, hidden, weight, labels, ignore_index, reduction)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``log_softmax(hidden @ weight^T / temperature)[t, tokens[t]]`` without the ``[T, V]`` logits.

    Args:
        hidden: ``[T, D]`` fp32 / fp16 / bf16, any strides. weight: ``[V, D]``, hidden's dtype and device.
        tokens: ``[T]`` int64 (or int32) in ``[0, V)`` (not checked: a host sync).
        temperature: > 0, divides the logits (in fp32, after their rounding to hidden's dtype).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpu"``.
    Returns:
        ``[T]`` fp32. Differentiable in hidden and weight (the backward recomputes the chunk logits).
    """
    op = "fused_linear_logprobs"
    t, _, _ = _check_head(op, hidden, weight)
    check_tensor(op, "tokens", tokens, shape=(t,), dtypes=_INT_DTYPES, device=hidden.device)
    temperature = _positive(op, "temperature", temperature)
    return FUSED_LINEAR_LOGPROBS(backend, hidden, weight, tokens, temperature)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_tokens: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO policy loss with a k3 KL penalty (formulas: ``r1kernels.reference.loss.grpo_loss``).

    Args:
        logprobs: ``[B, S]`` float (fp32 usually), the policy's log-probabilities; the only differentiated input.
        old_logprobs: ``[B, S]`` float, the sampling policy's (no gradient).
        ref_logprobs: ``[B, S]`` float or None (no KL term, ``kl`` metric 0).
        advantages: ``[B]`` (one per sequence) or ``[B, S]`` float.
        mask: ``[B, S]`` bool, or float weights; positions off the mask may hold anything (NaN included).
        epsilon / epsilon_high: the ratio is clipped to ``[1 - epsilon, 1 + epsilon_high]``; epsilon_high
            defaults to epsilon (DAPO's clip-higher uses a larger one).
        beta: weight of the KL penalty (0 or no ref: left out of the loss).
        loss_type: ``"grpo"`` (mean per sequence, then over sequences), ``"dapo"`` (mean over all tokens) or
            ``"dr_grpo"`` (sum / (B * max_tokens)); max_tokens defaults to S.
        backend: ``"auto"``, ``"reference"`` or ``"triton"`` (one fused element-wise kernel).
    Returns:
        ``(loss, {"kl": mean k3 KL, "clip_fraction": fraction of clipped tokens})``, all 0-d fp32 (metrics
        detached). The loss is differentiable in logprobs.
    """
    op = "grpo_loss"
    check_tensor(op, "logprobs", logprobs, ndim=2, dtypes=FLOAT_DTYPES)
    b, s = logprobs.shape
    if b < 1 or s < 1:
        _fail(op, f"logprobs must hold at least one sequence and one position, got shape {(b, s)}")
    dev = logprobs.device
    check_tensor(op, "old_logprobs", old_logprobs, shape=(b, s), dtypes=FLOAT_DTYPES, device=dev)
    if ref_logprobs is not None:
        check_tensor(op, "ref_logprobs", ref_logprobs, shape=(b, s), dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(op, "advantages", advantages, ndim=(1, 2), dtypes=FLOAT_DTYPES, device=dev)
    if advantages.shape not in ((b,), (b, s)):
        _fail(op, f"advantages must have shape [{b}] or [{b}, {s}], got {tuple(advantages.shape)}")
    check_tensor(op, "mask", mask, shape=(b, s), dtypes=(torch.bool,) + FLOAT_DTYPES, device=dev)
    if loss_type not in ref.GRPO_LOSS_TYPES:
        _fail(op, f"loss_type must be one of {', '.join(ref.GRPO_LOSS_TYPES)}, got {loss_type!r}")
    numbers = [("epsilon", epsilon), ("beta", beta)] + ([("epsilon_high", epsilon_high)] if epsilon_high is not None else [])
    for name, v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            _fail(op, f"{name} must be a number >= 0, got {v!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        _fail(op, f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")
    eps_high = float(epsilon if epsilon_high is None else epsilon_high)
    return GRPO_LOSS(backend, logprobs, old_logprobs, ref_logprobs, advantages, mask, float(epsilon), eps_high,
                     float(beta), loss_type, s if max_tokens is None else max_tokens)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between the student's head and given teacher logits, without the student's
    ``[T, V]`` logits.

    With s = softmax(student_logits / temperature) and t = softmax(teacher_logits / temperature), per token:
    ``forward_kl`` = KL(t || s); ``reverse_kl`` = KL(s || t); ``jsd`` = beta KL(t || m) + (1 - beta) KL(s || m)
    with m = beta t + (1 - beta) s (so beta = 0 or 1 gives 0; beta = 0.5 is the symmetric JSD). Terms of
    probability 0 count 0. No temperature^2 factor.

    Args:
        student_hidden: ``[T, D]`` fp32 / fp16 / bf16, any strides. student_weight: ``[V, D]``, its dtype.
        teacher_logits: ``[T, V]`` any float dtype and strides (no gradient).
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``. temperature: > 0. beta: in [0, 1].
        mask: ``[T]`` bool or float weights, or None; the loss is the mask-weighted mean over tokens (divided
            by the mask's sum, at least 1). Tokens off the mask may have any teacher logits.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpu"``.
    Returns:
        0-d fp32, differentiable in the student's hidden and weight (gradients computed in the forward).
    """
    op = "fused_linear_kd_loss"
    t, _, v = _check_head(op, student_hidden, student_weight, "student_hidden", "student_weight")
    dev = student_hidden.device
    check_tensor(op, "teacher_logits", teacher_logits, shape=(t, v), dtypes=FLOAT_DTYPES, device=dev)
    if mask is not None:
        check_tensor(op, "mask", mask, shape=(t,), dtypes=(torch.bool,) + FLOAT_DTYPES, device=dev)
    if kind not in ref.KD_KINDS:
        _fail(op, f"kind must be one of {', '.join(ref.KD_KINDS)}, got {kind!r}")
    temperature = _positive(op, "temperature", temperature)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
        _fail(op, f"beta must be a number in [0, 1], got {beta!r}")
    return FUSED_LINEAR_KD_LOSS(backend, student_hidden, student_weight, teacher_logits, kind, temperature,
                                float(beta), mask)


__all__ = [
    "FUSED_LINEAR_CROSS_ENTROPY", "FUSED_LINEAR_KD_LOSS", "FUSED_LINEAR_LOGPROBS", "GRPO_LOSS",
    "fused_linear_cross_entropy", "fused_linear_kd_loss", "fused_linear_logprobs", "grpo_loss", "logits_chunk_rows",
]
