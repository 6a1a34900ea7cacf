"""``backend="triton"``: the Triton backend's module, and its margin-softmax training step at four
GEMM-equivalents.

The backend implements the tile-kernel protocol of :mod:`fusedface.backends` with the kernels of
:mod:`fusedface.backends.triton_tiles` (re-exported here), and the protocol's optional whole step
(``step_applies``/``margin_step``): the launcher of ``triton_kernels/margin_step.py``, which the
engine runs instead of its own route for the margin-softmax family wherever it applies. One
registered op per pass, six kernel launches per forward + backward, no host synchronisation:

``fusedface::triton_step_fwd``  prologue → forward → merge → reduction   (4 launches)
``fusedface::triton_step_bwd``  dW (class-stationary, one recompute) → dL/dx   (2 launches)

Paths (``docs/perf.md`` has the design, its roofline and the estimates):

* ``"fused"`` — 16-bit ``x`` with ``W`` of the same dtype, or with an fp32 ``W`` (mixed precision: the
  ``W`` tiles are rounded in registers), when the feature axis fits one register tile
  (``next_pow2(D) <= 512``). Tensor-core work: the forward's logits and its numerator for ``dL/dx``,
  the backward's recompute and ``dW`` product — four GEMM-equivalents.
* ``"hybrid"`` — fp32 inputs (and anything the fused kernels do not take: ``D > 512``, or mixed dtypes
  with ``FUSEDFACE_TRITON_MIXED=32``): class chunks whose four products run through cuBLAS
  (``torch.mm``/``addmm``) into a bounded ``[B, chunk]`` fp32 buffer, with one fused Triton epilogue
  pass per chunk and direction. cuBLAS follows ``torch.backends.cuda.matmul.allow_tf32`` as every fp32
  matmul of PyTorch does.
* fp64 inputs, ``FUSEDFACE_TRITON_PATH=legacy``, the sharded heads and NPT keep the earlier
  three-kernel design (``fusedface/backends/triton_tiles.py``) through the engine.

In-backward optimizer (``fusedface.optim``, ``STEP_IN_BACKWARD``): with ``optim_token`` the backward
applies the optimizer's update instead of returning ``dL/dW`` — in the dW kernel's epilogue (fused,
launched after ``dL/dx``), per class chunk with ``optim_update_kernel`` (hybrid), or through
``Update.apply`` per slice where the kernels do not cover it (docs/triton.md).

Environment (read at each call):

* ``FUSEDFACE_TRITON_PATH=auto|fused|hybrid|legacy`` — force a path (``fused`` where it applies).
* ``FUSEDFACE_TRITON_SPLIT_GRAD=1`` — opt-in ``hi + lo`` split of every gradient product (two dots).
* ``FUSEDFACE_TRITON_MIXED=16|32`` — mixed dtypes (16-bit ``x``, fp32 ``W``) run the 16-bit tensor-core
  path (``16``, default, as ``F.linear`` under autocast) or fp32 products (``32``, the hybrid).
* ``FUSEDFACE_TRITON_HYBRID_MB`` — the hybrid's chunk buffer in MiB (default 32: L2-sized).

Autocast: inside ``torch.autocast`` (CUDA; CPU too, for the interpreter) with a 16-bit dtype, an fp32
``x`` is cast to that dtype before the op (autograd carries the cast's gradient back to fp32) and ``W``
is left as it is — the fused mixed path converts its tiles in registers; ``dW`` comes back in fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch
import triton

from .. import _inbackward
from .._env import env_choice, env_flag, triton_interpreted
from .._numerics import inverse_norms
from ..triton_kernels import margin_step as K
from .triton_tiles import LaunchConfig, _n_splits, arch_of
from .triton_tiles import margin_backward, margin_forward, npt_forward  # noqa: F401  (the tile-kernel protocol)
from .triton_tiles import MARGIN_EXTENSIONS  # noqa: F401  (rt, inter-class filtering, sub-centres: issue 16)

name = "triton"
KEEPS_BLOCK = False
STEP_IN_BACKWARD = True  # margin_step takes optim_token: the step's backward applies fusedface.optim's update


def supports_device(device) -> bool:
    """CUDA tensors; CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for testing)."""
    return torch.device(device).type == "cuda" or triton_interpreted()

C_ = LaunchConfig
# (arch, kernel) -> block sizes. block_d is the widest feature tile the kernel holds (the fused
# path needs next_pow2(D) <= it). Checked for spills, shared memory and warpgroup MMA by
# bench/check_triton_compile.py (docs/triton.md has the table).
STEP_CONFIGS: dict[tuple[str, str], LaunchConfig] = {
    # sm_90: the forward's fp32 numerator E [64, 512] takes half the register file, so the class tile
    # is 16 wide (wgmma m64n16); grad_t on the forward = both products transposed (T_DOT); resident on the
    # forward = x's row block loaded once (X_RES: 128 FLOP per byte of W instead of ~22, but 328 bytes of
    # spills at 16-class tiles on sm_90 with triton 3.9, so not shipped; docs/perf.md)
    ("sm90", "fwd"): C_(64, 16, 64, 512, num_warps=8, num_stages=2, resident=False),
    ("sm90", "fwd_mixed"): C_(64, 16, 64, 512, num_warps=8, num_stages=1, resident=False),
    # dW: 32-class tiles with W streamed in K chunks and x's row block cached in L1 for the gradient
    # product (254 registers, 0 spills); keeping the W tile resident fits only 16 classes (2x the x traffic)
    ("sm90", "dw"): C_(64, 32, 64, 512, num_warps=8, num_stages=1, grad_t=True, resident=False),
    # dW with the in-backward optimizer's update in its epilogue (fusedface.optim): at 32 classes the
    # update's tiles (W, state, fp32) spill up to 480 bytes beside the [512, 32] accumulator (fp32 W,
    # AdamW); at 16 classes 225-238 registers, 0 spills, all warpgroup MMA (not timed on a GPU: twice the
    # x traffic of the 32-class tile, against the saved write of dW and the optimizer's own pass over it)
    ("sm90", "dw_optim"): C_(64, 16, 64, 512, num_warps=8, num_stages=2, grad_t=True, resident=False),
    ("sm90", "fwd_split"): C_(64, 16, 64, 512, num_warps=8, num_stages=2, resident=False),
    ("sm80", "fwd"): C_(64, 16, 64, 512, num_warps=8, num_stages=1, resident=False),
    ("sm80", "fwd_mixed"): C_(64, 16, 32, 512, num_warps=8, num_stages=1, resident=False),
    # K32: the fp16 split (RESCALE) spills at K64
    ("sm80", "fwd_split"): C_(64, 16, 32, 512, num_warps=8, num_stages=1, resident=False),
    ("sm80", "dw"): C_(64, 16, 64, 512, num_warps=8, num_stages=2, grad_t=True),
}
# the O(B·D) kernels and the hybrid epilogues: rows × classes per program
ROW_BLOCK = 16
SMALL_WARPS = 8  # the O(B·D) kernels (prologue, merge, dx): rows × 512 fp32 tiles over 256 threads
EPI = C_(64, 32, 0, num_warps=8, num_stages=1)  # the hybrid's forward epilogue
EPI_BWD = C_(64, 64, 0, num_warps=8, num_stages=1)  # its backward epilogue (64 × 32 leaves an 8-byte stack frame)
_GPU_EPI = {"epi": EPI, "epi_bwd": EPI_BWD}
# Under TRITON_INTERPRET=1 (CPU tests): small blocks so small shapes leave partial tiles everywhere.
INTERPRET = {"fwd": C_(16, 32, 32, 512, resident=False), "dw": C_(16, 32, 32, 512, grad_t=True), "epi": C_(16, 32, 0),
             "epi_bwd": C_(16, 32, 0)}
INTERPRET_HYBRID_CHUNK = 96  # classes per hybrid chunk under the interpreter: several chunks, a partial one
MAX_FUSED_D = 512

_OVERRIDE: dict = {}


@contextlib.contextmanager
def override(**kw):
    """``with override(fwd=LaunchConfig(...), dw=..., splits=3, hybrid_chunk=64): ...`` — force block
    sizes, the split count or the hybrid chunk, for tests and the counting script."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kw)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def _config(kind: str, device: torch.device, variant: str = "") -> LaunchConfig:
    if kind in _OVERRIDE:
        return _OVERRIDE[kind]
    if device.type != "cuda":
        return INTERPRET[kind]
    if kind in _GPU_EPI:
        return _GPU_EPI[kind]
    arch = arch_of(device)
    return STEP_CONFIGS.get((arch, kind + variant), STEP_CONFIGS[(arch, kind)])


