"""The public functional API (SPEC §7): one call per loss, any backend.

``backend="auto"`` picks the fastest backend available for the tensors' device:
Triton on CUDA when it is importable, else the native backend (the compiled C++ module) when it was
built, else the ``torch`` backend (plain PyTorch tiles). ``"reference"`` is the materialised oracle of
:mod:`fusedface.reference`. The layers below a call: :mod:`fusedface._engine` (the fused algorithm and
its registered ops), :mod:`fusedface.backends` (the registry and one module per backend).
Every fused backend returns the same loss and gradients as the reference (the tests hold them to
it) without building a ``[B, C]`` tensor or a normalised copy of ``W``.
"""
from __future__ import annotations

import torch

from . import _engine
from . import reference as R
from ._engine import choose_tile
from ._numerics import compute_dtype
from ._options import MarginOptions, NPTOptions
from ._validate import check_embeddings_and_centres, check_labels, check_row_margin, check_row_margins, check_subcenters
from .backends import check_name as check_backend_name
from .otface import ot_triplet_loss

__all__ = ["margin_softmax_loss", "npt_loss", "otface_loss", "margin_softmax_loss_kept_block"]


def margin_softmax_with_stats(x, W, y, opts: MarginOptions, m2=0.0, m3=0.0, *, backend="auto",
                              tile_size=None, tile_budget=None, checked=False, want_stats=True, keep_block=False,
                              rt=None):
    """The loss and per-row statistics ``{"pred", "sv_count", "valid"}`` (used by the heads).

    ``checked=True``: the caller (a head) already ran the checks of ``x``, ``W`` and ``y``.
    ``want_stats=False``: the statistics may come back as None (the Triton step then skips them).
    ``keep_block``: the native backend keeps the forward's cosines for the backward.
    ``rt``: CurricularFace's ``t`` as a tensor (0-dim or ``[B]``; ``negative="curricular"`` only)."""
    check_backend_name(backend)
    C = check_subcenters(W, opts.subcenters)
    if not checked:
        check_embeddings_and_centres(x, W)
        check_labels(y, x.shape[0], C, opts.ignore_index, x.device)
    m2, m3 = check_row_margins(m2, m3, x.shape[0], x.device)
    if rt is not None:
        rt = check_row_margin("t", rt, x.shape[0], x.device)
    if backend == "reference":
        return R.margin_softmax_with_stats(x, W, y, opts, m2=m2, m3=m3, **({"t": rt} if rt is not None else {}))
    B = x.shape[0]
    tile = choose_tile(B, x.shape[1], C * opts.subcenters, tile_budget, tile_size)  # (also checks tile_size)
    tile = max(1, tile // opts.subcenters) if tile_size is None else min(tile, C)  # classes per tile
    loss, pred, sv = _engine.margin_softmax(x, W, y, opts, m2, m3, backend, tile, want_stats=want_stats,
                                            keep_block=keep_block, rt=rt)
    if not want_stats or pred is None:
        return loss, None
    return loss, {"pred": pred, "sv_count": sv, "valid": y != opts.ignore_index}


def margin_softmax_loss(x, W, y, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0, theta_policy="none",
                        negative="none", t=0.0, grad_mode="exact", reduction="mean", ignore_index=-1,
                        backend="auto", tile_size=None, interclass_threshold=None, subcenters=1):
    """Margin softmax cross-entropy (ArcFace, CosFace, combined, ElasticFace, KappaFace, SV/MV,
    AdaFace, CurricularFace, MagFace, sub-center ArcFace).

    See :func:`fusedface.reference.margin_softmax_loss` for the formula. ``m2``/``m3`` are floats or
    per-row tensors ``[B]``; a tensor that requires grad gets ``dL/dm`` (MagFace's norm-dependent
    margin), computed from the label column in O(B). ``t`` is a float, or for
    ``negative="curricular"`` also a tensor (CurricularFace's running ``t``, no gradient).
    ``interclass_threshold``: negatives whose cosine exceeds it are zeroed (InsightFace's inter-class
    filtering; None: off). ``subcenters``: K centres per class, ``W`` of ``[C·K, D]``. ``tile_size``
    overrides the class-tile width that the fused backends choose from their memory budget.
    """
    rt = None
    if isinstance(t, torch.Tensor):
        if negative != "curricular":
            raise TypeError(f"t must be a float for negative={negative!r} (a tensor t is CurricularFace's running t, "
                            "negative='curricular')")
        rt, t = t, 0.0
    opts = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index,
                         interclass_threshold=interclass_threshold, subcenters=subcenters)
    return margin_softmax_with_stats(x, W, y, opts, m2, m3, backend=backend, tile_size=tile_size,
                                     want_stats=False, rt=rt)[0]


