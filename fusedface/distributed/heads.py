"""Class-sharded heads: every head of :mod:`fusedface.modules`, its classes split over the ranks.

``ShardedArcFace(in_features, num_classes, **kw)`` takes the keyword arguments of
:class:`fusedface.ArcFace` (and likewise for every head) plus the distributed ones:

``process_group``  the group to shard over (default: the default group; a world of one without one)
``sample_rate``    Partial FC: keep every positive class plus random others up to
                   ``sample_rate·C_local`` per step (None: every class, no sampling)
``sample_generator``  the ``torch.Generator`` of the negative sampling (per rank)
``embedding_grad_scale``  multiplies the gradient returned to the embeddings; set it to the world
                   size when DDP averages the backbone's gradients over ranks
``track_stats``    merge the arg-max and support-vector counts (``last_accuracy`` …); 2 O(B)
                   all-reduces per step

The head holds a single-process head of the same class over its own classes as ``self.head``
(``head.weight [C_local·K, D]``, K sub-centres per class, 1 but for sub-center ArcFace; KappaFace's per-class statistics), so its options, defaults and
buffers are those of the single-process head. ``forward(embeddings, labels)`` takes this rank's
rows and returns the loss of the global batch, the same on every rank. Every rank must call
``forward`` and ``backward`` in the same order (they run collectives).

AdaFace's and CurricularFace's running statistics move over the GLOBAL batch (the same on every
rank: the ranks' ``state_dict`` agree); MagFace's margin and regulariser come from each rank's own
rows with their gradient; Sub-center ArcFace's shard holds the K sub-centres of each of its classes.

``fusedface.optim.SGD(head.parameters(), ...)`` / ``AdamW`` work as on the single-process heads:
each rank's backward applies the update to its own shard, slice by slice (``W.grad`` is never
allocated); with Partial FC, ``sparse=True`` updates only the sampled rows and ``sparse=False``
keeps ``torch.optim``'s dense semantics (docs/distributed.md, "In-backward optimizer").
"""
from __future__ import annotations

import torch
from torch import nn

from .. import margins as M
from .._numerics import reduce_rows
from ..otface import ot_triplet_loss
from .._engine import row_t
from ..modules import (AdaFace, ArcFace, CombinedMargin, CosFace, CurricularFace, ElasticArcFace, ElasticCosFace,
                       KappaFace, MagFace, MarginSoftmaxHead, MVSoftmax, NPT, OTFace, SphereFace, SubCenterArcFace,
                       SVSoftmax, _ClassCentres, _Elastic)
from ._comm import Comm, shard_range
from ._functions import (ElasticDraws, MarginSoftmaxShardFunction, NPTShardFunction, check_local_batch,
                         check_num_classes, check_sample_rate, gather_batch,
                         margin_plan, npt_plan, scale_grad)

__all__ = [
    "ShardedHead", "ShardedMarginSoftmaxHead", "ShardedArcFace", "ShardedCosFace", "ShardedCombinedMargin",
    "ShardedSphereFace", "ShardedElasticArcFace", "ShardedElasticCosFace", "ShardedKappaFace", "ShardedSVSoftmax",
    "ShardedMVSoftmax", "ShardedNPT", "ShardedOTFace", "ShardedAdaFace", "ShardedCurricularFace", "ShardedMagFace",
    "ShardedSubCenterArcFace",
]

# the per-row hooks of the single-process heads that read W[y] or the whole batch on one process, and the
# families whose own hook the sharded head replaces by its global-batch equivalent (ShardedHead.forward);
# "forward": the families whose extra terms (KappaFace's statistics, OTFace's transport term, MagFace's
# regulariser) ShardedHead.forward re-implements: a subclass's own forward would be silently skipped
_SHARDED_HOOKS = {"row_margins": (_Elastic, KappaFace, AdaFace, MagFace), "row_rewrite": (CurricularFace,),
                  "forward": (KappaFace, OTFace, MagFace)}


def _unshardable_hook(head_class) -> str | None:
    """The per-row hook ``head_class`` overrides that the sharded pass cannot reproduce, or None."""
    for name, families in _SHARDED_HOOKS.items():
        fn = getattr(head_class, name)
        if fn is getattr(MarginSoftmaxHead, name):
            continue
        if any(issubclass(head_class, k) and fn is getattr(k, name) for k in families):
            continue
        return name
    return None