SIXTEEN = (torch.float16, torch.bfloat16)


def path_env() -> str:
    return env_choice("FUSEDFACE_TRITON_PATH", ("auto", "fused", "hybrid", "legacy"), "auto")


def applies(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether the step op runs this call (else the engine with the earlier kernels): not for fp64,
    not under ``FUSEDFACE_TRITON_PATH=legacy``."""
    return torch.float64 not in (x.dtype, W.dtype) and path_env() != "legacy"


FUSED_MIN_CLASSES = 16384


def choose_path(x: torch.Tensor, W: torch.Tensor) -> str:
    """``"fused"`` or ``"hybrid"`` for these (post-autocast) inputs; see the module docstring.
    ``auto`` also sends heads under :data:`FUSED_MIN_CLASSES` classes to the hybrid: there the step is
    launch-bound anyway, and with few classes a few negatives can carry most of the softmax, where
    the fused forward's single-dot ``dL/dx`` numerator is measurably less accurate (docs/perf.md)."""
    env = path_env()
    sixteen = x.dtype in SIXTEEN and (W.dtype == x.dtype or (W.dtype == torch.float32 and _mixed16()))
    fits = triton.next_power_of_2(max(int(x.shape[1]), 16)) <= MAX_FUSED_D
    if env == "hybrid" or not (sixteen and fits):
        return "hybrid"
    if env == "auto" and W.shape[0] < FUSED_MIN_CLASSES:
        return "hybrid"
    return "fused"


def _mixed16() -> bool:
    return env_choice("FUSEDFACE_TRITON_MIXED", ("16", "32"), "16") == "16"


def _hybrid_w(W: torch.Tensor, x: torch.Tensor, c0: int, n: int) -> torch.Tensor:
    """The chunk ``W[c0 : c0 + n]`` as the fp32 operand of the hybrid's products: mixed dtypes on the
    16-bit path (``FUSEDFACE_TRITON_MIXED=16``) round it to ``x``'s dtype first, so that the hybrid
    computes what the fused mixed path computes (``F.linear`` under autocast); a chunk-sized copy."""
    Wc = W[c0:c0 + n]
    if _rounds_w(x, W):
        return Wc.to(x.dtype).float()
    return Wc if Wc.dtype == torch.float32 else Wc.float()


def _rounds_w(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Mixed dtypes on the 16-bit path: ``W`` (fp32) is rounded to ``x``'s dtype wherever it is read."""
    return x.dtype in SIXTEEN and W.dtype == torch.float32 and _mixed16()


def _flags(x: torch.Tensor, W: torch.Tensor) -> dict:
    upcast = x.dtype == torch.bfloat16 and x.device.type != "cuda"
    return dict(W_CAST=int(_rounds_w(x, W)), UPCAST=int(upcast), RESCALE=int(x.dtype == torch.float16),
                SPLIT=int(env_flag("FUSEDFACE_TRITON_SPLIT_GRAD", False)))


def _dp(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _fit(cfg: LaunchConfig, D: int) -> LaunchConfig:
    p = _dp(D)
    return dataclasses.replace(cfg, block_k=min(cfg.block_k, p), block_d=p)


def fwd_flags(cfg: LaunchConfig, D: int) -> dict:
    """The forward kernel's layout flags for a config: ``grad_t`` = both products transposed (T_DOT);
    ``resident`` with one feature chunk = x's row block loaded once (X_RES)."""
    return dict(T_DOT=int(cfg.grad_t), X_RES=int(cfg.resident and D <= cfg.block_d and not cfg.grad_t))


def dw_flags(cfg: LaunchConfig, D: int) -> dict:
    """The dW kernel's layout flags: transposed accumulator (GRAD_T); W tile resident (RESIDENT) when
    one feature chunk covers D; class-major recompute (T_RECOMP) for resident tiles of < 64 rows and
    >= 64 classes."""
    res = int(cfg.resident and D <= cfg.block_d)
    return dict(GRAD_T=int(cfg.grad_t), RESIDENT=res, T_RECOMP=int(res and cfg.block_m < 64 <= cfg.block_n))


def _unit_stride(*ts: torch.Tensor):
    """The tensors with unit stride along the feature axis (a copy only where they lack it)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _row_block(D: int) -> int:
    return max(1, min(ROW_BLOCK, 4096 // _dp(D)))


def _hybrid_chunk(B: int, C: int, device: torch.device) -> int:
    if "hybrid_chunk" in _OVERRIDE:
        return min(C, int(_OVERRIDE["hybrid_chunk"]))
    if device.type != "cuda":
        return min(C, INTERPRET_HYBRID_CHUNK)
    mb = os.environ.get("FUSEDFACE_TRITON_HYBRID_MB", "").strip() or "32"
    try:
        budget = max(1, int(mb)) * 2**20
    except ValueError:
        raise ValueError(f"FUSEDFACE_TRITON_HYBRID_MB={mb!r}: give the hybrid's chunk buffer in MiB, e.g. 32") from None
    return max(128, min(C, budget // (4 * max(B, 1)) // 128 * 128))


LAUNCHES = [0]  # kernel launches of this module (read by bench/count_tensor_work.py and the tests)


def _launch(kernel, grid, *args, **kw):
    LAUNCHES[0] += 1
    kernel[grid](*args, **kw)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

POLICIES = {"none": 0, "threshold": 1, "easy": 2, "clip": 3}


def _prologue(x, W, y, m2, m3, m2f, m3f, m1, theta_policy, grad_mode, ignore_index, fl):
    B, D = x.shape
    dev = x.device
    xinv = torch.empty(B, dtype=torch.float32, device=dev)
    f = torch.empty_like(xinv)
    slope = torch.empty_like(xinv)
    ylab = torch.empty(B, dtype=torch.int64, device=dev)
    R = _row_block(D)
    _launch(K.step_prologue_kernel, (triton.cdiv(B, R),),
            x, W, y, m2 if m2 is not None else xinv, m3 if m3 is not None else xinv,
            xinv, f, slope, ylab, B, W.shape[0], D, x.stride(0), W.stride(0), int(ignore_index),
            float(m1), float(m2f), float(m3f),
            M2_VEC=int(m2 is not None), M3_VEC=int(m3 is not None), POLICY=POLICIES[theta_policy],
            STRAIGHT=int(grad_mode == "straight_through"), W_CAST=fl["W_CAST"], UPCAST=fl["UPCAST"],
            BLOCK_R=R, BLOCK_D=min(_dp(D), 512), num_warps=SMALL_WARPS, num_stages=1)
    return xinv, f, slope, ylab


def _partials(S: int, B: int, dev):
    return (torch.empty((S, B), dtype=torch.float32, device=dev), torch.empty((S, B), dtype=torch.float32, device=dev),
            torch.empty((S, B), dtype=torch.float32, device=dev), torch.empty((S, B), dtype=torch.int64, device=dev),
            torch.empty((S, B), dtype=torch.int32, device=dev))


def _fused_forward(x, W, xinv, f, ylab, scale, sv_a, sv_b, negative, count_sv, need_dx, fl):
    B, D = x.shape
    C = W.shape[0]
    dev = x.device
    cfg = _fit(_config("fwd", dev, "_mixed" if fl["W_CAST"] else ("_split" if fl["SPLIT"] else "")), D)
    S = _OVERRIDE.get("splits") or _n_splits(C, cfg.block_n, triton.cdiv(B, cfg.block_m), dev)
    S = max(1, min(S, triton.cdiv(C, cfg.block_n)))
    winv = torch.empty(C, dtype=torch.float32, device=dev)
    pm, pl, pb, pa, ps = _partials(S, B, dev)
    pe = torch.empty((S, B, D) if need_dx else (0,), dtype=torch.float32, device=dev)
    _launch(K.step_fwd_kernel, (triton.cdiv(B, cfg.block_m), S),
            x, W, xinv, f, ylab, winv, pm, pl, pb, pa, ps, pe, B, C, D, x.stride(0), W.stride(0), S,
            float(scale), float(sv_a), float(sv_b),
            NEGATIVE=int(negative), COUNT_SV=int(count_sv), NEED_DX=int(need_dx), W_CAST=fl["W_CAST"],
            SPLIT=fl["SPLIT"], RESCALE=fl["RESCALE"], UPCAST=fl["UPCAST"], PRECISION="ieee", **fwd_flags(cfg, D),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return winv, (pm, pl, pb, pa, ps, pe), S


def _hybrid_chunks(C: int, chunk: int):
    return [(c0, min(chunk, C - c0)) for c0 in range(0, C, chunk)]


def _hybrid_forward(x, W, xinv, f, ylab, scale, sv_a, sv_b, negative, count_sv):
    """Forward of the hybrid: per class chunk one cuBLAS product into the fp32 buffer and one epilogue
    launch writing that chunk's partial statistics."""
    B, D = x.shape
    C = W.shape[0]
    dev = x.device
    x32 = x if x.dtype == torch.float32 else x.float()
    winv = torch.empty(C, dtype=torch.float32, device=dev)
    chunk = _hybrid_chunk(B, C, dev)
    epi = _config("epi", dev)
    per = _n_splits(chunk, epi.block_n, triton.cdiv(B, epi.block_m), dev)  # one wave of epilogue programs
    chunks = _hybrid_chunks(C, chunk)
    S = len(chunks) * per
    pm, pl, pb, pa, ps = _partials(S, B, dev)
    buf = torch.empty(B * chunk, dtype=torch.float32, device=dev)
    for i, (c0, n) in enumerate(chunks):
        view = buf[: B * n].view(B, n)
        Wc = _hybrid_w(W, x, c0, n)
        wi = inverse_norms(Wc, torch.float32)  # an Inf centre (winv 0) as NaN: the epilogue's NaN flag sees it
        winv[c0:c0 + n] = torch.where(torch.isinf(Wc).any(dim=1), torch.full_like(wi, float("nan")), wi)
        torch.mm(x32, Wc.t(), out=view)
        _launch(K.hybrid_fwd_kernel, (triton.cdiv(B, epi.block_m), per),
                view, xinv, winv, f, ylab, pm, pl, pb, pa, ps, B, n, c0, i * per, per,
                float(scale), float(sv_a), float(sv_b), NEGATIVE=int(negative), COUNT_SV=int(count_sv),
                BLOCK_M=epi.block_m, BLOCK_N=epi.block_n, num_warps=epi.num_warps, num_stages=epi.num_stages)
    return winv, (pm, pl, pb, pa, ps, torch.empty(0, dtype=torch.float32, device=dev)), S


def step_forward(x, W, y, m2, m3, m2f, m3f, scale, m1, theta_policy, grad_mode, sv_a, sv_b, negative,
                 reduction, ignore_index, need_dx, count_sv):
    """The forward pass; returns the op's outputs (see ``triton_step_fwd``)."""
    B, D = x.shape
    dev = x.device
    x, W = _unit_stride(x, W)
    path = choose_path(x, W)
    fl = _flags(x, W)
    y = y.contiguous()
    xinv, f, slope, ylab = _prologue(x, W, y, m2, m3, m2f, m3f, m1, theta_policy, grad_mode, ignore_index, fl)
    if path == "fused":
        winv, parts, S = _fused_forward(x, W, xinv, f, ylab, scale, sv_a, sv_b, negative, count_sv, need_dx, fl)
    else:
        winv, parts, S = _hybrid_forward(x, W, xinv, f, ylab, scale, sv_a, sv_b, negative, count_sv)
    pm, pl, pb, pa, ps, pe = parts
    fused_dx = path == "fused" and need_dx
    lse = torch.empty(B, dtype=torch.float32, device=dev)
    rows = torch.empty(B, dtype=torch.float32, device=dev)
    pred = torch.empty(B, dtype=torch.int64, device=dev)
    sv = torch.empty(B, dtype=torch.int32, device=dev)
    ebar = torch.empty((B, D) if fused_dx else (0,), dtype=torch.float32, device=dev)
    R = _row_block(D)
    _launch(K.step_merge_kernel, (triton.cdiv(B, R),),
            pm, pl, pb, pa, ps, pe, f, ylab, lse, rows, pred, sv, ebar, B, D, S, float(scale),
            NEED_DX=int(fused_dx), BLOCK_R=R, BLOCK_D=_dp(D), num_warps=SMALL_WARPS, num_stages=1)
    wscale = torch.empty(1, dtype=torch.float32, device=dev)
    if reduction == "none":
        loss = rows
    else:
        loss = torch.empty((), dtype=torch.float32, device=dev)
        _launch(K.step_reduce_kernel, (1,), rows, ylab, loss, wscale, B, MEAN=int(reduction == "mean"),
                BLOCK=min(1024, max(16, triton.next_power_of_2(B))))
    return loss, pred, sv, lse, f, slope, xinv, winv, ebar, ylab, wscale


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

def step_backward(grad, x, W, ylab, lse, f, slope, xinv, winv, ebar, wscale, scale, sv_a, sv_b, negative,
                  per_row, need_dx, need_dW, upd=None):
    """``(dL/dx in x's dtype or None, dL/dW in W's dtype or None)``.

    ``upd``: an in-backward update (:mod:`fusedface._inbackward`, ``fusedface.optim``): ``dL/dW`` is not
    returned (None) but applied to ``W`` and its state in place — in the dW kernel's epilogue (fused
    path), or per class chunk by ``optim_update_kernel`` (hybrid path), or slice by slice through
    ``upd.apply`` where the kernels do not cover the update (:func:`_optim_kernel_args`). Every part of
    ``dL/dx`` is formed from ``W`` before its update: the fused path launches ``step_dx_kernel`` before
    the dW kernel; the hybrid adds each chunk's ``dL/dx`` product and forms its ``dW`` before updating it."""
    B, D = x.shape
    C = W.shape[0]
    dev = x.device
    param = W
    x, W = _unit_stride(x, W)
    grad = grad.contiguous()
    path = choose_path(x, W)
    fl = _flags(x, W)
    common = dict(NEGATIVE=int(negative), PER_ROW=int(per_row))
    dx = dW = None
    R = _row_block(D)
    need_dW = need_dW or upd is not None
    opt = _optim_kernel_args(upd, param, W) if upd is not None else None
    if path == "fused":
        if need_dx:  # first: it reads W[y], which the dW kernel may update
            if ebar.numel() == 0:
                raise RuntimeError("backend='triton': dL/dx was not prepared by the forward (x did not require "
                                   "grad when the loss was computed); compute the loss with x.requires_grad_(True)")
            dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
            _launch(K.step_dx_kernel, (triton.cdiv(B, R),),
                    x, W, xinv, ylab, f, lse, slope, grad, wscale, ebar, dx, B, D, x.stride(0), W.stride(0),
                    float(scale), PER_ROW=int(per_row), GX_GIVEN=0, W_CAST=fl["W_CAST"], UPCAST=fl["UPCAST"],
                    BLOCK_R=R, BLOCK_D=_dp(D), num_warps=SMALL_WARPS, num_stages=1)
        if need_dW:
            cfg = _fit(_config("dw", dev, "_optim" if opt is not None else ("_split" if fl["SPLIT"] else "")), D)
            # one feature chunk: each program owns its class tile of W (the in-backward update relies on it)
            assert cfg.block_d >= D, (cfg.block_d, D)

            def dw_launch(Ws, winv_s, ylab_s, out, optim=None):
                """The dW kernel on the classes of ``Ws``: stores dL/dW in ``out``, or with ``optim``
                (:func:`_optim_kernel_args`) applies the update to ``Ws`` itself."""
                no_optim = (_NO_OPTIM, dict(OPTIM=0, MOMENTUM=0, ROUND_BITS=0), out, out, 0)
                sc, ce, s1, s2, stride_s = optim if optim is not None else no_optim
                _launch(K.step_dw_kernel, (triton.cdiv(Ws.shape[0], cfg.block_n), 1),
                        x, Ws, xinv, winv_s, ylab_s, f, lse, slope, grad, wscale, out, s1, s2, B, Ws.shape[0], D,
                        x.stride(0), Ws.stride(0), out.stride(0), stride_s, float(scale), float(sv_a), float(sv_b),
                        **sc, W_CAST=fl["W_CAST"], SPLIT=fl["SPLIT"], RESCALE=fl["RESCALE"], UPCAST=fl["UPCAST"],
                        PRECISION="ieee", **dw_flags(cfg, D), **ce, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                        BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, **common)

            if upd is None:
                dW = torch.empty(W.shape, dtype=W.dtype, device=dev)
                dw_launch(W, winv, ylab, dW)
            elif opt is not None:  # the update in the dW kernel's epilogue (W is the parameter itself)
                dw_launch(W, winv, ylab, W, opt)
                upd.mark_applied()
            else:  # what the kernels do not cover: dL/dW slice by slice, each slice through upd.apply
                n = _inbackward.slice_rows(C, D, W.device)
                for lo in range(0, C, n):
                    hi = min(lo + n, C)
                    # -1 stays an ignored row for the step's kernels; -2: a valid row whose label is elsewhere
                    yl = _inbackward.slice_labels(ylab, lo, hi,
                                                  torch.where(ylab == -1, ylab, torch.full_like(ylab, -2)))
                    g = torch.empty((hi - lo, D), dtype=W.dtype, device=dev)
                    dw_launch(W[lo:hi], winv[lo:hi], yl, g)
                    upd.apply(lo, hi, g)
        return dx, dW
    # hybrid: per chunk, recompute (cuBLAS), epilogue (dℓ/dc·winv in place, Jacobian coefficient),
    # dL/dx += buf·W_c and dW_c = coef·W_c + bufᵀ·x̂ (cuBLAS); with an in-backward update, dW_c goes to a
    # chunk-sized fp32 buffer and the chunk of W is updated after both products have read it
    x32 = x if x.dtype == torch.float32 else x.float()
    xhat = x32 * xinv[:, None]
    chunk = _hybrid_chunk(B, C, dev)
    epi = _config("epi_bwd", dev)
    buf = torch.empty(B * chunk, dtype=torch.float32, device=dev)
    coef = torch.empty(chunk, dtype=torch.float32, device=dev)
    gx = torch.zeros((B, D), dtype=torch.float32, device=dev) if need_dx else None
    if need_dW and upd is None:
        dW = torch.empty(W.shape, dtype=W.dtype, device=dev)
    gbuf = torch.empty((chunk, D), dtype=torch.float32, device=dev) if upd is not None else None
    for c0, n in _hybrid_chunks(C, chunk):
        view = buf[: B * n].view(B, n)
        Wc32 = _hybrid_w(W, x, c0, n)  # a view of W for fp32 W: read by both products before the update below
        torch.mm(x32, Wc32.t(), out=view)
        _launch(K.hybrid_bwd_kernel, (triton.cdiv(n, epi.block_n),),
                view, xinv, winv, f, ylab, lse, slope, grad, wscale, coef, B, n, c0,
                float(scale), float(sv_a), float(sv_b), BLOCK_M=epi.block_m, BLOCK_N=epi.block_n,
                num_warps=epi.num_warps, num_stages=epi.num_stages, **common)
        if need_dx:
            gx.addmm_(view, Wc32)
        if upd is not None:
            g = gbuf[:n]
            torch.mul(Wc32, coef[:n, None], out=g)
            g.addmm_(view.t(), xhat)
            if opt is None:
                upd.apply(c0, c0 + n, g)
            else:
                _optim_chunk(g, W, c0, n, opt)
                upd.mark_applied()
        elif need_dW:
            if dW.dtype == torch.float32:
                torch.mul(Wc32, coef[:n, None], out=dW[c0:c0 + n])
                dW[c0:c0 + n].addmm_(view.t(), xhat)
            else:
                dW[c0:c0 + n] = torch.addmm(Wc32 * coef[:n, None], view.t(), xhat)
    if need_dx:
        dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
        _launch(K.step_dx_kernel, (triton.cdiv(B, R),),
                x, W, xinv, ylab, f, lse, slope, grad, wscale, gx, dx, B, D, x.stride(0), W.stride(0),
                float(scale), PER_ROW=int(per_row), GX_GIVEN=1, W_CAST=0, UPCAST=fl["UPCAST"],
                BLOCK_R=R, BLOCK_D=_dp(D), num_warps=SMALL_WARPS, num_stages=1)
    return dx, dW


# ----------------------------------------------------------------------------------------------
# the in-backward optimizer (fusedface.optim): the kernels' arguments, the hybrid's update launch
# ----------------------------------------------------------------------------------------------

_NO_OPTIM = dict(wd=0.0, momentum=0.0, damp1=0.0, neg_lr=0.0, first=0, nesterov=0, decay=1.0, lerp_w=0.0, beta2=0.0,
                 w2=0.0, neg_step=0.0, bc2_sqrt=1.0, eps=0.0)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIM_ROWS = 16  # optim_update_kernel: rows × 128 features per program


def _optim_kernel_args(upd, param: torch.Tensor, W: torch.Tensor):
    """``(scalars, constexprs, s1, s2, stride_s)`` of ``upd`` for ``step_dw_kernel`` /
    ``optim_update_kernel``, or None where the kernels do not cover it and the launcher falls back to
    ``upd.apply`` per slice: per-row (sparse Partial FC) step counts (``"row_step"`` in the state), a
    ``W`` the step reads through a copy (not unit-stride) or state that is not fp32/bf16/fp16 with unit
    feature stride and one row stride. The scalars are folded on the host in Python floats, as
    ``torch.optim`` folds them (``fusedface._inbackward.Update._math``)."""
    h = upd.hyper
    if "row_step" in upd.state:
        return None
    if W.data_ptr() != param.data_ptr() or W.stride() != param.stride() or W.dtype not in _KERNEL_DTYPES:
        return None
    bufs = [upd.state[k] for k in upd.hyper.state_names()]
    if any(b.dtype not in _KERNEL_DTYPES or b.shape != W.shape or b.device != W.device or b.stride(-1) != 1
           or b.stride(0) != bufs[0].stride(0) for b in bufs):
        return None
    sc = dict(_NO_OPTIM)
    if h.kind == "sgd":
        sc.update(wd=h.weight_decay, momentum=h.momentum, damp1=1 - h.dampening, neg_lr=-h.lr,
                  first=int(bool(upd.first)), nesterov=int(h.nesterov))
        ce = dict(OPTIM=1, MOMENTUM=int(h.momentum != 0))
    else:
        bc1 = 1 - h.beta1 ** upd.step
        bc2_sqrt = (1 - h.beta2 ** upd.step) ** 0.5
        sc.update(decay=1 - h.lr * h.weight_decay if h.weight_decay != 0 else 1.0, lerp_w=1 - h.beta1, beta2=h.beta2,
                  w2=1 - h.beta2, neg_step=-(h.lr / bc1), bc2_sqrt=bc2_sqrt, eps=h.eps)
        ce = dict(OPTIM=2, MOMENTUM=0)
    sc = {k: (v if isinstance(v, int) else float(v)) for k, v in sc.items()}
    ce["ROUND_BITS"] = int(W.device.type != "cuda")  # the interpreter's fp32 -> bf16 cast truncates
    s1 = bufs[0] if bufs else W
    s2 = bufs[1] if len(bufs) > 1 else s1
    return sc, ce, s1, s2, (s1.stride(0) if bufs else 0)


def _optim_chunk(g: torch.Tensor, W: torch.Tensor, c0: int, n: int, opt) -> None:
    """The hybrid's update of rows ``c0 … c0 + n`` of ``W`` and its state from their fp32 gradient ``g``."""
    sc, ce, s1, s2, stride_s = opt
    D = W.shape[1]
    bd = min(_dp(D), 128)
    # under the interpreter one program per chunk (each interpreted program costs milliseconds)
    br = OPTIM_ROWS if W.device.type == "cuda" else max(16, min(triton.next_power_of_2(n), 16384 // bd))
    _launch(K.optim_update_kernel, (triton.cdiv(n, br), triton.cdiv(D, bd)),
            g, W[c0:c0 + n], s1[c0:c0 + n], s2[c0:c0 + n], n, D, g.stride(0), W.stride(0), stride_s, **sc, **ce,
            BLOCK_R=br, BLOCK_D=bd, num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------------------------
# registered ops, autograd, autocast
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fusedface::triton_step_fwd", mutates_args=())
def triton_step_fwd(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, m2: Optional[torch.Tensor],
                    m3: Optional[torch.Tensor], m2f: float, m3f: float, scale: float, m1: float,
                    theta_policy: str, grad_mode: str, sv_a: float, sv_b: float, negative: bool,
                    reduction: str, ignore_index: int, need_dx: bool, count_sv: bool, optim_token: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """``(loss, pred, sv, lse, f, slope, xinv, winv, ebar, ylab, wscale)``: the loss (a scalar, or
    ``[B]`` for ``reduction="none"``) and what the backward needs (non-differentiable).
    ``optim_token``: the in-backward optimizer attached to ``W`` (:mod:`fusedface._inbackward`; 0: none),
    used by the backward only."""
    return step_forward(x, W, y, m2, m3, m2f, m3f, scale, m1, theta_policy, grad_mode, sv_a, sv_b, negative,
                        reduction, ignore_index, need_dx, count_sv)


@triton_step_fwd.register_fake
def _(x, W, y, m2, m3, m2f, m3f, scale, m1, theta_policy, grad_mode, sv_a, sv_b, negative, reduction,
      ignore_index, need_dx, count_sv, optim_token=0):
    B, D = x.shape
    C = W.shape[0]
    vec = [x.new_empty(B, dtype=torch.float32) for _ in range(4)]
    fused_dx = need_dx and choose_path(x, W) == "fused"
    loss = x.new_empty(B if reduction == "none" else (), dtype=torch.float32)
    return (loss, x.new_empty(B, dtype=torch.int64), x.new_empty(B, dtype=torch.int32), vec[0], vec[1], vec[2],
            vec[3], W.new_empty(C, dtype=torch.float32),
            x.new_empty((B, D) if fused_dx else (0,), dtype=torch.float32), x.new_empty(B, dtype=torch.int64),
            x.new_empty(1, dtype=torch.float32))


@torch.library.custom_op("fusedface::triton_step_bwd", mutates_args=())
def triton_step_bwd(grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor, ylab: torch.Tensor, lse: torch.Tensor,
                    f: torch.Tensor, slope: torch.Tensor, xinv: torch.Tensor, winv: torch.Tensor,
                    ebar: torch.Tensor, wscale: torch.Tensor, scale: float, sv_a: float, sv_b: float,
                    negative: bool, per_row: bool, need_dx: bool, need_dW: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dW)``; one that is not needed comes back empty."""
    dx, dW = step_backward(grad, x, W, ylab, lse, f, slope, xinv, winv, ebar, wscale, scale, sv_a, sv_b,
                           negative, per_row, need_dx, need_dW)
    return (dx if dx is not None else x.new_empty(0)), (dW if dW is not None else W.new_empty(0))


@triton_step_bwd.register_fake
def _(grad, x, W, ylab, lse, f, slope, xinv, winv, ebar, wscale, scale, sv_a, sv_b, negative, per_row,
      need_dx, need_dW):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0),
            torch.empty_like(W, memory_format=torch.contiguous_format) if need_dW else W.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, W = inputs[0], inputs[1]
    loss, pred, sv, lse, f, slope, xinv, winv, ebar, ylab, wscale = output
    ctx.save_for_backward(x, W, ylab, lse, f, slope, xinv, winv, ebar, wscale)
    ctx.scalars = (inputs[7], inputs[11], inputs[12], inputs[13], inputs[14] == "none")
    ctx.optim_token = inputs[18] if len(inputs) > 18 else 0
    ctx.mark_non_differentiable(pred, sv, lse, f, slope, xinv, winv, ebar, ylab, wscale)
    ctx.set_materialize_grads(False)  # no zero tensors for the ten non-differentiable outputs


def _backward(ctx, grad, *_):
    need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_dx or need_dW):
        return (None,) * 19
    if need_dW and ctx.optim_token:
        # the in-backward optimizer: W (and its state) updated in place by the kernels, no dL/dW returned;
        # a Python call, not triton_step_bwd (that op returns a dense dL/dW)
        upd = _inbackward.begin(ctx.optim_token)
        if upd is not None:
            dx, _ = step_backward(grad, *ctx.saved_tensors, *ctx.scalars, need_dx, True, upd=upd)
            upd.finish()
            return (dx if need_dx else None, None) + (None,) * 17
        need_dW = False  # this backward does not ask for dL/dW (autograd.grad of x, backward(inputs=...))
        if not need_dx:
            return (None,) * 19
    dx, dW = torch.ops.fusedface.triton_step_bwd(grad, *ctx.saved_tensors, *ctx.scalars, need_dx, need_dW)
    return (dx if need_dx else None, dW if need_dW else None) + (None,) * 17


triton_step_fwd.register_autograd(_backward, setup_context=_setup_context)

OPS = ("fusedface::triton_step_fwd", "fusedface::triton_step_bwd")

_LIB = torch.library.Library("fusedface", "FRAGMENT")


def _register_autocast(device_type: str):
    """Autocast rule of ``triton_step_fwd``: cast an fp32 ``x`` to the region's 16-bit dtype and leave
    ``W`` alone (the fused path rounds its tiles in registers: no 16-bit copy of ``W``). What
    ``torch.library.register_autocast`` does, except that it would cast ``W`` too. Under
    ``FUSEDFACE_TRITON_MIXED=32`` (fp32 products) nothing is cast."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    dkey = getattr(torch._C.DispatchKey, key)

    def kernel(_keyset, x, W, *rest):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dkey)):
            dt = torch.get_autocast_dtype(device_type)
            if x.dtype == torch.float32 and dt in SIXTEEN and x.device.type == device_type and _mixed16():
                x = x.to(dt)
            return torch.ops.fusedface.triton_step_fwd(x, W, *rest)

    _LIB.impl("triton_step_fwd", kernel, key, with_keyset=True)


for _dev in ("cuda", "cpu"):
    _register_autocast(_dev)


def _per_row(m, B: int):
    """A margin tensor as a contiguous ``[B]`` vector (a 0-dim one broadcast), or None for a float."""
    if not isinstance(m, torch.Tensor):
        return None
    return (m.reshape(1).expand(B) if m.dim() == 0 else m).contiguous()


step_applies = applies  # the protocol's name: whether margin_step runs this call


def step_covers(opts) -> bool:
    """Whether the whole-step kernels take these options: the seed family and AdaFace's
    ``theta_policy="clip"`` (a prologue variant, ``POLICY`` 3). The curricular rewrite, inter-class
    filtering and sub-centres take the engine's op with the tile kernels."""
    return opts.negative != "curricular" and not opts.filters and opts.subcenters == 1


def margin_step(x, W, y, opts, m2, m3, want_stats: bool, optim_token: int = 0):
    """The protocol's whole step, called by the engine for ``backend="triton"`` where it applies
    (``functional.margin_softmax_loss`` and the heads): ``(loss, pred, sv)``, the loss reduced by
    ``opts.reduction``. ``m2``/``m3`` are checked floats or ``[B]`` tensors. ``optim_token``: the
    in-backward optimizer attached to ``W`` (``fusedface.optim``, :data:`STEP_IN_BACKWARD`): the
    backward applies its update in the kernels instead of returning ``dL/dW``."""
    a, b = opts.rewrite
    B = x.shape[0]
    m2t, m3t = (_per_row(m, B) for m in (m2, m3))
    negative = opts.negative != "none"
    need_dx = torch.is_grad_enabled() and x.requires_grad
    out = torch.ops.fusedface.triton_step_fwd(
        x, W, y, m2t, m3t, 0.0 if m2t is not None else float(m2), 0.0 if m3t is not None else float(m3),
        float(opts.scale), float(opts.m1), opts.theta_policy, opts.grad_mode, float(a), float(b), negative,
        opts.reduction, int(opts.ignore_index), need_dx, bool(want_stats or negative), int(optim_token))
    return out[0], out[1], out[2]


__all__ = ["name", "supports_device", "margin_forward", "margin_backward", "npt_forward", "step_applies", "step_covers",
           "margin_step", "applies", "choose_path", "step_forward", "step_backward", "override", "OPS",
           "STEP_CONFIGS"]
