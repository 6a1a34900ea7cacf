"""``backend="triton"``, tile kernels: the launcher of ``triton_kernels/margin_softmax.py``.

The Triton backend's implementation of the tile-kernel protocol (:mod:`fusedface.backends`), which
:mod:`fusedface.backends.triton` re-exports: what the engine runs for fp64 inputs, NPT, the sharded
heads and ``FUSEDFACE_TRITON_PATH=legacy`` (the margin-softmax training step of
:mod:`fusedface.backends.triton` runs everything else). This module knows the strides, block sizes,
grids and allocations of those kernels:

``margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False, rt=None) -> (lse, pred, sv, None)``
``margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None, rt=None) -> (Gx, dW)``
``npt_forward(x, W, xinv, winv, y, k, tile) -> (values, index)``

The margin kernels cover the extensions of issue 16 (:data:`MARGIN_EXTENSIONS`): the general rewrite
``g = (q·c + a + t_b)·c + b`` with a per-row ``rt`` (CurricularFace), inter-class filtering
(``opts.filter_threshold``) and ``opts.subcenters`` K sub-centres per class (``W`` and ``winv`` with
``C·K`` rows). Each is a constexpr specialisation (``QUAD``/``HAS_RT``, ``FILTER``, ``SUBC``), so the
default options compile to the one-centre, unfiltered, affine kernels. With K > 1 a class tile of
``block_n // K_pad`` classes spans ``block_n`` rows of ``W`` (``K_pad``: K rounded up to a power of
two), so the register footprint stays that of the shipped configuration (no autotuning for K > 1).

``tile`` (the torch engine's memory-budget hint) is ignored: the kernels hold a tile in registers and
use the block sizes below. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``
(testing only: slow).

Launch configurations (``docs/triton.md``): one tuned default per architecture (``sm80`` for
compute capability 8.x, ``sm90`` for 9.x and later) and input precision (16-bit, fp32, fp64) in
:data:`CONFIGS`. Environment variables:

* ``FUSEDFACE_TRITON_AUTOTUNE=1``: wrap every kernel in ``triton.autotune`` over :data:`TUNE_SPACE`,
  keyed on (B, C, D) and dtypes; the first call per shape then benchmarks every candidate.
* ``FUSEDFACE_TRITON_DETERMINISTIC=0``: the embedding gradient is accumulated with ``tl.atomic_add``
  (no per-split partial buffer) — faster and smaller, but the summation order varies run to run, so
  results are not bitwise reproducible. Ignored when ``torch.are_deterministic_algorithms_enabled()``.
  The default (``1``) writes per-split partials and sums them in a fixed order; ``dW`` is always
  deterministic (each program owns its class tile).
* ``FUSEDFACE_TRITON_FAST_GRAD=1``: with fp16/bf16 inputs, multiply ``dℓ/dc`` rounded to the input
  dtype (one tensor-core dot per gradient product) instead of the default ``hi + lo`` split (two dots,
  fp32-grade gradients). About 2⁻⁹ relative error on bf16 gradients.
* ``FUSEDFACE_TRITON_FP32_PRECISION=ieee|tf32|tf32x3``: the ``input_precision`` of fp32 dots. Default:
  ``"tf32x3"`` (three TF32 tensor-core passes, fp32-grade: on an H100 its gradients were closer to a
  float64 truth than PyTorch's own fp32 reference, and 2.5x faster than ``"ieee"``, which runs on the
  FMA units) when ``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default), else
  ``"tf32"``, the choice PyTorch makes for its own fp32 matmuls at ``"high"``/``"medium"``.

``torch.compile``: the entry points are registered as ``torch.library.triton_op`` s
(``fusedface::margin_forward``, ``fusedface::margin_backward_dx``, ``fusedface::margin_backward_dw``,
``fusedface::npt_topk``), so the compiler sees the Triton kernels and their fake (shape-only)
implementations; :data:`REGISTERED` says whether that worked in this installation (when it did not,
:data:`REGISTRATION_ERROR` says why and plain Python functions are used).
"""
from __future__ import annotations

import contextlib
import dataclasses
import struct
from typing import Optional

import torch
import triton