KAPPA_PER_CLASS = ("class_margins", "resultant_sum", "epoch_counts", "class_counts", "class_kappa")


class ShardedHead(nn.Module):
    """A fusedface head whose classes are sharded over a process group (SPEC §8).

    ``head_class`` is the single-process head (a subclass of :class:`fusedface.MarginSoftmaxHead`
    or :class:`fusedface.NPT`); the named subclasses below fix it."""

    head_class: type | None = None

    def __init__(self, in_features: int, num_classes: int, *, head_class=None, process_group=None,
                 sample_rate=None, sample_generator=None, embedding_grad_scale=1.0, track_stats=True,
                 device=None, dtype=None, **head_kwargs):
        super().__init__()
        head_class = head_class or type(self).head_class
        if head_class is None or not issubclass(head_class, (MarginSoftmaxHead, NPT)):
            raise TypeError("head_class must be a fusedface head (a MarginSoftmaxHead or NPT subclass), "
                            f"got {head_class!r}")
        self.comm = Comm(process_group)
        self.process_group = process_group
        check_num_classes(num_classes, self.comm.world_size)
        check_sample_rate(sample_rate)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.class_range = shard_range(num_classes, self.comm.world_size, self.comm.rank)
        lo, hi = self.class_range
        if issubclass(head_class, NPT):
            # NPT checks k against its class count: validate on the global count (meta: no memory),
            # hold the shard in a plain class-centre holder
            proto = head_class(in_features, num_classes, device="meta", **head_kwargs)
            self.head = _ClassCentres(in_features, hi - lo, backend=proto.backend, device=device, dtype=dtype)
            self.head.options = proto.options
        else:
            hook = _unshardable_hook(head_class)
            if hook is not None:
                if hook == "forward":
                    raise TypeError(f"{head_class.__name__} overrides forward, which the sharded head does not call "
                                    "(it runs its family's loss over the global batch): add the extra term to the "
                                    "sharded head's loss instead, or call fusedface.distributed.margin_softmax_loss")
                raise TypeError(f"{head_class.__name__} overrides {hook}, which needs W[y] on one rank: "
                                "it cannot be sharded as is; compute the per-row margins (and t) of the global batch "
                                "and call fusedface.distributed.margin_softmax_loss(..., m2=..., m3=..., rt=...)")
            self.head = head_class(in_features, hi - lo, device=device, dtype=dtype, **head_kwargs)
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.sample_generator = sample_generator
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.track_stats = bool(track_stats)
        self.last_accuracy: torch.Tensor | None = None
        self.last_sv_fraction: torch.Tensor | None = None
        self.last_batch_sizes: list | None = None
        self.last_row_offset: int | None = None
        self.last_sampled_classes: torch.Tensor | None = None  # Partial FC: the classes this rank ran

    # ------------------------------------------------------------------ layout

    @property
    def weight(self) -> nn.Parameter:
        """This rank's class centres ``[C_local, D]`` (rows ``class_range`` of the full ``W``); with
        ``K`` sub-centres per class ``[C_local·K, D]`` (rows ``lo·K : hi·K``, class ``j``'s K together)."""
        return self.head.weight

    @property
    def subcenters(self) -> int:
        """Rows of ``weight`` per class (Sub-center ArcFace's K; 1 otherwise)."""
        return getattr(self.head.options, "subcenters", 1)

    def rows_per_class(self, key: str) -> int:
        """Rows per class of the per-class entry ``key`` of ``self.head.state_dict()`` (or of the
        optimizer state of the parameter ``key``): K for ``weight``, 1 for the others."""
        return self.subcenters if key == "weight" else 1

    @property
    def options(self):
        return self.head.options

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def per_class_keys(self) -> tuple[str, ...]:
        """Entries of ``self.head.state_dict()`` whose first dimension is the class: sharded with ``W``."""
        return ("weight",) + (KAPPA_PER_CLASS if isinstance(self.head, KappaFace) else ())

    def _is_npt(self) -> bool:
        return not isinstance(self.head, MarginSoftmaxHead)

    # ------------------------------------------------------------------ forward

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, feature_maps: torch.Tensor | None = None,
                *, batch_sizes=None) -> torch.Tensor:
        """The loss of the global batch from this rank's ``embeddings [b, D]`` and ``labels [b]``.

        ``batch_sizes``: every rank's ``b`` when known (skips the host synchronisation of reading
        them); ``feature_maps [b, Cf, H, W]``: OTFace only (its transport term uses this rank's rows)."""
        h = self.head
        if feature_maps is not None and not isinstance(h, OTFace):
            raise ValueError(f"feature_maps is only for OTFace, not {type(h).__name__}")
        if feature_maps is None and isinstance(h, OTFace):
            raise ValueError("OTFace needs feature_maps [b, Cf, H, W]: call head(embeddings, labels, feature_maps)")
        common = dict(num_classes=self.num_classes, backend=h.backend, sample_rate=self.sample_rate,
                      sample_generator=self.sample_generator, batch_sizes=batch_sizes,
                      embedding_grad_scale=self.embedding_grad_scale)
        if self._is_npt():
            W_used, plan = npt_plan(self.comm, embeddings, h.weight, labels, h.options, **common)
            rows = NPTShardFunction.apply(embeddings, W_used, plan)
            loss = reduce_rows(rows, plan.batch.valid, h.options.reduction)
            self._remember(plan)
            return loss
        # the boundary checks once, before any family reads the rows (AdaFace's gather, MagFace's norms);
        # margin_plan is told, so the finiteness pass over x and W is not run twice
        check_local_batch(embeddings, labels, h.weight)
        extra, local = {}, {}
        if isinstance(h, _Elastic):
            extra["elastic"] = ElasticDraws(h.margin_mean, h.margin_std, h.plus, h._slot, h.generator)
        elif isinstance(h, KappaFace):
            extra["class_m2"] = h.class_margins
        elif isinstance(h, AdaFace):
            # the norms of the GLOBAL batch (gathered): every rank moves its statistics identically
            batch = gather_batch(self.comm, embeddings, labels, self.num_classes, h.options.ignore_index, batch_sizes)
            extra["batch"] = batch
            extra["m2"], extra["m3"] = M.adaface_margins(batch.x_all, batch.valid, h.batch_mean, h.batch_std,
                                                         margin=h.margin, h=h.h, t_alpha=h.t_alpha, update=h.training)
        elif isinstance(h, MagFace):
            # each rank's margins and regulariser from its own rows' norms, with their gradient: the
            # prologue shares the values, the pass returns dL/dm2 and dL/dg of this rank's rows
            a = M.magface_norms(scale_grad(embeddings, self.embedding_grad_scale), h.l_a, h.u_a)
            local["m2_local"] = M.magface_margins(a, h.l_a, h.u_a, h.l_margin, h.u_margin)
            local["term_local"] = M.magface_regularizer(a, h.u_a)
            extra["term_weight"] = h.lambda_g
        else:
            extra["m2"], extra["m3"] = h.m2, h.m3
        W_used, plan = margin_plan(self.comm, embeddings, h.weight, labels, h.options, stats=self.track_stats,
                                   checked=True, **common, **extra, **local)
        if isinstance(h, KappaFace) and self.training and h.auto_update:
            self._accumulate(plan.batch)
        if isinstance(h, CurricularFace):
            if h.training:  # t from the GLOBAL batch's target cosines (shared by the prologue), before its use
                M.curricular_update(h.t, plan.raw_y.clamp(-1.0, 1.0), plan.batch.valid, h.momentum)
            plan.rt = row_t(h.t, h.options, plan.batch.B, embeddings.device, plan.cdt)
        rows, pred, sv = MarginSoftmaxShardFunction.apply(embeddings, W_used, plan, local.get("m2_local"), None,
                                                          local.get("term_local"))
        loss = reduce_rows(rows, plan.batch.valid, h.options.reduction)
        if isinstance(h, MagFace):
            h.last_regularizer = reduce_rows(plan.term, plan.batch.valid, "mean").detach()
        self._remember(plan)
        if self.track_stats:
            valid = plan.batch.valid
            n = valid.sum().clamp(min=1)
            self.last_accuracy = (((pred == plan.batch.y_all) & valid).sum() / n).detach()
            self.last_sv_fraction = (((sv > 0) & valid).sum() / n).detach()
        if isinstance(h, OTFace):
            term = ot_triplet_loss(embeddings, labels, feature_maps, margin=h.ot_margin, eps=h.ot_eps,
                                     iters=h.ot_iters, ignore_index=h.options.ignore_index)
            h.last_ot_loss = term.detach()
            loss = loss + h.ot_weight * term.to(loss.dtype)
        return loss

    def _remember(self, plan) -> None:
        self.last_batch_sizes = list(plan.batch.sizes)
        self.last_row_offset = plan.batch.offset
        self.last_sampled_classes = None if plan.index is None else plan.index + plan.batch.lo

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's part of a ``reduction="none"`` result (the rows of the global batch)."""
        return rows[self.last_row_offset: self.last_row_offset + self.last_batch_sizes[self.rank]]

    # ------------------------------------------------------------------ KappaFace

    def _kappa(self) -> KappaFace:
        if not isinstance(self.head, KappaFace):
            raise TypeError(f"{type(self).__name__} has no KappaFace statistics")
        return self.head

    @torch.no_grad()
    def _accumulate(self, batch) -> None:
        """``S_c += Σ x̂_b`` and ``n_c += 1`` over the global batch's rows whose class this rank owns."""
        h = self._kappa()
        owned = batch.y_shard >= 0
        ys = batch.y_shard.clamp(min=0)
        M.accumulate_resultants(h.resultant_sum, h.epoch_counts, batch.x_all, ys, owned)

    @torch.no_grad()
    def update_statistics(self, embeddings: torch.Tensor, labels: torch.Tensor, *, batch_sizes=None) -> None:
        """KappaFace: accumulate this step's global batch into the shard's statistics (what
        ``forward`` does itself when ``auto_update=True``)."""
        h = self._kappa()
        check_local_batch(embeddings, labels, h.weight)
        self._accumulate(gather_batch(self.comm, embeddings, labels, self.num_classes, h.options.ignore_index,
                                      batch_sizes))

    @torch.no_grad()
    def end_epoch(self) -> None:
        """KappaFace's epoch update (SPEC §3) over the sharded statistics: κ per class on its owner;
        the largest finite κ, the largest count, and the mean and unbiased std of κ over ALL classes
        by four scalar all-reduces (the same functions of :mod:`fusedface.margins` as ``KappaFace.end_epoch``); then
        the margins of the shard."""
        h = self._kappa()
        comm = self.comm

        def all_sum(t):
            return comm.all_reduce(t.reshape(1), "sum")[0]

        def all_max(t):
            return comm.all_reduce(t.reshape(1), "max")[0]

        rbar = M.mean_resultant_length(h.resultant_sum, h.epoch_counts)
        kappa = M.kappa_from_resultant(rbar, h.in_features, all_max=all_max)
        m = M.kappa_margins(kappa, h.epoch_counts, m0=h.m0, temperature=h.temperature, gamma=h.gamma,
                            all_sum=all_sum, all_max=all_max, num_classes=self.num_classes)
        h._finish_epoch(kappa, m)

    # ------------------------------------------------------------------ checkpoints

    def full_state_dict(self, dst: int = 0, optimizer=None):
        """The state of the whole head on rank ``dst`` (None on the others): the ``state_dict`` of
        the single-process head over all ``num_classes`` (loadable into it). With ``optimizer``:
        ``(state, optimizer_state)`` (``(None, None)`` on the others), the second the ``state_dict``
        of that optimizer over the single-process head. See :mod:`fusedface.distributed.checkpoint`
        for per-shard files."""
        from .checkpoint import full_state_dict
        return full_state_dict(self, dst, optimizer=optimizer)

    def load_full_state_dict(self, state: dict, optimizer=None, optimizer_state: dict | None = None) -> None:
        """Load a full (single-process) state, each rank taking its own classes (and, with
        ``optimizer`` and ``optimizer_state``, its classes of the optimizer's state)."""
        from .checkpoint import load_full_state_dict
        load_full_state_dict(self, state, optimizer=optimizer, optimizer_state=optimizer_state)

    def extra_repr(self) -> str:
        lo, hi = self.class_range
        s = (f"num_classes={self.num_classes}, classes [{lo}, {hi}) on rank {self.rank} of {self.world_size}")
        if self.sample_rate is not None:
            s += f", sample_rate={self.sample_rate}"
        if self.embedding_grad_scale != 1.0:
            s += f", embedding_grad_scale={self.embedding_grad_scale}"
        return s


