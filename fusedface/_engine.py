"""The fused algorithm of SPEC §6, independent of the backend that runs the class tiles.

Layers of one op, top to bottom (``docs/engine.md``): the public API (:mod:`fusedface.functional`,
the heads) checks the inputs and calls :func:`margin_softmax` / :func:`npt_loss` here, which resolve
the backend once (:mod:`fusedface.backends`) and call the registered op
(``fusedface::margin_softmax_fwd`` …) — or the backend's own whole step where it has one that
applies (the Triton step). The op runs the prologue below, then the backend's tile kernels; its
registered autograd formula is the only backward route of the op. The sharded heads
(:mod:`fusedface.distributed`) reuse the prologue, the kernels and the epilogues around their own
communication.

Every fused backend (``torch``, ``native``, ``triton``) plugs three tile kernels into it:

``margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False, rt=None) -> (lse [B] f32/f64, pred [B] i64, sv [B] i32, block)``
    One pass over class tiles. Per tile: ``c = clamp((x·Wᵀ)·xinv·winv, -1, 1)``; a negative column
    with ``c > opts.filter_threshold`` is filtered (``g = 0``, no gradient, InsightFace's inter-class
    filtering); other columns with ``c > f_b`` other than the label are support vectors, rewritten
    to ``g = (q·c + a + t_b)·c + b`` with ``(q, a, b) = opts.rewrite3`` and ``t_b = rt[b]`` (0 when
    ``rt`` is None; CurricularFace: ``c·(t_b + c)``); the label column's logit is ``s·f_b``; fold
    ``z = s·g`` into an online log-sum-exp. ``pred`` is the arg-max of ``c`` (training accuracy),
    ``sv`` the support-vector count. ``y`` is ``-1`` on ignored rows (no label column). With
    ``K = opts.subcenters`` ``W`` holds ``C·K`` rows and a class's raw cosine is the largest of its
    K sub-centres' (``tile`` counts classes). ``block``: the ``[C, B]`` cosines kept for the backward
    when ``keep_block`` (backends with ``KEEPS_BLOCK``), else None.

``margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None, rt=None) -> (Gx, dW)``
    Recomputes each tile. ``dℓ/dc_bk = s·exp(z_bk − lse_b)·gl_b·slope_bk`` for negatives
    (``slope`` is ``2q·c + a + t_b`` on support vectors, 0 on filtered columns, 1 elsewhere, and 0
    where the raw cosine was clamped) and ``dcy_b`` on the label column; with sub-centres it flows
    to the arg-max sub-centre only. Returns ``Gx = Σ_k dℓ/dc_bk·ŵ_k`` ([B, D], accumulation dtype)
    and ``dW`` ([C·K, D], W's dtype) with the normalisation Jacobian of W already applied.

A backend implements the options beyond the seed family (``MarginOptions.seed_family`` False) only
when it sets ``MARGIN_EXTENSIONS``; the engine refuses them elsewhere (:func:`check_kernels`).

``npt_forward(x, W, xinv, winv, y, k, tile) -> (values [B, k], index [B, k])``
    Streaming top-k of ``c`` over the columns other than the label.

Everything else — the O(B·D) prologue (norms, target cosines, the target transform and its slope),
the reductions, the x-side Jacobian, NPT's sparse backward and the gradients of per-row margins that
require grad (``dL/dm2``, ``dL/dm3`` from the label column, O(B)) — is plain PyTorch here, shared by
all backends, and free of host synchronisation.
"""
from __future__ import annotations

import math

import torch

from typing import Optional

from . import _inbackward, backends
from ._numerics import EPS_SIN2, compute_dtype, inverse_norms, nonfinite_centres, reduce_rows, row_margin
from ._options import MarginOptions, NPTOptions

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


CLIP_EPS = 1e-3  # AdaFace's eps: the target cosine in [-1 + eps, 1 - eps], the angle in [eps, pi - eps]


def _target_angle(raw_y, opts: MarginOptions, m2):
    """``(c_y, pass, angle, angle_pass)``: the clamped target cosine, where its clamp passes the
    gradient, the angle ``m1·θ + m2`` (clipped to ``[eps, π − eps]`` under ``"clip"``) and where that
    clip passes it."""
    lim = 1.0 - CLIP_EPS if opts.theta_policy == "clip" else 1.0
    in_y = (raw_y >= -lim) & (raw_y <= lim)
    c_y = raw_y.clamp(-lim, lim)
    angle = opts.m1 * torch.acos(c_y) + m2
    if opts.theta_policy != "clip":
        return c_y, in_y, angle, None
    inside = (angle >= CLIP_EPS) & (angle <= math.pi - CLIP_EPS)
    return c_y, in_y, angle.clamp(CLIP_EPS, math.pi - CLIP_EPS), inside