from .._env import env_choice, env_flag, triton_interpreted
from ..triton_kernels import margin_softmax as K

MARGIN_EXTENSIONS = True  # curricular rewrite (rt), inter-class filtering, sub-centres (issue 16)


# ----------------------------------------------------------------------------------------------
# launch configurations
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of one kernel. ``block_m`` rows × ``block_n`` classes per tile, ``block_k`` features
    per dot step of the recomputed products, ``block_d`` features of the gradient accumulator per
    program (gradient kernels only; the feature axis is split across programs above it)."""

    block_m: int
    block_n: int
    block_k: int
    block_d: int = 0
    num_warps: int = 4
    num_stages: int = 3
    resident: bool = True  # gradient kernels: load whole rows once when block_d covers D
    grad_t: bool = False  # gradient kernels: accumulate the transposed product (features on MMA's M side)

    def meta(self) -> dict:
        out = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
        if self.block_d:
            out["BLOCK_D"] = self.block_d
        return out


C_ = LaunchConfig
# (arch, kernel, precision) -> config. precision: "16" (fp16/bf16), "32" (fp32 or mixed), "64" (fp64).
# Chosen for B = 512, D = 512 and C in the 10⁵–10⁶ range, checked for zero spills and shared memory
# within the limit by bench/check_triton_compile.py (docs/triton.md has the table).
CONFIGS: dict[tuple[str, str, str], LaunchConfig] = {
    # 16-bit: the gradient kernels hold a full 512-feature accumulator ([32, 512] fp32: 64 registers
    # per thread at 8 warps), so D <= 512 recomputes each tile once per gradient kernel
    ("sm90", "fwd", "16"): C_(128, 128, 64, num_warps=8, num_stages=3),
    ("sm90", "dx", "16"): C_(32, 64, 64, 512, num_warps=8, num_stages=3, grad_t=True),
    ("sm90", "dw", "16"): C_(64, 32, 64, 512, num_warps=8, num_stages=3, resident=False),
    ("sm90", "npt", "16"): C_(32, 128, 64, num_warps=8, num_stages=3),
    ("sm80", "fwd", "16"): C_(128, 64, 64, num_warps=8, num_stages=3),
    ("sm80", "dx", "16"): C_(32, 64, 32, 512, num_warps=8, num_stages=2),
    ("sm80", "dw", "16"): C_(64, 32, 32, 512, num_warps=8, num_stages=3, resident=False, grad_t=True),
    ("sm80", "npt", "16"): C_(32, 128, 32, num_warps=8, num_stages=3),
    # fp32 (and mixed dtypes): ieee dots run on FMA units, tf32 ones on tensor cores
    ("sm90", "fwd", "32"): C_(64, 64, 32, num_warps=8, num_stages=3),
    ("sm90", "dx", "32"): C_(32, 64, 32, 128, num_warps=8, num_stages=2, grad_t=True),
    ("sm90", "dw", "32"): C_(64, 64, 32, 128, num_warps=8, num_stages=2),
    ("sm90", "npt", "32"): C_(32, 32, 32, num_warps=8, num_stages=2),
    # fp64 (DMMA / FMA)
    ("sm90", "fwd", "64"): C_(32, 32, 16, num_warps=4, num_stages=2),
    ("sm90", "dx", "64"): C_(32, 32, 16, 64, num_warps=8, num_stages=2),
    ("sm90", "dw", "64"): C_(16, 16, 16, 64, num_warps=4, num_stages=2),
    ("sm90", "npt", "64"): C_(32, 32, 16, num_warps=8, num_stages=2),
}
for _k in [k for k in CONFIGS if k[0] == "sm90" and k[2] in ("32", "64")]:
    CONFIGS[("sm80",) + _k[1:]] = CONFIGS[_k]
# FUSEDFACE_TRITON_FAST_GRAD=1 (one dot per gradient product) changes the register allocation of dW
CONFIGS[("sm90", "dw_fast", "16")] = CONFIGS[("sm90", "dw", "16")]
CONFIGS[("sm80", "dw_fast", "16")] = CONFIGS[("sm80", "dw", "16")]
# sm_80's fp32 (FMA / mma.sync) paths need smaller tiles to stay spill-free
CONFIGS[("sm80", "dx", "32")] = C_(32, 32, 32, 256, num_warps=8, num_stages=2)
CONFIGS[("sm80", "dw", "32")] = C_(32, 32, 32, 128, num_warps=8, num_stages=2)

# Sub-centres (K > 1, issue 16): where the shipped configuration spills with the sub-centre epilogue (the
# max over each class's K rows and the spread of dℓ/dc back to the arg-max row), a smaller one. Here
# block_n counts rows of W: a tile holds block_n // K_pad classes (bench/check_triton_compile.py, K = 2, 3, 8).
SUB_CONFIGS: dict[tuple[str, str, str], LaunchConfig] = {
    ("sm80", "dx", "16"): C_(32, 32, 32, 512, num_warps=8, num_stages=2),
    ("sm80", "dw", "32"): C_(16, 32, 32, 128, num_warps=8, num_stages=2),
    ("sm90", "dw", "32"): C_(32, 64, 32, 128, num_warps=8, num_stages=2),
}

# Under TRITON_INTERPRET=1 (CPU tests): small blocks, so small test shapes (B = 37, D = 45, C = 301)
# leave partial tiles on every axis, two feature chunks in the gradient kernels and three class splits.
INTERPRET_CONFIG = {
    "fwd": C_(16, 32, 32), "dx": C_(16, 32, 32, 32), "dw": C_(16, 32, 32, 32, grad_t=True), "npt": C_(16, 32, 32),
}
INTERPRET_SPLITS = 3

# FUSEDFACE_TRITON_AUTOTUNE=1: candidates per (kernel, precision).
TUNE_SPACE: dict[tuple[str, str], list[LaunchConfig]] = {
    ("fwd", "16"): [C_(bm, bn, 64, num_warps=w, num_stages=st)
                    for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (3, 4)],
    ("dx", "16"): [C_(bm, bn, 64, bd, num_warps=8, num_stages=st, resident=res, grad_t=gt)
                   for bm in (32, 64) for bn in (32, 64) for bd in (256, 512) for st in (2, 3)
                   for res, gt in ((True, True), (False, False))],
    ("dw", "16"): [C_(bm, bn, 64, bd, num_warps=8, num_stages=st, resident=res, grad_t=gt)
                   for bm in (32, 64) for bn in (32, 64) for bd in (256, 512) for st in (2, 3)
                   for res, gt in ((False, False), (True, True))],
    ("npt", "16"): [C_(bm, bn, 64, num_warps=w, num_stages=3) for bm in (64, 128) for bn in (64, 128) for w in (4, 8)],
    ("fwd", "32"): [C_(bm, bn, 32, num_warps=w, num_stages=st)
                    for bm in (32, 64) for bn in (64, 128) for w in (4, 8) for st in (2, 3)],
    ("dx", "32"): [C_(bm, bn, 32, bd, num_warps=w, num_stages=2)
                   for bm in (32, 64) for bn in (32, 64) for bd in (64, 128) for w in (4, 8)],
    ("dw", "32"): [C_(bm, bn, 32, bd, num_warps=w, num_stages=2)
                   for bm in (32, 64) for bn in (32, 64) for bd in (64, 128) for w in (4, 8)],
    ("npt", "32"): [C_(bm, bn, 32, num_warps=w, num_stages=2) for bm in (32, 64) for bn in (32, 64) for w in (4, 8)],
}
for _k in ("fwd", "dx", "dw", "npt"):
    TUNE_SPACE[(_k, "64")] = [CONFIGS[("sm90", _k, "64")]]

_OVERRIDE: dict = {}


@contextlib.contextmanager
def override(configs: dict[str, LaunchConfig] | None = None, splits: int | None = None):
    """Force block sizes per kernel (``{"fwd": LaunchConfig(...), ...}``) and/or the number of class
    splits, inside a ``with`` block. For tests and benchmarks; not thread-safe."""
    old = dict(_OVERRIDE)
    if configs:
        _OVERRIDE.setdefault("configs", {})
        _OVERRIDE["configs"] = {**_OVERRIDE["configs"], **configs}
    if splits is not None:
        _OVERRIDE["splits"] = int(splits)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def autotune_enabled() -> bool:
    return env_flag("FUSEDFACE_TRITON_AUTOTUNE", False)


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() or env_flag("FUSEDFACE_TRITON_DETERMINISTIC", True)


def fast_grad() -> bool:
    return env_flag("FUSEDFACE_TRITON_FAST_GRAD", False)


def fp32_precision() -> str:
    env = env_choice("FUSEDFACE_TRITON_FP32_PRECISION", ("ieee", "tf32", "tf32x3"), None)
    if env is not None:
        return env
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def arch_of(device: torch.device) -> str:
    """``"sm90"`` for compute capability ≥ 9.0, else ``"sm80"`` (Ampere; older GPUs get Ampere's
    configs and may not fit their shared memory)."""
    if device.type != "cuda":
        return "sm90"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def precision_class(x: torch.Tensor, W: torch.Tensor) -> str:
    if torch.float64 in (x.dtype, W.dtype):
        return "64"
    if x.dtype == W.dtype and x.dtype in (torch.float16, torch.bfloat16):
        return "16"
    return "32"


def config_for(kernel: str, x: torch.Tensor, W: torch.Tensor, subcenters: int = 1) -> LaunchConfig:
    forced = _OVERRIDE.get("configs", {}).get(kernel)
    if forced is not None:
        return forced
    if x.device.type != "cuda":
        return INTERPRET_CONFIG[kernel]
    key = (arch_of(x.device), kernel, precision_class(x, W))
    if kernel == "dw" and key[2] == "16" and fast_grad():
        key = (key[0], "dw_fast", "16")
    if subcenters > 1 and key in SUB_CONFIGS:
        return SUB_CONFIGS[key]
    return CONFIGS[key]


def _fit(cfg: LaunchConfig, D: int) -> LaunchConfig:
    """Shrinks ``block_k``/``block_d`` for small D (no work on padding); tl.dot needs ≥ 16."""
    p = max(16, triton.next_power_of_2(D))
    return dataclasses.replace(cfg, block_k=min(cfg.block_k, p), block_d=min(cfg.block_d, p) if cfg.block_d else 0)


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _n_splits(C: int, block_n: int, other_programs: int, device: torch.device) -> int:
    """Class splits so that (row blocks × feature chunks × splits) is one full wave: the shipped
    configurations use nearly all registers, so one program runs per SM, and every program then
    streams an equal share of the classes (no tail wave). Every split keeps at least one class tile."""
    n_tiles = triton.cdiv(C, block_n)
    forced = _OVERRIDE.get("splits")
    if forced is not None:
        want = forced
    elif device.type != "cuda":
        want = INTERPRET_SPLITS
    else:
        want = _sm_count(device) // max(1, other_programs)
    s = max(1, min(n_tiles, want))
    per = triton.cdiv(n_tiles, s)
    return triton.cdiv(n_tiles, per)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _pair(v: float) -> tuple[float, float]:
    """``v`` as fp32 ``(hi, lo)`` with ``hi + lo ≈ v`` to ~2⁻⁴⁸ (fp64 runs keep fp64 scalars)."""
    hi = _f32(v)
    return hi, _f32(v - hi)


def _flags(x: torch.Tensor, W: torch.Tensor) -> dict:
    """Compile-time flags of the dot paths for these input dtypes (see the kernels' module docstring)."""
    cast = x.dtype != W.dtype
    sixteen = not cast and x.dtype in (torch.float16, torch.bfloat16)
    upcast = sixteen and x.dtype == torch.bfloat16 and x.device.type != "cuda"
    if precision_class(x, W) == "64":
        precision = "ieee"
    elif sixteen:
        precision = "ieee"  # unused by 16-bit dots
    else:
        precision = fp32_precision()
    return dict(CAST=int(cast), UPCAST=int(upcast), PRECISION=precision,
                SPLIT_DC=int(sixteen and not fast_grad()), RESCALE=int(sixteen and x.dtype == torch.float16))


# ----------------------------------------------------------------------------------------------
# kernel handles (plain, or autotuned behind FUSEDFACE_TRITON_AUTOTUNE=1)
# ----------------------------------------------------------------------------------------------

_KERNELS = {"fwd": K.margin_fwd_kernel, "dx": K.margin_bwd_dx_kernel, "dw": K.margin_bwd_dw_kernel,
            "npt": K.npt_topk_kernel}
_TUNED: dict = {}


def _wrap(kernel):
    """``torch.library.wrap_triton`` where it applies (traceable by torch.compile), else the kernel."""
    try:
        return torch.library.wrap_triton(kernel)
    except (AttributeError, RuntimeError):  # older torch, or an interpreted kernel on a torch that rejects it
        return kernel


def _prune_resident(configs, named_args, **kwargs):
    """Autotuning: a config that keeps whole rows resident needs ``BLOCK_D >= D``."""
    D = named_args["D"]
    keep = [c for c in configs if not c.kwargs.get("RESIDENT") or c.kwargs["BLOCK_D"] >= D]
    return keep or [c for c in configs if not c.kwargs.get("RESIDENT")]


def _kernel(kind: str, prec: str, tunable: bool = True):
    """Returns ``(launchable, tuned)``; a tuned launchable takes no block sizes (autotune picks them,
    and for the gradient kernels the resident/transposed variants too). ``tunable=False`` (sub-centres)
    always returns the plain kernel."""
    if tunable and autotune_enabled() and not triton_interpreted():
        key = (kind, prec)
        if key not in _TUNED:
            grads = kind in ("dx", "dw")
            configs = [triton.Config(dict(c.meta(), **(dict(RESIDENT=int(c.resident), GRAD_T=int(c.grad_t))
                                                       if grads else {})),
                                     num_warps=c.num_warps, num_stages=c.num_stages)
                       for c in TUNE_SPACE[key]]
            reset = ["gx_ptr"] if kind == "dx" else None
            prune = {"early_config_prune": _prune_resident} if grads else None
            _TUNED[key] = triton.autotune(configs=configs, key=["B", "C", "D"], reset_to_zero=reset,
                                          prune_configs_by=prune)(_KERNELS[kind])
        return _wrap(_TUNED[key]), True
    return _wrap(_KERNELS[kind]), False


def _launch_args(cfg: LaunchConfig, tuned: bool, D: int | None = None) -> dict:
    """Block sizes and, for the gradient kernels (``D`` given), their resident/transposed flags;
    nothing when autotuning (the tuner's config supplies all of them)."""
    if tuned:
        return {}
    out = dict(cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if D is not None:
        out.update(RESIDENT=int(cfg.resident and D <= cfg.block_d), GRAD_T=int(cfg.grad_t))
    return out


def _scalars(scale: float, sv_a: float, sv_b: float) -> dict:
    (s_hi, s_lo), (a_hi, a_lo), (b_hi, b_lo) = _pair(scale), _pair(sv_a), _pair(sv_b)
    return dict(s_hi=s_hi, s_lo=s_lo, a_hi=a_hi, a_lo=a_lo, b_hi=b_hi, b_lo=b_lo)


def _sub_pad(subcenters: int) -> int:
    return triton.next_power_of_2(subcenters) if subcenters > 1 else 1


def _sub_cfg(cfg: LaunchConfig, subcenters: int) -> LaunchConfig:
    """K > 1: ``block_n // K_pad`` classes per tile (at least one), i.e. ``block_n`` rows of ``W`` per dot
    (``K_pad`` rows when K_pad > block_n; tl.dot needs >= 16, which both are)."""
    if subcenters == 1:
        return cfg
    return dataclasses.replace(cfg, block_n=max(1, cfg.block_n // _sub_pad(subcenters)))


def _extensions(xinv: torch.Tensor, sv_q: float, rt: Optional[torch.Tensor], thr: float, subcenters: int) -> dict:
    """Runtime arguments and constexpr flags of the issue-16 extensions: ``QUAD`` (``q ≠ 0``), ``HAS_RT``
    (per-row ``t_b``; ``xinv`` stands in for the pointer without it), ``FILTER`` (``thr < 2``), ``SUBC``
    and ``SUBC_PAD`` (K and K rounded up to a power of two)."""
    (q_hi, q_lo), (t_hi, t_lo) = _pair(sv_q), _pair(thr)
    return dict(rt_ptr=rt if rt is not None else xinv, q_hi=q_hi, q_lo=q_lo, thr_hi=t_hi, thr_lo=t_lo,
                QUAD=int(sv_q != 0.0), HAS_RT=int(rt is not None), FILTER=int(thr < 2.0), SUBC=int(subcenters),
                SUBC_PAD=_sub_pad(subcenters))


def _rt(rt: Optional[torch.Tensor], xinv: torch.Tensor) -> Optional[torch.Tensor]:
    if rt is None:
        return None
    if rt.shape != xinv.shape:
        raise ValueError(f"rt must be a [B] tensor (B = {xinv.shape[0]}), got shape {tuple(rt.shape)}")
    return rt.to(device=xinv.device, dtype=xinv.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# the entry points (registered as torch.library.triton_op below)
# ----------------------------------------------------------------------------------------------

def _forward_impl(x: torch.Tensor, W: torch.Tensor, xinv: torch.Tensor, winv: torch.Tensor,
                  y: torch.Tensor, f: torch.Tensor, scale: float, sv_a: float, sv_b: float,
                  negative: int, sv_q: float = 0.0, rt: Optional[torch.Tensor] = None, thr: float = 2.0,
                  subcenters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, D = x.shape
    C = W.shape[0] // subcenters
    rt = _rt(rt, xinv)
    cfg = _sub_cfg(_fit(config_for("fwd", x, W, subcenters), D), subcenters)
    kern, tuned = _kernel("fwd", precision_class(x, W), subcenters == 1)
    # with autotune the split count must not depend on the config: use the smallest block_n of the space
    bn = min(c.block_n for c in TUNE_SPACE[("fwd", precision_class(x, W))]) if tuned else cfg.block_n
    bm = max(c.block_m for c in TUNE_SPACE[("fwd", precision_class(x, W))]) if tuned else cfg.block_m
    S = _n_splits(C, bn, triton.cdiv(B, bm), x.device)
    acc = xinv.dtype
    pm = torch.empty((S, B), dtype=acc, device=x.device)
    pl = torch.empty((S, B), dtype=acc, device=x.device)
    pb = torch.empty((S, B), dtype=acc, device=x.device)
    pa = torch.empty((S, B), dtype=torch.int64, device=x.device)
    ps = torch.empty((S, B), dtype=torch.int32, device=x.device)
    fl = _flags(x, W)

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]), S)

    kern[grid](x, W, xinv, winv, y, f, pm, pl, pb, pa, ps, B, C, D, x.stride(0), W.stride(0), S,
               **_scalars(scale, sv_a, sv_b), **_extensions(xinv, sv_q, rt, thr, subcenters),
               NEGATIVE=int(negative), CAST=fl["CAST"], UPCAST=fl["UPCAST"],
               PRECISION=fl["PRECISION"], **_launch_args(cfg, tuned))
    # merge the splits: O(S·B)
    m = pm.max(dim=0).values
    lse = m + torch.log((pl * torch.exp(pm - m[None, :])).sum(dim=0))
    best = pb.max(dim=0).values
    pred = torch.where(pb == best[None, :], pa, torch.full_like(pa, C)).min(dim=0).values
    sv = ps.sum(dim=0, dtype=torch.int32)
    return lse, pred, sv


def _forward_fake(x, W, xinv, winv, y, f, scale, sv_a, sv_b, negative, sv_q=0.0, rt=None, thr=2.0, subcenters=1):
    B = x.shape[0]
    return (x.new_empty((B,), dtype=xinv.dtype), x.new_empty((B,), dtype=torch.int64),
            x.new_empty((B,), dtype=torch.int32))


def _dx_impl(x: torch.Tensor, W: torch.Tensor, xinv: torch.Tensor, winv: torch.Tensor, y: torch.Tensor,
             f: torch.Tensor, lse: torch.Tensor, gl: torch.Tensor, dcy: torch.Tensor, scale: float,
             sv_a: float, sv_b: float, negative: int, sv_q: float = 0.0, rt: Optional[torch.Tensor] = None,
             thr: float = 2.0, subcenters: int = 1) -> torch.Tensor:
    B, D = x.shape
    C = W.shape[0] // subcenters
    rt = _rt(rt, xinv)
    prec = precision_class(x, W)
    cfg = _sub_cfg(_fit(config_for("dx", x, W, subcenters), D), subcenters)
    kern, tuned = _kernel("dx", prec, subcenters == 1)
    if tuned:
        bn = min(c.block_n for c in TUNE_SPACE[("dx", prec)])
        others = triton.cdiv(B, max(c.block_m for c in TUNE_SPACE[("dx", prec)]))
    else:
        bn = cfg.block_n
        others = triton.cdiv(B, cfg.block_m) * triton.cdiv(D, cfg.block_d)
    S = _n_splits(C, bn, others, x.device)
    atomic = not deterministic()
    if atomic:
        gx = torch.zeros((B, D), dtype=xinv.dtype, device=x.device)
    else:
        gx = torch.empty((S, B, D), dtype=xinv.dtype, device=x.device)
    fl = _flags(x, W)

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]), S)

    kern[grid](x, W, xinv, winv, y, f, lse, gl, dcy, gx, B, C, D, x.stride(0), W.stride(0), S,
               **_scalars(scale, sv_a, sv_b), **_extensions(xinv, sv_q, rt, thr, subcenters),
               NEGATIVE=int(negative), ATOMIC=int(atomic), **fl, **_launch_args(cfg, tuned, D))
    if atomic:
        return gx
    return gx.sum(dim=0) if S > 1 else gx[0]