class ShardedMarginSoftmaxHead(ShardedHead):
    """:class:`fusedface.MarginSoftmaxHead` (every option of SPEC §2), classes sharded."""

    head_class = MarginSoftmaxHead


class ShardedArcFace(ShardedHead):
    """:class:`fusedface.ArcFace`, classes sharded."""

    head_class = ArcFace


class ShardedCosFace(ShardedHead):
    """:class:`fusedface.CosFace`, classes sharded."""

    head_class = CosFace


class ShardedCombinedMargin(ShardedHead):
    """:class:`fusedface.CombinedMargin`, classes sharded."""

    head_class = CombinedMargin


class ShardedSphereFace(ShardedHead):
    """:class:`fusedface.SphereFace`, classes sharded."""

    head_class = SphereFace


class ShardedElasticArcFace(ShardedHead):
    """:class:`fusedface.ElasticArcFace`, classes sharded. Rank 0 draws the margins of the whole
    global batch (with ``generator``, or the global RNG) and shares them; plus ranks the GLOBAL batch."""

    head_class = ElasticArcFace


class ShardedElasticCosFace(ShardedHead):
    """:class:`fusedface.ElasticCosFace`, classes sharded (draws as :class:`ShardedElasticArcFace`)."""

    head_class = ElasticCosFace