def target_transform(raw_y, opts: MarginOptions, m2, m3):
    """``(f, slope)`` per row from the raw (unclamped) target cosines (SPEC §2): ``f_b = T(c_y)``
    with the theta policy applied, and ``dT/dc`` at ``c_y`` (1 under ``straight_through``, 0 where
    the raw cosine left ``[-1, 1]`` and the clamp blocks the gradient). ``m2``, ``m3``: ``[B]``.
    Shared by the single-process prologue and the sharded one (``fusedface.distributed``).

    ``"clip"`` (AdaFace, Kim et al. 2022): ``c_y`` clamped to ``[−1 + ε, 1 − ε]`` and the angle
    ``m1·θ + m2`` to ``[ε, π − ε]`` (ε = 1e-3), each clamp blocking the gradient where it acts under
    ``"exact"`` (``straight_through`` passes 1 through both, as the reference)."""
    c_y, in_y, angle, inside = _target_angle(raw_y, opts, m2)
    f = torch.cos(angle) - m3
    slope = opts.m1 * torch.sin(angle) / torch.sqrt(torch.clamp(1.0 - c_y * c_y, min=EPS_SIN2))
    one = torch.ones_like(slope)
    if inside is not None:
        slope = slope * inside.to(slope.dtype)
    if opts.theta_policy == "threshold":
        past = angle > math.pi
        f = torch.where(past, c_y - m2 * torch.sin(m2) - m3, f)
        slope = torch.where(past, one, slope)
    elif opts.theta_policy == "easy":
        easy = c_y > 0
        f = torch.where(easy, f, c_y)
        slope = torch.where(easy, slope, one)
    if opts.grad_mode == "straight_through":
        # dT/dc = 1 through every policy, the clip's clamp included (it is part of T); only the
        # clamp of a raw cosine to [-1, 1] still blocks the gradient, as with every other cosine
        return f, ((raw_y >= -1.0) & (raw_y <= 1.0)).to(slope.dtype)
    return f, slope * in_y.to(slope.dtype)


def margin_slopes(raw_y, opts: MarginOptions, m2):
    """``(dT/dm2, dT/dm3)`` per row: ``−sin(m1·θ + m2)`` and −1; past π under ``"threshold"``
    ``−(sin m2 + m2·cos m2)`` and −1; 0 and 0 where ``"easy"`` keeps ``c``; ``dT/dm2`` 0 where ``"clip"``
    clips the angle. Exact in every ``grad_mode`` (``straight_through`` concerns ``dT/dc`` only). What a
    differentiable per-row margin (MagFace) needs from the label column."""
    c_y, _, angle, inside = _target_angle(raw_y, opts, m2)
    d2 = -torch.sin(angle)
    d3 = -torch.ones_like(d2)
    if inside is not None:
        d2 = d2 * inside.to(d2.dtype)
    if opts.theta_policy == "threshold":
        d2 = torch.where(angle > math.pi, -(torch.sin(m2) + m2 * torch.cos(m2)), d2)
    elif opts.theta_policy == "easy":
        d2 = torch.where(c_y > 0, d2, torch.zeros_like(d2))
        d3 = torch.where(c_y > 0, d3, torch.zeros_like(d3))
    return d2, d3


def margin_prologue(x, W, y, opts: MarginOptions, m2, m3, cdt):
    """O(B·D) work before the pass: norms, target cosines, ``f_b`` and ``dT/dc`` per row."""
    B = x.shape[0]
    valid = y != opts.ignore_index
    y_lab = torch.where(valid, y, torch.full_like(y, -1)).long()
    y_safe = y_lab.clamp(min=0)
    xinv = inverse_norms(x, cdt)
    winv = inverse_norms(W, cdt)
    raw_y = label_raw_cosines(x, W, y_safe, xinv, winv, opts.subcenters, cdt)
    f, slope = target_transform(raw_y, opts, row_margin(m2, B, x.device, cdt), row_margin(m3, B, x.device, cdt))
    return valid, y_lab, xinv, winv, raw_y.clamp(-1.0, 1.0), f, slope


def label_raw_cosines(x, W, y_safe, xinv, winv, K: int, cdt):
    """Raw target cosines ``x̂_b·ŵ_{y_b}`` in O(B·K·D): with ``K`` sub-centres per class (``W`` of
    ``[C·K, D]``, class ``j``'s at rows ``j·K … j·K + K − 1``) the largest over the label's sub-centres."""
    if K == 1:
        return (x.to(cdt) * W[y_safe].to(cdt)).sum(dim=1) * xinv * winv[y_safe]
    rows = y_safe[:, None] * K + torch.arange(K, device=y_safe.device)  # [B, K]
    raw = torch.einsum("bd,bkd->bk", x.to(cdt), W[rows].to(cdt)) * xinv[:, None] * winv[rows]
    return raw.max(dim=1).values


