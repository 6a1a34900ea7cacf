"""Checks at the public boundary: every message names the argument and says how to fix it.

Checks that need a value from the device (labels in range, finite embeddings) cost a host
synchronisation on a GPU. They always run on CPU tensors (where they are free) and run on GPU
tensors only when :func:`fusedface.set_input_checks` turned them on, so the default GPU hot path
never synchronises. Under ``torch.compile`` the same value checks become ``torch._assert_async``
(a check inside the compiled graph, no graph break): the error then carries the message without
the offending row, which eager mode adds.

Mixed floating dtypes (say fp16 embeddings and fp32 centres) are accepted: every backend computes
in fp32 (fp64 when either input is fp64), the loss comes back in that dtype, and each gradient
comes back in its own input's dtype (docs/guarantees.md).
"""
from __future__ import annotations

import math

import torch


_CHECKS = {"enabled": False}


def set_input_checks(enabled: bool) -> None:
    """Turn on (or off) the value checks that synchronise with a GPU: labels in range and
    finite embeddings/centres. On CPU tensors labels are always checked."""
    _CHECKS["enabled"] = bool(enabled)


def input_checks_enabled() -> bool:
    return _CHECKS["enabled"]


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_UNSIGNED = tuple(getattr(torch, n) for n in ("uint8", "uint16", "uint32", "uint64") if hasattr(torch, n))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _fail_if_any(bad: torch.Tensor, message: str, detail=None) -> None:
    """Raises ``ValueError(message + detail())`` when ``bad`` holds a True (a host sync in eager
    mode; under ``torch.compile`` an assertion inside the graph instead of a graph break)."""
    if _compiling():
        torch._assert_async(~bad.any(), message)
        return
    if bool(bad.any()):
        raise ValueError(message + (detail() if detail is not None else ""))


