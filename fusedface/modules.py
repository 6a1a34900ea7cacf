"""``nn.Module`` heads: each holds the class centres ``W`` as a ``[C, D]`` parameter and its margin
state, and calls :mod:`fusedface.functional` with any backend.

``head(embeddings, labels) -> loss``. After each call the head keeps the last batch's statistics
from the fused pass, as tensors (no host synchronisation): ``last_accuracy`` (arg-max of the
cosines equals the label, over non-ignored rows) and ``last_sv_fraction`` (rows with at least one
support vector, i.e. a negative whose cosine beats the margin-bent target, over non-ignored rows).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import backends
from . import functional as FF
from . import margins as M
from .optim import mark_head_weight
from .otface import ot_triplet_loss
from ._numerics import reduce_rows as R_reduce
from ._options import MarginOptions, NPTOptions
from ._validate import check_embeddings_and_centres, check_labels

__all__ = [
    "MarginSoftmaxHead", "ArcFace", "CosFace", "CombinedMargin", "SphereFace", "ElasticArcFace",
    "ElasticCosFace", "KappaFace", "SVSoftmax", "MVSoftmax", "NPT", "OTFace", "AdaFace", "CurricularFace",
    "MagFace", "SubCenterArcFace",
]


class _ClassCentres(nn.Module):
    """Shared part of every head: ``weight [C, D]``, backend choice and the last statistics."""

    def __init__(self, in_features: int, out_features: int, *, backend="auto", device=None, dtype=None,
                 centres_per_class: int = 1):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.backend = backend
        if isinstance(backend, str) and backend in backends.FUSED:
            backends.load(backend)  # imported now, eagerly: a step compiled later finds it (Dynamo does not import)
        rows = out_features * int(centres_per_class)  # (sub-center ArcFace: K rows per class)
        self.weight = nn.Parameter(torch.empty(rows, in_features, device=device, dtype=dtype))
        self.last_accuracy: torch.Tensor | None = None
        self.last_sv_fraction: torch.Tensor | None = None
        self.reset_parameters()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "weight" and isinstance(value, nn.Parameter):
            mark_head_weight(value)  # the parameter an in-backward optimizer (fusedface.optim) may drive

    def __setstate__(self, state):
        """(``copy.deepcopy``, unpickling: the copied class matrix is marked as the original was.)"""
        super().__setstate__(state)
        if isinstance(self._parameters.get("weight"), nn.Parameter):
            mark_head_weight(self._parameters["weight"])

    def reset_parameters(self) -> None:
        """Normal init, as InsightFace's heads (the scale of W does not matter: rows are normalised)."""
        nn.init.normal_(self.weight, std=0.01)

    def _check(self, x, y, ignore_index: int) -> None:
        """The boundary checks of the functional API, before a head uses the labels itself
        (KappaFace's statistics, its per-class margins, ElasticFace+'s target cosines)."""
        check_embeddings_and_centres(x, self.weight)
        check_labels(y, x.shape[0], self.out_features, ignore_index, x.device)

    def _record(self, y, stats):
        valid = stats["valid"]
        n = valid.sum().clamp(min=1)
        hit = (stats["pred"] == y) & valid
        self.last_accuracy = (hit.sum() / n).detach()
        self.last_sv_fraction = (((stats["sv_count"] > 0) & valid).sum() / n).detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend!r}"