def target_column_grad(opts: MarginOptions, f, lse, gl, slope):
    """``dℓ/dc`` on the label column: ``s·(p_y − 1)·gl·dT/dc`` with ``p_y = exp(s·f − lse)``."""
    return opts.scale * (torch.exp(opts.scale * f - lse) - 1.0) * gl * slope


def margin_forward_rows(x, W, y, m2, m3, opts: MarginOptions, kernels, tile: int, keep_block: bool = False, rt=None):
    """The forward of the fused margin softmax: prologue, one kernel pass, per-row losses.

    Returns ``(rows, pred, sv, saved, block)`` with ``saved = (x, W, y_lab, xinv, winv, f, slope,
    lse, valid, rt)`` (``x`` and ``W`` contiguous): everything :func:`margin_backward_grads` needs, and the
    kernels' kept block (None unless ``keep_block``).
    ``rt``: CurricularFace's per-row ``t`` (``[B]``, accumulation dtype) for ``negative="curricular"``."""
    cdt = compute_dtype(x, W)
    x = x.contiguous()
    W = W.contiguous()
    check_kernels(kernels, opts, keep_block)
    B = x.shape[0]
    valid, y_lab, xinv, winv, c_y, f, slope = margin_prologue(x, W, y, opts, m2, m3, cdt)
    rt = row_t(rt, opts, B, x.device, cdt)
    lse, pred, sv, block = kernels.margin_forward(x, W, xinv, winv, y_lab, f, opts, tile, keep_block=keep_block,
                                                  **({"rt": rt} if rt is not None else {}))
    rows = _nan_if_bad_centres(W, winv, lse - opts.scale * f)
    rows = torch.where(valid, rows, torch.zeros_like(lse))
    return rows, pred, sv, (x, W, y_lab, xinv, winv, f, slope, lse, valid, rt), block


def check_kernels(kernels, opts: MarginOptions, keep_block: bool = False) -> None:
    """Refuses options a backend's kernels do not implement (instead of a silently wrong loss)."""
    if not opts.seed_family and not getattr(kernels, "MARGIN_EXTENSIONS", False):
        raise ValueError(f"backend={kernels.name!r} does not implement theta_policy='clip', negative='curricular', "
                         "interclass_threshold or subcenters > 1 yet; use backend='torch'")
    if keep_block and opts.subcenters > 1:
        raise ValueError("the kept block of cosines (margin_softmax_loss_kept_block) holds one centre per class; with "
                         "subcenters > 1 use fusedface.functional.margin_softmax_loss")


def row_t(rt, opts: MarginOptions, B: int, device, cdt):
    """CurricularFace's ``t`` as the kernels' per-row tensor (None for the other rewrites)."""
    if opts.negative != "curricular":
        return None
    if rt is None:
        rt = opts.t
    return row_margin(rt, B, device, cdt)


def _nan_if_bad_centres(W, winv, rows):
    """NaN in, NaN out, whatever the kernels' min/max do with NaN (Triton's ``tl.maximum`` and a
    streaming top-k drop it, torch's ops propagate it; an Inf centre's ``winv`` is 0, which no kernel
    sees as NaN): a NaN or an Inf in any centre makes every row NaN, as in the reference, where every
    row's softmax (and top-k) sees every class (:func:`fusedface._numerics.nonfinite_centres`). A NaN
    embedding already reaches its row through the prologue's target cosine. No synchronisation."""
    return torch.where(nonfinite_centres(W, winv).any(), torch.full_like(rows, float("nan")), rows)


def margin_backward_grads(grad_rows, saved, opts: MarginOptions, kernels, tile: int, need_dx: bool, need_dW: bool,
                          block=None, upd=None):
    """``(dL/dx or None, dL/dW or None)`` from the upstream per-row gradient and ``saved`` (and the
    forward's kept block, when it kept one). ``upd``: an in-backward update (:mod:`fusedface.optim`)
    that takes ``dL/dW`` slice by slice (:func:`apply_in_slices`), then ``dL/dW`` comes back None."""
    x, W, y_lab, xinv, winv, f, slope, lse, valid, rt = saved
    gl = torch.where(valid, grad_rows.to(lse.dtype), torch.zeros_like(lse))
    dcy = target_column_grad(opts, f, lse, gl, slope)
    if upd is not None:
        Gx = apply_in_slices(upd, x, W, y_lab, xinv, winv, f, lse, gl, dcy, opts, kernels, tile, need_dx, block, rt=rt)
        dW = None
        upd.finish()
    else:
        Gx, dW = kernels.margin_backward(x, W, xinv, winv, y_lab, f, lse, gl, dcy, opts, tile, need_dx, need_dW,
                                         block=block, **({"rt": rt} if rt is not None else {}))
    dx = x_jacobian(x, xinv, Gx).to(x.dtype) if need_dx else None
    return dx, (dW if need_dW else None)


def x_jacobian(x, xinv, G):
    """``dL/dx = (G − (G·x̂)x̂) / max(‖x‖, eps)`` row by row (SPEC §2)."""
    xh = x.to(G.dtype) * xinv[:, None]
    return (G - (G * xh).sum(dim=1, keepdim=True) * xh) * xinv[:, None]


