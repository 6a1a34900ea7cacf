"""The OTFace transport term (SPEC §5), as the heads and the functional API compute it.

O(B·(H·W)²·(Cf + iters)) plus O(B²·D) mining, no class dimension. The oracle
(:mod:`fusedface.reference`) states the same term on its own, anchor by anchor; the tests hold the
two to each other.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._numerics import EPS_NORM, compute_dtype

__all__ = ["sinkhorn_ot", "ot_triplet_loss"]


def sinkhorn_ot(a: torch.Tensor, b: torch.Tensor, *, eps: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Entropic optimal-transport cost between point clouds, by log-domain Sinkhorn (Cuturi 2013).

    ``a [N, P, Cf]``, ``b [N, Q, Cf]``: N pairs of clouds, each a uniform distribution over its
    L2-normalised points. Cost ``1 − cosine``. Returns ``⟨π, cost⟩ [N]`` for the entropic plan
    ``π`` after ``iters`` alternating updates of the dual potentials (differentiable, unrolled).
    """
    a = F.normalize(a, dim=-1, eps=EPS_NORM)
    b = F.normalize(b, dim=-1, eps=EPS_NORM)
    cost = 1.0 - a @ b.transpose(1, 2)  # [N, P, Q]
    P, Q = cost.shape[1], cost.shape[2]
    log_mu = -math.log(P)
    log_nu = -math.log(Q)
    f = torch.zeros(cost.shape[0], P, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(cost.shape[0], Q, dtype=cost.dtype, device=cost.device)
    for _ in range(iters):
        f = eps * (log_mu - torch.logsumexp((g[:, None, :] - cost) / eps, dim=2))
        g = eps * (log_nu - torch.logsumexp((f[:, :, None] - cost) / eps, dim=1))
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)
    return (plan * cost).sum(dim=(1, 2))


def ot_triplet_loss(x, y, feature_maps, *, margin=0.2, eps=0.05, iters=50, ignore_index=-1):
    """The OTFace transport term, as fusedface reconstructs it from the abstract of Qian et al.
    2022 ("OTFace: Hard Samples Guided Optimal Transport Loss for Deep Face Representation").

    For each anchor with both a positive and a negative in the batch: the hardest positive (same
    label, lowest embedding cosine) and hardest negative (other label, highest cosine), chosen
    without gradient. Each sample's ``[Cf, H, W]`` feature map is a uniform distribution over its
    ``H·W`` position vectors; ``L_OT = mean_a max(0, OT(a, p) − OT(a, n) + margin)`` (0 when no
    anchor qualifies). The paper's hyper-parameters were not available: see docs/losses/otface.md.
    """
    if not eps > 0 or int(iters) < 1:
        raise ValueError(f"the OT term needs eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    if feature_maps.dim() != 4 or feature_maps.shape[0] != x.shape[0]:
        raise ValueError(f"feature_maps must be [B={x.shape[0]}, Cf, H, W], got shape {tuple(feature_maps.shape)}")
    B = x.shape[0]
    valid = y != ignore_index
    with torch.no_grad():
        xn = F.normalize(x.detach().float(), dim=1, eps=EPS_NORM)
        cos = xn @ xn.t()
        same = (y[:, None] == y[None, :]) & valid[:, None] & valid[None, :]
        eye = torch.eye(B, dtype=torch.bool, device=x.device)
        pos = same & ~eye
        neg = ~(y[:, None] == y[None, :]) & valid[:, None] & valid[None, :]
        hard_pos = cos.masked_fill(~pos, float("inf")).argmin(dim=1)
        hard_neg = cos.masked_fill(~neg, float("-inf")).argmax(dim=1)
        anchors = pos.any(dim=1) & neg.any(dim=1)
    dt = compute_dtype(x, feature_maps)
    clouds = feature_maps.to(dt).flatten(2).transpose(1, 2)  # [B, H·W, Cf]
    ot_pos = sinkhorn_ot(clouds, clouds[hard_pos], eps=eps, iters=iters)
    ot_neg = sinkhorn_ot(clouds, clouds[hard_neg], eps=eps, iters=iters)
    terms = torch.relu(ot_pos - ot_neg + margin)
    terms = torch.where(anchors, terms, torch.zeros_like(terms))
    return terms.sum() / anchors.sum().clamp(min=1).to(terms.dtype)
