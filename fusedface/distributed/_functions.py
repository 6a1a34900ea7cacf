"""The class-sharded fused pass (SPEC §8): gathered rows, one shard of classes per rank.

Rank ``r`` of ``R`` owns the classes ``[lo, hi)`` of the contiguous balanced layout and the rows
``W[lo:hi]``. One step of the margin softmax:

1. **Gather** the embeddings and labels of every rank: ``x_all [B, D]``, ``y_all [B]`` with
   ``B = Σ_r b_r`` (padded collectives, so batch sizes may differ between ranks).
2. **Prologue, O(B·D) + one O(B) all-reduce.** The rank that owns row ``b``'s class computes
   its raw target cosine ``x̂_b·ŵ_y`` (plus, for the heads that need them, ElasticFace+'s target
   cosine and KappaFace's per-class margin); rank 0 adds ElasticFace's draws; a single all-reduce
   (sum, with zeros from the other ranks, hence exact) gives every rank the same values. Every
   rank then computes the same target value ``f_b`` and slope ``dT/dc`` for every row.
3. **Pass.** ``kernels.margin_forward`` on the local shard with ``y_b − lo`` on the rows whose
   class the rank owns and ``-1`` (no label column) elsewhere, and the GLOBAL ``f_b`` (which the
   support-vector test of every column needs). Its ``lse`` covers the local columns only.
4. **Merge, O(B) all-reduces.** ``lse = M + log Σ_r exp(lse_r − M)`` with ``M = max_r lse_r``;
   the arg-max as (value, global index) — max of the values, then min of the indices that reach
   it; the support-vector counts summed.
5. **Backward.** The upstream row gradients are averaged over ranks (one O(B) all-reduce: the
   gradient is that of the mean over ranks of the losses each rank back-propagates, which is the
   global loss when every rank back-propagates it). ``kernels.margin_backward`` on the local
   shard with the global ``lse`` and the target-column gradient ``dcy`` on owned rows (0
   elsewhere) gives this shard's ``dL/dW`` (it never leaves the rank) and a partial ``Σ_k
   dℓ/dc_bk·ŵ_k``; the x-side Jacobian is linear, so each rank applies it to its partial and a
   reduce-scatter sums the partials and hands each rank its own rows. With an in-backward
   optimizer (:mod:`fusedface.optim`) attached to the shard, ``dL/dW`` is formed one class slice
   at a time and each slice is applied to the shard before the next is formed
   (:func:`fusedface._engine.apply_in_slices`): every slice's part of ``dL/dx`` uses its rows
   before their update, and no ``[C_local, D]`` gradient exists.

The heads of issue 16 on this pass. AdaFace's margins come from the norms of the gathered batch
(its statistics move identically on every rank); CurricularFace's ``t`` moves over the shared raw
target cosines of step 2 before the pass takes it as the per-row ``rt``; inter-class filtering is an
option the kernels read from ``opts``. MagFace's margin and regulariser are per-row functions of
each rank's OWN rows' norms: each rank places its values at its rows in the prologue's all-reduce
(``m2_local``, ``term_local``), and since every rank holds the same averaged row gradients, ``f``,
``lse`` and raw target cosines, every rank can form ``dL/dm2`` and ``dL/dterm`` of every row and
returns those of its own rows to its own graph (no extra collective). Sub-centres (``K`` rows per
class, class ``j``'s together): a shard holds whole classes (``[C_local·K, D]``), the owner's target
cosine is the largest over the label's K rows, and Partial FC samples classes and runs their K rows.

NPT (SPEC §4) replaces 3–4 by a streaming top-k on the shard, an all-gather of the ``k`` local
candidates per row (O(B·k·R)) and a local top-k of the ``R·k`` candidates; its sparse backward
runs on the ranks that own the selected columns and the label column.

Partial FC (``sample_rate``) keeps, on each rank, every class of its shard that is a label in the
global batch plus random others up to ``sample_rate·C_local``, runs the same pass on
``W_shard[index]`` (with K sub-centres: rows ``index·K + k``; an autograd ``index_select``: the gradient lands in the full shard's ``.grad``,
so any optimiser works) with the labels remapped into the sample. An in-backward optimizer updates
the shard's rows ``index`` from the sample's gradient slices (``sparse=True``: only those rows and
their state change, each with its own step count; ``sparse=False``: the other rows then get the
update of a zero gradient, ``torch.optim``'s dense semantics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _inbackward, backends
from .. import margins as M
from .._engine import (apply_in_slices, apply_sparse_in_slices, check_kernels, choose_tile, label_raw_cosines,
                       margin_slopes, row_t, sparse_column_contributions, sparse_column_grads, target_column_grad,
                       target_transform, x_jacobian)
from .._numerics import compute_dtype, inverse_norms, nonfinite_centres, reduce_rows, row_margin
from .._options import MarginOptions, NPTOptions
from .._validate import check_embeddings_and_centres, check_label_tensor, check_labels, check_row_margins
from ._comm import Comm, shard_range, shard_sizes

__all__ = ["margin_softmax_loss", "npt_loss", "GlobalBatch", "gather_batch", "sample_classes"]


# ---------------------------------------------------------------------------------------------
# the global batch


@dataclass
class GlobalBatch:
    """The rows of every rank, gathered (no autograd: the Functions below carry the gradient).

    ``y_shard``: ``y − lo`` on rows whose class this rank owns, ``-1`` elsewhere (ignored rows too)."""

    x_all: torch.Tensor  # [B, D], contiguous
    y_all: torch.Tensor  # [B] int64
    valid: torch.Tensor  # [B] bool, label != ignore_index
    y_shard: torch.Tensor  # [B] int64
    sizes: list  # every rank's batch size
    offset: int  # first row of this rank in the global batch
    lo: int
    hi: int
    num_classes: int
    rank: int

    @property
    def B(self) -> int:
        return self.x_all.shape[0]

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The part of a global-batch tensor ``[B, ...]`` that belongs to this rank's rows."""
        return t[self.offset: self.offset + self.sizes[self.rank]]