class MarginSoftmaxHead(_ClassCentres):
    """The general margin-softmax head ``cos(m1·θ + m2) − m3`` with every option of SPEC §2.

    Subclasses only choose defaults or produce per-row margins in :meth:`row_margins`.
    """

    def __init__(self, in_features, out_features, *, scale=64.0, m1=1.0, m2=0.0, m3=0.0,
                 theta_policy="none", negative="none", t=0.0, grad_mode="exact", reduction="mean",
                 ignore_index=-1, interclass_threshold=None, subcenters=1, backend="auto", device=None, dtype=None):
        self.options = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                                     grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index,
                                     interclass_threshold=interclass_threshold, subcenters=subcenters)
        super().__init__(in_features, out_features, backend=backend, device=device, dtype=dtype,
                         centres_per_class=self.options.subcenters)
        self.m2 = float(m2)
        self.m3 = float(m3)

    def __setattr__(self, name, value):
        if name == "options" and "_parameters" not in self.__dict__:
            object.__setattr__(self, name, value)  # (set before nn.Module.__init__: it sizes the class matrix)
            return
        super().__setattr__(name, value)

    def _margin_repr(self) -> str:
        return f"m1={self.options.m1}, m2={self.m2}, m3={self.m3}"

    def row_margins(self, x: torch.Tensor, y: torch.Tensor):
        """``(m2, m3)`` for this batch: floats, or per-row tensors ``[B]``."""
        return self.m2, self.m3

    def row_rewrite(self, x: torch.Tensor, y: torch.Tensor):
        """The rewrite's ``t`` as a tensor for this batch (CurricularFace's running ``t``), or None:
        ``options.t``."""
        return None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, stats = self._loss_and_stats(embeddings, labels)
        self._record(labels, stats)
        return loss

    def _loss_and_stats(self, embeddings, labels):
        self._check(embeddings, labels, self.options.ignore_index)
        m2, m3 = self.row_margins(embeddings, labels)
        rt = self.row_rewrite(embeddings, labels)
        return FF.margin_softmax_with_stats(embeddings, self.weight, labels, self.options, m2, m3,
                                            backend=self.backend, checked=True, rt=rt)

    def extra_repr(self) -> str:
        o = self.options
        s = (f"{super().extra_repr()}, scale={o.scale}, {self._margin_repr()}, "
             f"theta_policy={o.theta_policy!r}, grad_mode={o.grad_mode!r}")
        if o.negative != "none":
            s += f", negative={o.negative!r}" + ("" if "t" in self._buffers else f", t={o.t}")  # a running t: a buffer
        if o.interclass_threshold is not None:
            s += f", interclass_threshold={o.interclass_threshold}"
        if o.subcenters > 1:
            s += f", subcenters={o.subcenters}"
        return s


class ArcFace(MarginSoftmaxHead):
    """ArcFace (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition"): ``cos(θ + m)``, s = 64, m = 0.5. InsightFace: ``margin_list=(1.0, 0.5, 0.0)``.
    ``theta_policy="threshold"`` gives the original paper code's fall-back past π."""

    def __init__(self, in_features, out_features, *, scale=64.0, margin=0.5, theta_policy="none",
                 grad_mode="exact", **kw):
        super().__init__(in_features, out_features, scale=scale, m2=margin, theta_policy=theta_policy,
                         grad_mode=grad_mode, **kw)


class CosFace(MarginSoftmaxHead):
    """CosFace / AM-Softmax (Wang et al. 2018): ``cos θ − m``, s = 64, m = 0.35 (InsightFace's
    Glint360K recipe uses 0.40). InsightFace: ``margin_list=(1.0, 0.0, 0.35)``."""

    def __init__(self, in_features, out_features, *, scale=64.0, margin=0.35, **kw):
        super().__init__(in_features, out_features, scale=scale, m3=margin, **kw)


class CombinedMargin(MarginSoftmaxHead):
    """InsightFace's combined margin ``cos(m1·θ + m2) − m3`` (defaults 1, 0.3, 0.2 as the MXNet
    recipe). ``margin_list=(m1, m2, m3)`` is accepted as InsightFace spells it."""

    def __init__(self, in_features, out_features, *, scale=64.0, m1=1.0, m2=0.3, m3=0.2, margin_list=None, **kw):
        if margin_list is not None:
            m1, m2, m3 = margin_list
        super().__init__(in_features, out_features, scale=scale, m1=m1, m2=m2, m3=m3, **kw)


class SphereFace(MarginSoftmaxHead):
    """SphereFace-style multiplicative margin ``cos(m·θ)`` (Liu et al. 2017), without the original
    piecewise ψ(θ) and λ annealing (see docs/differences.md). ``cos(m·θ)`` is monotone only for
    ``θ <= π/m``; the default ``theta_policy="threshold"`` turns the margin off past that angle
    (``f = c``), so the target never rises above the cosine. ``"easy"`` only guards ``c <= 0`` and
    lets rows between ``π/m`` and π/2 get a target above their cosine."""

    def __init__(self, in_features, out_features, *, scale=64.0, margin=4.0, theta_policy="threshold", **kw):
        super().__init__(in_features, out_features, scale=scale, m1=margin, theta_policy=theta_policy, **kw)