def npt_forward_rows(x, W, y, opts: NPTOptions, kernels, tile: int):
    """Per-row NPT losses and ``saved = (x, W, y_safe, xinv, winv, topi, hinge, valid)``."""
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
    rows = _nan_if_bad_centres(W, winv, rows)  # a streaming top-k may skip a NaN cosine; torch.topk ranks it first
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return rows, (x, W, y_safe, xinv, winv, topi, hinge, valid)


def npt_backward_grads(grad_rows, saved, opts: NPTOptions, need_dx: bool, need_dW: bool, upd=None):
    """NPT's sparse backward: only the ``k`` selected columns and the label column carry gradient.
    ``upd``: an in-backward update (:mod:`fusedface._inbackward`) that takes ``dL/dW`` slice by slice
    instead of a returned ``[C, D]`` gradient."""
    x, W, y_safe, xinv, winv, topi, hinge, valid = saved
    cdt = xinv.dtype
    gl = torch.where(valid, grad_rows.to(cdt), torch.zeros_like(xinv))
    # a slot a kernel left empty (index −1: no candidate beat −inf, e.g. a NaN row) carries nothing
    found = topi >= 0
    coef = 2.0 * opts.r ** 2 * gl[:, None] * ((hinge > 0) & found).to(cdt)  # [B, k] on c_bj
    cols = torch.cat([torch.where(found, topi, y_safe[:, None]), y_safe[:, None]], dim=1)  # [B, k+1]
    dc = torch.cat([coef, -coef.sum(dim=1, keepdim=True)], dim=1)  # the label column: −Σ coef
    if upd is not None:
        Gx, idx, val = sparse_column_contributions(x, xinv, W, winv, cols, dc, need_dx, True)
        apply_sparse_in_slices(upd, idx, val, W.shape[0], W.shape[1], cdt)
        dW = None
    else:
        Gx, dW = sparse_column_grads(x, xinv, W, winv, cols, dc, need_dx, need_dW)
    return (x_jacobian(x, xinv, Gx).to(x.dtype) if need_dx else None), dW


def sparse_column_grads(x, xinv, W, winv, cols, dc, need_dx: bool, need_dW: bool):
    """Gradients of ``Σ_bj dc_bj·c(b, cols_bj)`` through the cosines of a few columns per row.

    ``cols [B, j]`` indexes rows of ``W``; ``dc [B, j]`` is ``dℓ/dc`` there. The clamp to
    ``[-1, 1]`` blocks columns whose raw cosine left it. Returns ``(Gx, dW)``: ``Gx = Σ_j dc·ŵ``
    in the accumulation dtype, before the x-side Jacobian (or None), and ``dL/dW`` in ``W``'s
    dtype with its Jacobian applied (or None). Used by NPT's backward, single-process and sharded."""
    Gx, idx, val = sparse_column_contributions(x, xinv, W, winv, cols, dc, need_dx, need_dW)
    dW = None
    if need_dW:
        dW = scatter_rows(idx, val, W.shape[0], xinv.dtype).to(W.dtype)
    return Gx, dW


def sparse_column_contributions(x, xinv, W, winv, cols, dc, need_dx: bool, need_dW: bool):
    """``(Gx or None, idx [B·j], val [B·j, D] or None)``: :func:`sparse_column_grads` before the
    scatter of the per-(row, column) contributions to ``dL/dW`` into their rows ``idx``."""
    cdt = xinv.dtype
    Wg = W[cols].to(cdt)  # [B, j, D]
    wi = winv[cols]
    xh = x.to(cdt) * xinv[:, None]
    raw = torch.einsum("bd,bjd->bj", xh, Wg) * wi
    dc = dc * ((raw >= -1.0) & (raw <= 1.0)).to(cdt)
    Gx = val = None
    if need_dx:
        Gx = torch.einsum("bj,bjd->bd", dc * wi, Wg)
    if need_dW:
        wh = Wg * wi[..., None]
        Gw = dc[..., None] * xh[:, None, :]  # [B, j, D], one contribution per (row, column)
        val = ((Gw - (Gw * wh).sum(-1, keepdim=True) * wh) * wi[..., None]).reshape(-1, W.shape[1])
    return Gx, cols.reshape(-1), val


def scatter_rows(idx, val, rows: int, dtype):
    """``[rows, D]`` sums of ``val`` by row ``idx``, bitwise reproducible without
    ``torch.use_deterministic_algorithms``: on CUDA ``index_add_`` uses atomics while
    ``index_put_(accumulate=True)`` sorts the indices and sums each class in order; on CPU it is the
    other way round."""
    acc = torch.zeros(rows, val.shape[1], dtype=dtype, device=val.device)
    if acc.is_cuda:
        acc.index_put_((idx,), val.to(dtype), accumulate=True)
    else:
        acc.index_add_(0, idx, val.to(dtype))
    return acc