def _dx_fake(x, W, xinv, winv, y, f, lse, gl, dcy, scale, sv_a, sv_b, negative, sv_q=0.0, rt=None, thr=2.0,
             subcenters=1):
    return x.new_empty(x.shape, dtype=xinv.dtype)


def _dw_impl(x: torch.Tensor, W: torch.Tensor, xinv: torch.Tensor, winv: torch.Tensor, y: torch.Tensor,
             f: torch.Tensor, lse: torch.Tensor, gl: torch.Tensor, dcy: torch.Tensor, scale: float,
             sv_a: float, sv_b: float, negative: int, sv_q: float = 0.0, rt: Optional[torch.Tensor] = None,
             thr: float = 2.0, subcenters: int = 1) -> torch.Tensor:
    B, D = x.shape
    C = W.shape[0] // subcenters
    rt = _rt(rt, xinv)
    cfg = _sub_cfg(_fit(config_for("dw", x, W, subcenters), D), subcenters)
    kern, tuned = _kernel("dw", precision_class(x, W), subcenters == 1)
    dW = torch.empty_like(W)
    fl = _flags(x, W)

    def grid(meta):
        return (triton.cdiv(C, meta["BLOCK_N"]), triton.cdiv(D, meta["BLOCK_D"]))

    kern[grid](x, W, xinv, winv, y, f, lse, gl, dcy, dW, B, C, D, x.stride(0), W.stride(0), dW.stride(0),
               **_scalars(scale, sv_a, sv_b), **_extensions(xinv, sv_q, rt, thr, subcenters),
               NEGATIVE=int(negative), **fl, **_launch_args(cfg, tuned, D))
    return dW