def check_local_batch(x, y, W) -> None:
    """The boundary checks of the single-process API on a rank's own rows (``b = 0`` allowed; the
    label values are checked against ``num_classes`` once gathered, in :func:`gather_batch`)."""
    check_embeddings_and_centres(x, W, allow_empty_batch=True)
    check_label_tensor(y, x.shape[0], x.device)


def gather_batch(comm: Comm, x: torch.Tensor, y: torch.Tensor, num_classes: int, ignore_index: int,
                 batch_sizes=None) -> GlobalBatch:
    """All-gather this rank's ``x [b, D]`` and ``y [b]`` (any ``b``, also 0) into the global batch.

    ``batch_sizes`` (every rank's ``b``, the same list on every rank) skips the all-gather of the
    sizes and with it the host synchronisation that reading them costs."""
    if batch_sizes is None:
        sizes = comm.batch_sizes(x.shape[0], x.device)
    else:
        sizes = [int(s) for s in batch_sizes]
        if len(sizes) != comm.world_size or sizes[comm.rank] != x.shape[0] or min(sizes) < 0:
            raise ValueError(f"batch_sizes={list(batch_sizes)} must list the batch size of each of the "
                             f"{comm.world_size} ranks; this rank (rank {comm.rank}) has {x.shape[0]} rows")
    B = sum(sizes)
    if B == 0:
        raise ValueError("the global batch is empty (every rank passed 0 rows); pass at least one row")
    with torch.no_grad():
        x_all = comm.all_gather_rows(x.detach(), sizes).contiguous()
        y_all = comm.all_gather_rows(y.detach().long(), sizes)
    check_labels(y_all, B, num_classes, ignore_index, x.device)
    valid = y_all != ignore_index
    lo, hi = shard_range(num_classes, comm.world_size, comm.rank)
    owned = valid & (y_all >= lo) & (y_all < hi)
    y_shard = torch.where(owned, y_all - lo, torch.full_like(y_all, -1))
    return GlobalBatch(x_all, y_all, valid, y_shard, sizes, sum(sizes[: comm.rank]), lo, hi, int(num_classes),
                       comm.rank)


# ---------------------------------------------------------------------------------------------
# Partial FC


def sample_classes(y_shard: torch.Tensor, num_local: int, sample_rate: float, generator=None):
    """Partial FC (An et al. 2021/2022) on one shard: ``(index [k], y_sub [B])``.

    ``index`` holds the local class ids kept, sorted: every class of the shard that is a label in
    the global batch, plus uniformly random other classes up to ``k = max(⌊sample_rate·C_local⌋, 1)``
    (or more, when the batch holds more positive classes than that). ``y_sub`` remaps the owned
    labels into ``index`` (``-1`` stays ``-1``).

    No host synchronisation when ``k ≥ min(B, C_local)`` (the positives then always fit, the usual
    case: ``sample_rate·C_local`` is far larger than the batch); otherwise the number of positive
    classes is read on the host to size the sample."""
    check_sample_rate(sample_rate, allow_none=False)
    device = y_shard.device
    owned = y_shard >= 0
    ys = y_shard.clamp(min=0)
    hits = torch.zeros(num_local, dtype=torch.int32, device=device).index_add_(0, ys, owned.to(torch.int32))
    positive = hits > 0
    k = min(num_local, max(1, int(float(sample_rate) * num_local)))
    if k < min(y_shard.shape[0], num_local):
        k = max(k, int(positive.sum()))  # host sync: only when the batch could hold more positives than k
    score = torch.rand(num_local, generator=generator, device=device)
    score = torch.where(positive, torch.full_like(score, 2.0), score)  # positives rank above every draw in [0, 1)
    index = torch.topk(score, k, sorted=False).indices.sort().values
    y_sub = torch.where(owned, torch.searchsorted(index, ys), torch.full_like(y_shard, -1))
    return index, y_sub


