"""``backend="torch"``: the tile-kernel protocol (:mod:`fusedface.backends`) in plain PyTorch.

Runs on any device. Each tile works on ``[B, T]`` temporaries in the accumulation dtype (fp32,
or fp64 for fp64 inputs) and a ``[T, D]`` slice of ``W``; nothing grows with C except O(C)
vectors (inverse norms). The tile width comes from :func:`fusedface._engine.choose_tile`.
(This module's ``import torch`` is the PyTorch package: imports are absolute.)
"""
from __future__ import annotations

import torch

name = "torch"
KEEPS_BLOCK = False
MARGIN_EXTENSIONS = True  # the curricular rewrite, inter-class filtering and sub-centres (docs/engine.md)


def supports_device(device) -> bool:
    """Any device PyTorch runs on."""
    return True


def _tile_cosines(x32, Wt, xinv, winv_t, K=1):
    """Raw cosines of one tile and their clamped values, ``[B, T]``, plus the arg-max sub-centre
    ``[B, T]`` (None for ``K = 1``): with K sub-centres per class (``Wt`` has ``T·K`` rows, class
    ``j``'s at ``j·K … j·K + K − 1``) a class's raw cosine is the largest of its sub-centres' (the
    first on ties)."""
    raw = (x32 @ Wt.t()) * xinv[:, None] * winv_t[None, :]
    if K == 1:
        return raw, raw.clamp(-1.0, 1.0), None
    raw, arg = raw.unflatten(1, (-1, K)).max(dim=2)
    return raw, raw.clamp(-1.0, 1.0), arg


def _tile_logits(c, lab, f, opts, rt):
    """Support-vector mask, filter mask, rewritten cosines' slope factors and logits ``z`` of one tile.

    Inter-class filtering first (a negative with ``c > thr`` gets ``g = 0`` and no gradient, and is no
    support vector), then the rewrite ``g = (q·c + a + t_b)·c + b`` of the support vectors."""
    thr = opts.filter_threshold
    filt = (c > thr) & ~lab if thr < 2.0 else None
    sv = (c > f[:, None]) & ~lab
    if filt is not None:
        sv = sv & ~filt
    q, a, b = opts.rewrite3
    if opts.negative != "none":
        lin = a + (rt[:, None] if rt is not None else 0.0)
        g = torch.where(sv, (q * c + lin) * c + b, c)
    else:
        g = c
    if filt is not None:
        g = torch.where(filt, torch.zeros_like(g), g)
    z = torch.where(lab, (opts.scale * f)[:, None], opts.scale * g)
    return sv, filt, z


def _rewrite_slope(c, sv, filt, opts, rt):
    """``dg/dc`` of the negatives (1, the rewrite's slope on support vectors, 0 where filtered)."""
    q, a, _ = opts.rewrite3
    slope = torch.ones_like(c)
    if opts.negative != "none":
        lin = a + (rt[:, None] if rt is not None else 0.0)
        slope = torch.where(sv, 2.0 * q * c + lin, slope)
    if filt is not None:
        slope = torch.where(filt, torch.zeros_like(slope), slope)
    return slope


def margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False, rt=None):
    cdt = xinv.dtype
    K = opts.subcenters
    B, C = x.shape[0], W.shape[0] // K
    x32 = x.to(cdt)
    run_max = torch.full((B,), float("-inf"), dtype=cdt, device=x.device)
    run_sum = torch.zeros(B, dtype=cdt, device=x.device)
    best = torch.full((B,), float("-inf"), dtype=cdt, device=x.device)
    pred = torch.zeros(B, dtype=torch.long, device=x.device)
    svc = torch.zeros(B, dtype=torch.int32, device=x.device)
    for j0 in range(0, C, tile):
        j1 = min(j0 + tile, C)
        cols = torch.arange(j0, j1, device=x.device)
        _, c, _ = _tile_cosines(x32, W[j0 * K:j1 * K].to(cdt), xinv, winv[j0 * K:j1 * K], K)
        lab = y[:, None] == cols[None, :]
        sv, _, z = _tile_logits(c, lab, f, opts, rt)
        svc += sv.sum(dim=1, dtype=torch.int32)
        tmax = z.max(dim=1).values
        new_max = torch.maximum(run_max, tmax)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)
        run_max = new_max
        cval, cidx = c.max(dim=1)
        better = cval > best
        best = torch.where(better, cval, best)
        pred = torch.where(better, cidx + j0, pred)
    return run_max + torch.log(run_sum), pred, svc, None


def margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None, rt=None):
    cdt = xinv.dtype
    K = opts.subcenters
    B, C = x.shape[0], W.shape[0] // K
    x32 = x.to(cdt)
    xh = x32 * xinv[:, None]
    Gx = torch.zeros(B, x.shape[1], dtype=cdt, device=x.device) if need_dx else None
    dW = torch.empty_like(W) if need_dW else None
    for j0 in range(0, C, tile):
        j1 = min(j0 + tile, C)
        cols = torch.arange(j0, j1, device=x.device)
        Wt = W[j0 * K:j1 * K].to(cdt)
        winv_t = winv[j0 * K:j1 * K]
        raw, c, arg = _tile_cosines(x32, Wt, xinv, winv_t, K)
        lab = y[:, None] == cols[None, :]
        sv, filt, z = _tile_logits(c, lab, f, opts, rt)
        slope = ((raw >= -1.0) & (raw <= 1.0)).to(cdt)
        if opts.negative != "none" or filt is not None:
            slope = slope * _rewrite_slope(c, sv, filt, opts, rt)
        dc = opts.scale * torch.exp(z - lse[:, None]) * gl[:, None] * slope
        dc = torch.where(lab, dcy[:, None], dc)
        if K > 1:  # to the arg-max sub-centre of each (row, class): [B, T·K]
            dc = torch.zeros(B, j1 - j0, K, dtype=cdt, device=x.device).scatter_(2, arg[..., None], dc[..., None])
            dc = dc.flatten(1)
        if need_dx:
            Gx.addmm_(dc * winv_t[None, :], Wt)
        if need_dW:
            Gw = dc.t() @ xh  # [T·K, D]
            wh = Wt * winv_t[:, None]
            dW[j0 * K:j1 * K] = ((Gw - (Gw * wh).sum(dim=1, keepdim=True) * wh) * winv_t[:, None]).to(W.dtype)
    return Gx, dW


def npt_forward(x, W, xinv, winv, y, k, tile):
    cdt = xinv.dtype
    B, C = x.shape[0], W.shape[0]
    x32 = x.to(cdt)
    topv = torch.full((B, k), float("-inf"), dtype=cdt, device=x.device)
    topi = torch.full((B, k), -1, dtype=torch.long, device=x.device)
    for j0 in range(0, C, tile):
        j1 = min(j0 + tile, C)
        cols = torch.arange(j0, j1, device=x.device)
        _, c, _ = _tile_cosines(x32, W[j0:j1].to(cdt), xinv, winv[j0:j1])
        c = c.masked_fill(y[:, None] == cols[None, :], float("-inf"))
        kk = min(k, j1 - j0)
        tv, ti = c.topk(kk, dim=1)
        allv = torch.cat([topv, tv], dim=1)
        alli = torch.cat([topi, ti + j0], dim=1)
        topv, pos = allv.topk(k, dim=1)
        topi = alli.gather(1, pos)
    return topv, topi