def apply_sparse_in_slices(upd, idx, val, C: int, D: int, dtype, index=None):
    """In-backward update from per-(row, column) contributions (NPT): slice by slice, the columns
    ``lo:hi`` of the ``C`` the pass ran on get the sum of their contributions (zero for columns no
    row selected); they are the parameter's rows ``lo:hi``, or its rows ``index[lo:hi]`` when the
    pass ran on a gathered Partial FC sample."""
    n = _inbackward.slice_rows(C, D, idx.device)
    for lo in range(0, C, n):
        hi = min(lo + n, C)
        sel = (idx >= lo) & (idx < hi)
        g = scatter_rows(idx[sel] - lo, val[sel], hi - lo, dtype)
        if index is None:
            upd.apply(lo, hi, g)
        else:
            upd.apply_index(index[lo:hi], g)


# ---------------------------------------------------------------------------------------------
# Registered ops: what the public API calls, and what torch.compile sees
# ---------------------------------------------------------------------------------------------
#
# Dynamo would unroll the Python tile loop of the torch kernels (one graph node per tile op, a
# graph that grows with C) and cannot trace the backend lookup. So the engine is registered as
# custom ops: the compiler sees one opaque op per pass, with a shape-only fake kernel, and the tile
# loop runs eagerly inside it. Non-tensor options travel as scalars and strings (the backend by
# the name :func:`margin_softmax` resolved, looked up inside the op; ``"auto"`` from a compiled
# graph is resolved there); margins as per-row tensors ``[B]``. ``margin_softmax_fwd`` returns what
# its backward needs besides its inputs; those extra outputs are marked non-differentiable.

def _margin_opts(scale, m1, theta_policy, negative, t, grad_mode, ignore_index, interclass=2.0,
                 subcenters=1) -> MarginOptions:
    return MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction="none", ignore_index=ignore_index,
                         interclass_threshold=None if interclass > 1.0 else interclass, subcenters=subcenters)


@torch.library.custom_op("fusedface::margin_softmax_fwd", mutates_args=())
def margin_softmax_fwd(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor,
                       backend: str, scale: float, m1: float, theta_policy: str, negative: str, t: float,
                       grad_mode: str, ignore_index: int, tile: int, keep_block: bool = False,
                       optim_token: int = 0, rt: Optional[torch.Tensor] = None, interclass: float = 2.0,
                       subcenters: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [B], pred [B] i64, sv [B] i32, lse [B], f [B], slope [B], xinv [B], winv [C·K], block)``;
    the float outputs are in the accumulation dtype (fp32, fp64 when an input is fp64); ``block`` is
    the kept ``[C, B]`` cosines with ``keep_block`` (backends with ``KEEPS_BLOCK``), else empty.
    ``optim_token``: the in-backward optimizer attached to ``W`` (:mod:`fusedface._inbackward`; 0: none),
    used by the backward only. ``rt``: CurricularFace's per-row ``t``; ``interclass``: the inter-class
    filtering threshold (2.0: off); ``subcenters``: centres per class (``W`` is ``[C·K, D]``)."""
    opts = _margin_opts(scale, m1, theta_policy, negative, t, grad_mode, ignore_index, interclass, subcenters)
    kernels = backends.get(backend, x.device)
    if keep_block and not getattr(kernels, "KEEPS_BLOCK", False):
        raise ValueError(f"keep_block: backend={kernels.name!r} cannot keep the block of cosines; use backend='native'")
    rows, pred, sv, saved, block = margin_forward_rows(x, W, y, m2, m3, opts, kernels, tile, keep_block, rt)
    _, _, _, xinv, winv, f, slope, lse, _, _ = saved
    cdt = rows.dtype
    block = block if block is not None else x.new_empty(0, dtype=cdt)
    return (rows, pred.to(torch.long), sv.to(torch.int32), lse.to(cdt), f, slope, xinv, winv, block)


@margin_softmax_fwd.register_fake
def _(x, W, y, m2, m3, backend, scale, m1, theta_policy, negative, t, grad_mode, ignore_index, tile, keep_block=False,
      optim_token=0, rt=None, interclass=2.0, subcenters=1):
    cdt = compute_dtype(x, W)
    B, C = x.shape[0], W.shape[0]
    vec = [x.new_empty(B, dtype=cdt) for _ in range(5)]
    block = x.new_empty((C // subcenters, B) if keep_block else (0,), dtype=cdt)
    return (vec[0], x.new_empty(B, dtype=torch.long), x.new_empty(B, dtype=torch.int32), vec[1], vec[2],
            vec[3], vec[4], W.new_empty(C, dtype=cdt), block)


@torch.library.custom_op("fusedface::margin_softmax_bwd", mutates_args=())
def margin_softmax_bwd(grad_rows: torch.Tensor, x: torch.Tensor, W: torch.Tensor, y: torch.Tensor,
                       lse: torch.Tensor, f: torch.Tensor, slope: torch.Tensor, xinv: torch.Tensor,
                       winv: torch.Tensor, backend: str, scale: float, m1: float, theta_policy: str,
                       negative: str, t: float, grad_mode: str, ignore_index: int, tile: int,
                       need_dx: int, need_dW: int, block: Optional[torch.Tensor] = None,
                       rt: Optional[torch.Tensor] = None, interclass: float = 2.0, subcenters: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx [B, D] in x's dtype, dL/dW [C, D] in W's dtype)``; a gradient that is not needed
    comes back as an empty tensor. ``block``: the forward's kept cosines (None or empty: recompute)."""
    opts = _margin_opts(scale, m1, theta_policy, negative, t, grad_mode, ignore_index, interclass, subcenters)
    saved, block = _backward_inputs(x, W, y, lse, f, slope, xinv, winv, block, ignore_index, rt)
    dx, dW = margin_backward_grads(grad_rows, saved, opts, backends.get(backend, x.device), tile,
                                   bool(need_dx), bool(need_dW), block)
    return (dx if dx is not None else x.new_empty(0)), (dW if dW is not None else W.new_empty(0))