class _Elastic(MarginSoftmaxHead):
    _slot = "m2"

    def __init__(self, in_features, out_features, *, scale, margin, std, plus, generator, **kw):
        super().__init__(in_features, out_features, scale=scale, **kw)
        self.margin_mean = float(margin)
        self.margin_std = float(std)
        self.plus = bool(plus)
        self.generator = generator

    def __setattr__(self, name, value):
        if name == "generator":  # reachable by id from a compiled step (margins.normal_draws)
            M.register_generator(value)
        super().__setattr__(name, value)

    def row_margins(self, x, y):
        ignore = self.options.ignore_index
        valid = y != ignore
        if self.plus:
            # ElasticFace+ needs the target cosines before the pass: O(B·D), gathers the label rows
            cos_y = M.target_cosines(x, self.weight, y, ignore)
        else:
            cos_y = torch.zeros(x.shape[0], device=x.device,
                                dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        m = M.elastic_margins(cos_y, self.margin_mean, self.margin_std, plus=self.plus,
                              generator=self.generator, valid=valid)
        return (m, 0.0) if self._slot == "m2" else (0.0, m)

    def get_extra_state(self):
        if self.generator is None:
            return {"generator_state": None}
        return {"generator_state": self.generator.get_state(), "generator_device": self.generator.device.type}

    def set_extra_state(self, state):
        """Restores the draw stream; a head built without a generator gets one (on the saved
        device type), so the loaded head continues the saved stream instead of the global RNG."""
        if not state or state.get("generator_state") is None:
            return
        if self.generator is None:
            self.generator = torch.Generator(device=state.get("generator_device", "cpu"))
        self.generator.set_state(state["generator_state"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend!r}, "
                f"scale={self.options.scale}, margin~N({self.margin_mean}, {self.margin_std}²) in {self._slot}, "
                f"plus={self.plus}")


class ElasticArcFace(_Elastic):
    """ElasticFace-Arc (Boutros et al. 2022, "ElasticFace: Elastic Margin Loss for Deep Face
    Recognition"): per row ``cos(θ + E)``, ``E ~ N(0.5, 0.05²)`` drawn at every call; ``plus=True``
    gives the hardest rows the largest draws (σ = 0.0175 in the paper's Arc+ recipe).
    ``generator`` makes the draws reproducible and is saved in the ``state_dict``."""

    _slot = "m2"

    def __init__(self, in_features, out_features, *, scale=64.0, margin=0.5, std=None, plus=False,
                 generator=None, **kw):
        std = (0.0175 if plus else 0.05) if std is None else std
        super().__init__(in_features, out_features, scale=scale, margin=margin, std=std, plus=plus,
                         generator=generator, **kw)


class ElasticCosFace(_Elastic):
    """ElasticFace-Cos (Boutros et al. 2022): per row ``cos θ − E``, ``E ~ N(0.35, 0.05²)``;
    σ = 0.02 in the paper's Cos+ recipe (``plus=True``)."""

    _slot = "m3"

    def __init__(self, in_features, out_features, *, scale=64.0, margin=0.35, std=None, plus=False,
                 generator=None, **kw):
        std = (0.02 if plus else 0.05) if std is None else std
        super().__init__(in_features, out_features, scale=scale, margin=margin, std=std, plus=plus,
                         generator=generator, **kw)


class _RunningStatistics:
    """Keeps a head's running statistics (the buffers named in ``_statistics``) in the dtype they were
    built with when the module is cast to fp16 or bf16 (``head.half()``, ``head.to(torch.bfloat16)``):
    an EMA step of weight 0.01 rounds back to the old value in a 16-bit buffer, so the statistic would
    stop moving, and an epoch's sum of unit vectors loses its small terms. Device moves and fp32/fp64
    casts apply as usual."""

    _statistics: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self._statistics}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = old.to(device=new.device)
        return out