def check_embeddings_and_centres(x: torch.Tensor, W: torch.Tensor, *, allow_empty_batch: bool = False) -> None:
    """Types, shapes, dtypes and devices of ``x [B, D]`` and ``W [C, D]`` (and, with input checks
    on, finite values). ``allow_empty_batch``: a rank of a sharded head may hold no rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x (embeddings) must be a torch.Tensor of shape [B, D], got {type(x).__name__}")
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W (class centres) must be a torch.Tensor of shape [C, D], got {type(W).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x (embeddings) must be 2-D [B, D], got shape {tuple(x.shape)}; flatten the backbone output first")
    if W.dim() != 2:
        raise ValueError(
            f"W (class centres) must be 2-D [C, D] with one row per class, got shape {tuple(W.shape)}")
    if x.shape[1] != W.shape[1]:
        hint = ""
        if W.shape[0] == x.shape[1]:
            hint = " (W looks like [D, C], the pytorch-metric-learning layout: pass W.t())"
        raise ValueError(
            f"x has D={x.shape[1]} features but W has D={W.shape[1]} columns; W must be [C, D]{hint}")
    if x.shape[0] == 0 and not allow_empty_batch:
        raise ValueError("x (embeddings) is an empty batch (B = 0); pass at least one row")
    if W.shape[0] == 0:
        raise ValueError("W (class centres) has no classes (C = 0)")
    if x.shape[1] == 0:
        raise ValueError("x and W have no features (D = 0); embeddings need at least one dimension")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x (embeddings) must be floating point (fp16, bf16, fp32 or fp64), got {x.dtype}")
    if W.dtype not in _FLOATS:
        raise TypeError(f"W (class centres) must be floating point (fp16, bf16, fp32 or fp64), got {W.dtype}")
    if x.device != W.device:
        raise ValueError(f"x is on {x.device} but W is on {W.device}; move both to the same device")
    if input_checks_enabled():
        _fail_if_any(~torch.isfinite(x), "x (embeddings) holds NaN or Inf values (input checks are on); "
                     "check the backbone (or its fp16 overflow) upstream of the loss")
        _fail_if_any(~torch.isfinite(W), "W (class centres) holds NaN or Inf values (input checks are on); "
                     "a diverged optimiser step or a bad checkpoint wrote them")


def check_label_tensor(y: torch.Tensor, B: int, device: torch.device) -> None:
    """Type, shape, dtype and device of the labels (no look at their values)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y (labels) must be a torch.Tensor of shape [B], got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != B:
        raise ValueError(f"y (labels) must be 1-D of length B={B}, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(f"y (labels) must be an integer tensor (torch.long), got {y.dtype}; use y.long()")
    if y.dtype in _UNSIGNED:
        # ``y != -1`` on a uint8 tensor compares with 255: a label 255 would silently be ignored
        raise TypeError(f"y (labels) must be a signed integer tensor, got {y.dtype}, which cannot hold "
                        "ignore_index=-1 (a label of 255 would read as ignored); use y.long()")
    if y.device != device:
        raise ValueError(f"y (labels) is on {y.device} but x is on {device}; move the labels with y.to(x.device)")


def check_labels(y: torch.Tensor, B: int, C: int, ignore_index: int, device: torch.device) -> None:
    """:func:`check_label_tensor`, then every label other than ``ignore_index`` in ``[0, C)``
    (always on CPU tensors; on GPU tensors when input checks are on)."""
    check_label_tensor(y, B, device)
    if y.device.type == "cpu" or input_checks_enabled():
        bad = (y != ignore_index) & ((y < 0) | (y >= C))

        def detail():
            i = int(bad.nonzero()[0, 0])
            return f": {int(bad.sum())} of them, first at row {i}: {int(y[i])}"

        _fail_if_any(bad, f"y (labels) holds value(s) outside [0, C={C}) that are not "
                     f"ignore_index={ignore_index}; labels index the rows of W", detail)


def check_row_margin(name: str, m, B: int, device: torch.device):
    """A margin is a float (broadcast) or a per-row tensor of length B."""
    if isinstance(m, torch.Tensor):
        if m.dim() > 1 or (m.dim() == 1 and m.shape[0] != B):
            raise ValueError(f"{name} as a tensor must be per-row, shape [B={B}], got shape {tuple(m.shape)}")
        if not m.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
        if m.device != device and m.dim() == 1:
            raise ValueError(f"{name} is on {m.device} but x is on {device}; move it to x's device")
        if m.device.type == "cpu" or input_checks_enabled():  # (free on CPU, a sync on GPU: opt-in there)
            _fail_if_any(~torch.isfinite(m.detach()), f"{name} holds NaN or Inf; margins must be finite")
        if m.device != device and m.device.type == "cpu" and not _compiling():
            return float(m)  # a 0-dim CPU margin for tensors elsewhere: a scalar (free), not a blocking copy
        return m
    if isinstance(m, (bool, str, bytes)):
        raise TypeError(f"{name} must be a float or a Tensor[B], got {type(m).__name__} {m!r}")
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or a Tensor[B], got {type(m).__name__}") from None
    if not _compiling() and not math.isfinite(m):  # (under torch.compile a margin schedule is symbolic)
        raise ValueError(f"{name} must be finite, got {m}")
    return m


def check_subcenters(W, K: int) -> int:
    """The class count ``C`` of a ``W`` with ``K`` sub-centres per class (``[C·K, D]``)."""
    rows = W.shape[0] if isinstance(W, torch.Tensor) and W.dim() == 2 else None
    if rows is not None and K > 1 and rows % K:
        raise ValueError(f"W (class centres) has {rows} rows, not a multiple of subcenters={K}: with K sub-centres per "
                         "class W is [C·K, D], class j's sub-centres at rows j·K … j·K + K − 1")
    return rows // K if rows is not None else rows


def check_row_margins(m2, m3, B: int, device: torch.device):
    """``(m2, m3)``, each checked by :func:`check_row_margin`."""
    return check_row_margin("m2", m2, B, device), check_row_margin("m3", m3, B, device)