def _backward_inputs(x, W, y, lse, f, slope, xinv, winv, block, ignore_index, rt=None):
    """``(saved, block)`` of :func:`margin_backward_grads` from the op's saved tensors (an empty kept
    block: none)."""
    valid = y != ignore_index
    y_lab = torch.where(valid, y, torch.full_like(y, -1)).long()
    saved = (x.contiguous(), W.contiguous(), y_lab, xinv, winv, f, slope, lse, valid, rt)
    return saved, (block if block is not None and block.numel() else None)


@margin_softmax_bwd.register_fake
def _(grad_rows, x, W, y, lse, f, slope, xinv, winv, backend, scale, m1, theta_policy, negative, t,
      grad_mode, ignore_index, tile, need_dx, need_dW, block=None, rt=None, interclass=2.0, subcenters=1):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dW = torch.empty_like(W, memory_format=torch.contiguous_format) if need_dW else W.new_empty(0)
    return dx, dW


_MARGIN_SCALARS = slice(5, 14)  # backend … tile among margin_softmax_fwd's inputs
_MARGIN_INPUTS = 19  # margin_softmax_fwd's inputs (the length of its backward's answer)


def _margin_setup_context(ctx, inputs, output):
    x, W, y, m2, m3 = inputs[:5]
    rows, pred, sv, lse, f, slope, xinv, winv, block = output
    rt = inputs[16] if len(inputs) > 16 else None
    ctx.save_for_backward(x, W, y, lse, f, slope, xinv, winv, block, m2, rt)
    ctx.scalars = inputs[_MARGIN_SCALARS]
    ctx.optim_token = inputs[15] if len(inputs) > 15 else 0
    ctx.extensions = (inputs[17] if len(inputs) > 17 else 2.0, inputs[18] if len(inputs) > 18 else 1)
    ctx.mark_non_differentiable(pred, sv, lse, f, slope, xinv, winv, block)


def _margin_grads(ctx, grad_rows, saved):
    """For margins that require grad, ``dL/dm2 = dℓ/df·dT/dm2`` and ``dL/dm3 = dℓ/df·dT/dm3`` per row,
    with ``dℓ/df = s·(p_y − 1)·gl`` from the label column (O(B·K·D): the target cosines are gathered
    again, only when a margin asks for its gradient; before an in-backward update changes ``W``).
    ``saved``: ``ctx.saved_tensors``."""
    need_m2, need_m3 = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dm2 = dm3 = None
    if need_m2 or need_m3:
        x, W, y, lse, f, slope, xinv, winv, block, m2, rt = saved
        opts = _margin_opts(*ctx.scalars[1:-1], *ctx.extensions)
        valid = y != opts.ignore_index
        gl = torch.where(valid, grad_rows.to(lse.dtype), torch.zeros_like(lse))
        dldf = opts.scale * (torch.exp(opts.scale * f - lse) - 1.0) * gl
        y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
        raw_y = label_raw_cosines(x, W, y_safe, xinv, winv, opts.subcenters, lse.dtype)
        d2, d3 = margin_slopes(raw_y, opts, m2.to(lse.dtype))
        dm2 = dldf * d2 if need_m2 else None
        dm3 = dldf * d3 if need_m3 else None
    return dm2, dm3