class KappaFace(_RunningStatistics, MarginSoftmaxHead):
    """KappaFace (Oinar et al. 2022): an ArcFace head whose margin is per class, from the vMF
    concentration κ of each class's embeddings and the class's sample count.

    Workflow: call :meth:`update_statistics` with each batch's embeddings and labels during an
    epoch (``forward`` does it for you when ``auto_update=True``, the default), and
    :meth:`end_epoch` once per epoch to turn the statistics into margins. Until the first
    ``end_epoch`` every class uses ``m0``. State (``class_margins``, the running sums and counts,
    the last epoch's counts, ``epochs_seen``) lives in buffers, so it is in the ``state_dict``.
    ``stats_dtype`` lets the ``[C, D]`` running sum be stored in a lower precision (or fp64: the unit
    vectors are then formed in fp64, and κ and the margins are kept in fp64).
    """

    def __init__(self, in_features, out_features, *, scale=64.0, m0=0.8, temperature=0.4, gamma=0.7,
                 stats_dtype=torch.float32, auto_update=True, device=None, dtype=None, **kw):
        super().__init__(in_features, out_features, scale=scale, device=device, dtype=dtype, **kw)
        self.m0, self.temperature, self.gamma = float(m0), float(temperature), float(gamma)
        self.auto_update = bool(auto_update)
        # κ and the margins per class: fp64 when the head or its statistics are (an fp64 κ end to end)
        per_class = torch.float64 if torch.float64 in (dtype or torch.get_default_dtype(), stats_dtype) else torch.float32
        self.register_buffer("class_margins", torch.full((out_features,), self.m0, device=device, dtype=per_class))
        self.register_buffer("resultant_sum", torch.zeros(out_features, in_features, device=device, dtype=stats_dtype))
        self.register_buffer("epoch_counts", torch.zeros(out_features, device=device, dtype=torch.long))
        self.register_buffer("class_counts", torch.zeros(out_features, device=device, dtype=torch.long))
        self.register_buffer("class_kappa", torch.zeros(out_features, device=device, dtype=per_class))
        self.register_buffer("epochs_seen", torch.zeros((), device=device, dtype=torch.long))

    # κ, the margins and the running sum keep their dtype (stats_dtype included) when the head is cast to 16 bits
    _statistics = ("class_margins", "resultant_sum", "class_kappa")

    @torch.no_grad()
    def update_statistics(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate ``S_c += Σ x̂_b`` and ``n_c`` over the rows labelled c (ignored rows skipped)."""
        self._check(x, y, self.options.ignore_index)
        valid = y != self.options.ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
        M.accumulate_resultants(self.resultant_sum, self.epoch_counts, x, y_safe, valid)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """κ and margins from this epoch's statistics (SPEC §3), then reset the running sums.

        Classes unseen this epoch get r̄ = 0/0 → κ = 0 and keep count 0 (largest count weight)."""
        rbar = M.mean_resultant_length(self.resultant_sum, self.epoch_counts)
        kappa = M.kappa_from_resultant(rbar, self.in_features)
        m = M.kappa_margins(kappa, self.epoch_counts, m0=self.m0, temperature=self.temperature, gamma=self.gamma)
        self._finish_epoch(kappa, m)

    @torch.no_grad()
    def _finish_epoch(self, kappa: torch.Tensor, margins: torch.Tensor) -> None:
        """Store this epoch's κ and margins and counts, reset the running sums."""
        self.class_kappa.copy_(kappa.to(self.class_kappa.dtype))
        self.class_margins.copy_(margins.to(self.class_margins.dtype))
        self.class_counts.copy_(self.epoch_counts)
        self.resultant_sum.zero_()
        self.epoch_counts.zero_()
        self.epochs_seen += 1

    def row_margins(self, x, y):
        valid = y != self.options.ignore_index
        m = self.class_margins[torch.where(valid, y, torch.zeros_like(y)).long()]
        return m, 0.0

    def forward(self, embeddings, labels):
        if self.training and self.auto_update:
            self.update_statistics(embeddings, labels)
        return super().forward(embeddings, labels)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend!r}, "
                f"scale={self.options.scale}, m0={self.m0}, temperature={self.temperature}, gamma={self.gamma}")