def _dw_fake(x, W, xinv, winv, y, f, lse, gl, dcy, scale, sv_a, sv_b, negative, sv_q=0.0, rt=None, thr=2.0,
             subcenters=1):
    return torch.empty_like(W)


def _npt_impl(x: torch.Tensor, W: torch.Tensor, xinv: torch.Tensor, winv: torch.Tensor, y: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = x.shape
    C = W.shape[0]
    prec = precision_class(x, W)
    cfg = _fit(config_for("npt", x, W), D)
    kern, tuned = _kernel("npt", prec)
    bn = min(c.block_n for c in TUNE_SPACE[("npt", prec)]) if tuned else cfg.block_n
    bm = max(c.block_m for c in TUNE_SPACE[("npt", prec)]) if tuned else cfg.block_m
    S = _n_splits(C, bn, triton.cdiv(B, bm), x.device)
    kp = triton.next_power_of_2(k)
    pv = torch.empty((S, B, kp), dtype=xinv.dtype, device=x.device)
    pi = torch.empty((S, B, kp), dtype=torch.int64, device=x.device)
    fl = _flags(x, W)

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]), S)

    kern[grid](x, W, xinv, winv, y, pv, pi, B, C, D, x.stride(0), W.stride(0), S, K=k, K_PAD=kp,
               CAST=fl["CAST"], UPCAST=fl["UPCAST"], PRECISION=fl["PRECISION"], **_launch_args(cfg, tuned))
    cand_v = pv.permute(1, 0, 2).reshape(B, S * kp)
    cand_i = pi.permute(1, 0, 2).reshape(B, S * kp)
    topv, pos = cand_v.topk(k, dim=1)
    return topv, cand_i.gather(1, pos)