# ---------------------------------------------------------------------------------------------
# the margin-softmax prologue shared by every rank


@dataclass(frozen=True)
class ElasticDraws:
    """ElasticFace margins for the sharded pass: rank 0 draws ``E ~ N(mean, std²)`` for the whole
    global batch with ``generator`` and every rank receives the same draws."""

    mean: float
    std: float
    plus: bool
    slot: str  # "m2" (Arc) or "m3" (Cos)
    generator: object = None


@dataclass
class _Plan:
    """Everything the sharded Functions need besides ``x_local`` and ``W`` (no autograd)."""

    comm: Comm
    batch: GlobalBatch
    kernels: object
    tile: int
    cdt: torch.dtype
    x_dtype: torch.dtype
    y_sub: torch.Tensor  # labels into the columns of the W the pass runs on; -1 where not owned
    index: torch.Tensor | None  # Partial FC: local class id of each column, else None
    xinv: torch.Tensor
    winv: torch.Tensor
    embedding_grad_scale: float
    opts: object = None
    f: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    c_y: torch.Tensor | None = None  # NPT
    stats: bool = False
    optim_token: int = 0  # the in-backward optimizer of the shard (fusedface.optim; 0: none)
    row_index: torch.Tensor | None = None  # Partial FC: the rows of the shard run (K per sampled class)
    raw_y: torch.Tensor | None = None  # the raw (unclamped) target cosine of every row, shared
    m2: torch.Tensor | None = None  # the per-row m2 of the global batch the target used
    rt: torch.Tensor | None = None  # CurricularFace's per-row t (negative="curricular"), else None
    term: torch.Tensor | None = None  # a per-row term of the global batch (gathered), or None
    term_weight: float = 1.0  # the loss rows get term_weight·term

    def global_ids(self, local_cols: torch.Tensor) -> torch.Tensor:
        cols = local_cols if self.index is None else self.index[local_cols]
        return cols + self.batch.lo


def _columns(comm, batch, W, sample_rate, sample_generator, K: int = 1):
    """``(W_used, index, y_sub, rows)``: the shard itself, or the Partial FC sample of it. With ``K``
    sub-centres per class (``W`` of ``[C_local·K, D]``) the sample is of CLASSES (``index``) and takes
    the K rows of each (``rows``, the shard's rows run; ``index`` itself for ``K = 1``)."""
    if sample_rate is None:
        return W, None, batch.y_shard, None
    index, y_sub = sample_classes(batch.y_shard, W.shape[0] // K, sample_rate, sample_generator)
    rows = index if K == 1 else (index[:, None] * K + torch.arange(K, device=index.device)).reshape(-1)
    return W.index_select(0, rows), index, y_sub, rows


def _owner_cosines(batch, W, y_sub, xinv, winv, cdt, K: int = 1):
    """Raw ``x̂_b·ŵ_y`` on the rows whose class this rank owns (0 elsewhere), as the prologue does;
    with ``K`` sub-centres per class the largest over the label's sub-centres."""
    owned = y_sub >= 0
    raw = label_raw_cosines(batch.x_all, W, y_sub.clamp(min=0), xinv, winv, K, cdt)
    return torch.where(owned, raw, torch.zeros_like(raw))


def _placed(batch, t, cdt):
    """This rank's rows ``t [b]`` at their place in a zero ``[B]`` vector (summed over the ranks: the
    rows of every rank, exactly)."""
    out = torch.zeros(batch.B, dtype=cdt, device=batch.x_all.device)
    out[batch.offset: batch.offset + batch.sizes[batch.rank]] = t.detach().to(cdt)
    return out


def _check_local_rows(name, t, b: int):
    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (b,)):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of this rank's {b} rows, got {shape}")


