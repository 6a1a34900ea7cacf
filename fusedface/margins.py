"""Where the per-row margins come from (SPEC §3): ElasticFace draws and the plus order, KappaFace's
statistics, κ and margins; AdaFace's norm statistics and margins, CurricularFace's running ``t``,
MagFace's norm-dependent margin and regulariser.

The heads (:mod:`fusedface.modules`) and the sharded heads (:mod:`fusedface.distributed`) lower
their margin families to per-row ``m2``/``m3`` vectors here before the fused pass. Everything is
O(B·D) or O(C·D) and free of host synchronisation. The oracle (:mod:`fusedface.reference`) holds
its own materialised version of the same formulas; the tests hold the two to each other and to
the check values of SPEC §3.
"""
from __future__ import annotations

import math
import weakref

import torch

from ._numerics import EPS_NORM, compute_dtype

__all__ = ["elastic_draws", "plus_order", "elastic_margins", "target_cosines", "register_generator",
           "accumulate_resultants", "mean_resultant_length", "kappa_from_resultant", "kappa_margins",
           "adaface_norms", "adaface_update", "adaface_margins", "curricular_update", "magface_norms", "magface_margins",
           "magface_regularizer"]


# ---------------------------------------------------------------- ElasticFace

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
    """ElasticFace margins (Boutros et al. 2022): ``E_b ~ N(mean, std²)`` per row, not clamped
    (fp32 draws of the generator's stream, then scaled)."""
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
    after every valid row."""
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


def target_cosines(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, ignore_index: int = -1, *,
                   subcenters: int = 1) -> torch.Tensor:
    """``c_by`` for every row in O(B·K·D): gathers the label rows of ``W`` (0 on ignored rows); with
    ``subcenters = K`` (``W`` of ``[C·K, D]``) the largest over the label's K sub-centres."""
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
    dt = compute_dtype(x, W)
    xn = torch.nn.functional.normalize(x.detach().to(dt), dim=1, eps=EPS_NORM)
    rows = y_safe[:, None] * subcenters + torch.arange(subcenters, device=y.device)  # [B, K]
    wn = torch.nn.functional.normalize(W.detach()[rows].to(dt), dim=2, eps=EPS_NORM)
    c = torch.einsum("bd,bkd->bk", xn, wn).max(dim=1).values.clamp(-1.0, 1.0)
    return torch.where(valid, c, torch.zeros_like(c))


# ---------------------------------------------------------------- KappaFace

def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def accumulate_resultants(resultant_sum: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
                          y_safe: torch.Tensor, keep: torch.Tensor) -> None:
    """``S_c += Σ x̂_b`` and ``n_c += 1`` over the rows ``b`` with ``keep`` (labels ``y_safe``), in place.

    ``x̂`` is formed in the statistics' precision (at least fp32): an fp64 statistic gets fp64
    unit vectors, so κ from fp64 statistics is an fp64 result."""
    dt = torch.promote_types(torch.promote_types(resultant_sum.dtype, x.dtype), torch.float32)
    xn = torch.nn.functional.normalize(x.detach().to(dt), dim=1, eps=EPS_NORM) * keep[:, None]
    resultant_sum.index_add_(0, y_safe, xn.to(resultant_sum.dtype))
    counts.index_add_(0, y_safe, keep.to(counts.dtype))


