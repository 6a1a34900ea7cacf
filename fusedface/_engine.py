"""The fused algorithm of SPEC §6, independent of the backend that runs the class tiles.

Every fused backend (``torch``, ``native``, ``triton``) plugs three tile kernels into the same
two ``autograd.Function`` s defined here:

``margin_forward(x, W, xinv, winv, y, f, opts, tile) -> (lse [B] f32/f64, pred [B] i64, sv [B] i32)``
    One pass over class tiles. Per tile: ``c = clamp((x·Wᵀ)·xinv·winv, -1, 1)``; columns with
    ``c > f_b`` other than the label are support vectors (rewritten to ``a·c + b``); the label
    column's logit is ``s·f_b``; fold ``z = s·g`` into an online log-sum-exp. ``pred`` is the
    arg-max of ``c`` (training accuracy), ``sv`` the support-vector count. ``y`` is ``-1`` on
    ignored rows (no label column).

``margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW) -> (Gx, dW)``
    Recomputes each tile. ``dℓ/dc_bk = s·exp(z_bk − lse_b)·gl_b·slope_bk`` for negatives
    (``slope`` is ``a`` on support vectors, 1 elsewhere, 0 where the raw cosine was clamped) and
    ``dcy_b`` on the label column. Returns ``Gx = Σ_k dℓ/dc_bk·ŵ_k`` ([B, D], accumulation dtype)
    and ``dW`` ([C, D], W's dtype) with the normalisation Jacobian of W already applied.

``npt_forward(x, W, xinv, winv, y, k, tile) -> (values [B, k], index [B, k])``
    Streaming top-k of ``c`` over the columns other than the label.

Everything else — the O(B·D) prologue (norms, target cosines, the target transform and its slope),
the reductions, the x-side Jacobian and NPT's sparse backward — is plain PyTorch here, shared by
all backends, and free of host synchronisation.
"""
from __future__ import annotations

import math

import torch

from ._options import MarginOptions, NPTOptions
from .reference import EPS_NORM, EPS_SIN2, compute_dtype, row_margin

DEFAULT_TILE_BUDGET = 32 * 2**20  # bytes of tile temporaries per call, independent of C


