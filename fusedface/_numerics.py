"""Low-level numerics shared by the fused path (engine, backends, margin sources, heads, sharded path).

Nothing here imports another fusedface module, so every layer may use it. The oracle
(:mod:`fusedface.reference`) does not: it states the same constants from SPEC §1 on its own.
"""
from __future__ import annotations

import torch

EPS_NORM = 1e-12  # x̂ = x / max(‖x‖, EPS_NORM), as F.normalize (SPEC §1)
EPS_SIN2 = 1e-12  # floor under 1 − c² in the exact slope of the target transform (SPEC §2)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the accumulation type of every fused backend."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_margin(m, B: int, device, dtype) -> torch.Tensor:
    """A margin (float or per-row tensor) as a detached per-row vector ``[B]`` in ``dtype``: always a
    new tensor, never a view of ``m`` (the fused op saves it for the backward, and a running buffer
    such as CurricularFace's ``t`` is updated in place by the next call)."""
    if isinstance(m, torch.Tensor):
        out = torch.empty((B,), dtype=dtype, device=device)
        return out.copy_(m.detach().expand(B))
    return torch.full((B,), float(m), dtype=dtype, device=device)


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` over the rows that are not ignored (0 when all are), ``"sum"``, or ``"none"``
    (ignored rows 0). No host synchronisation."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def nonfinite_centres(W: torch.Tensor, winv: torch.Tensor) -> torch.Tensor:
    """Per row of ``W``: whether the centre holds a NaN or an Inf (its ``winv`` is NaN, or an entry is
    infinite), i.e. whether the reference's ``F.normalize`` makes it NaN. A finite row whose norm
    overflows (``winv = 0``) is not one: the reference normalises it to a finite vector. O(C·D) reads,
    O(C) memory: the max-abs norm per row is a reduction (``torch.isinf(W).any(1)`` would build a
    ``[C, D]`` bool and an fp32 ``|W|``, 1.25× the size of an fp32 ``W``, at every step)."""
    return torch.isnan(winv) | torch.isinf(torch.linalg.vector_norm(W, ord=float("inf"), dim=1))


def inverse_norms(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 / max(‖row‖, EPS_NORM)`` per row, in ``dtype`` (O(rows), no normalised copy kept)."""
    return 1.0 / torch.linalg.vector_norm(t, dim=1, dtype=dtype).clamp(min=EPS_NORM)