def mean_resultant_length(resultant_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``r̄_c = ‖S_c‖ / n_c`` per class, in float64 (0/0 = NaN for a class not seen).

    A class seen once has r̄ = 1 exactly, but a low-precision sum of unit vectors rounds it just
    below 1, which would give a huge finite κ instead of +inf (and wreck the std of κ): r̄ within
    the statistic's rounding of 1 (1e-5 below fp64, 1e-12 in fp64) counts as 1."""
    n = counts.to(torch.float64)
    rbar = torch.linalg.vector_norm(resultant_sum.to(torch.float64), dim=1) / n
    tol = 1e-12 if resultant_sum.dtype == torch.float64 else 1e-5
    return torch.where(rbar > 1.0 - tol, torch.ones_like(rbar), rbar)


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
    ``m = m0·(γ·wκ + (1 − γ)·wn)``.

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


# ---------------------------------------------------------------- AdaFace

ADAFACE_EPS = 1e-3  # the authors' eps: in σ + eps (and in the target's clip policy, fusedface._engine.CLIP_EPS)


def adaface_norms(x: torch.Tensor) -> torch.Tensor:
    """``clip(‖x_b‖, 0.001, 100)`` per row, detached (AdaFace's "safe norms"), at least fp32."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return torch.linalg.vector_norm(x.detach(), dim=1, dtype=dt).clamp(0.001, 100.0)


def _counted(valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The rows a running statistic takes in: not ignored, and a finite value (a NaN embedding, or an
    fp16 overflow in a step GradScaler skips, would otherwise leave the statistic NaN for good)."""
    return valid & torch.isfinite(values)


@torch.no_grad()
def adaface_update(batch_mean: torch.Tensor, batch_std: torch.Tensor, norms: torch.Tensor, valid: torch.Tensor,
                   t_alpha: float, *, all_sum=None) -> None:
    """AdaFace's running statistics, in place: ``μ ← α·mean(n) + (1 − α)·μ``, ``σ ← α·std(n) + (1 − α)·σ``
    over the valid rows (unbiased std); μ keeps its value without valid rows, σ with fewer than two.
    A row whose norm is not finite (a NaN embedding, an fp16 overflow that GradScaler will skip) counts
    as ignored: one bad batch does not leave μ and σ NaN for the rest of training (its loss is NaN
    anyway). ``all_sum``: sums a tensor over the ranks of a sharded head whose rows differ per rank
    (None: one process, or rows already global). No host synchronisation."""
    use = _counted(valid, norms)
    w = use.to(norms.dtype)
    zero = torch.zeros_like(norms)
    parts = torch.stack([w.sum(), torch.where(use, norms, zero).sum()])
    if all_sum is not None:
        parts = all_sum(parts)
    k, total = parts[0], parts[1]
    mean = total / k.clamp(min=1.0)
    sq = torch.where(use, (norms - mean) ** 2, zero).sum()
    if all_sum is not None:
        sq = all_sum(sq)
    std = torch.sqrt(sq / (k - 1.0).clamp(min=1.0))
    new_mean = t_alpha * mean + (1.0 - t_alpha) * batch_mean.to(mean.dtype)
    new_std = t_alpha * std + (1.0 - t_alpha) * batch_std.to(std.dtype)
    batch_mean.copy_(torch.where(k >= 1, new_mean, batch_mean.to(mean.dtype)))
    batch_std.copy_(torch.where(k >= 2, new_std, batch_std.to(std.dtype)))


def adaface_margins(x: torch.Tensor, valid: torch.Tensor, batch_mean: torch.Tensor, batch_std: torch.Tensor, *,
                    margin: float, h: float, t_alpha: float, update: bool, all_sum=None):
    """AdaFace's per-row ``(m2, m3)`` (Kim et al. 2022): with ``n`` the safe norms (:func:`adaface_norms`),
    after the running statistics' update (``update``: training mode), ``ẑ = clip(h·(n − μ)/(σ + ε), −1, 1)``,
    ``m2 = −m·ẑ`` (angular) and ``m3 = m + m·ẑ`` (additive). No gradient (the norms are detached).
    Ignored rows and rows with a non-finite norm get ``ẑ = 0``: finite margins, so such a row is judged
    by its embedding (NaN in, NaN out; or the finiteness check's error), not by its margin."""
    n = adaface_norms(x)
    if update:
        adaface_update(batch_mean, batch_std, n, valid, t_alpha, all_sum=all_sum)
    z = (h * (n - batch_mean.to(n.dtype)) / (batch_std.to(n.dtype) + ADAFACE_EPS)).clamp(-1.0, 1.0)
    z = torch.where(_counted(valid, n), z, torch.zeros_like(z))
    return -margin * z, margin + margin * z


# ---------------------------------------------------------------- CurricularFace

@torch.no_grad()
def curricular_update(t: torch.Tensor, cos_y: torch.Tensor, valid: torch.Tensor, momentum: float, *,
                      all_sum=None) -> None:
    """CurricularFace's running ``t ← momentum·mean(c_y) + (1 − momentum)·t`` over the valid rows, in
    place (unchanged without valid rows; a row with a non-finite cosine counts as ignored, as in
    :func:`adaface_update`). ``all_sum`` as in :func:`adaface_update`."""
    cos_y = cos_y.detach()
    use = _counted(valid, cos_y)
    parts = torch.stack([use.to(cos_y.dtype).sum(), torch.where(use, cos_y, torch.zeros_like(cos_y)).sum()])
    if all_sum is not None:
        parts = all_sum(parts)
    mean = parts[1] / parts[0].clamp(min=1.0)
    new = momentum * mean + (1.0 - momentum) * t.to(mean.dtype)
    t.copy_(torch.where(parts[0] >= 1, new, t.to(mean.dtype)))


# ---------------------------------------------------------------- MagFace

def magface_norms(x: torch.Tensor, l_a: float, u_a: float) -> torch.Tensor:
    """``a = clamp(‖x_b‖, l_a, u_a)`` per row, with its gradient (MagFace), at least fp32."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return torch.linalg.vector_norm(x, dim=1, dtype=dt).clamp(l_a, u_a)


def magface_margins(a: torch.Tensor, l_a: float, u_a: float, l_margin: float, u_margin: float) -> torch.Tensor:
    """MagFace's margin ``m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m`` (Meng et al. 2021), linear
    and increasing in the clamped norm ``a``; differentiable. A row whose norm is not finite gets
    ``l_m`` (a finite margin: the row is judged by its embedding, NaN in, NaN out, not by its margin)."""
    m = (u_margin - l_margin) / (u_a - l_a) * (a - l_a) + l_margin
    return torch.where(torch.isfinite(a), m, torch.full_like(m, l_margin))


def magface_regularizer(a: torch.Tensor, u_a: float) -> torch.Tensor:
    """MagFace's ``g(a) = a/u_a² + 1/a`` per row (convex, its minimum at ``a = u_a``); differentiable."""
    return a / (u_a * u_a) + 1.0 / a