def _npt_fake(x, W, xinv, winv, y, k):
    B = x.shape[0]
    return x.new_empty((B, k), dtype=xinv.dtype), x.new_empty((B, k), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# torch.compile registration
# ----------------------------------------------------------------------------------------------

REGISTERED = False
REGISTRATION_ERROR = ""
_OPS = {}


def _register():
    """Registers the four entry points as ``torch.library.triton_op`` s with explicit fake kernels.
    Idempotent (a module reload finds the ops already defined and reuses them)."""
    global REGISTERED, REGISTRATION_ERROR
    specs = {
        "margin_forward": (_forward_impl, _forward_fake),
        "margin_backward_dx": (_dx_impl, _dx_fake),
        "margin_backward_dw": (_dw_impl, _dw_fake),
        "npt_topk": (_npt_impl, _npt_fake),
    }
    try:
        triton_op = torch.library.triton_op
    except AttributeError:
        REGISTRATION_ERROR = f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)"
        _OPS.update({n: impl for n, (impl, _) in specs.items()})
        return
    try:
        for op_name, (impl, fake) in specs.items():
            existing = getattr(torch.ops.fusedface, op_name, None) if hasattr(torch.ops, "fusedface") else None
            if existing is not None:
                _OPS[op_name] = existing
                continue
            op = triton_op(f"fusedface::{op_name}", impl, mutates_args=())
            op.register_fake(fake)
            _OPS[op_name] = op
        REGISTERED = True
    except Exception as exc:  # registration is an optimisation for torch.compile, never a requirement
        REGISTRATION_ERROR = f"{type(exc).__name__}: {exc}"
        _OPS.update({n: impl for n, (impl, _) in specs.items()})