class SVSoftmax(MarginSoftmaxHead):
    """SV-Softmax (Wang et al. 2018, "Support Vector Guided Softmax Loss for Face Recognition"):
    support vectors ``c > f`` are rewritten to ``t·c + t − 1`` (t ≥ 1, default 1.12 as FaceX-Zoo's
    ``mv_weight``). ``margin_type`` "am"
    (CosFace target, m = 0.35) or "arc" (ArcFace target, m = 0.5); s = 32."""

    _negative = "sv"
    _t = 1.12  # FaceX-Zoo's mv_weight for SV-Softmax

    def __init__(self, in_features, out_features, *, scale=32.0, margin_type="am", margin=None, t=None,
                 theta_policy="easy", **kw):
        if margin_type not in ("am", "arc"):
            raise ValueError(f"margin_type={margin_type!r} is not supported; use 'am' or 'arc'")
        margin = (0.35 if margin_type == "am" else 0.5) if margin is None else float(margin)
        t = self._t if t is None else t
        m2, m3 = (0.0, margin) if margin_type == "am" else (margin, 0.0)
        kw.setdefault("negative", self._negative)
        super().__init__(in_features, out_features, scale=scale, m2=m2, m3=m3, t=t, theta_policy=theta_policy, **kw)
        self.margin_type = margin_type


class MVSoftmax(SVSoftmax):
    """MV-Softmax (Wang et al. 2020, "Mis-classified Vector Guided Softmax Loss for Face
    Recognition"): mis-classified negatives are re-weighted, ``"mv_adaptive"`` (``(t+1)·c + t``,
    default, t = 0.2) or ``"mv_fixed"`` (``c + t``). Defaults follow the official code: s = 32,
    ``theta_policy="easy"``, AM (m = 0.35) or Arc (m = 0.5) target."""

    _negative = "mv_adaptive"
    _t = 0.2


