"""The public functional API (SPEC §7): one call per loss, any backend.

``backend="auto"`` picks the fastest backend available for the tensors' device:
Triton on CUDA when it is importable, else the compiled native module when it was built, else the
chunked pure-PyTorch engine. ``"reference"`` is the materialised oracle of :mod:`fusedface.reference`.
Every fused backend returns the same loss and gradients as the reference (the tests hold them to
it) without building a ``[B, C]`` tensor or a normalised copy of ``W``.
"""
from __future__ import annotations

import torch

from . import reference as R
from ._backends import resolve
from ._engine import choose_tile
from ._options import MarginOptions, NPTOptions
from ._validate import check_backend_name, check_embeddings_and_centres, check_labels, check_row_margins
from .reference import compute_dtype, row_margin

__all__ = ["margin_softmax_loss", "npt_loss", "otface_loss"]


def margin_softmax_with_stats(x, W, y, opts: MarginOptions, m2=0.0, m3=0.0, *, backend="auto",
                              tile_size=None, tile_budget=None, checked=False, want_stats=True):
    """The loss and per-row statistics ``{"pred", "sv_count", "valid"}`` (used by the heads).

    ``checked=True``: the caller (a head) already ran the checks of ``x``, ``W`` and ``y``.
    ``want_stats=False``: the statistics may come back as None (the Triton step then skips them)."""
    if not checked:
        check_embeddings_and_centres(x, W)
    name = _backend_name(backend, x.device)
    if name == "reference":
        return R.margin_softmax_with_stats(x, W, y, opts, m2=m2, m3=m3)
    B, C = x.shape[0], W.shape[0]
    if not checked:
        check_labels(y, B, C, opts.ignore_index, x.device)
    m2, m3 = check_row_margins(m2, m3, B, x.device)
    tile = choose_tile(B, x.shape[1], C, tile_budget, tile_size)  # (also checks tile_size)
    if name == "triton" and _triton_step().applies(x, W):
        # the Triton training step (fusedface/_triton_step.py): six launches per forward + backward
        loss, pred, sv = _triton_step().margin_loss(x, W, y, opts, m2, m3, want_stats)
        if not want_stats:
            return loss, None
        return loss, {"pred": pred, "sv_count": sv, "valid": y != opts.ignore_index}
    cdt = compute_dtype(x, W)
    rows, pred, sv, *_ = torch.ops.fusedface.margin_softmax_fwd(
        x, W, y, row_margin(m2, B, x.device, cdt), row_margin(m3, B, x.device, cdt), name, opts.scale, opts.m1,
        opts.theta_policy, opts.negative, opts.t, opts.grad_mode, opts.ignore_index, tile)
    valid = y != opts.ignore_index
    return R._reduce(rows, valid, opts.reduction), {"pred": pred, "sv_count": sv, "valid": valid}


def _triton_step():
    """``fusedface._triton_step``, imported when a call first needs it (it imports triton)."""
    from . import _triton_step
    return _triton_step


def _backend_name(backend, device: torch.device) -> str:
    """The backend that will run: resolved (and its availability checked) in eager mode; under
    ``torch.compile`` only the name is checked here and the registered op resolves it when it runs
    (resolving imports the optional backends, which Dynamo does not trace)."""
    check_backend_name(backend)
    if torch.compiler.is_compiling():
        return backend
    return resolve(backend, device)[0]


def margin_softmax_loss(x, W, y, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0, theta_policy="none",
                        negative="none", t=0.0, grad_mode="exact", reduction="mean", ignore_index=-1,
                        backend="auto", tile_size=None):
    """Margin softmax cross-entropy (ArcFace, CosFace, combined, ElasticFace, KappaFace, SV/MV).

    See :func:`fusedface.reference.margin_softmax_loss` for the formula. ``m2``/``m3`` are floats or
    per-row tensors ``[B]`` (treated as constants: no gradient flows into them). ``tile_size``
    overrides the class-tile width that the fused backends choose from their memory budget.
    """
    opts = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index)
    return margin_softmax_with_stats(x, W, y, opts, m2, m3, backend=backend, tile_size=tile_size,
                                     want_stats=False)[0]


def npt_loss(x, W, y, *, delta=0.5, k=1, r=1.0, reduction="mean", ignore_index=-1, backend="auto",
             tile_size=None):
    """NPT-Loss (Khalid et al. 2021); formula in :func:`fusedface.reference.npt_loss`."""
    opts = NPTOptions(delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    check_embeddings_and_centres(x, W)
    name = _backend_name(backend, x.device)
    if name == "reference":
        return R.npt_loss(x, W, y, delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    B, C = x.shape[0], W.shape[0]
    check_labels(y, B, C, opts.ignore_index, x.device)
    if opts.k > C - 1:
        raise ValueError(f"k={opts.k} nearest negative proxies need at least k + 1 classes, W has C={C}; use k <= {C - 1}")
    tile = choose_tile(B, x.shape[1], C, None, tile_size)
    rows = torch.ops.fusedface.npt_fwd(x, W, y, name, opts.delta, opts.k, opts.r, opts.ignore_index, tile)[0]
    return R._reduce(rows, y != opts.ignore_index, opts.reduction)


def otface_loss(x, W, y, feature_maps, *, ot_weight=0.1, ot_margin=0.2, ot_eps=0.05, ot_iters=50,
                backend="auto", **margin_kwargs):
    """OTFace: a margin softmax on any backend plus ``ot_weight`` times the transport term of
    :func:`fusedface.reference.ot_triplet_loss` (O(B·(H·W)²·(Cf + iters)) plus O(B²·D) mining, no class dimension)."""
    base = margin_softmax_loss(x, W, y, backend=backend, **margin_kwargs)
    term = R.ot_triplet_loss(x, y, feature_maps, margin=ot_margin, eps=ot_eps, iters=ot_iters,
                             ignore_index=margin_kwargs.get("ignore_index", -1))
    return base + ot_weight * term.to(base.dtype)