def margin_plan(comm: Comm, x, W, y, opts: MarginOptions, *, num_classes, backend="auto", tile_size=None,
                m2=0.0, m3=0.0, class_m2=None, elastic: ElasticDraws | None = None, sample_rate=None,
                sample_generator=None, batch_sizes=None, embedding_grad_scale=1.0, stats=True, batch=None,
                m2_local=None, m3_local=None, term_local=None, term_weight=1.0, rt=None, checked=False):
    """Gather, sample and run the prologue; returns ``(W_used, plan)`` for :class:`MarginSoftmaxShardFunction`.

    ``m2``/``m3``: floats or per-row tensors over the GLOBAL batch (the same on every rank).
    ``class_m2``: a per-class margin of this shard ``[C_local]`` (KappaFace), looked up by the
    owner of each row. ``elastic``: draws made on rank 0 and shared. ``batch``: the global batch
    when the caller gathered it already (AdaFace's margins come from its norms).
    ``m2_local``/``m3_local``: per-row margins of THIS rank's rows ``[b]`` (MagFace's, from each
    row's norm), shared in the prologue's all-reduce; ``term_local``: a per-row term of this rank's
    rows, shared likewise, of which ``term_weight`` times is added to the loss rows (MagFace's
    regulariser; ``plan.term`` holds it over the global batch). When they require grad,
    pass the same tensors to :class:`MarginSoftmaxShardFunction`, which returns their gradient.
    ``rt``: CurricularFace's ``t`` (a tensor; the plan's ``raw_y`` holds the shared target cosines
    it is updated from, and the caller may set ``plan.rt`` before the pass).
    With ``opts.subcenters = K`` the shard ``W`` is ``[C_local·K, D]`` (class ``j``'s K rows together).
    ``checked``: the caller ran :func:`check_local_batch` on these tensors already."""
    if not checked:
        check_local_batch(x, y, W)
    kernels = backends.get(backend, x.device)
    check_kernels(kernels, opts)
    K = opts.subcenters
    if W.shape[0] % K:
        raise ValueError(f"with subcenters={K} the shard must hold K rows per class, got {W.shape[0]} rows")
    if batch is None:
        batch = gather_batch(comm, x, y, num_classes, opts.ignore_index, batch_sizes)
    b_local = x.shape[0]
    for name, t in (("m2_local", m2_local), ("m3_local", m3_local), ("term_local", term_local)):
        _check_local_rows(name, t, b_local)
    B, device = batch.B, x.device
    m2, m3 = check_row_margins(m2, m3, B, device)
    token = _inbackward.token_of(W)  # of the shard parameter, not of the Partial FC copy below
    W_used, index, y_sub, rows_run = _columns(comm, batch, W, sample_rate, sample_generator, K)
    cdt = compute_dtype(x, W)
    term = None
    with torch.no_grad():
        Wd = W_used.detach().contiguous()
        xinv = inverse_norms(batch.x_all, cdt)
        winv = inverse_norms(Wd, cdt)
        owned = y_sub >= 0
        shared = [_owner_cosines(batch, Wd, y_sub, xinv, winv, cdt, K)]
        if elastic is not None and elastic.plus:
            # the ranking of ElasticFace+ uses the same target cosines as the single-process head
            shared.append(M.target_cosines(batch.x_all, Wd, y_sub, -1, subcenters=K).to(cdt))
        if class_m2 is not None:
            m_own = class_m2[batch.y_shard.clamp(min=0)].to(cdt)
            shared.append(torch.where(owned, m_own, torch.zeros_like(m_own)))
        if elastic is not None:
            draw_dtype = cdt if elastic.plus else (torch.float64 if x.dtype == torch.float64 else torch.float32)
            if comm.rank == 0:
                draws = M.elastic_draws(B, elastic.mean, elastic.std, generator=elastic.generator, device=device,
                                        dtype=draw_dtype)
            else:
                draws = torch.zeros(B, dtype=draw_dtype, device=device)
            shared.append(draws.to(cdt))
        locals_ = [t for t in (m2_local, m3_local, term_local) if t is not None]
        shared += [_placed(batch, t, cdt) for t in locals_]
        shared = comm.all_reduce(torch.stack(shared), "sum")  # one O(B) all-reduce; exact (zeros elsewhere)
        raw_y, rest = shared[0], list(shared[1:])
        if elastic is not None:
            tc = rest.pop(0) if elastic.plus else None
        if class_m2 is not None:
            m2 = rest.pop(0)
        if elastic is not None:
            draws = rest.pop(0).to(draw_dtype)
            m = M.plus_order(tc, draws, batch.valid) if elastic.plus else draws
            if elastic.slot == "m2":
                m2 = m
            else:
                m3 = m
        if m2_local is not None:
            m2 = rest.pop(0)
        if m3_local is not None:
            m3 = rest.pop(0)
        if term_local is not None:
            term = rest.pop(0)
        m2 = row_margin(m2, B, device, cdt)
        f, slope = target_transform(raw_y, opts, m2, row_margin(m3, B, device, cdt))
    C_used = W_used.shape[0] // K
    tile = choose_tile(B, x.shape[1], C_used * K, None, tile_size)
    tile = max(1, tile // K) if tile_size is None else min(tile, C_used)  # classes per tile
    plan = _Plan(comm, batch, kernels, tile, cdt, x.dtype, y_sub, index, xinv, winv, float(embedding_grad_scale),
                 opts=opts, f=f, slope=slope, stats=bool(stats), optim_token=token, row_index=rows_run,
                 raw_y=raw_y, m2=m2, rt=row_t(rt, opts, B, device, cdt), term=term, term_weight=float(term_weight))
    return W_used, plan


class _ScaleGrad(torch.autograd.Function):
    """The identity, its gradient multiplied by ``s``."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


def scale_grad(x: torch.Tensor, s: float) -> torch.Tensor:
    """``x`` whose gradient is multiplied by ``s`` (``embedding_grad_scale`` on the paths to the
    embeddings that do not pass through the reduce-scatter: MagFace's norm)."""
    return x if s == 1.0 else _ScaleGrad.apply(x, float(s))


def _mean_upstream(plan: _Plan, grad_rows: torch.Tensor) -> torch.Tensor:
    """The upstream row gradient averaged over ranks, 0 on ignored rows."""
    g = grad_rows.to(plan.cdt).clone()
    if plan.comm.active:
        g = plan.comm.all_reduce(g, "sum") / plan.comm.world_size
    return torch.where(plan.batch.valid, g, torch.zeros_like(g))


def _scatter_dx(plan: _Plan, G: torch.Tensor) -> torch.Tensor:
    """This rank's ``dL/dx`` from its partial ``Σ_k dℓ/dc_bk·ŵ_k`` over the global batch."""
    part = x_jacobian(plan.batch.x_all, plan.xinv, G)
    dx = plan.comm.reduce_scatter_rows(part, plan.batch.sizes)
    if plan.embedding_grad_scale != 1.0:
        dx = dx * plan.embedding_grad_scale
    return dx.to(plan.x_dtype)


class MarginSoftmaxShardFunction(torch.autograd.Function):
    """Per-row margin-softmax losses of the GLOBAL batch ``[B]`` (the same on every rank, 0 on
    ignored rows), the global arg-max ``pred [B]`` and support-vector counts ``sv [B]``.

    Inputs: this rank's embeddings ``x_local [b, D]`` (the gradient comes back to them by a
    reduce-scatter), the columns of ``W`` this rank runs (its shard or its Partial FC sample) and
    the ``plan`` of :func:`margin_plan`; optionally the per-row tensors of this rank's rows the plan
    was built with (``m2_local``, ``m3_local``, ``term_local``), whose gradient it returns.

    Their gradient: the upstream row gradients are averaged over ranks (as for ``dL/dx``), so every
    rank computes the same ``dℓ/df_b = s·(p_y − 1)·gl_b`` for every row of the global batch (``f``,
    ``lse`` and the raw target cosine are shared); ``dL/dm2_b = dℓ/df_b·dT/dm2``, ``dL/dm3_b = dℓ/df_b·dT/dm3``
    and ``dL/dterm_b = term_weight·gl_b``, and each rank keeps its own rows (no communication)."""

    @staticmethod
    def forward(ctx, x_local, W, plan: _Plan, m2_local=None, m3_local=None, term_local=None):
        comm, b, opts, cdt = plan.comm, plan.batch, plan.opts, plan.cdt
        K = opts.subcenters
        Wc = W.contiguous()
        extra = {"rt": plan.rt} if plan.rt is not None else {}
        lse_r, pred_r, sv_r, _ = plan.kernels.margin_forward(b.x_all, Wc, plan.xinv, plan.winv, plan.y_sub, plan.f,
                                                          opts, plan.tile, **extra)
        lse_r = lse_r.to(cdt)
        # NaN in, NaN out (fusedface._engine._nan_if_bad_centres) across ranks: a flag rides on the max
        nan_r = nonfinite_centres(Wc, plan.winv).any().to(cdt).expand(b.B)
        if plan.stats:
            pr = pred_r.long()
            best = label_raw_cosines(b.x_all, Wc, pr, plan.xinv, plan.winv, K, cdt).clamp(-1.0, 1.0)
            top = comm.all_reduce(torch.stack([lse_r, best, nan_r]), "max")
            M, best_all, nan_any = top[0], top[1], top[2]
            tot = comm.all_reduce(torch.stack([torch.exp(lse_r - M).double(), sv_r.double()]), "sum")
            cand = torch.where(best == best_all, plan.global_ids(pr), torch.full_like(pr, b.num_classes))
            pred = comm.all_reduce(cand, "min")
            sv = tot[1].round().long()
        else:
            top = comm.all_reduce(torch.stack([lse_r, nan_r]), "max")
            M, nan_any = top[0], top[1]
            tot = comm.all_reduce(torch.exp(lse_r - M).double()[None], "sum")
            pred = torch.zeros(b.B, dtype=torch.long, device=lse_r.device)
            sv = torch.zeros(b.B, dtype=torch.long, device=lse_r.device)
        lse = (M.double() + torch.log(tot[0])).to(cdt)
        rows = torch.where(nan_any > 0, torch.full_like(lse, float("nan")), lse - opts.scale * plan.f)
        if plan.term is not None:
            rows = rows + plan.term_weight * plan.term
        rows = torch.where(b.valid, rows, torch.zeros_like(lse))
        ctx.save_for_backward(Wc, lse)
        ctx.plan = plan
        ctx.local_dtypes = tuple(None if t is None else t.dtype for t in (m2_local, m3_local, term_local))
        ctx.mark_non_differentiable(pred, sv)
        return rows, pred, sv

    @staticmethod
    def backward(ctx, grad_rows, _gp, _gs):
        plan = ctx.plan
        need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the in-backward optimizer first: a second backward before its step() is refused before the
        # shard it updated is read (the saved W would fail autograd's version check)
        upd = _inbackward.begin(plan.optim_token) if need_dW and plan.optim_token else None
        if upd is None and plan.optim_token:
            need_dW = False  # the optimizer's shard, not asked for by this backward
        Wc, lse = ctx.saved_tensors
        opts = plan.opts
        gl = _mean_upstream(plan, grad_rows)
        local = _local_grads(ctx, plan, lse, gl)
        if not (need_dx or need_dW):
            return (None, None, None) + local
        dcy = target_column_grad(opts, plan.f, lse, gl, plan.slope)
        dcy = torch.where(plan.y_sub >= 0, dcy, torch.zeros_like(dcy))  # the label column lives on its owner
        extra = {"rt": plan.rt} if plan.rt is not None else {}
        if upd is not None:
            # the in-backward optimizer (fusedface.optim): this shard's dL/dW slice by slice, each slice
            # applied to the shard (rows row_index[lo:hi] for a Partial FC sample) after its part of dL/dx
            # was formed with the rows before their update
            Gx = apply_in_slices(upd, plan.batch.x_all, Wc, plan.y_sub, plan.xinv, plan.winv, plan.f, lse, gl, dcy,
                                 opts, plan.kernels, plan.tile, need_dx, index=plan.row_index, **extra)
            _finish_update(upd, plan)
            dx = _scatter_dx(plan, Gx) if need_dx else None
            return (dx, None, None) + local
        Gx, dW = plan.kernels.margin_backward(plan.batch.x_all, Wc, plan.xinv, plan.winv, plan.y_sub, plan.f, lse,
                                              gl, dcy, opts, plan.tile, need_dx, need_dW, **extra)
        dx = _scatter_dx(plan, Gx) if need_dx else None
        return (dx, (dW if need_dW else None), None) + local


def _local_grads(ctx, plan: _Plan, lse, gl) -> tuple:
    """The gradients of ``m2_local``, ``m3_local`` and ``term_local`` (this rank's rows; None where not
    asked for), from the averaged upstream row gradient ``gl`` (the same on every rank)."""
    need = ctx.needs_input_grad[3:6]
    out = [None, None, None]
    if not any(need):
        return tuple(out)
    opts, b = plan.opts, plan.batch
    dldf = opts.scale * (torch.exp(opts.scale * plan.f - lse) - 1.0) * gl
    if need[0] or need[1]:
        d2, d3 = margin_slopes(plan.raw_y, opts, plan.m2)
        if need[0]:
            out[0] = b.local_rows(dldf * d2)
        if need[1]:
            out[1] = b.local_rows(dldf * d3)
    if need[2]:
        out[2] = b.local_rows(plan.term_weight * gl)
    return tuple(None if g is None else g.to(dt) for g, dt in zip(out, ctx.local_dtypes))


def _finish_update(upd, plan: _Plan) -> None:
    """Closes a shard's in-backward update. With a Partial FC sample and ``sparse=False`` (the dense
    semantics of ``torch.optim``), the rows of the shard outside the sample get the update of a zero
    gradient (weight decay, momentum), as ``torch.optim`` gives the zero rows of the dense gradient."""
    if plan.row_index is not None and not upd.sparse:
        upd.apply_rows_without_grad(plan.row_index)
    upd.finish()


def margin_softmax_loss(x, W_shard, y, *, num_classes, scale=64.0, m1=1.0, m2=0.0, m3=0.0, theta_policy="none",
                        negative="none", t=0.0, grad_mode="exact", reduction="mean", ignore_index=-1, backend="auto",
                        tile_size=None, group=None, sample_rate=None, sample_generator=None, batch_sizes=None,
                        embedding_grad_scale=1.0, interclass_threshold=None, subcenters=1, rt=None):
    """The margin softmax of :func:`fusedface.functional.margin_softmax_loss` with the classes
    sharded over ``group`` (default: the default process group; a world of one without one).

    ``x [b, D]``, ``y [b]``: this rank's rows (``b`` may differ between ranks); ``W_shard``: this
    rank's classes ``[C_local, D]`` of the contiguous balanced layout of ``num_classes`` (``[C_local·K,
    D]`` with ``subcenters = K``, class ``j``'s K rows together). Returns the
    loss of the GLOBAL batch, the same on every rank (``reduction="none"``: the rows of the global
    batch, rank by rank). Per-row ``m2``/``m3`` tensors are over the global batch. ``sample_rate``
    turns on Partial FC. ``embedding_grad_scale`` multiplies the gradient returned to ``x`` (set it
    to the world size when DDP averages the backbone's gradients, as InsightFace does). ``rt``:
    CurricularFace's ``t`` (a tensor) for ``negative="curricular"`` (default: ``t``)."""
    opts = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                         grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index,
                         interclass_threshold=interclass_threshold, subcenters=subcenters)
    comm = Comm(group)
    _check_shard(W_shard, num_classes, comm, opts.subcenters)
    W_used, plan = margin_plan(comm, x, W_shard, y, opts, num_classes=num_classes, backend=backend,
                               tile_size=tile_size, m2=m2, m3=m3, sample_rate=sample_rate,
                               sample_generator=sample_generator, batch_sizes=batch_sizes,
                               embedding_grad_scale=embedding_grad_scale, stats=False, rt=rt)
    rows, _, _ = MarginSoftmaxShardFunction.apply(x, W_used, plan)
    return reduce_rows(rows, plan.batch.valid, reduction)


def check_num_classes(num_classes, world_size: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (the classes over all ranks), got {num_classes!r}")
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} is smaller than the world size {world_size}: "
                         "every rank needs at least one class")


