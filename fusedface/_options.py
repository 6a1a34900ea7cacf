"""Validated, frozen option records shared by every backend.

Non-tensor options travel through the stack as one small frozen dataclass (the habit of Cut
Cross-Entropy) instead of a dozen positional arguments. Construction validates every field, so a
typo in a policy name or a negative scale fails at the public boundary with a message that names
the argument and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

THETA_POLICIES = ("none", "threshold", "easy", "clip")
NEGATIVE_REWRITES = ("none", "sv", "mv_fixed", "mv_adaptive", "curricular")
GRAD_MODES = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")
    return value


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class MarginOptions:
    """Options of the margin-softmax family (SPEC §2) that are not per-row tensors."""

    scale: float = 64.0
    m1: float = 1.0
    theta_policy: str = "none"
    negative: str = "none"
    t: float = 0.0
    grad_mode: str = "exact"
    reduction: str = "mean"
    ignore_index: int = -1
    interclass_threshold: float | None = None
    subcenters: int = 1

    def __post_init__(self):
        object.__setattr__(self, "scale", _finite("scale", self.scale))
        if self.interclass_threshold is not None:
            thr = _finite("interclass_threshold", self.interclass_threshold)
            if not -1.0 <= thr <= 1.0:
                raise ValueError(f"interclass_threshold must be a cosine in [-1, 1] (InsightFace uses 0.2-0.4), or None "
                                 f"to keep every negative, got {thr}")
            object.__setattr__(self, "interclass_threshold", thr)
        if isinstance(self.subcenters, bool) or not isinstance(self.subcenters, int) or self.subcenters < 1:
            raise ValueError(f"subcenters must be an int >= 1 (sub-centres per class; W then has C·subcenters rows), "
                             f"got {self.subcenters!r}")
        object.__setattr__(self, "m1", _finite("m1", self.m1))
        object.__setattr__(self, "t", _finite("t", self.t))
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0 (the logit scale s, 64 for ArcFace), got {self.scale}")
        _choice("theta_policy", self.theta_policy, THETA_POLICIES)
        _choice("negative", self.negative, NEGATIVE_REWRITES)
        _choice("grad_mode", self.grad_mode, GRAD_MODES)
        _choice("reduction", self.reduction, REDUCTIONS)
        if self.negative == "sv" and self.t < 1:
            raise ValueError(f"t must be >= 1 for negative='sv' (SV-Softmax uses t >= 1), got {self.t}")
        if self.negative in ("mv_fixed", "mv_adaptive") and self.t < 0:
            raise ValueError(f"t must be >= 0 for negative={self.negative!r}, got {self.t}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")

    @property
    def rewrite(self) -> tuple[float, float]:
        """(a, b) of the support-vector rewrite g = a·c + b (SPEC §2 table); (1, 0) for none."""
        t = self.t
        return {
            "none": (1.0, 0.0),
            "sv": (t, t - 1.0),
            "mv_fixed": (1.0, t),
            "mv_adaptive": (t + 1.0, t),
            "curricular": (0.0, 0.0),
        }[self.negative]

    @property
    def rewrite3(self) -> tuple[float, float, float]:
        """``(q, a, b)`` of the general support-vector rewrite ``g = (q·c + a + t_b)·c + b`` (slope
        ``2q·c + a + t_b``), ``t_b`` the per-row tensor of CurricularFace (``g = c·(t_b + c)``: q = 1,
        a = b = 0); ``q = 0`` and ``(a, b) =`` :attr:`rewrite` for the affine rewrites of SPEC §2."""
        if self.negative == "curricular":
            return (1.0, 0.0, 0.0)
        return (0.0,) + self.rewrite

    @property
    def filter_threshold(self) -> float:
        """The inter-class filtering threshold the kernels compare clamped cosines with: 2.0 (never
        exceeded) when filtering is off, or at 1.0 (no clamped cosine exceeds 1: nothing is filtered)."""
        return 2.0 if not self.filters else self.interclass_threshold

    @property
    def filters(self) -> bool:
        """Whether inter-class filtering can drop a negative: a threshold below 1 (the filter is strict,
        ``c > threshold``, on cosines clamped to ``[-1, 1]``)."""
        return self.interclass_threshold is not None and self.interclass_threshold < 1.0

    @property
    def seed_family(self) -> bool:
        """Whether these options stay inside the seed losses' family (what the Triton step covers):
        no clip policy, no quadratic rewrite, no inter-class filtering, one centre per class."""
        return (self.theta_policy != "clip" and self.negative != "curricular" and not self.filters
                and self.subcenters == 1)


@dataclass(frozen=True)
class NPTOptions:
    """Options of NPT-Loss (SPEC §4)."""

    delta: float = 0.5
    k: int = 1
    r: float = 1.0
    reduction: str = "mean"
    ignore_index: int = -1

    def __post_init__(self):
        object.__setattr__(self, "delta", _finite("delta", self.delta))
        object.__setattr__(self, "r", _finite("r", self.r))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1 (the number of nearest negative proxies), got {self.k!r}")
        if self.k > 16:
            raise ValueError(f"k={self.k} is larger than 16, the largest top-k the fused backends stream; use k <= 16")
        _choice("reduction", self.reduction, REDUCTIONS)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