def npt_loss(x, W, y, *, delta=0.5, k=1, r=1.0, reduction="mean", ignore_index=-1, backend="auto",
             tile_size=None):
    """NPT-Loss (Khalid et al. 2021); formula in :func:`fusedface.reference.npt_loss`."""
    opts = NPTOptions(delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    check_backend_name(backend)
    check_embeddings_and_centres(x, W)
    B, C = x.shape[0], W.shape[0]
    check_labels(y, B, C, opts.ignore_index, x.device)
    if opts.k > C - 1:
        raise ValueError(f"k={opts.k} nearest negative proxies need at least k + 1 classes, W has C={C}; use k <= {C - 1}")
    if backend == "reference":
        return R.npt_loss(x, W, y, delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    return _engine.npt_loss(x, W, y, opts, backend, choose_tile(B, x.shape[1], C, None, tile_size))


def otface_loss(x, W, y, feature_maps, *, ot_weight=0.1, ot_margin=0.2, ot_eps=0.05, ot_iters=50,
                backend="auto", **margin_kwargs):
    """OTFace: a margin softmax on any backend plus ``ot_weight`` times the transport term of
    :func:`fusedface.otface.ot_triplet_loss` (O(B·(H·W)²·(Cf + iters)) plus O(B²·D) mining, no class dimension)."""
    base = margin_softmax_loss(x, W, y, backend=backend, **margin_kwargs)
    term = ot_triplet_loss(x, y, feature_maps, margin=ot_margin, eps=ot_eps, iters=ot_iters,
                             ignore_index=margin_kwargs.get("ignore_index", -1))
    return base + ot_weight * term.to(base.dtype)


def margin_softmax_loss_kept_block(x, W, y, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0, theta_policy="none",
                                   negative="none", t=0.0, grad_mode="exact", reduction="mean", ignore_index=-1,
                                   tile_size=None, budget=None):
    """:func:`margin_softmax_loss` on the native backend, keeping the forward's ``[C, B]`` block of
    cosines for the backward, which then skips its recomputing GEMM (three matrix products per step
    instead of four, for ``4·B·C`` bytes held between forward and backward, fp32). Refuses with a
    ``ValueError`` when the block does not fit ``budget`` bytes (default 256 MiB): use the
    recomputing :func:`margin_softmax_loss` then."""
    from .backends import resolve

    opts = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index)
    check_embeddings_and_centres(x, W)
    if x.device.type != "cpu":
        raise ValueError(f"margin_softmax_loss_kept_block runs the native CPU kernels; x is on {x.device}: use "
                         "fusedface.functional.margin_softmax_loss there")
    _, _native_backend = resolve("native", x.device)  # (says how to build it when it is missing)
    B, C = x.shape[0], W.shape[0]
    if not _native_backend.block_fits(B, C, compute_dtype(x, W), budget):
        raise ValueError(f"the [C={C}, B={B}] block of cosines does not fit budget="
                         f"{budget or _native_backend.DEFAULT_BLOCK_BUDGET} bytes; raise the budget or use "
                         "fusedface.functional.margin_softmax_loss (recomputing)")
    return margin_softmax_with_stats(x, W, y, opts, m2, m3, backend="native", tile_size=tile_size,
                                     want_stats=False, keep_block=True)[0]