class ShardedKappaFace(ShardedHead):
    """:class:`fusedface.KappaFace`, classes sharded: the ``[C, D]`` running sums, counts, κ and
    margins live with their classes; ``end_epoch()`` merges what needs every class (largest κ,
    mean and std of κ, largest count) with all-reduces of scalars."""

    head_class = KappaFace


class ShardedSVSoftmax(ShardedHead):
    """:class:`fusedface.SVSoftmax`, classes sharded."""

    head_class = SVSoftmax


class ShardedMVSoftmax(ShardedHead):
    """:class:`fusedface.MVSoftmax`, classes sharded."""

    head_class = MVSoftmax


class ShardedNPT(ShardedHead):
    """:class:`fusedface.NPT`, classes sharded: streaming top-k per shard, ``k`` candidates per row
    all-gathered and merged."""

    head_class = NPT


class ShardedOTFace(ShardedHead):
    """:class:`fusedface.OTFace`: the margin softmax sharded over the global batch; the transport
    term mined and computed within each rank's own rows (feature maps never cross the wire), so
    the returned loss differs between ranks by that term."""

    head_class = OTFace


class ShardedAdaFace(ShardedHead):
    """:class:`fusedface.AdaFace`, classes sharded. The norm statistics (``batch_mean``, ``batch_std``)
    move over the GLOBAL batch's norms (from the gathered embeddings), the same on every rank, so the
    ranks' buffers agree; the per-row margins are then those of the single-process head."""

    head_class = AdaFace