def check_sample_rate(sample_rate, allow_none: bool = True) -> None:
    """Partial FC's rate: in (0, 1], or None (off) where ``allow_none``."""
    if sample_rate is None and allow_none:
        return
    if not (isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
            and 0.0 < float(sample_rate) <= 1.0):
        none = "None or " if allow_none else ""
        raise ValueError(f"sample_rate must be {none}in (0, 1] (the fraction of each shard's classes kept), "
                         f"got {sample_rate!r}")


def _check_shard(W_shard, num_classes, comm, K: int = 1):
    check_num_classes(num_classes, comm.world_size)
    want = shard_sizes(num_classes, comm.world_size)[comm.rank]
    if not isinstance(W_shard, torch.Tensor) or W_shard.dim() != 2 or W_shard.shape[0] != want * K:
        shape = tuple(W_shard.shape) if isinstance(W_shard, torch.Tensor) else type(W_shard).__name__
        lo, hi = shard_range(num_classes, comm.world_size, comm.rank)
        rows = f"rows {(lo, hi)} of W" if K == 1 else f"rows {(lo * K, hi * K)} of W: {K} sub-centres per class"
        raise ValueError(f"rank {comm.rank} of {comm.world_size} owns {want} of num_classes={num_classes} classes "
                         f"({rows}) but W_shard has shape {shape}; slice W with fusedface.distributed.shard_range")


