"""Exact, materialised PyTorch references for every loss in fusedface (SPEC §2–§5).

This module is the oracle every backend is tested against. It is written for clarity, not for
speed or memory: it builds the whole ``[B, C]`` cosine matrix and several ``[B, C]`` temporaries.
Inputs in fp16/bf16 are promoted to fp32 (fp64 stays fp64), so the loss is fp32 or fp64 and the
gradients come back in the inputs' dtypes.

Notation (SPEC §1): ``x [B, D]`` embeddings, ``W [C, D]`` class centres (one row per class),
``y [B]`` labels with ``ignore_index`` marking rows that contribute nothing, ``s`` the logit scale.
``c_bj = clamp(x̂_b · ŵ_j, -1, 1)`` with ``x̂ = x / max(‖x‖, 1e-12)``.

The O(B) and O(C) helpers here (ElasticFace draws and plus ordering, KappaFace statistics →
κ → margins, the OTFace transport term) are also what the fused backends use before and around
their pass over the classes: only the ``[B, C]`` work differs between backends.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ._options import MarginOptions, NPTOptions
from ._validate import check_embeddings_and_centres, check_labels, check_row_margin

__all__ = [
    "cosine_matrix",
    "target_transform",
    "margin_softmax_loss",
    "npt_loss",
    "elastic_draws",
    "plus_order",
    "elastic_margins",
    "kappa_from_resultant",
    "kappa_margins",
    "sinkhorn_ot",
    "ot_triplet_loss",
    "otface_loss",
]

EPS_NORM = 1e-12  # as F.normalize
EPS_SIN2 = 1e-12  # floor under 1 - c² in the exact slope of the target transform


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the accumulation type of every backend."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cosine_matrix(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``c = clamp(x̂ ŵᵀ, -1, 1)`` as a materialised ``[B, C]`` matrix (the thing fusedface avoids).

    ``torch.clamp`` passes the gradient where ``-1 <= raw <= 1`` and blocks it outside; every
    backend follows the same rule.
    """
    dt = compute_dtype(x, W)
    xn = F.normalize(x.to(dt), dim=1, eps=EPS_NORM)
    wn = F.normalize(W.to(dt), dim=1, eps=EPS_NORM)
    return (xn @ wn.t()).clamp(-1.0, 1.0)