class NPT(_ClassCentres):
    """NPT-Loss head (Khalid et al. 2021, "NPT-Loss: Demystifying face recognition losses with
    Nearest Proxies Triplet"): ``2r²·Σ_topk max(0, c_neg − c_pos + δ)``; δ = 0.5, k = 1, r = 1."""

    def __init__(self, in_features, out_features, *, delta=0.5, k=1, r=1.0, reduction="mean",
                 ignore_index=-1, backend="auto", device=None, dtype=None):
        super().__init__(in_features, out_features, backend=backend, device=device, dtype=dtype)
        self.options = NPTOptions(delta=delta, k=k, r=r, reduction=reduction, ignore_index=ignore_index)
        if self.options.k > out_features - 1:
            raise ValueError(f"k={k} needs at least k + 1 classes, out_features={out_features}")

    def forward(self, embeddings, labels):
        o = self.options
        return FF.npt_loss(embeddings, self.weight, labels, delta=o.delta, k=o.k, r=o.r,
                           reduction=o.reduction, ignore_index=o.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        o = self.options
        return f"{super().extra_repr()}, delta={o.delta}, k={o.k}, r={o.r}"


class OTFace(MarginSoftmaxHead):
    """OTFace (Qian et al. 2022), as fusedface reconstructs it (SPEC §5, docs/losses/otface.md):
    a margin softmax (``margin_type`` "arc": m2 = 0.5, or "am": m3 = 0.35; s = 64) plus
    ``ot_weight`` × a triplet of entropic OT distances between hard samples' feature maps.

    ``forward(embeddings, labels, feature_maps)`` with ``feature_maps [B, Cf, H, W]`` from a
    high-level conv layer of the backbone.
    """

    def __init__(self, in_features, out_features, *, scale=64.0, margin_type="arc", margin=None,
                 ot_weight=0.1, ot_margin=0.2, ot_eps=0.05, ot_iters=50, **kw):
        if margin_type not in ("am", "arc"):
            raise ValueError(f"margin_type={margin_type!r} is not supported; use 'am' or 'arc'")
        margin = (0.35 if margin_type == "am" else 0.5) if margin is None else float(margin)
        m2, m3 = (0.0, margin) if margin_type == "am" else (margin, 0.0)
        super().__init__(in_features, out_features, scale=scale, m2=m2, m3=m3, **kw)
        self.ot_weight, self.ot_margin = float(ot_weight), float(ot_margin)
        self.ot_eps, self.ot_iters = float(ot_eps), int(ot_iters)
        if self.ot_eps <= 0 or self.ot_iters < 1:
            raise ValueError(f"ot_eps must be > 0 and ot_iters >= 1, got {ot_eps}, {ot_iters}")
        self.last_ot_loss: torch.Tensor | None = None

    def forward(self, embeddings, labels, feature_maps):
        base = super().forward(embeddings, labels)
        term = ot_triplet_loss(embeddings, labels, feature_maps, margin=self.ot_margin, eps=self.ot_eps,
                                 iters=self.ot_iters, ignore_index=self.options.ignore_index)
        self.last_ot_loss = term.detach()
        return base + self.ot_weight * term.to(base.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ot_weight={self.ot_weight}, ot_margin={self.ot_margin}, "
                f"ot_eps={self.ot_eps}, ot_iters={self.ot_iters}")


def _statistics_dtype(dtype) -> torch.dtype:
    """Running statistics in fp64 for an fp64 head, else fp32 (as the authors' buffers)."""
    return torch.float64 if (dtype or torch.get_default_dtype()) == torch.float64 else torch.float32


def _no_fixed_margins(head: str, kw: dict, names=("m2", "m3")) -> None:
    """A head that computes these options from each batch (margins, CurricularFace's ``t``) refuses fixed
    values instead of ignoring them."""
    for name in names:
        if name in kw:
            raise TypeError(f"{head} computes {name} itself, from each batch; got {name}={kw[name]!r}. "
                            f"Use fusedface.MarginSoftmaxHead for fixed values")


class AdaFace(_RunningStatistics, MarginSoftmaxHead):
    """AdaFace (Kim et al., CVPR 2022, "AdaFace: Quality Adaptive Margin for Face Recognition"): the
    margin adapts to image quality, read from the embedding norm ``‖x‖``.

    Per row, with ``n = clip(‖x‖, 0.001, 100)`` (detached) and running batch statistics ``μ``, ``σ``:
    ``ẑ = clip(h·(n − μ)/(σ + ε), −1, 1)`` (ε = 1e-3), the angular margin ``m2 = −m·ẑ`` and the additive
    one ``m3 = m + m·ẑ``; the target is ``cos(clip(θ + m2, ε, π − ε)) − m3`` with ``θ`` from the target
    cosine clamped to ``[−1 + ε, 1 − ε]`` (``theta_policy="clip"``). In training mode each call first
    moves ``μ ← α·mean(n) + (1 − α)·μ`` and ``σ ← α·std(n) + (1 − α)·σ`` (α = ``t_alpha``, unbiased std,
    over the non-ignored rows; σ keeps its value when fewer than two rows are left), as the authors'
    code does before it uses them; the statistics start at μ = 20, σ = 100 and live in buffers
    (``batch_mean``, ``batch_std``: in the ``state_dict``). The embeddings passed in are the backbone's
    unnormalised features: their norm is the quality proxy.
    """

    def __init__(self, in_features, out_features, *, margin=0.4, h=0.333, scale=64.0, t_alpha=0.01,
                 theta_policy="clip", device=None, dtype=None, **kw):
        _no_fixed_margins("AdaFace", kw)
        super().__init__(in_features, out_features, scale=scale, theta_policy=theta_policy, device=device,
                         dtype=dtype, **kw)
        if not 0.0 <= float(t_alpha) <= 1.0:
            raise ValueError(f"t_alpha must be in [0, 1] (the weight of the new batch in the running statistics), "
                             f"got {t_alpha}")
        self.margin, self.h, self.t_alpha = float(margin), float(h), float(t_alpha)
        stat = _statistics_dtype(dtype)
        self.register_buffer("batch_mean", torch.full((), 20.0, device=device, dtype=stat))
        self.register_buffer("batch_std", torch.full((), 100.0, device=device, dtype=stat))

    _statistics = ("batch_mean", "batch_std")

    def _margin_repr(self) -> str:
        return f"m1={self.options.m1}, m2=m3=per row"

    def row_margins(self, x, y):
        return M.adaface_margins(x, y != self.options.ignore_index, self.batch_mean, self.batch_std,
                                 margin=self.margin, h=self.h, t_alpha=self.t_alpha, update=self.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, margin={self.margin}, h={self.h}, t_alpha={self.t_alpha}")


class CurricularFace(_RunningStatistics, MarginSoftmaxHead):
    """CurricularFace (Huang et al., CVPR 2020, "CurricularFace: Adaptive Curriculum Learning Loss for
    Deep Face Recognition"): an ArcFace target (``m = 0.5``, the classic fall-back past π,
    ``theta_policy="threshold"``) and hard negatives (``c > f``) rewritten to ``c·(t + c)``, where ``t``
    is a running mean of the batch's target cosines: in training mode each call first moves
    ``t ← momentum·mean(c_y) + (1 − momentum)·t`` (non-ignored rows; no gradient through ``t`` or the
    mask), then uses it. Early in training ``t`` is near 0 and hard negatives count less than plain
    ones (easy samples first); as ``t`` grows they count more. ``t`` starts at 0 and is a buffer
    (in the ``state_dict``). The rewrite is quadratic, ``dg/dc = t + 2c``, fused in every backend.
    """

    def __init__(self, in_features, out_features, *, margin=0.5, scale=64.0, momentum=0.01, theta_policy="threshold",
                 device=None, dtype=None, **kw):
        _no_fixed_margins("CurricularFace", kw, ("t",))
        super().__init__(in_features, out_features, scale=scale, m2=margin, theta_policy=theta_policy,
                         negative="curricular", device=device, dtype=dtype, **kw)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (the weight of the new batch in t), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("t", torch.zeros((), device=device, dtype=_statistics_dtype(dtype)))

    _statistics = ("t",)

    def row_rewrite(self, x, y):
        if self.training:
            cos_y = M.target_cosines(x, self.weight, y, self.options.ignore_index, subcenters=self.options.subcenters)
            M.curricular_update(self.t, cos_y, y != self.options.ignore_index, self.momentum)
        return self.t

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}"


class MagFace(MarginSoftmaxHead):
    """MagFace (Meng et al., CVPR 2021, "MagFace: A Universal Representation for Face Recognition and
    Quality Assessment"): the angular margin grows with the embedding norm, and a regulariser pulls
    the norm of easy samples up, so that the norm measures quality.

    Per row, ``a = clamp(‖x‖, l_a, u_a)`` and ``m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m``: an
    ArcFace target ``cos(θ + m(a))``, kept at ``c`` on rows with ``c ≤ 0`` (``theta_policy="easy"``, as
    the authors' released trainers run ``MagLinear(easy_margin=True)``; ``"threshold"`` is their
    ``easy_margin=False`` branch). The loss is the softmax cross-entropy plus
    ``λ_g·mean g(a)`` with ``g(a) = a/u_a² + 1/a``, both with their gradient through ``a`` (the margin
    is a differentiable per-row tensor: the fused pass returns ``dL/dm`` from the label column).
    ``last_regularizer`` keeps the last batch's ``mean g(a)`` (detached). ``reduction`` applies to
    both terms ("sum": the regulariser is summed over the rows too; "none": per-row totals).
    """

    def __init__(self, in_features, out_features, *, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8,
                 lambda_g=35.0, scale=64.0, theta_policy="easy", **kw):
        _no_fixed_margins("MagFace", kw)
        super().__init__(in_features, out_features, scale=scale, theta_policy=theta_policy, **kw)
        if not 0 < float(l_a) < float(u_a):
            raise ValueError(f"MagFace needs 0 < l_a < u_a (the norm range), got l_a={l_a}, u_a={u_a}")
        self.l_a, self.u_a = float(l_a), float(u_a)
        self.l_margin, self.u_margin, self.lambda_g = float(l_margin), float(u_margin), float(lambda_g)
        self.last_regularizer: torch.Tensor | None = None

    def _margin_repr(self) -> str:
        return f"m1={self.options.m1}, m2=per row"

    def row_margins(self, x, y):
        a = M.magface_norms(x, self.l_a, self.u_a)
        return M.magface_margins(a, self.l_a, self.u_a, self.l_margin, self.u_margin), 0.0

    def forward(self, embeddings, labels):
        loss, stats = self._loss_and_stats(embeddings, labels)
        self._record(labels, stats)
        valid = labels != self.options.ignore_index
        g = M.magface_regularizer(M.magface_norms(embeddings, self.l_a, self.u_a), self.u_a).to(loss.dtype)
        reg = R_reduce(g, valid, self.options.reduction)
        self.last_regularizer = R_reduce(g, valid, "mean").detach()
        return loss + self.lambda_g * reg

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, l_a={self.l_a}, u_a={self.u_a}, l_margin={self.l_margin}, "
                f"u_margin={self.u_margin}, lambda_g={self.lambda_g}")


