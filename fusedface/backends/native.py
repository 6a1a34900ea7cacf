"""``backend="native"``: the tile-kernel protocol (:mod:`fusedface.backends`) in C++ (``csrc/``).

Importing this module needs the compiled ``fusedface._C`` (the registry treats an ImportError as
"not built"); it registers the dispatcher ops

* ``fusedface::native_margin_forward(x, W, xinv, winv, y, f, scale, a, b, tile, keep_block, bf16_gemm=0,``
  ``q=0., rt=None, thr=2., K=1) -> (lse, pred, sv, block)``
* ``fusedface::native_margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, block?, scale, a, b, tile,``
  ``need_dx, need_dW, fast_grad, bf16_gemm=0, q=0., rt=None, thr=2., K=1) -> (Gx, dW)``
* ``fusedface::native_npt_forward(x, W, xinv, winv, y, k, tile) -> (values, index)``

with CPU kernels (and CUDA kernels when ``fusedface._C`` was built with them), and adds their fake
(shape-only) kernels here, so ``torch.compile`` traces through them. The functions below have
exactly the signatures and return dtypes of :mod:`fusedface.backends.torch`. This backend alone
``KEEPS_BLOCK``: asked by the engine (``keep_block=True``, what
:func:`fusedface.functional.margin_softmax_loss_kept_block` does), its forward hands the ``[C, B]``
block of cosines to the backward, which then skips its recomputing GEMM.

``tile`` (the engine's memory-budget tile width) is an upper bound: the CPU code picks the width
that keeps one tile buffer in a core's cache (``docs/native.md``).

``MARGIN_EXTENSIONS``: the kernels take the general rewrite ``g = (q·c + a + t_b)·c + b`` with a
per-row ``rt`` (CurricularFace), inter-class filtering (``thr``, 2.0 = off) and ``K`` sub-centres per
class (``W`` is ``[C·K, D]``; the CPU code reduces each tile's ``C·K`` products to the classes' maxima
and their arg-max rows, and sends each class's gradient back to its arg-max row; ``keep_block`` is
refused with ``K > 1``, and the bf16-GEMM mode falls back to exact products there). The seed losses
(q = 0, no ``rt``, no filter, K = 1) run the same loops as before.

Environment:

* ``FUSEDFACE_NATIVE_PRECISION=bf16``: with bf16 ``x`` and ``W`` on CPU, every tile GEMM is a plain
  bf16 GEMM with bf16 output (fp32 accumulation inside), as ``torch.mm`` of bf16 tensors and an
  autocast pipeline are: the cosines are rounded to bf16 (2⁻⁹ relative; at s = 64 a logit moves by up
  to 0.125), the epilogues still compute in fp32 from them and the gradients accumulate across tiles
  in fp32; includes ``FAST_GRAD`` below. About the precision of plain bf16 PyTorch, at about the speed
  of its four bf16 ``torch.mm`` products. Default ``fp32`` (fp32-grade cosines). Ignored on CUDA, for
  other dtypes, for NPT and by the kept-block variant's forward (its block holds fp32 cosines).
* ``FUSEDFACE_NATIVE_FAST_GRAD=1``: with bf16 ``x`` and ``W`` on CPU, the two gradient GEMMs of the
  backward are bf16 GEMMs (``dℓ/dc`` and ``x̂`` rounded to bf16, each tile's partial product rounded
  to bf16, accumulated in fp32), about twice as fast as the fp32 ones; gradients about twice the
  default's error, like autocast training. Default ``0`` keeps fp32-grade gradients (the contract of
  the other backends). Ignored on CUDA and for other dtypes.
* ``FUSEDFACE_NATIVE_ONEDNN=0``: fp32 tile GEMMs through ``at::mm`` (MKL/OpenBLAS) instead of oneDNN.
* ``FUSEDFACE_NATIVE_TILE_BYTES`` (default 524288; in the bf16-GEMM mode 512 KiB × clamp(512 // D, 1, 4),
  up to 2 MiB), ``FUSEDFACE_NATIVE_ROW_BLOCK`` (default 1024):
  the per-worker tile buffer and the rows per GEMM; ``FUSEDFACE_NATIVE_ONEDNN_BF16=0`` keeps even
  the exact bf16 products on the fp32 GEMM.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .. import _C  # noqa: F401  (loads the library: registers the fusedface::native_* ops)
from .._env import env_choice, env_flag

name = "native"
KEEPS_BLOCK = True
MARGIN_EXTENSIONS = True  # the curricular rewrite, inter-class filtering and sub-centres (docs/engine.md)

_OPS = torch.ops.fusedface


def build_info() -> dict:
    """What this build contains: ``{"cpu": "<code path>; threads …", "cuda": bool}``."""
    return dict(_C.build_info())


def cuda_built() -> bool:
    """Whether ``fusedface._C`` was compiled with its CUDA kernels."""
    return bool(_C.WITH_CUDA)


def supports_device(device) -> bool:
    """CPU always; CUDA when the CUDA kernels were built (and torch can see a GPU)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return cuda_built() and torch.cuda.is_available()
    return False


def fast_grad() -> int:
    """1 when ``FUSEDFACE_NATIVE_FAST_GRAD`` is on (default off)."""
    return int(env_flag("FUSEDFACE_NATIVE_FAST_GRAD", False))