class ShardedCurricularFace(ShardedHead):
    """:class:`fusedface.CurricularFace`, classes sharded. ``t`` moves over the GLOBAL batch's target
    cosines (the raw target cosines the prologue already shares, clamped) before the pass uses it,
    the same on every rank."""

    head_class = CurricularFace


class ShardedMagFace(ShardedHead):
    """:class:`fusedface.MagFace`, classes sharded. Each rank forms the margin ``m(a)`` and
    regulariser ``g(a)`` of its own rows from their norms (with their gradient); the prologue's
    all-reduce shares them, the loss is the single-process head's over the global batch (softmax
    plus ``λ_g`` times the reduced regulariser), and the backward hands each rank ``dL/dm`` and
    ``dL/dg`` of its own rows (from the shared, rank-averaged row gradients), which reach the
    embeddings through the norm (times ``embedding_grad_scale``)."""

    head_class = MagFace


class ShardedSubCenterArcFace(ShardedHead):
    """:class:`fusedface.SubCenterArcFace`, classes sharded: each rank holds whole classes, the K
    sub-centres of each (``weight [C_local·K, D]``); Partial FC samples classes and runs all K rows
    of each; checkpoints reshard by class, K rows at a time. (The cleaning helpers of the
    single-process head, ``nearest_counts`` …, are not sharded: consolidate the checkpoint first.)"""

    head_class = SubCenterArcFace