class SubCenterArcFace(MarginSoftmaxHead):
    """Sub-center ArcFace (Deng et al., ECCV 2020, "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces"): ``k`` sub-centres per class (``weight`` of ``[C·k, D]``, class
    ``j``'s at rows ``j·k … j·k + k − 1``); a class's cosine is the largest over its sub-centres,
    taken inside the fused tile loop (no ``[B, C·k]`` tensor), and the gradient goes to that
    sub-centre. ArcFace target, s = 64, m = 0.5.

    The paper's cleaning step, after training: accumulate :meth:`nearest_counts` over the dataset,
    then :meth:`drop_non_dominant` gives a one-centre :class:`ArcFace` head on each class's dominant
    sub-centre (the one most of its samples are nearest to), and :meth:`keep_mask` flags the samples
    within ``max_angle`` (75° in the paper) of their class's dominant sub-centre.
    """

    def __init__(self, in_features, out_features, *, k=3, margin=0.5, scale=64.0, **kw):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (sub-centres per class; weight then has out_features·k rows), "
                             f"got k={k!r}")
        if "subcenters" in kw:
            raise TypeError("SubCenterArcFace takes the number of sub-centres as k=, not subcenters=")
        super().__init__(in_features, out_features, scale=scale, m2=margin, subcenters=k, **kw)
        self.k = self.options.subcenters

    def _label_cosines(self, x, y):
        """``[B, k]`` cosines of each row with its label's sub-centres (0 on ignored rows)."""
        valid = y != self.options.ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y)).long()
        rows = y_safe[:, None] * self.k + torch.arange(self.k, device=y.device)
        dt = torch.promote_types(x.dtype, torch.float32)
        xn = torch.nn.functional.normalize(x.detach().to(dt), dim=1)
        wn = torch.nn.functional.normalize(self.weight.detach()[rows].to(dt), dim=2)
        return torch.einsum("bd,bkd->bk", xn, wn) * valid[:, None]

    @torch.no_grad()
    def nearest_counts(self, embeddings, labels, counts=None):
        """``counts [C, k]`` (int64) += for each row, one at its label's nearest sub-centre; pass the
        returned tensor back in over the batches of a dataset. O(B·k·D)."""
        self._check(embeddings, labels, self.options.ignore_index)
        if counts is None:
            counts = torch.zeros(self.out_features, self.k, dtype=torch.long, device=self.weight.device)
        valid = labels != self.options.ignore_index
        near = self._label_cosines(embeddings, labels).argmax(dim=1)
        y_safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        counts.view(-1).index_add_(0, y_safe * self.k + near, valid.to(torch.long))
        return counts

    @torch.no_grad()
    def drop_non_dominant(self, counts) -> "ArcFace":
        """A one-centre :class:`ArcFace` head (same scale, margin, options and backend) whose class ``j``
        is this head's dominant sub-centre of ``j``: the largest of ``counts[j]`` (the first on ties)."""
        dominant = self.dominant(counts)
        o = self.options
        head = ArcFace(self.in_features, self.out_features, scale=o.scale, margin=self.m2, theta_policy=o.theta_policy,
                       grad_mode=o.grad_mode, reduction=o.reduction, ignore_index=o.ignore_index,
                       interclass_threshold=o.interclass_threshold, backend=self.backend,
                       device=self.weight.device, dtype=self.weight.dtype)
        rows = torch.arange(self.out_features, device=self.weight.device) * self.k + dominant
        head.weight.copy_(self.weight[rows])
        return head

    def dominant(self, counts) -> torch.Tensor:
        """The dominant sub-centre of each class ``[C]`` from :meth:`nearest_counts`' counts."""
        if counts.shape != (self.out_features, self.k):
            raise ValueError(f"counts must be [C={self.out_features}, k={self.k}] (from nearest_counts), "
                             f"got shape {tuple(counts.shape)}")
        return counts.argmax(dim=1)

    @torch.no_grad()
    def keep_mask(self, embeddings, labels, counts, max_angle=75.0) -> torch.Tensor:
        """``[B]`` bool: rows within ``max_angle`` degrees of their class's dominant sub-centre (the
        paper's threshold for high-confidence noise is 75°); ignored rows are False."""
        self._check(embeddings, labels, self.options.ignore_index)
        valid = labels != self.options.ignore_index
        cos = self._label_cosines(embeddings, labels)
        y_safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        dom = self.dominant(counts)[y_safe]
        c = cos.gather(1, dom[:, None]).squeeze(1)
        return valid & (c >= math.cos(math.radians(float(max_angle))))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