_register()


# ----------------------------------------------------------------------------------------------
# the engine's kernel interface (fusedface/_engine.py)
# ----------------------------------------------------------------------------------------------

def _check(x, W):
    if x.device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (got {x.device.type}); set "
                           "TRITON_INTERPRET=1 before importing triton to run it on CPU tensors for testing")
    if x.stride(1) != 1 or W.stride(1) != 1:
        raise ValueError("backend='triton' needs x and W with unit stride along D (the engine passes .contiguous())")


def _margin_args(W, opts, rt):
    """``(scale, a, b, negative, q, rt, thr, K)`` of the margin ops from the options (``rt`` only where
    a rewrite is on, as in the torch backend)."""
    K = int(opts.subcenters)
    if W.shape[0] % K:
        raise ValueError(f"W has {W.shape[0]} rows, not a multiple of subcenters={K} (W must be [C·K, D])")
    q, a, b = opts.rewrite3
    neg = opts.negative != "none"
    return (float(opts.scale), float(a), float(b), int(neg), float(q), rt if neg else None,
            float(opts.filter_threshold), K)


def margin_forward(x, W, xinv, winv, y, f, opts, tile, keep_block=False, rt=None):
    _check(x, W)
    lse, pred, sv = _OPS["margin_forward"](x, W, xinv, winv, y, f, *_margin_args(W, opts, rt))
    return lse, pred, sv, None


def margin_backward(x, W, xinv, winv, y, f, lse, gl, dcy, opts, tile, need_dx, need_dW, block=None, rt=None):
    _check(x, W)
    args = (x, W, xinv, winv, y, f, lse, gl, dcy, *_margin_args(W, opts, rt))
    Gx = _OPS["margin_backward_dx"](*args) if need_dx else None
    dW = _OPS["margin_backward_dw"](*args) if need_dW else None
    return Gx, dW


def npt_forward(x, W, xinv, winv, y, k, tile):
    _check(x, W)
    return _OPS["npt_topk"](x, W, xinv, winv, y, int(k))