def _margin_backward(ctx, grad_rows, *_):
    need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    upd = None
    if need_dW and ctx.optim_token:
        # First, before W is read: a second backward, or a head used twice, is refused here by name
        # (reading the saved tensors would raise autograd's version-counter error instead).
        upd = _inbackward.begin(ctx.optim_token)
        need_dW = upd is not None  # None: this backward does not ask for dL/dW (autograd.grad of x, …)
    saved = ctx.saved_tensors
    x, W, y, lse, f, slope, xinv, winv, block, _, rt = saved
    dm2, dm3 = _margin_grads(ctx, grad_rows, saved)  # before the update below changes W

    def answer(dx, dW):
        return (dx, dW, None, dm2, dm3) + (None,) * (_MARGIN_INPUTS - 5)

    if upd is not None:
        backend, *options, tile = ctx.scalars
        saved, block = _backward_inputs(x, W, y, lse, f, slope, xinv, winv, block, options[-1], rt)
        dx, _ = margin_backward_grads(grad_rows, saved, _margin_opts(*options, *ctx.extensions),
                                      backends.get(backend, x.device), tile, need_dx, False, block, upd=upd)
        return answer(dx, None)
    if not (need_dx or need_dW):
        return answer(None, None)
    dx, dW = torch.ops.fusedface.margin_softmax_bwd(grad_rows, x, W, y, lse, f, slope, xinv, winv,
                                                    *ctx.scalars, int(need_dx), int(need_dW), block, rt,
                                                    *ctx.extensions)
    return answer(dx if need_dx else None, dW if need_dW else None)