def _with_slope(value: torch.Tensor, slope: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``value`` whose derivative with respect to ``c`` is ``slope``."""
    return value.detach() + slope.detach() * (c - c.detach())


def target_transform(c, m1: float, m2, m3, theta_policy: str = "none", grad_mode: str = "exact"):
    """The target value ``f(c)`` of the margin-softmax family (SPEC §2).

    ``T(c) = cos(m1·acos(c) + m2) − m3`` — SphereFace's multiplicative ``m1`` (Liu et al. 2017),
    ArcFace's additive angular ``m2`` (Deng et al. 2019) and CosFace's additive cosine ``m3``
    (Wang et al. 2018), combined as in InsightFace.

    Policies for angles past π:
      * ``"none"``: ``f = T(c)``;
      * ``"threshold"`` (ArcFace's original): past ``m1·θ + m2 > π``, ``f = c − m2·sin(m2) − m3``;
      * ``"easy"``: ``f = T(c)`` where ``c > 0``, else ``f = c``.

    Gradient (``grad_mode``): ``"exact"`` uses ``dT/dc = m1·sin(m1θ + m2) / sinθ`` with
    ``sinθ = sqrt(max(1 − c², 1e-12))`` (slope 1 on the ``threshold``/``easy`` fall-backs);
    ``"straight_through"`` uses ``dT/dc = 1`` everywhere (InsightFace since Dec 2022).

    ``c``, ``m2``, ``m3`` broadcast together (floats or per-row tensors).
    """
    theta = torch.acos(c.detach())
    angle = m1 * theta + m2
    value = torch.cos(angle) - m3
    sin_theta = torch.sqrt(torch.clamp(1.0 - c.detach() ** 2, min=EPS_SIN2))
    slope = m1 * torch.sin(angle) / sin_theta
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


def _prepare(x, W, y, ignore_index):
    check_embeddings_and_centres(x, W)
    check_labels(y, x.shape[0], W.shape[0], ignore_index, x.device)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
    return valid, y_safe


def row_margin(m, B, device, dtype):
    """A margin as a per-row vector ``[B]``; margins are constants (detached, no gradient)."""
    if isinstance(m, torch.Tensor):
        return m.detach().to(device=device, dtype=dtype).expand(B).contiguous()
    return torch.full((B,), float(m), dtype=dtype, device=device)


def margin_softmax_from_cosines(c, y, opts: MarginOptions, m2=0.0, m3=0.0):
    """The margin-softmax loss as a function of a given cosine matrix ``c [B, C]``.

    Returns ``(loss, stats)`` with ``stats = {"pred": argmax_j c_bj, "sv_count": number of
    support vectors per row, "valid": rows not ignored}``. Split out so tests can differentiate
    with respect to the cosines themselves (``dℓ/dc = s·(p − onehot)·dg/dc``).
    """
    B, C = c.shape
    valid = y != opts.ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
    m2 = row_margin(check_row_margin("m2", m2, B, c.device), B, c.device, c.dtype)
    m3 = row_margin(check_row_margin("m3", m3, B, c.device), B, c.device, c.dtype)
    c_y = c.gather(1, y_safe[:, None]).squeeze(1)  # [B]
    f = target_transform(c_y, opts.m1, m2, m3, opts.theta_policy, opts.grad_mode)  # [B]

    target = F.one_hot(y_safe, C).bool() & valid[:, None]  # [B, C]
    support = (c.detach() > f.detach()[:, None]) & ~target  # mis-classified negatives; no gradient
    a, b = opts.rewrite
    g = torch.where(support, a * c + b, c)
    z = opts.scale * torch.where(target, f[:, None].expand_as(c), g)
    rows = torch.logsumexp(z, dim=1) - opts.scale * f
    loss = _reduce(rows, valid, opts.reduction)
    stats = {"pred": c.detach().argmax(dim=1), "sv_count": support.sum(dim=1), "valid": valid}
    return loss, stats


def margin_softmax_with_stats(x, W, y, opts: MarginOptions, m2=0.0, m3=0.0):
    """The margin-softmax loss plus per-row statistics, materialised (see
    :func:`margin_softmax_from_cosines`)."""
    _prepare(x, W, y, opts.ignore_index)
    return margin_softmax_from_cosines(cosine_matrix(x, W), y, opts, m2=m2, m3=m3)


def margin_softmax_loss(x, W, y, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0, theta_policy="none",
                        negative="none", t=0.0, grad_mode="exact", reduction="mean", ignore_index=-1):
    """Margin softmax cross-entropy, materialised (SPEC §2).

    Per row ``b`` with label ``y``: ``f_b`` is :func:`target_transform` of the target cosine.
    Negative columns whose cosine exceeds ``f_b`` (support vectors) are rewritten to
    ``g = a·c + b``: SV-Softmax ``(t, t − 1)`` (Wang et al. 2018, "Support Vector Guided Softmax
    Loss"), MV-Softmax fixed ``(1, t)`` and adaptive ``(t + 1, t)`` (Wang et al. 2020,
    "Mis-classified Vector Guided Softmax Loss"); other negatives keep ``c``. The mask carries no
    gradient. Then ``ℓ_b = logsumexp_k(s·g_bk with s·f_b at k = y) − s·f_b``, reduced by
    ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"``.

    ``m2``/``m3`` are floats or per-row tensors ``[B]`` (ElasticFace, KappaFace).
    """
    opts = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index)
    return margin_softmax_with_stats(x, W, y, opts, m2=m2, m3=m3)[0]


def npt_loss(x, W, y, *, delta=0.5, k=1, r=1.0, reduction="mean", ignore_index=-1):
    """NPT-Loss, "nearest proxies triplet" (Khalid et al. 2021), materialised (SPEC §4).

    ``ℓ_b = 2r² · Σ_{j ∈ TopK_b} max(0, c_bj − c_by + δ)`` where ``TopK_b`` holds the ``k``
    largest cosines over the columns ``j ≠ y_b`` (a hard top-k). Follows the paper, not the
    released code (which fills the target column with 0 and scales by 2r): see docs/differences.md.
    """
    opts = NPTOptions(delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    valid, y_safe = _prepare(x, W, y, opts.ignore_index)
    C = W.shape[0]
    if opts.k > C - 1:
        raise ValueError(f"k={opts.k} nearest negative proxies need at least k + 1 classes, W has C={C}; use k <= {C - 1}")
    c = cosine_matrix(x, W)
    c_y = c.gather(1, y_safe[:, None])  # [B, 1]
    target = F.one_hot(y_safe, C).bool()
    top = c.masked_fill(target, float("-inf")).topk(opts.k, dim=1).values  # [B, k]
    rows = 2.0 * opts.r ** 2 * torch.relu(top - c_y + opts.delta).sum(dim=1)
    return _reduce(rows, valid, opts.reduction)


# ---------------------------------------------------------------- ElasticFace (SPEC §3)

_GENERATORS: "weakref.WeakValueDictionary[int, torch.Generator]" = weakref.WeakValueDictionary()
_GENERATORS_HELD: "dict[int, torch.Generator]" = {}  # strong references (a few generators per process)


def register_generator(generator) -> None:
    """Makes ``generator`` reachable by id from :func:`normal_draws` (the compiled path of
    :func:`elastic_draws`); the heads call it when a generator is assigned."""
    if generator is not None:
        try:
            _GENERATORS[id(generator)] = generator
        except TypeError:  # torch releases whose Generator takes no weak reference: keep it alive
            _GENERATORS_HELD[id(generator)] = generator


@torch.library.custom_op("fusedface::normal_draws", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def normal_draws(n: int, device: torch.device, generator_id: int) -> torch.Tensor:
    """``n`` fp32 draws of N(0, 1) from the registered generator ``generator_id``.

    Dynamo cannot pass a ``torch.Generator`` into a graph; this op takes its id instead and draws
    eagerly, so a compiled ElasticFace step consumes the same stream as an eager one (the
    ``nondeterministic_seeded`` tag keeps the compiler from merging or re-running draws)."""
    generator = _GENERATORS.get(generator_id) or _GENERATORS_HELD.get(generator_id)
    if generator is None:
        raise RuntimeError("the ElasticFace generator was not registered before torch.compile traced the head: "
                           "assign it with `head.generator = g` (or pass generator= to the constructor)")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but the draws are for {device}; "
                         f"create it with torch.Generator(device={torch.device(device).type!r})")
    return torch.randn(n, generator=generator, device=device, dtype=torch.float32)


@normal_draws.register_fake
def _(n, device, generator_id):
    return torch.empty(n, device=device, dtype=torch.float32)


def elastic_draws(batch: int, mean: float, std: float, *, generator=None, device=None, dtype=torch.float32):
    """ElasticFace margins (Boutros et al. 2022): ``E_b ~ N(mean, std²)`` per row, not clamped."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is not None and torch.compiler.is_compiling():
        draws = torch.ops.fusedface.normal_draws(batch, device, id(generator))
    else:
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the draws are for {device}; "
                             f"create it with torch.Generator(device={device.type!r})")
        draws = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
    return (draws * std + mean).to(dtype)


def plus_order(target_cos: torch.Tensor, draws: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ElasticFace+ assignment: the row with the smallest target cosine gets the largest draw.

    Rank rule (the paper's; the released code indexes with the argsort instead of its inverse):
    sort the draws in descending order and give the r-th of them to the row whose target cosine has
    rank r in ascending order, ties broken by row index. Rows that are not ``valid`` (ignored) rank
    after every valid row. SPEC example: cosines ``[0.1, 0.9, 0.5, 0.7]`` and draws
    ``[0.52, 0.47, 0.50, 0.55]`` give ``[0.55, 0.47, 0.52, 0.50]``.
    """
    key = target_cos.detach().to(torch.float64)
    if valid is not None:
        key = torch.where(valid, key, torch.full_like(key, float("inf")))
    order = torch.argsort(key, stable=True)  # rows, hardest first
    ranked = torch.sort(draws, descending=True, stable=True).values
    out = torch.empty_like(draws)
    out[order] = ranked  # the inverse permutation: row order[r] gets the r-th largest draw
    return out


def elastic_margins(target_cos, mean, std, *, plus=False, generator=None, valid=None):
    """Per-row ElasticFace margins for one call: fresh draws, rank-ordered when ``plus``."""
    draws = elastic_draws(target_cos.shape[0], mean, std, generator=generator, device=target_cos.device,
                          dtype=torch.float64 if target_cos.dtype == torch.float64 else torch.float32)
    return plus_order(target_cos, draws, valid) if plus else draws


def target_cosines(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """``c_by`` for every row in O(B·D): gathers the B label rows of ``W`` (0 on ignored rows)."""
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
    dt = compute_dtype(x, W)
    xn = F.normalize(x.detach().to(dt), dim=1, eps=EPS_NORM)
    wn = F.normalize(W.detach()[y_safe].to(dt), dim=1, eps=EPS_NORM)
    c = (xn * wn).sum(dim=1).clamp(-1.0, 1.0)
    return torch.where(valid, c, torch.zeros_like(c))


# ---------------------------------------------------------------- KappaFace (SPEC §3)

def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def mean_resultant_length(resultant_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``r̄_c = ‖Σ x̂‖ / n_c`` per class, in float64 (0/0 = NaN for a class not seen).

    A class seen once has r̄ = 1 exactly, but an fp32 sum of unit vectors rounds it just below 1,
    which would give a huge finite κ instead of +inf (and wreck the std of κ): r̄ within fp32
    rounding of 1 counts as 1."""
    n = counts.to(torch.float64)
    rbar = torch.linalg.vector_norm(resultant_sum.to(torch.float64), dim=1) / n
    return torch.where(rbar > 1.0 - 1e-5, torch.ones_like(rbar), rbar)


def kappa_from_resultant(rbar: torch.Tensor, dim: int, *, all_max=_identity) -> torch.Tensor:
    """vMF concentration estimate ``κ = r̄(d − r̄²)/(1 − r̄²)`` (Banerjee et al. 2005, used by
    KappaFace, Oinar et al. 2022). ``+inf`` becomes the largest finite κ and NaN becomes 0.

    ``all_max`` reduces a scalar over the shards when the classes are split across processes
    (``fusedface.distributed``); the identity in one process."""
    r = rbar.to(torch.float64)
    kappa = r * (dim - r * r) / (1.0 - r * r)
    kappa = torch.where(torch.isnan(kappa), torch.zeros_like(kappa), kappa)
    finite = torch.isfinite(kappa)
    largest = all_max(torch.where(finite, kappa, torch.full_like(kappa, float("-inf"))).max())
    largest = torch.where(torch.isfinite(largest), largest, torch.zeros_like(largest))
    return torch.where(finite, kappa, largest.expand_as(kappa))


def kappa_margins(kappa: torch.Tensor, counts: torch.Tensor, *, m0=0.8, temperature=0.4, gamma=0.7,
                  all_sum=_identity, all_max=_identity, num_classes: int | None = None) -> torch.Tensor:
    """KappaFace per-class margins (Oinar et al. 2022, "KappaFace: Adaptive Additive Angular
    Margin Loss for Deep Face Recognition").

    ``z = (κ − mean κ)/std κ`` (unbiased std; z = 0 when the std is 0 or undefined),
    ``wκ = 1 − sigmoid(T·z)``, ``K = 1.05·max n``, ``wn = (cos(π·n/K) + 1)/2``,
    ``m = m0·(γ·wκ + (1 − γ)·wn)``. Check values in SPEC §3 are asserted in the tests.

    Sharded classes (``fusedface.distributed``): ``all_sum``/``all_max`` reduce a scalar over the
    shards and ``num_classes`` is the total; the mean, std and largest count are then global."""
    kappa = kappa.to(torch.float64)
    n = counts.to(torch.float64)
    C = kappa.numel() if num_classes is None else int(num_classes)
    mean = all_sum(kappa.sum()) / C
    if C > 1:
        std = torch.sqrt(all_sum(((kappa - mean) ** 2).sum()) / (C - 1))
    else:
        std = torch.zeros_like(mean)
    ok = torch.isfinite(std) & (std > 0)
    z = torch.where(ok, (kappa - mean) / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(kappa))
    w_kappa = 1.0 - torch.sigmoid(temperature * z)
    K = 1.05 * all_max(n.max()).clamp(min=1.0)
    w_n = (torch.cos(math.pi * n / K) + 1.0) / 2.0
    return m0 * (gamma * w_kappa + (1.0 - gamma) * w_n)


# ---------------------------------------------------------------- OTFace (SPEC §5)

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


def otface_loss(x, W, y, feature_maps, *, ot_weight=0.1, ot_margin=0.2, ot_eps=0.05, ot_iters=50, **margin_kwargs):
    """OTFace total loss: ``margin_softmax_loss(x, W, y, **margin_kwargs) + ot_weight·L_OT``."""
    base = margin_softmax_loss(x, W, y, **margin_kwargs)
    term = ot_triplet_loss(x, y, feature_maps, margin=ot_margin, eps=ot_eps, iters=ot_iters,
                           ignore_index=margin_kwargs.get("ignore_index", -1))
    return base + ot_weight * term.to(base.dtype)