# ---------------------------------------------------------------------------------------------
# NPT


def npt_plan(comm: Comm, x, W, y, opts: NPTOptions, *, num_classes, backend="auto", tile_size=None,
             sample_rate=None, sample_generator=None, batch_sizes=None, embedding_grad_scale=1.0):
    """Gather, sample and share the target cosines; returns ``(W_used, plan)`` for :class:`NPTShardFunction`."""
    check_local_batch(x, y, W)
    if opts.k > num_classes - 1:
        raise ValueError(f"k={opts.k} nearest negative proxies need at least k + 1 classes, "
                         f"num_classes={num_classes}; use k <= {num_classes - 1}")
    kernels = backends.get(backend, x.device)
    batch = gather_batch(comm, x, y, num_classes, opts.ignore_index, batch_sizes)
    token = _inbackward.token_of(W)
    W_used, index, y_sub, rows_run = _columns(comm, batch, W, sample_rate, sample_generator)
    cdt = compute_dtype(x, W)
    with torch.no_grad():
        Wd = W_used.detach().contiguous()
        xinv = inverse_norms(batch.x_all, cdt)
        winv = inverse_norms(Wd, cdt)
        c_y = comm.all_reduce(_owner_cosines(batch, Wd, y_sub, xinv, winv, cdt).clamp(-1.0, 1.0), "sum")
    tile = choose_tile(batch.B, x.shape[1], W_used.shape[0], None, tile_size)
    plan = _Plan(comm, batch, kernels, tile, cdt, x.dtype, y_sub, index, xinv, winv, float(embedding_grad_scale),
                 opts=opts, c_y=c_y, optim_token=token, row_index=rows_run)
    return W_used, plan


