"""The oracle: exact, materialised PyTorch references for every loss in fusedface (SPEC §2–§5).

This module is the math of the SPEC and nothing else. It is written from the SPEC's formulas for
clarity, not for speed or memory: it builds the whole ``[B, C]`` cosine matrix and several
``[B, C]`` temporaries. It imports only ``torch``, ``math`` and the option records
(:mod:`fusedface._options`, for their validated fields): its rewrite table, its target transform,
its margin sources (ElasticFace's plus order, KappaFace's κ and margins) and its OTFace term are
its own, so a mistake in the fused path's code cannot also be the oracle's.

Inputs in fp16/bf16 are promoted to fp32 (fp64 stays fp64), so the loss is fp32 or fp64 and the
gradients come back in the inputs' dtypes.

Notation (SPEC §1): ``x [B, D]`` embeddings, ``W [C, D]`` class centres (one row per class),
``y [B]`` labels with ``ignore_index`` marking rows that contribute nothing, ``s`` the logit scale.
``c_bj = clamp(x̂_b · ŵ_j, -1, 1)`` with ``x̂ = x / max(‖x‖, 1e-12)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._options import MarginOptions, NPTOptions

__all__ = [
    "cosine_matrix",
    "target_transform",
    "rewritten_negatives",
    "margin_softmax_from_cosines",
    "margin_softmax_with_stats",
    "margin_softmax_loss",
    "npt_loss",
    "elastic_margins",
    "plus_order",
    "kappa_from_resultant",
    "kappa_margins",
    "sinkhorn_ot",
    "ot_triplet_loss",
    "otface_loss",
]

EPS_NORM = 1e-12  # SPEC §1, as F.normalize
EPS_SIN2 = 1e-12  # SPEC §2: sin θ = sqrt(max(1 − c², 1e-12))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(x, W, y, ignore_index):
    """The oracle's own guards (the public API checks more, with the same wording, before it calls
    the oracle): shapes, integer labels, labels in range. Returns ``(valid, y_safe)``."""
    for name, t, what in (("x", x, "embeddings"), ("W", W, "class centres")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} ({what}) must be a 2-D torch.Tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if x.shape[1] != W.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} features but W has D={W.shape[1]} columns; W must be [C, D]")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point:
        raise ValueError(f"y (labels) must be an integer tensor of shape [B={x.shape[0]}]")
    valid = y != ignore_index
    bad = ((y < 0) | (y >= W.shape[0])) & valid
    message = f"y (labels) holds value(s) outside [0, C={W.shape[0]}) that are not ignore_index={ignore_index}"
    if torch.compiler.is_compiling():  # (a check inside the compiled graph instead of a graph break)
        torch._assert_async(~bad.any(), message)
    elif y.device.type == "cpu" and bool(bad.any()):  # (on a GPU the public API checks, behind its switch)
        raise ValueError(message)
    return valid, torch.where(valid, y, torch.zeros_like(y)).long()


def _margin_vector(name, m, B, device, dtype):
    """A margin (float or per-row tensor ``[B]``) as a vector ``[B]``; a tensor keeps its graph, so a
    margin that requires grad (MagFace's) gets its gradient through the formulas below."""
    if isinstance(m, torch.Tensor):
        if m.dim() > 1 or (m.dim() == 1 and m.shape[0] != B):
            raise ValueError(f"{name} as a tensor must be per-row, shape [B={B}], got shape {tuple(m.shape)}")
        return m.to(device=device, dtype=dtype).expand(B)
    return torch.full((B,), float(m), dtype=dtype, device=device)


def row_margin(m, B, device, dtype):
    """A margin as a per-row vector ``[B]`` (detached)."""
    return _margin_vector("margin", m, B, device, dtype)


def cosine_matrix(x: torch.Tensor, W: torch.Tensor, subcenters: int = 1) -> torch.Tensor:
    """``c = clamp(x̂ ŵᵀ, -1, 1)`` as a materialised ``[B, C]`` matrix (the thing fusedface avoids).

    ``torch.clamp`` passes the gradient where ``-1 <= raw <= 1`` and blocks it outside; every
    backend follows the same rule.

    ``subcenters = K`` (Sub-center ArcFace, Deng et al. 2020): ``W`` is ``[C·K, D]`` with class ``j``'s
    sub-centres at rows ``j·K … j·K + K − 1``; a class's cosine is the largest of its sub-centres'
    (``torch.max`` sends the gradient to the first one that attains it).
    """
    dt = compute_dtype(x, W)
    xn = F.normalize(x.to(dt), dim=1, eps=EPS_NORM)
    wn = F.normalize(W.to(dt), dim=1, eps=EPS_NORM)
    raw = xn @ wn.t()
    if subcenters > 1:
        raw = raw.reshape(raw.shape[0], -1, subcenters).max(dim=2).values
    return raw.clamp(-1.0, 1.0)


def _with_slope(value: torch.Tensor, slope: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``value`` whose derivative with respect to ``c`` is ``slope`` (``value`` keeps
    its own graph to the margins, which ``c`` is detached from in it)."""
    return value + slope.detach() * (c - c.detach())


ADAFACE_EPS = 1e-3  # AdaFace's eps: cosines clamped to [-1 + eps, 1 - eps], angles clipped to [eps, pi - eps]


def target_transform(c, m1: float, m2, m3, theta_policy: str = "none", grad_mode: str = "exact"):
    """The target value ``f(c)`` of the margin-softmax family (SPEC §2).

    ``T(c) = cos(m1·acos(c) + m2) − m3`` — SphereFace's multiplicative ``m1`` (Liu et al. 2017),
    ArcFace's additive angular ``m2`` (Deng et al. 2019) and CosFace's additive cosine ``m3``
    (Wang et al. 2018), combined as in InsightFace.

    Policies for angles past π:
      * ``"none"``: ``f = T(c)``;
      * ``"threshold"`` (ArcFace's original): past ``m1·θ + m2 > π``, ``f = c − m2·sin(m2) − m3``;
      * ``"easy"``: ``f = T(c)`` where ``c > 0``, else ``f = c``;
      * ``"clip"`` (AdaFace, Kim et al. 2022): ``c`` clamped to ``[−1 + ε, 1 − ε]`` and the angle to
        ``[ε, π − ε]``, ``f = cos(clip(m1·θ + m2)) − m3`` with ε = 1e-3; no gradient where a clamp acts.

    Gradient (``grad_mode``): ``"exact"`` uses ``dT/dc = m1·sin(m1θ + m2) / sinθ`` with
    ``sinθ = sqrt(max(1 − c², 1e-12))`` (slope 1 on the ``threshold``/``easy`` fall-backs);
    ``"straight_through"`` uses ``dT/dc = 1`` everywhere (InsightFace since Dec 2022).

    ``c``, ``m2``, ``m3`` broadcast together (floats or per-row tensors). Margins that require grad
    get the exact ``dT/dm2``, ``dT/dm3 = −1`` (in every ``grad_mode``).
    """
    cd = c.detach()
    gate = torch.ones_like(cd)
    if theta_policy == "clip":
        lim = 1.0 - ADAFACE_EPS
        gate = ((cd >= -lim) & (cd <= lim)).to(cd.dtype)
        cd = cd.clamp(-lim, lim)
    theta = torch.acos(cd)
    angle = m1 * theta + m2
    if theta_policy == "clip":
        angle = torch.clamp(angle, ADAFACE_EPS, math.pi - ADAFACE_EPS)
    value = torch.cos(angle) - m3
    sin_theta = torch.sqrt(torch.clamp(1.0 - cd ** 2, min=EPS_SIN2))
    slope = m1 * torch.sin(angle) / sin_theta * gate
    if theta_policy == "clip":
        inside = (m1 * theta + m2 >= ADAFACE_EPS) & (m1 * theta + m2 <= math.pi - ADAFACE_EPS)
        slope = slope * inside.to(slope.dtype)
    if theta_policy == "threshold":
        past = angle > math.pi
        m2_t = torch.as_tensor(m2, dtype=c.dtype, device=c.device)
        value = torch.where(past, c.detach() - m2_t * torch.sin(m2_t) - m3, value)
        slope = torch.where(past, torch.ones_like(slope), slope)
    elif theta_policy == "easy":
        easy = c.detach() > 0
        value = torch.where(easy, value, c.detach())
        slope = torch.where(easy, slope, torch.ones_like(slope))
    if grad_mode == "straight_through":
        slope = torch.ones_like(slope)
    return _with_slope(value, slope, c)


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """mean over rows that are not ignored (0 when all are), sum, or none (ignored rows 0)."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def rewritten_negatives(c: torch.Tensor, negative: str, t) -> torch.Tensor:
    """The rewritten cosine ``g`` of a support vector (SPEC §2 table), column by column:
    ``"none"``: ``c``; ``"sv"`` (SV-Softmax, Wang et al. 2018): ``t·c + t − 1``; ``"mv_fixed"``:
    ``c + t``; ``"mv_adaptive"`` (MV-Softmax, Wang et al. 2020): ``(t + 1)·c + t``;
    ``"curricular"`` (CurricularFace, Huang et al. 2020): ``c·(t + c)`` with ``t`` a float or a
    per-row tensor ``[B, 1]`` (no gradient flows into ``t``)."""
    if negative == "none":
        return c
    if negative == "curricular":
        return c * (t + c)
    if negative == "sv":
        return t * c + t - 1.0
    if negative == "mv_fixed":
        return c + t
    if negative == "mv_adaptive":
        return (t + 1.0) * c + t
    raise ValueError(f"negative={negative!r} is not in the SPEC §2 table")


def margin_softmax_from_cosines(c, y, opts: MarginOptions, m2=0.0, m3=0.0, t=None):
    """The margin-softmax loss as a function of a given cosine matrix ``c [B, C]``.

    Returns ``(loss, stats)`` with ``stats = {"pred": argmax_j c_bj, "sv_count": number of
    support vectors per row, "valid": rows not ignored}``. Split out so tests can differentiate
    with respect to the cosines themselves (``dℓ/dc = s·(p − onehot)·dg/dc``).

    ``t``: CurricularFace's ``t`` as a tensor (0-dim or ``[B]``), else ``opts.t``.
    ``opts.interclass_threshold`` (InsightFace's inter-class filtering): a negative whose cosine
    exceeds it is taken for label noise: its cosine becomes 0 (no gradient) before anything else
    looks at it, and it is no support vector.
    """
    B, C = c.shape
    valid = y != opts.ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
    m2 = _margin_vector("m2", m2, B, c.device, c.dtype)
    m3 = _margin_vector("m3", m3, B, c.device, c.dtype)
    c_y = c.gather(1, y_safe[:, None]).squeeze(1)  # [B]
    f = target_transform(c_y, opts.m1, m2, m3, opts.theta_policy, opts.grad_mode)  # [B]

    target = F.one_hot(y_safe, C).bool() & valid[:, None]  # [B, C]
    cn = c
    filtered = torch.zeros_like(target)
    if opts.interclass_threshold is not None:
        filtered = (c.detach() > opts.interclass_threshold) & ~F.one_hot(y_safe, C).bool()
        cn = torch.where(filtered, torch.zeros_like(c), c)
    support = (c.detach() > f.detach()[:, None]) & ~target & ~filtered  # mis-classified negatives; no gradient
    tt = opts.t if t is None else _margin_vector("t", t, B, c.device, c.dtype).detach()[:, None]
    g = torch.where(support, rewritten_negatives(cn, opts.negative, tt), cn)
    z = opts.scale * torch.where(target, f[:, None].expand_as(c), g)
    rows = torch.logsumexp(z, dim=1) - opts.scale * f
    loss = _reduce(rows, valid, opts.reduction)
    stats = {"pred": c.detach().argmax(dim=1), "sv_count": support.sum(dim=1), "valid": valid}
    return loss, stats


def margin_softmax_with_stats(x, W, y, opts: MarginOptions, m2=0.0, m3=0.0, t=None):
    """The margin-softmax loss plus per-row statistics, materialised (see
    :func:`margin_softmax_from_cosines`)."""
    K = opts.subcenters
    if W.dim() == 2 and W.shape[0] % K:
        raise ValueError(f"W has {W.shape[0]} rows, not a multiple of subcenters={K}")
    _check_inputs(x, W[::K] if W.dim() == 2 else W, y, opts.ignore_index)
    return margin_softmax_from_cosines(cosine_matrix(x, W, K), y, opts, m2=m2, m3=m3, t=t)


def margin_softmax_loss(x, W, y, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0, theta_policy="none",
                        negative="none", t=0.0, grad_mode="exact", reduction="mean", ignore_index=-1,
                        interclass_threshold=None, subcenters=1):
    """Margin softmax cross-entropy, materialised (SPEC §2).

    Per row ``b`` with label ``y``: ``f_b`` is :func:`target_transform` of the target cosine.
    Negative columns whose cosine exceeds ``f_b`` (support vectors) are rewritten to
    ``g = a·c + b``: SV-Softmax ``(t, t − 1)`` (Wang et al. 2018, "Support Vector Guided Softmax
    Loss"), MV-Softmax fixed ``(1, t)`` and adaptive ``(t + 1, t)`` (Wang et al. 2020,
    "Mis-classified Vector Guided Softmax Loss"); other negatives keep ``c``. The mask carries no
    gradient. Then ``ℓ_b = logsumexp_k(s·g_bk with s·f_b at k = y) − s·f_b``, reduced by
    ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"``.

    ``m2``/``m3`` are floats or per-row tensors ``[B]`` (ElasticFace, KappaFace, AdaFace; MagFace's
    require grad and get it). ``negative="curricular"``: support vectors become ``c·(t + c)``
    (CurricularFace), ``t`` a float or a tensor. ``interclass_threshold``: see
    :func:`margin_softmax_from_cosines`. ``subcenters``: see :func:`cosine_matrix`.
    """
    tt = None
    if isinstance(t, torch.Tensor):
        tt, t = t, 0.0
    opts = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index,
                         interclass_threshold=interclass_threshold, subcenters=subcenters)
    return margin_softmax_with_stats(x, W, y, opts, m2=m2, m3=m3, t=tt)[0]


def npt_loss(x, W, y, *, delta=0.5, k=1, r=1.0, reduction="mean", ignore_index=-1):
    """NPT-Loss, "nearest proxies triplet" (Khalid et al. 2021), materialised (SPEC §4).

    ``ℓ_b = 2r² · Σ_{j ∈ TopK_b} max(0, c_bj − c_by + δ)`` where ``TopK_b`` holds the ``k``
    largest cosines over the columns ``j ≠ y_b`` (a hard top-k). Follows the paper, not the
    released code (which fills the target column with 0 and scales by 2r): see docs/differences.md.
    """
    opts = NPTOptions(delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    valid, y_safe = _check_inputs(x, W, y, opts.ignore_index)
    C = W.shape[0]
    if opts.k > C - 1:
        raise ValueError(f"k={opts.k} nearest negative proxies need at least k + 1 classes, W has C={C}; use k <= {C - 1}")
    c = cosine_matrix(x, W)
    c_y = c.gather(1, y_safe[:, None])  # [B, 1]
    target = F.one_hot(y_safe, C).bool()
    top = c.masked_fill(target, float("-inf")).topk(opts.k, dim=1).values  # [B, k]
    rows = 2.0 * opts.r ** 2 * torch.relu(top - c_y + opts.delta).sum(dim=1)
    return _reduce(rows, valid, opts.reduction)


# ---------------------------------------------------------------- margin sources (SPEC §3)

def elastic_margins(target_cos, mean, std, *, plus=False, generator=None, valid=None):
    """ElasticFace margins (Boutros et al. 2022) for one call: ``E_b = mean + std·N(0, 1)`` from
    fp32 draws of ``generator`` (not clamped); ``plus`` hands them out by :func:`plus_order`."""
    B = target_cos.shape[0]
    dtype = torch.float64 if target_cos.dtype == torch.float64 else torch.float32
    draws = (torch.randn(B, generator=generator, device=target_cos.device, dtype=torch.float32) * std + mean).to(dtype)
    return plus_order(target_cos, draws, valid) if plus else draws


def plus_order(target_cos: torch.Tensor, draws: torch.Tensor, valid=None) -> torch.Tensor:
    """ElasticFace+ (SPEC §3): the row with the r-th smallest target cosine (ties by row index,
    ignored rows last) gets the r-th largest draw. Written as a loop over ranks."""
    B = target_cos.shape[0]

    def key(b):  # valid rows by cosine, then ignored rows, then NaN cosines (as torch.sort places NaN)
        c = float(target_cos[b])
        if valid is not None and not bool(valid[b]):
            return (0, math.inf, b)
        return (1, 0.0, b) if math.isnan(c) else (0, c, b)

    rows_by_rank = sorted(range(B), key=key)
    draws_by_rank = sorted(range(B), key=lambda i: (-float(draws[i]), i))
    out = draws.clone()
    for rank, row in enumerate(rows_by_rank):
        out[row] = draws[draws_by_rank[rank]]
    return out


def kappa_from_resultant(rbar: torch.Tensor, dim: int) -> torch.Tensor:
    """KappaFace's concentration (SPEC §3): ``κ = r̄(d − r̄²)/(1 − r̄²)`` in float64; +inf becomes the
    largest finite κ (0 if none), NaN becomes 0."""
    r = rbar.to(torch.float64)
    kappa = r * (dim - r ** 2) / (1.0 - r ** 2)
    kappa = torch.nan_to_num(kappa, nan=0.0, posinf=math.nan)
    finite = kappa[~torch.isnan(kappa)]
    largest = finite.max() if finite.numel() else torch.zeros((), dtype=torch.float64)
    return torch.where(torch.isnan(kappa), largest, kappa)


def kappa_margins(kappa: torch.Tensor, counts: torch.Tensor, *, m0=0.8, temperature=0.4, gamma=0.7) -> torch.Tensor:
    """KappaFace per-class margins (Oinar et al. 2022; SPEC §3) from κ and the class counts:
    ``m = m0·(γ·(1 − sigmoid(T·z)) + (1 − γ)·(cos(π·n/K) + 1)/2)`` with ``z`` the standardised κ
    (unbiased std; z = 0 when the std is 0 or undefined) and ``K = 1.05·max n``."""
    kappa = kappa.to(torch.float64)
    n = counts.to(torch.float64)
    std = kappa.std() if kappa.numel() > 1 else torch.zeros((), dtype=torch.float64)
    z = (kappa - kappa.mean()) / std if bool(std > 0) else torch.zeros_like(kappa)
    K = 1.05 * max(float(n.max()), 1.0)
    return m0 * (gamma * (1.0 - torch.sigmoid(temperature * z)) + (1.0 - gamma) * (torch.cos(math.pi * n / K) + 1.0) / 2.0)


# ---------------------------------------------------------------- OTFace (SPEC §5)

def sinkhorn_ot(a: torch.Tensor, b: torch.Tensor, *, eps: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Entropic OT cost ``⟨π, 1 − cos⟩`` between the uniform distributions over the L2-normalised
    points of ``a [N, P, Cf]`` and ``b [N, Q, Cf]`` (log-domain Sinkhorn, Cuturi 2013: ``iters``
    alternating updates of the dual potentials, unrolled and differentiable). Returns ``[N]``."""
    out = []
    for n in range(a.shape[0]):
        pa = a[n] / a[n].norm(dim=1, keepdim=True).clamp(min=EPS_NORM)
        pb = b[n] / b[n].norm(dim=1, keepdim=True).clamp(min=EPS_NORM)
        cost = 1.0 - pa @ pb.t()  # [P, Q]
        P, Q = cost.shape
        u = torch.zeros(P, dtype=cost.dtype, device=cost.device)  # dual potentials
        v = torch.zeros(Q, dtype=cost.dtype, device=cost.device)
        for _ in range(iters):
            u = eps * (-math.log(P) - torch.logsumexp((v[None, :] - cost) / eps, dim=1))
            v = eps * (-math.log(Q) - torch.logsumexp((u[:, None] - cost) / eps, dim=0))
        plan = torch.exp((u[:, None] + v[None, :] - cost) / eps)
        out.append((plan * cost).sum())
    return torch.stack(out)


def ot_triplet_loss(x, y, feature_maps, *, margin=0.2, eps=0.05, iters=50, ignore_index=-1):
    """The OTFace transport term as fusedface reconstructs it (Qian et al. 2022; SPEC §5), anchor
    by anchor: for each non-ignored anchor with a positive and a negative in the batch, its hardest
    positive (same label, lowest embedding cosine, first on ties) and hardest negative (other label,
    highest cosine), chosen without gradient; ``max(0, OT(a, p) − OT(a, n) + margin)`` with each
    feature map ``[Cf, H, W]`` a uniform cloud of ``H·W`` points; the mean over such anchors (0 if none)."""
    if not eps > 0 or int(iters) < 1:
        raise ValueError(f"the OT term needs eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    if feature_maps.dim() != 4 or feature_maps.shape[0] != x.shape[0]:
        raise ValueError(f"feature_maps must be [B={x.shape[0]}, Cf, H, W], got shape {tuple(feature_maps.shape)}")
    B = x.shape[0]
    dt = compute_dtype(x, feature_maps)
    clouds = feature_maps.to(dt).flatten(2).transpose(1, 2)  # [B, H·W, Cf]
    xn = F.normalize(x.detach().float(), dim=1, eps=EPS_NORM)
    cos = xn @ xn.t()
    labels = [int(v) for v in y]
    terms = []
    for a in range(B):
        if labels[a] == ignore_index:
            continue
        pos = [j for j in range(B) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(B) if labels[j] != ignore_index and labels[j] != labels[a]]
        if not pos or not neg:
            continue
        p = min(pos, key=lambda j: (float(cos[a, j]), j))
        n = max(neg, key=lambda j: (float(cos[a, j]), -j))
        pair = sinkhorn_ot(clouds[[a, a]], clouds[[p, n]], eps=eps, iters=iters)
        terms.append(torch.relu(pair[0] - pair[1] + margin))
    if not terms:  # 0, still in the graph of the feature maps (a NaN there does not leak into it)
        return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), clouds.sum(),
                           torch.zeros((), dtype=dt, device=x.device))
    return torch.stack(terms).mean()


def otface_loss(x, W, y, feature_maps, *, ot_weight=0.1, ot_margin=0.2, ot_eps=0.05, ot_iters=50, **margin_kwargs):
    """OTFace total loss (SPEC §5): ``margin_softmax_loss(x, W, y, **margin_kwargs) + ot_weight·L_OT``."""
    base = margin_softmax_loss(x, W, y, **margin_kwargs)
    term = ot_triplet_loss(x, y, feature_maps, margin=ot_margin, eps=ot_eps, iters=ot_iters,
                           ignore_index=margin_kwargs.get("ignore_index", -1))
    return base + ot_weight * term.to(base.dtype)
