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


def supports_device(device) -> bool:
    """Any device PyTorch runs on."""
    return True


def _tile_cosines(x32, Wt, xinv, winv_t):
    """raw cosines of one tile ``[B, T]`` and their clamped values."""
    raw = (x32 @ Wt.t()) * xinv[:, None] * winv_t[None, :]
    return raw, raw.clamp(-1.0, 1.0)


def _tile_logits(c, lab, f, opts):
    """support-vector mask, slope on the negatives and logits ``z`` of one tile."""
    sv = (c > f[:, None]) & ~lab
    a, b = opts.rewrite
    if opts.negative != "none":
        g = torch.where(sv, a * c + b, c)
    else:
        g = c
    z = torch.where(lab, (opts.scale * f)[:, None], opts.scale * g)
    return sv, z


def margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False):
    cdt = xinv.dtype
    B, C = x.shape[0], W.shape[0]
    x32 = x.to(cdt)
    run_max = torch.full((B,), float("-inf"), dtype=cdt, device=x.device)
    run_sum = torch.zeros(B, dtype=cdt, device=x.device)
    best = torch.full((B,), float("-inf"), dtype=cdt, device=x.device)
    pred = torch.zeros(B, dtype=torch.long, device=x.device)
    svc = torch.zeros(B, dtype=torch.int32, device=x.device)
    for j0 in range(0, C, tile):
        j1 = min(j0 + tile, C)
        cols = torch.arange(j0, j1, device=x.device)
        _, c = _tile_cosines(x32, W[j0:j1].to(cdt), xinv, winv[j0:j1])
        lab = y[:, None] == cols[None, :]
        sv, z = _tile_logits(c, lab, f, opts)
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


def margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None):
    cdt = xinv.dtype
    B, C = x.shape[0], W.shape[0]
    x32 = x.to(cdt)
    xh = x32 * xinv[:, None]
    a = opts.rewrite[0]
    Gx = torch.zeros(B, x.shape[1], dtype=cdt, device=x.device) if need_dx else None
    dW = torch.empty_like(W) if need_dW else None
    for j0 in range(0, C, tile):
        j1 = min(j0 + tile, C)
        cols = torch.arange(j0, j1, device=x.device)
        Wt = W[j0:j1].to(cdt)
        winv_t = winv[j0:j1]
        raw, c = _tile_cosines(x32, Wt, xinv, winv_t)
        lab = y[:, None] == cols[None, :]
        sv, z = _tile_logits(c, lab, f, opts)
        slope = ((raw >= -1.0) & (raw <= 1.0)).to(cdt)
        if opts.negative != "none" and a != 1.0:
            slope = torch.where(sv, slope * a, slope)
        dc = opts.scale * torch.exp(z - lse[:, None]) * gl[:, None] * slope
        dc = torch.where(lab, dcy[:, None], dc)
        if need_dx:
            Gx.addmm_(dc * winv_t[None, :], Wt)
        if need_dW:
            Gw = dc.t() @ xh  # [T, D]
            wh = Wt * winv_t[:, None]
            dW[j0:j1] = ((Gw - (Gw * wh).sum(dim=1, keepdim=True) * wh) * winv_t[:, None]).to(W.dtype)
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
        _, c = _tile_cosines(x32, W[j0:j1].to(cdt), xinv, winv[j0:j1])
        c = c.masked_fill(y[:, None] == cols[None, :], float("-inf"))
        kk = min(k, j1 - j0)
        tv, ti = c.topk(kk, dim=1)
        allv = torch.cat([topv, tv], dim=1)
        alli = torch.cat([topi, ti + j0], dim=1)
        topv, pos = allv.topk(k, dim=1)
        topi = alli.gather(1, pos)
    return topv, topi