def apply_in_slices(upd, x, W, y_lab, xinv, winv, f, lse, gl, dcy, opts, kernels, tile, need_dx, block=None,
                    index=None, rt=None):
    """Runs ``kernels.margin_backward`` over class slices of ``W`` (the rows the pass ran on) and hands
    each slice's ``dL/dW`` to ``upd``: rows ``lo:hi`` of the parameter, or rows ``index[lo:hi]`` when
    ``W`` is a gathered Partial FC sample. Returns ``Gx`` summed over the slices (or None). With
    ``K = opts.subcenters`` a slice is whole classes: rows ``lo·K : hi·K``."""
    K = opts.subcenters
    C, D = W.shape[0] // K, W.shape[1]
    n = max(1, _inbackward.slice_rows(C * K, D, W.device) // K)
    extra = {"rt": rt} if rt is not None else {}
    Gx = None
    for lo in range(0, C, n):
        hi = min(lo + n, C)
        yl = _inbackward.slice_labels(y_lab, lo, hi)
        Gs, dWs = kernels.margin_backward(x, W[lo * K:hi * K], xinv, winv[lo * K:hi * K], yl, f, lse, gl, dcy, opts,
                                          min(tile, hi - lo), need_dx, True,
                                          block=None if block is None else block[lo:hi], **extra)
        if need_dx:
            Gx = Gs if Gx is None else Gx.add_(Gs)
        if index is None:
            upd.apply(lo * K, hi * K, dWs)
        else:
            upd.apply_index(index[lo * K:hi * K], dWs)
    return Gx


margin_softmax_fwd.register_autograd(_margin_backward, setup_context=_margin_setup_context)


@torch.library.custom_op("fusedface::npt_fwd", mutates_args=())
def npt_fwd(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, backend: str, delta: float, k: int, r: float,
            ignore_index: int, tile: int, optim_token: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [B], topi [B, k] i64, hinge [B, k], xinv [B], winv [C])`` (floats in the accumulation dtype)."""
    opts = NPTOptions(delta=delta, k=k, r=r, reduction="none", ignore_index=ignore_index)
    rows, saved = npt_forward_rows(x, W, y, opts, backends.get(backend, x.device), tile)
    _, _, _, xinv, winv, topi, hinge, _ = saved
    return rows, topi.to(torch.long), hinge, xinv, winv


@npt_fwd.register_fake
def _(x, W, y, backend, delta, k, r, ignore_index, tile, optim_token=0):
    cdt = compute_dtype(x, W)
    B, C = x.shape[0], W.shape[0]
    return (x.new_empty(B, dtype=cdt), x.new_empty(B, k, dtype=torch.long), x.new_empty(B, k, dtype=cdt),
            x.new_empty(B, dtype=cdt), W.new_empty(C, dtype=cdt))


def _npt_setup_context(ctx, inputs, output):
    x, W, y, backend, delta, k, r, ignore_index, tile = inputs[:9]
    ctx.optim_token = inputs[9] if len(inputs) > 9 else 0
    rows, topi, hinge, xinv, winv = output
    ctx.save_for_backward(x, W, y, topi, hinge, xinv, winv)
    ctx.opts = NPTOptions(delta=delta, k=k, r=r, reduction="none", ignore_index=ignore_index)
    ctx.mark_non_differentiable(topi, hinge, xinv, winv)


def _npt_backward(ctx, grad_rows, *_):
    need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    upd = _inbackward.begin(ctx.optim_token) if need_dW and ctx.optim_token else None
    if upd is None and ctx.optim_token:
        need_dW = False  # the optimizer's W, not asked for by this backward
    x, W, y, topi, hinge, xinv, winv = ctx.saved_tensors
    valid = y != ctx.opts.ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
    saved = (x, W, y_safe, xinv, winv, topi, hinge, valid)
    if upd is not None:
        dx, _ = npt_backward_grads(grad_rows, saved, ctx.opts, need_dx, False, upd=upd)
        upd.finish()
        return (dx, None) + (None,) * 8
    dx, dW = npt_backward_grads(grad_rows, saved, ctx.opts, need_dx, need_dW)
    return (dx, dW) + (None,) * 8


npt_fwd.register_autograd(_npt_backward, setup_context=_npt_setup_context)

REGISTERED_OPS = ("fusedface::margin_softmax_fwd", "fusedface::margin_softmax_bwd", "fusedface::npt_fwd")


# ---------------------------------------------------------------------------------------------
# The entry points of the public API: the backend resolved once per call, one route per op
# ---------------------------------------------------------------------------------------------

def _resolved(backend: str, device: torch.device):
    """``(name, module)`` in eager mode; under ``torch.compile`` the name as given and the module
    only if it is already loaded (the op resolves ``"auto"`` when it runs: Dynamo does not trace
    the registry's imports)."""
    if torch.compiler.is_compiling():
        return backend, backends.loaded(backend)
    return backends.resolve(backend, device)


def margin_softmax(x, W, y, opts: MarginOptions, m2, m3, backend: str, tile: int, *, want_stats: bool = True,
                   keep_block: bool = False, rt=None):
    """The fused margin softmax of the public API (inputs already checked): ``(loss, pred, sv)`` with
    the loss reduced by ``opts.reduction`` (``pred``/``sv`` may be None when ``want_stats`` is
    False). ``backend`` is resolved here, once; a backend with a whole step of its own that applies
    to this call (the Triton step) runs it, every other call runs ``fusedface::margin_softmax_fwd``."""
    name, module = _resolved(backend, x.device)
    if module is None and name == "reference":
        raise ValueError("backend='reference' is the materialised oracle; fusedface.reference computes it")
    token = in_backward_token(W)
    margin_grads = any(isinstance(m, torch.Tensor) and m.requires_grad and torch.is_grad_enabled() for m in (m2, m3))
    if (module is not None and not keep_block and hasattr(module, "margin_step") and _step_covers(module, opts)
            and not margin_grads and module.step_applies(x, W)
            and (not token or getattr(module, "STEP_IN_BACKWARD", False))):
        return module.margin_step(x, W, y, opts, m2, m3, want_stats, **({"optim_token": token} if token else {}))
    B = x.shape[0]
    cdt = compute_dtype(x, W)
    rows, pred, sv, *_ = torch.ops.fusedface.margin_softmax_fwd(
        x, W, y, margin_vector(m2, B, x.device, cdt), margin_vector(m3, B, x.device, cdt), name, opts.scale, opts.m1,
        opts.theta_policy, opts.negative, opts.t, opts.grad_mode, opts.ignore_index, tile, keep_block, token,
        row_t(rt, opts, B, x.device, cdt), opts.filter_threshold, opts.subcenters)
    return reduce_rows(rows, y != opts.ignore_index, opts.reduction), pred, sv


def _step_covers(module, opts: MarginOptions) -> bool:
    """Whether a backend's whole step takes these options: its ``step_covers(opts)`` where it has one,
    else the seed family."""
    covers = getattr(module, "step_covers", None)
    return covers(opts) if covers is not None else opts.seed_family


def margin_vector(m, B: int, device, dtype) -> torch.Tensor:
    """A margin as the op's per-row input ``[B]``: a constant, or (a tensor that requires grad, e.g.
    MagFace's norm-dependent margin) still attached to its graph, so the op returns ``dL/dm`` to it."""
    if isinstance(m, torch.Tensor) and m.requires_grad and torch.is_grad_enabled():
        return m.to(device=device, dtype=dtype).expand(B).contiguous()
    return row_margin(m, B, device, dtype)


def in_backward_token(W) -> int:
    """The token of the in-backward optimizer attached to ``W`` (0: none, or no ``dL/dW`` this call)."""
    token = _inbackward.token_of(W)
    if token and torch.compiler.is_compiling():
        raise _inbackward.InBackwardError(
            "torch.compile of a step whose head has an in-backward optimizer (fusedface.optim): the update mutates W "
            "inside the backward, which a compiled graph cannot hold; compile the backbone only, or use a "
            "torch.optim optimizer for W")
    return token


def npt_loss(x, W, y, opts: NPTOptions, backend: str, tile: int):
    """Fused NPT-Loss of the public API (inputs already checked), reduced by ``opts.reduction``."""
    name, _ = _resolved(backend, x.device)
    rows = torch.ops.fusedface.npt_fwd(x, W, y, name, opts.delta, opts.k, opts.r, opts.ignore_index, tile,
                                       in_backward_token(W))[0]
    return reduce_rows(rows, y != opts.ignore_index, opts.reduction)