def choose_tile(B: int, D: int, C: int, budget: int | None = None, tile: int | None = None) -> int:
    """Class-tile width from a memory budget: about eight ``[B, T]`` fp32 temporaries plus the
    fp32 copies of a ``[T, D]`` tile of ``W`` and of its gradient stay under ``budget`` bytes."""
    if tile is not None:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile_size must be a positive int (classes per tile), got {tile!r}")
        return min(tile, C)
    budget = DEFAULT_TILE_BUDGET if budget is None else int(budget)
    per_class = 8 * 4 * B + 3 * 4 * D
    t = max(64, (budget // per_class) // 64 * 64)
    return min(t, C)


def inverse_norms(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 / max(‖row‖, 1e-12)`` per row, in ``dtype`` (O(rows), no copy of the matrix kept)."""
    return 1.0 / torch.linalg.vector_norm(t, dim=1, dtype=dtype).clamp(min=EPS_NORM)


def margin_prologue(x, W, y, opts: MarginOptions, m2, m3, cdt):
    """O(B·D) work before the pass: norms, target cosines, ``f_b`` and ``dT/dc`` per row."""
    B = x.shape[0]
    valid = y != opts.ignore_index
    y_lab = torch.where(valid, y, torch.full_like(y, -1)).long()
    y_safe = y_lab.clamp(min=0)
    xinv = inverse_norms(x, cdt)
    winv = inverse_norms(W, cdt)
    raw_y = (x.to(cdt) * W[y_safe].to(cdt)).sum(dim=1) * xinv * winv[y_safe]
    in_y = (raw_y >= -1.0) & (raw_y <= 1.0)
    c_y = raw_y.clamp(-1.0, 1.0)
    m2 = row_margin(m2, B, x.device, cdt)
    m3 = row_margin(m3, B, x.device, cdt)
    theta = torch.acos(c_y)
    angle = opts.m1 * theta + m2
    f = torch.cos(angle) - m3
    slope = opts.m1 * torch.sin(angle) / torch.sqrt(torch.clamp(1.0 - c_y * c_y, min=EPS_SIN2))
    one = torch.ones_like(slope)
    if opts.theta_policy == "threshold":
        past = angle > math.pi
        f = torch.where(past, c_y - m2 * torch.sin(m2) - m3, f)
        slope = torch.where(past, one, slope)
    elif opts.theta_policy == "easy":
        easy = c_y > 0
        f = torch.where(easy, f, c_y)
        slope = torch.where(easy, slope, one)
    if opts.grad_mode == "straight_through":
        slope = one
    slope = slope * in_y.to(cdt)
    return valid, y_lab, xinv, winv, c_y, f, slope


class MarginSoftmaxFunction(torch.autograd.Function):
    """Per-row margin-softmax losses ``[B]`` (0 on ignored rows) plus (pred, sv) statistics."""

    @staticmethod
    def forward(ctx, x, W, y, m2, m3, opts: MarginOptions, kernels, tile: int):
        cdt = compute_dtype(x, W)
        x = x.contiguous()
        W = W.contiguous()
        valid, y_lab, xinv, winv, c_y, f, slope = margin_prologue(x, W, y, opts, m2, m3, cdt)
        lse, pred, sv = kernels.margin_forward(x, W, xinv, winv, y_lab, f, opts, tile)
        rows = torch.where(valid, lse - opts.scale * f, torch.zeros_like(lse))
        ctx.save_for_backward(x, W, y_lab, xinv, winv, f, slope, lse, valid)
        ctx.opts, ctx.kernels, ctx.tile = opts, kernels, tile
        ctx.mark_non_differentiable(pred, sv)
        return rows, pred, sv

    @staticmethod
    def backward(ctx, grad_rows, _gp, _gs):
        x, W, y_lab, xinv, winv, f, slope, lse, valid = ctx.saved_tensors
        opts = ctx.opts
        need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dW):
            return (None,) * 8
        gl = torch.where(valid, grad_rows.to(lse.dtype), torch.zeros_like(lse))
        p_y = torch.exp(opts.scale * f - lse)
        dcy = opts.scale * (p_y - 1.0) * gl * slope
        Gx, dW = ctx.kernels.margin_backward(x, W, xinv, winv, y_lab, f, lse, gl, dcy, opts, ctx.tile,
                                             need_dx, need_dW)
        dx = x_jacobian(x, xinv, Gx).to(x.dtype) if need_dx else None
        return dx, (dW if need_dW else None), None, None, None, None, None, None


def x_jacobian(x, xinv, G):
    """``dL/dx = (G − (G·x̂)x̂) / max(‖x‖, eps)`` row by row (SPEC §2)."""
    xh = x.to(G.dtype) * xinv[:, None]
    return (G - (G * xh).sum(dim=1, keepdim=True) * xh) * xinv[:, None]


class NPTFunction(torch.autograd.Function):
    """Per-row NPT losses ``[B]`` (0 on ignored rows). The backward is sparse and needs no pass
    over the classes: only the ``k`` selected columns and the label column carry gradient."""

    @staticmethod
    def forward(ctx, x, W, y, opts: NPTOptions, kernels, tile: int):
        cdt = compute_dtype(x, W)
        x = x.contiguous()
        W = W.contiguous()
        valid = y != opts.ignore_index
        y_lab = torch.where(valid, y, torch.full_like(y, -1)).long()
        y_safe = y_lab.clamp(min=0)
        xinv = inverse_norms(x, cdt)
        winv = inverse_norms(W, cdt)
        c_y = ((x.to(cdt) * W[y_safe].to(cdt)).sum(dim=1) * xinv * winv[y_safe]).clamp(-1.0, 1.0)
        topv, topi = kernels.npt_forward(x, W, xinv, winv, y_lab, opts.k, tile)
        hinge = topv - c_y[:, None] + opts.delta
        rows = 2.0 * opts.r ** 2 * torch.relu(hinge).sum(dim=1)
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        ctx.save_for_backward(x, W, y_safe, xinv, winv, topi, hinge, valid)
        ctx.opts = opts
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        x, W, y_safe, xinv, winv, topi, hinge, valid = ctx.saved_tensors
        opts = ctx.opts
        need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = xinv.dtype
        gl = torch.where(valid, grad_rows.to(cdt), torch.zeros_like(xinv))
        coef = 2.0 * opts.r ** 2 * gl[:, None] * (hinge > 0).to(cdt)  # [B, k] on c_bj
        cols = torch.cat([topi, y_safe[:, None]], dim=1)  # [B, k+1]
        # dℓ/dc on the label column is −Σ coef; the clamp blocks columns whose raw cosine left [-1, 1]
        dc = torch.cat([coef, -coef.sum(dim=1, keepdim=True)], dim=1)
        Wg = W[cols].to(cdt)  # [B, k+1, D]
        xh = x.to(cdt) * xinv[:, None]
        raw = torch.einsum("bd,bjd->bj", xh, Wg) * winv[cols]
        dc = dc * ((raw >= -1.0) & (raw <= 1.0)).to(cdt)
        dx = dW = None
        if need_dx:
            Gx = torch.einsum("bj,bjd->bd", dc * winv[cols], Wg)
            dx = x_jacobian(x, xinv, Gx).to(x.dtype)
        if need_dW:
            wh = Wg * winv[cols][..., None]
            Gw = dc[..., None] * xh[:, None, :]  # [B, k+1, D], one contribution per (row, column)
            contrib = (Gw - (Gw * wh).sum(-1, keepdim=True) * wh) * winv[cols][..., None]
            acc = torch.zeros(W.shape, dtype=cdt if W.dtype != cdt else W.dtype, device=W.device)
            acc.index_add_(0, cols.reshape(-1), contrib.reshape(-1, W.shape[1]))
            dW = acc.to(W.dtype)
        return dx, dW, None, None, None, None