def _small_topk(x_all, W, xinv, winv, y_sub, k, cdt):
    """Top-k when the shard has at most k columns (materialised ``[B, C_sub]``, C_sub ≤ k ≤ 16),
    padded with ``-inf`` / ``-1``."""
    B, C = x_all.shape[0], W.shape[0]
    c = ((x_all.to(cdt) @ W.to(cdt).t()) * xinv[:, None] * winv[None, :]).clamp(-1.0, 1.0)
    cols = torch.arange(C, device=x_all.device)
    c = c.masked_fill(y_sub[:, None] == cols[None, :], float("-inf"))
    v = torch.cat([c, c.new_full((B, k - C), float("-inf"))], dim=1)
    i = torch.cat([cols.expand(B, C), cols.new_full((B, k - C), -1)], dim=1)
    return v, i


class NPTShardFunction(torch.autograd.Function):
    """Per-row NPT losses of the GLOBAL batch ``[B]`` (the same on every rank)."""

    @staticmethod
    def forward(ctx, x_local, W, plan: _Plan):
        comm, b, opts, cdt = plan.comm, plan.batch, plan.opts, plan.cdt
        Wc = W.contiguous()
        k = opts.k
        if Wc.shape[0] > k:
            v, i = plan.kernels.npt_forward(b.x_all, Wc, plan.xinv, plan.winv, plan.y_sub, k, plan.tile)
        else:
            v, i = _small_topk(b.x_all, Wc, plan.xinv, plan.winv, plan.y_sub, k, cdt)
        v, i = v.to(cdt), i.long()
        # NaN in, NaN out: a NaN centre of this shard makes every candidate of this rank NaN (a
        # streaming top-k may have skipped it), and the global top-k below ranks NaN first, as
        # torch.topk does in the single-process head; a NaN embedding reaches c_y through the sum
        v = torch.where(nonfinite_centres(Wc, plan.winv).any(), torch.full_like(v, float("nan")), v)
        real = torch.isnan(v) | (~torch.isneginf(v) & (i >= 0))
        gid = torch.where(real, plan.global_ids(i.clamp(min=0)), torch.full_like(i, -1))
        v = torch.where(real, v, torch.full_like(v, float("-inf")))
        # the k local candidates of every rank, O(B·k·R): [R, B, k] -> [B, R·k]
        cand_v = comm.all_gather(v).permute(1, 0, 2).reshape(b.B, -1)
        cand_g = comm.all_gather(gid).permute(1, 0, 2).reshape(b.B, -1)
        topv, pos = cand_v.topk(k, dim=1)
        topg = cand_g.gather(1, pos)
        hinge = topv - plan.c_y[:, None] + opts.delta
        rows = 2.0 * opts.r ** 2 * torch.relu(hinge).sum(dim=1)
        rows = torch.where(b.valid, rows, torch.zeros_like(rows))
        ctx.save_for_backward(Wc, topg, hinge)
        ctx.plan = plan
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        plan = ctx.plan
        b, opts, cdt = plan.batch, plan.opts, plan.cdt
        need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        upd = _inbackward.begin(plan.optim_token) if need_dW and plan.optim_token else None  # first, as above
        if upd is None and plan.optim_token:
            need_dW = False  # the optimizer's shard, not asked for by this backward
        Wc, topg, hinge = ctx.saved_tensors
        gl = _mean_upstream(plan, grad_rows)
        if not (need_dx or need_dW):
            return None, None, None
        coef = 2.0 * opts.r ** 2 * gl[:, None] * (hinge > 0).to(cdt)  # [B, k] on the selected columns
        own = (topg >= b.lo) & (topg < b.hi)
        local = (topg - b.lo).clamp(0, b.hi - b.lo - 1)
        if plan.index is not None:
            local = torch.searchsorted(plan.index, local).clamp(max=plan.index.shape[0] - 1)
        local = torch.where(own, local, torch.zeros_like(local))
        label = plan.y_sub >= 0
        dcy = torch.where(label, -coef.sum(dim=1), torch.zeros_like(gl))  # the label column, on its owner
        cols = torch.cat([local, plan.y_sub.clamp(min=0)[:, None]], dim=1)  # [B, k+1] columns of Wc
        dc = torch.cat([torch.where(own, coef, torch.zeros_like(coef)), dcy[:, None]], dim=1)
        # the sparse backward of fusedface._engine.npt_backward_grads, on the columns this rank owns
        if upd is not None:
            # in-backward optimizer: dL/dx from the rows before any update, then the update slice by slice
            Gx, idx, val = sparse_column_contributions(b.x_all, plan.xinv, Wc, plan.winv, cols, dc, need_dx, True)
            apply_sparse_in_slices(upd, idx, val, Wc.shape[0], Wc.shape[1], cdt, index=plan.index)
            _finish_update(upd, plan)
            dx = _scatter_dx(plan, Gx) if need_dx else None
            return dx, None, None
        Gx, dW = sparse_column_grads(b.x_all, plan.xinv, Wc, plan.winv, cols, dc, need_dx, need_dW)
        dx = _scatter_dx(plan, Gx) if need_dx else None
        return dx, dW, None


def npt_loss(x, W_shard, y, *, num_classes, delta=0.5, k=1, r=1.0, reduction="mean", ignore_index=-1,
             backend="auto", tile_size=None, group=None, sample_rate=None, sample_generator=None, batch_sizes=None,
             embedding_grad_scale=1.0):
    """NPT-Loss (:func:`fusedface.functional.npt_loss`) with the classes sharded over ``group``;
    arguments as :func:`margin_softmax_loss`."""
    opts = NPTOptions(delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
    comm = Comm(group)
    _check_shard(W_shard, num_classes, comm)
    W_used, plan = npt_plan(comm, x, W_shard, y, opts, num_classes=num_classes, backend=backend, tile_size=tile_size,
                            sample_rate=sample_rate, sample_generator=sample_generator, batch_sizes=batch_sizes,
                            embedding_grad_scale=embedding_grad_scale)
    rows = NPTShardFunction.apply(x, W_used, plan)
    return reduce_rows(rows, plan.batch.valid, reduction)