def bf16_gemm() -> int:
    """1 when ``FUSEDFACE_NATIVE_PRECISION=bf16`` (the bf16-GEMM mode), 0 for ``fp32`` (default)."""
    return int(env_choice("FUSEDFACE_NATIVE_PRECISION", ("fp32", "default", "bf16"), "fp32") == "bf16")


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), without which a bf16 GEMM
    is slower than an fp32 one (torch converts and falls back to a reference loop)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a probe missing or failing in this torch build: assume no
            pass
    return False


def _bf16_modes(x, W) -> tuple[int, int]:
    """``(fast_grad, bf16_gemm)`` for this call: the switches apply to bf16 ``x`` and ``W`` only,
    and warn (once per process) where this CPU makes them slower instead of faster."""
    modes = fast_grad(), bf16_gemm()
    if x.dtype == W.dtype == torch.bfloat16 and any(modes) and not cpu_has_bf16_matmul():
        var = "FUSEDFACE_NATIVE_PRECISION=bf16" if modes[1] else "FUSEDFACE_NATIVE_FAST_GRAD"
        warnings.warn(f"{var}: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so its bf16 GEMMs are "
                      "several times slower than fp32 ones (4-10x measured on an AVX2 machine) and this mode makes "
                      "the native backend slower here; unset it (docs/native.md, \"Precision\")", RuntimeWarning,
                      stacklevel=2)
    return modes


# ------------------------------------------------------------------ fake kernels (torch.compile)

@torch.library.register_fake("fusedface::native_margin_forward")
def _margin_forward_fake(x, W, xinv, winv, y, f, scale, a, b, tile, keep_block, bf16_gemm=0, q=0.0, rt=None, thr=2.0,
                         K=1):
    B, C = x.shape[0], W.shape[0] // K
    block = f.new_empty((C, B)) if keep_block else f.new_empty((0,))
    return f.new_empty((B,)), y.new_empty((B,)), y.new_empty((B,), dtype=torch.int32), block


@torch.library.register_fake("fusedface::native_margin_backward")
def _margin_backward_fake(x, W, xinv, winv, y, f, lse, gl, dcy, block, scale, a, b, tile, need_dx, need_dW,
                          fast_grad, bf16_gemm=0, q=0.0, rt=None, thr=2.0, K=1):
    gx = f.new_empty(x.shape) if need_dx else f.new_empty((0,))
    dw = W.new_empty(W.shape) if need_dW else W.new_empty((0,))
    return gx, dw


@torch.library.register_fake("fusedface::native_npt_forward")
def _npt_forward_fake(x, W, xinv, winv, y, k, tile):
    B = x.shape[0]
    return xinv.new_empty((B, k)), y.new_empty((B, k))


# ------------------------------------------------------------------ the three tile kernels

def _extensions(opts, rt):
    """``(q, a, b, rt, thr, K)`` of the ops from ``opts`` (``rt`` only where a rewrite is applied, as
    in the ``torch`` backend: with ``negative="none"`` the cosines are kept)."""
    q, a, b = opts.rewrite3
    rt = rt if opts.negative != "none" else None
    return float(q), float(a), float(b), rt, float(opts.filter_threshold), int(opts.subcenters)


def margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False, rt=None):
    """``keep_block``: also return the forward's ``[C, B]`` block of cosines (accumulation dtype) for
    :func:`margin_backward`; that forward runs fp32-grade products (the bf16-GEMM mode is off).
    ``rt``: the per-row ``t_b`` of the general rewrite (``negative="curricular"``), or None."""
    q, a, b, rt, thr, K = _extensions(opts, rt)
    lse, pred, sv, block = _OPS.native_margin_forward(x, W, xinv, winv, y, f, float(opts.scale), a, b, int(tile),
                                                      int(bool(keep_block)), 0 if keep_block else _bf16_modes(x, W)[1],
                                                      q, rt, thr, K)
    return lse, pred, sv, (block if keep_block else None)


def margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None, rt=None):
    """``block``: the kept cosines of :func:`margin_forward` (read as they are), or None to recompute."""
    q, a, b, rt, thr, K = _extensions(opts, rt)
    Gx, dW = _OPS.native_margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, block, float(opts.scale), a, b,
                                         int(tile), int(bool(need_dx)), int(bool(need_dW)), *_bf16_modes(x, W),
                                         q, rt, thr, K)
    return (Gx if need_dx else None), (dW if need_dW else None)


def npt_forward(x, W, xinv, winv, y, k, tile):
    return _OPS.native_npt_forward(x, W, xinv, winv, y, int(k), int(tile))


DEFAULT_BLOCK_BUDGET = 256 * 2**20  # bytes of the kept [C, B] block


def block_fits(B: int, C: int, dtype: torch.dtype, budget: int | None = None) -> bool:
    """Whether the ``[C, B]`` block of cosines (accumulation dtype) fits ``budget`` bytes."""
    budget = DEFAULT_BLOCK_BUDGET if budget is None else int(budget)
    elt = 8 if dtype == torch.float64 else 4
    return B * C * elt <= budget


__all__ = ["name", "KEEPS_BLOCK", "MARGIN_EXTENSIONS", "supports_device", "margin_forward", "margin_backward", "npt_forward", "build_info",
           "bf16_gemm", "cuda_built", "block_fits", "DEFAULT_BLOCK_BUDGET"]
