"""``nn.Module`` heads: each holds the class centres ``W`` as a ``[C, D]`` parameter and its margin
state, and calls :mod:`fusedface.functional` with any backend.

``head(embeddings, labels) -> loss``. After each call the head keeps the last batch's statistics
from the fused pass, as tensors (no host synchronisation): ``last_accuracy`` (arg-max of the
cosines equals the label, over non-ignored rows) and ``last_sv_fraction`` (rows with at least one
support vector, i.e. a negative whose cosine beats the margin-bent target, over non-ignored rows).
"""
from __future__ import annotations


import torch
from torch import nn

from . import backends
from . import functional as FF
from . import margins as M
from .optim import mark_head_weight
from .otface import ot_triplet_loss
from ._options import MarginOptions, NPTOptions
from ._validate import check_embeddings_and_centres, check_labels

__all__ = [
    "MarginSoftmaxHead", "ArcFace", "CosFace", "CombinedMargin", "SphereFace", "ElasticArcFace",
    "ElasticCosFace", "KappaFace", "SVSoftmax", "MVSoftmax", "NPT", "OTFace",
]


class _ClassCentres(nn.Module):
    """Shared part of every head: ``weight [C, D]``, backend choice and the last statistics."""

    def __init__(self, in_features: int, out_features: int, *, backend="auto", device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.backend = backend
        if isinstance(backend, str) and backend in backends.FUSED:
            backends.load(backend)  # imported now, eagerly: a step compiled later finds it (Dynamo does not import)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
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
                 ignore_index=-1, backend="auto", device=None, dtype=None):
        super().__init__(in_features, out_features, backend=backend, device=device, dtype=dtype)
        self.options = MarginOptions(scale=scale, m1=m1, theta_policy=theta_policy, negative=negative, t=t,
                                     grad_mode=grad_mode, reduction=reduction, ignore_index=ignore_index)
        self.m2 = float(m2)
        self.m3 = float(m3)

    def row_margins(self, x: torch.Tensor, y: torch.Tensor):
        """``(m2, m3)`` for this batch: floats, or per-row tensors ``[B]``."""
        return self.m2, self.m3

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(embeddings, labels, self.options.ignore_index)
        m2, m3 = self.row_margins(embeddings, labels)
        loss, stats = FF.margin_softmax_with_stats(embeddings, self.weight, labels, self.options, m2, m3,
                                                   backend=self.backend, checked=True)
        self._record(labels, stats)
        return loss

    def extra_repr(self) -> str:
        o = self.options
        s = (f"{super().extra_repr()}, scale={o.scale}, m1={o.m1}, m2={self.m2}, m3={self.m3}, "
             f"theta_policy={o.theta_policy!r}, grad_mode={o.grad_mode!r}")
        if o.negative != "none":
            s += f", negative={o.negative!r}, t={o.t}"
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


class KappaFace(MarginSoftmaxHead):
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
