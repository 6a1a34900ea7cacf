"""Triton kernels of the training step of the margin-softmax family at four GEMM-equivalents
(installed as ``fusedface.triton_kernels.margin_step``; the launcher is ``fusedface/backends/triton.py``).

The earlier design (``margin_softmax.py``, still used for fp64, for the sharded heads and behind
``FUSEDFACE_TRITON_PATH=legacy``) recomputes the logits in *each* of its two gradient kernels and,
for fp32-grade gradients, runs every gradient product twice (``dℓ/dc`` split into 16-bit ``hi + lo``):
seven GEMM-equivalents of tensor-core work per forward + backward. Here:

* **forward** (``step_fwd_kernel``, 2 GEMM-eq): each class tile's logits ``x·Wᵀ`` are formed once
  and, as in FlashAttention's forward (Dao et al., 2022), the same tile's probabilities (relative to
  the running row max) are multiplied straight into an online-rescaled numerator
  ``E_b = Σ_k exp(z_bk − m_b)·slope_bk·ŵ_k`` over the negatives. After the merge, ``E_b / L_b`` is the
  softmax-weighted mean of the negative centres, and since the upstream gradient ``gl_b`` is one
  scalar per row, ``dL/dx`` needs no pass over the classes in the backward at all:
  ``Gx_b = s·gl_b·E_b/L_b + dcy_b·ŵ_{y_b}``.
* **backward** (``step_dw_kernel``, 2 GEMM-eq): one class-stationary kernel recomputes each tile once
  and accumulates ``dW`` (normalisation Jacobian in-kernel), then ``step_dx_kernel`` (O(B·D)) forms
  ``dL/dx`` from ``E`` and the label column.

**Exact single-dot gradients.** Both gradient products run as one 16-bit tensor-core dot, on
``dℓ/dc`` (or the probabilities) rounded to the input dtype: each term is off by at most 2⁻⁹ (bf16)
relative, and the errors of the many small negative terms average out. The one large term of every
row is the label column's (``−s·(1 − p_y)``), whose rounding error would show in the gradient: it is
kept out of the dots. In ``dL/dx`` it is added in fp32 from the gathered ``W[y]`` (O(B·D)); in ``dW``
the tiles that hold a label column (a few per row block) get a second dot on the rounding remainder
of the label entries only. ``SPLIT`` (opt-in) runs the full ``hi + lo`` split on every tile instead.

**Also fused here:** the O(B·D) prologue (inverse norms of ``x``, the gathered target cosine, the target
transform ``T(c) = cos(m1·θ + m2) − m3`` with its theta policy and slope: ``step_prologue_kernel``);
the inverse norms of ``W``, computed by the forward from the tiles it loads anyway (no separate read
of ``W``); the merge of the class splits, the per-row losses, the arg-max and the ``E`` merge
(``step_merge_kernel``); the reduction (``step_reduce_kernel``); and the upstream gradient, ``dcy``
and both normalisation Jacobians inside the backward kernels. A whole forward + backward is six
kernel launches (no host synchronisation, static shapes: CUDA-graph capturable).

**Mixed precision.** ``W_CAST``: ``W`` is fp32 (master weights) and ``x`` 16-bit; every ``W`` tile is
rounded to ``x``'s dtype in registers after loading — the result of ``F.linear`` under autocast, with
no 16-bit copy of ``W`` — and its norms are those of the rounded rows, so the loss is the 16-bit
path's on ``W`` rounded; ``dW`` is accumulated in fp32 and stored in fp32.

**The lean epilogue.** Logits are kept in log2 units (``s·log2 e`` folded into one scale, ``exp2``);
the arg-max's index reduction runs only on tiles whose best cosine beats some row's running best; the
support-vector count only when asked for (a rewrite is on, or a head reports it); ``E`` is rescaled
only when some row's running max moved.

**Hybrid epilogues** (``hybrid_fwd_kernel``, ``hybrid_bwd_kernel``): for fp32 inputs the products
run through cuBLAS (``torch.mm`` into a bounded ``[B, chunk]`` fp32 buffer) and these kernels do the
same epilogue over the buffer: the forward's online statistics, and the backward's ``dℓ/dc`` written
back in place (times ``winv``) with the Jacobian coefficient ``−r_k·winv_k²`` per class.

Conventions as in ``margin_softmax.py`` (int64 offsets, fp32 accumulation, ``UPCAST`` for the triton
interpreter's bf16 defects). ``ylab`` is the label with ``-1`` on ignored rows and ``-2`` on labels
outside ``[0, C)`` (their loss is NaN: never a silent wrong loss).

References: ArcFace (Deng et al., CVPR 2019), CosFace (Wang et al., CVPR 2018), SphereFace (Liu et al.,
CVPR 2017), SV-Softmax (Wang et al., 2018), MV-Softmax (Wang et al., AAAI 2020), online softmax
(Milakov & Gimelshein, 2018), FlashAttention (Dao et al., NeurIPS 2022) for the online-rescaled
numerator, Cut Cross-Entropy (Wijmans et al., 2024) for the streamed logits. The code is our own.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .margin_softmax import _dot_pv, _pscale, _round, _scaled_dot, _split_tiles

LOG2E = tl.constexpr(1.4426950408889634)  # logits are kept in log2 units: exp(z) = exp2(z·log2 e)
LN2 = tl.constexpr(0.6931471805599453)
CLIP_EPS = tl.constexpr(1e-3)  # theta_policy="clip" (AdaFace): fusedface._engine.CLIP_EPS


@triton.jit
def _acos(c):
    """``acos`` in fp32 for ``c`` in [-1, 1] (triton has no portable acos: libdevice's is not
    available under the interpreter). ``asin(u) = u + u·u²·P(u²)`` on [0, 1/2] with a degree-4
    minimax polynomial (the classic single-precision one, ~1 ulp), and
    ``acos(|c|) = 2·asin(√((1 − |c|)/2))`` above 1/2, which keeps full relative accuracy near ±1."""
    a = tl.abs(c)
    big = a > 0.5
    z = tl.where(big, (1.0 - a) * 0.5, a * a)
    u = tl.where(big, tl.sqrt(z), a)
    p = (((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z \
        + 1.6666752422e-1
    asin_u = u + u * z * p
    r = tl.where(big, 2.0 * asin_u, 1.5707963267948966 - asin_u)
    return tl.where(c < 0, 3.141592653589793 - r, r)


@triton.jit
def _sincos(a):
    """``(sin a, cos a)`` in fp32 for moderate ``|a|`` (the target transform's ``m1·θ + m2``, within a
    few π): ``a = k·π/2 + r`` with a three-piece Cody–Waite reduction, ``|r| ≤ π/4``, Taylor
    polynomials to ``r¹³``/``r¹⁴`` (truncation < 1e-11), then the quadrant. libdevice's ``sinf``/``cosf``
    keep a local-memory array for their huge-argument reduction (a stack frame in every kernel that
    calls them); this needs none."""
    k = tl.floor(a * 0.6366197723675814 + 0.5)
    r = a - k * 1.5707963705062866
    r = r - k * -4.371139000186243e-08
    r = r - k * -1.7151245100059536e-15
    r2 = r * r
    sp = r * (1.0 + r2 * (-1.6666666666666666e-01 + r2 * (8.333333333333333e-03 + r2 * (-1.984126984126984e-04
         + r2 * (2.7557319223985893e-06 + r2 * (-2.505210838544172e-08 + r2 * 1.6059043836821613e-10))))))
    cp = 1.0 + r2 * (-0.5 + r2 * (4.1666666666666664e-02 + r2 * (-1.388888888888889e-03 + r2 * (2.48015873015873e-05
         + r2 * (-2.755731922398589e-07 + r2 * (2.08767569878681e-09 + r2 * -1.1470745597729725e-11))))))
    q = k.to(tl.int32) & 3
    sin_a = tl.where(q == 0, sp, tl.where(q == 1, cp, tl.where(q == 2, -sp, -cp)))
    cos_a = tl.where(q == 0, cp, tl.where(q == 1, -sp, tl.where(q == 2, -cp, sp)))
    return sin_a, cos_a


@triton.jit
def _cast(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``v`` (fp32) stored as ``dtype``: round to nearest even (``_round``'s bit rounding for bf16
    under the interpreter), a plain conversion otherwise."""
    if UPCAST and dtype == tl.bfloat16:
        return _round(v, dtype, UPCAST)
    else:
        return v.to(dtype)


@triton.jit
def _to_input(v, dtype: tl.constexpr, W_CAST: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded ``W`` tile as the dot operand: rounded to ``x``'s 16-bit dtype when ``W_CAST``."""
    if W_CAST:
        return _round(v.to(tl.float32), dtype, UPCAST)
    else:
        return v


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` (under the interpreter's ``UPCAST`` the bf16 operands go through fp32 exactly)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _tile_products(x_ptr, w_tile, rows, row_ok, lane, col_ok, D, stride_x, stride_w, acc, wsq,
                   W_CAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, NORMS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Raw products of one ``[BLOCK_M, BLOCK_N]`` tile streamed over ``D``; with ``NORMS`` also the
    squared norms of the (rounded) ``W`` rows of the tile, from the same loads. ``w_tile`` points at
    the tile's first class row (its int64 offset is taken once per tile) and ``rows``/``lane`` are
    int32, so the per-element addresses cost no 64-bit arithmetic (the launcher checks that
    ``B·stride_x`` and ``BLOCK_N·stride_w`` fit in int32)."""
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        # x's row block is read again with every class tile: ask for it to stay in L1 (``.ca``), where it
        # fits (64 rows × 512 × 2 bytes) beside the pipeline's shared memory, instead of L2 each time
        a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".ca")
        b = tl.load(w_tile + lane[None, :] * stride_w + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        b = _to_input(b, x_ptr.dtype.element_ty, W_CAST, UPCAST)
        if NORMS:
            bf = b.to(tl.float32)
            wsq += tl.sum(bf * bf, axis=0)
        acc = _dot(a, b, acc, UPCAST, PRECISION)
    return acc, wsq


@triton.jit
def _tile_products_t(x_ptr, w_tile, rows, row_ok, lane, col_ok, D, stride_x, stride_w, acc_t, wsq,
                     W_CAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_tile_products` transposed: ``acc_t [BLOCK_N, BLOCK_M] += W_chunk · x_chunkᵀ``, so the
    classes are the M side of the MMA (Hopper's warpgroup MMA needs M ≥ 64 and ``BLOCK_M`` may be 32),
    with the squared norms of the tile's rows."""
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(x_ptr + rows[None, :] * stride_x + ks[:, None],
                    mask=row_ok[None, :] & k_ok[:, None], other=0.0)
        b = tl.load(w_tile + lane[:, None] * stride_w + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        b = _to_input(b, x_ptr.dtype.element_ty, W_CAST, UPCAST)
        bf = b.to(tl.float32)
        wsq += tl.sum(bf * bf, axis=1)
        acc_t = _dot(b, a, acc_t, UPCAST, PRECISION)
    return acc_t, wsq


@triton.jit
def _tile_epilogue(raw, ylab, cols64, col_ok, f, s2, sv_a, sv_b, NEGATIVE: tl.constexpr):
    """Cosines, label mask, support vectors and logits (log2 units) of one tile (SPEC §2):
    ``c = clamp(raw)``; support vectors ``c > f_b`` off the label (strict, no gradient through the
    mask) rewritten to ``a·c + b`` when ``NEGATIVE``; ``z₂ = s·log2(e)·g``, ``s·log2(e)·f_b`` on the
    label column, ``-inf`` on padding."""
    c = tl.minimum(tl.maximum(raw, -1.0), 1.0)
    lab = ylab[:, None] == cols64[None, :]
    sv = (c > f[:, None]) & (lab == 0) & col_ok[None, :]
    if NEGATIVE:
        g = tl.where(sv, sv_a * c + sv_b, c)
    else:
        g = c
    z2 = tl.where(lab, s2 * f[:, None], s2 * g)
    z2 = tl.where(col_ok[None, :], z2, float("-inf"))
    return c, lab, sv, z2


@triton.jit
def _tile_slope(raw, sv, sv_a, NEGATIVE: tl.constexpr):
    """``dg/dc`` off the label: 0 where the raw cosine left [-1, 1] (as ``torch.clamp``), ``a`` on
    rewritten support vectors, else 1."""
    slope = tl.where((raw >= -1.0) & (raw <= 1.0), 1.0, 0.0)
    if NEGATIVE:
        slope = tl.where(sv, slope * sv_a, slope)
    return slope


@triton.jit
def _row_grads(rows64, row_ok, ylab, f, lse, slope, g_ptr, wscale_ptr, scale, PER_ROW: tl.constexpr):
    """Per row: the upstream gradient ``gl_b`` (0 on ignored rows; ``g·wscale`` for a reduced loss,
    ``wscale = 1/n_valid`` for the mean) and ``dcy_b = s·(p_y − 1)·gl_b·dT/dc`` on the label column."""
    valid = (ylab != -1) & row_ok
    if PER_ROW:
        g = tl.load(g_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr).to(tl.float32) * tl.load(wscale_ptr)
    gl = tl.where(valid, g, 0.0)
    dcy = scale * (tl.exp(scale * f - lse) - 1.0) * gl * slope
    dcy = tl.where(valid, dcy, 0.0)
    return gl, dcy


@triton.jit
def _pdot(p, lab, v, acc, LABEL_EXACT: tl.constexpr, SPLIT: tl.constexpr, RESCALE: tl.constexpr,
          PRECISION: tl.constexpr, UPCAST: tl.constexpr, P_RIGHT: tl.constexpr):
    """``acc + p @ v`` (``acc + v @ p`` with ``P_RIGHT``) for an fp32 tile ``p`` and a 16-bit ``v``:
    one tensor-core dot on ``p`` rounded to ``v``'s dtype; ``SPLIT``: ``hi + lo`` on every entry.
    ``LABEL_EXACT``: the entries where ``lab`` is set (label columns, ~s·(1 − p_y) against ~s·p of the
    negatives) get the ``hi + lo`` treatment, on the tiles that hold one: a second dot on their
    rounding remainder (bf16), or (fp16, ``RESCALE``) their own two dots at their own scale, so that
    the negatives of the tile keep their precision in fp16's narrow range."""
    if SPLIT:
        acc = _scaled_dot(p, v, acc, True, RESCALE, PRECISION, UPCAST, P_RIGHT)
    elif LABEL_EXACT:
        any_lab = tl.sum(tl.sum(lab.to(tl.int32), axis=1), axis=0) > 0
        if RESCALE:
            acc = _scaled_dot(tl.where(lab, 0.0, p), v, acc, False, RESCALE, PRECISION, UPCAST, P_RIGHT)
            if any_lab:
                acc = _scaled_dot(tl.where(lab, p, 0.0), v, acc, True, RESCALE, PRECISION, UPCAST, P_RIGHT)
        else:
            hi = _round(p, v.dtype, UPCAST)
            acc = _dot_pv(hi, v, acc, P_RIGHT, PRECISION, UPCAST)
            if any_lab:
                lo = _round(tl.where(lab, p - hi.to(tl.float32), 0.0), v.dtype, UPCAST)
                acc = _dot_pv(lo, v, acc, P_RIGHT, PRECISION, UPCAST)
    else:
        acc = _scaled_dot(p, v, acc, False, RESCALE, PRECISION, UPCAST, P_RIGHT)
    return acc


@triton.jit
def _load_wt(w_tile, lane, col_ok, dcols, d_ok, stride_w, dtype: tl.constexpr, W_CAST: tl.constexpr,
             UPCAST: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_D]`` ``W`` tile as the right operand of the ``E`` dot (rounded to ``dtype``
    when ``W_CAST``). The ``where`` after the rounding is a no-op on the values (the masked entries are
    loaded as 0) but keeps the compiler from moving the rounding past the tile's trip through shared
    memory: without it, the fp32 tile is staged in shared memory and read back in fp32 (no ``ldmatrix``,
    twice the registers), which spills on sm_80."""
    mask = col_ok[:, None] & d_ok[None, :]
    wt = tl.load(w_tile + lane[:, None] * stride_w + dcols[None, :], mask=mask, other=0.0)
    if W_CAST:
        wt = tl.where(mask, _to_input(wt, dtype, W_CAST, UPCAST), 0.0)
    return wt


@triton.jit
def _pdot_split_joined(p, w, acc, RESCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``acc + p @ w`` with ``p = hi + lo`` (both rounded to ``w``'s dtype) as ONE dot of doubled depth,
    ``[hi | lo] @ [w; w]`` (columns interleaved: ``k = 2·n + {0: hi, 1: lo}``), rather than two dots into
    the same accumulator (which the compiler handles with a second live copy of it: spills). The same
    products and fp32 accumulation as :func:`_scaled_dot` with ``TWO``; ``RESCALE`` as there."""
    up = _pscale(p, RESCALE)
    if RESCALE:
        p = p / up
        acc = acc / up
    hi = _round(p, w.dtype, UPCAST)
    lo = _round(p - hi.to(tl.float32), w.dtype, UPCAST)
    a = tl.reshape(tl.join(hi, lo), (BLOCK_M, 2 * BLOCK_N))
    b = tl.reshape(tl.permute(tl.join(w, w), (0, 2, 1)), (2 * BLOCK_N, BLOCK_D))
    acc = _dot_pv(a, b, acc, False, PRECISION, UPCAST)
    if RESCALE:
        acc = acc * up
    return acc


@triton.jit
def _online_update(z2, run_m, run_l, nan_tile):
    """One tile into the online log-sum-exp (log2 units; Milakov & Gimelshein 2018): the new running
    max, the tile's ``p = exp2(z₂ − m_new)``, the rescale ``exp2(m_old − m_new)`` and the new running
    sum; ``nan_tile`` (a NaN centre in the tile) makes the sum NaN — NaN in, NaN out."""
    new_m = tl.maximum(run_m, tl.max(z2, axis=1))
    p = tl.exp2(z2 - new_m[:, None])
    alpha = tl.exp2(run_m - new_m)
    run_l = run_l * alpha + tl.sum(p, axis=1)
    if nan_tile:
        run_l = run_l + float("nan")
    return new_m, p, alpha, run_l


@triton.jit
def _row_block_bwd(rows, row_ok, xinv_ptr, f_ptr, ylab_ptr, lse_ptr, slope_ptr, g_ptr, wscale_ptr, scale,
                   PER_ROW: tl.constexpr):
    """A backward row block's per-row inputs: ``(xinv, f, ylab, lse, gl, dcy)``."""
    xinv = tl.load(xinv_ptr + rows, mask=row_ok, other=0.0)
    f = tl.load(f_ptr + rows, mask=row_ok, other=0.0)
    ylab = tl.load(ylab_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    slope_y = tl.load(slope_ptr + rows, mask=row_ok, other=0.0)
    gl, dcy = _row_grads(rows, row_ok, ylab, f, lse, slope_y, g_ptr, wscale_ptr, scale, PER_ROW)
    return xinv, f, ylab, lse, gl, dcy


@triton.jit
def _tile_dc(raw, z2, sv, lab, ok, lse, gl, dcy, scale, sv_a, NEGATIVE: tl.constexpr):
    """``dℓ/dc`` of a recomputed tile: ``s·exp(z − lse)·gl·slope`` off the label, ``dcy`` on it, 0 on
    padding."""
    dc = scale * tl.exp2(z2 - lse[:, None] * LOG2E) * gl[:, None] * _tile_slope(raw, sv, sv_a, NEGATIVE)
    dc = tl.where(lab, dcy[:, None], dc)
    return tl.where(ok, dc, 0.0)


@triton.jit
def _row_block_in(pid_m, B, xinv_ptr, f_ptr, ylab_ptr, BLOCK_M: tl.constexpr):
    """A forward program's rows and their per-row inputs: ``(rows, row_ok, rows64, xinv, f, ylab)``."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    xinv = tl.load(xinv_ptr + rows64, mask=row_ok, other=0.0)
    f = tl.load(f_ptr + rows64, mask=row_ok, other=0.0)
    ylab = tl.load(ylab_ptr + rows64, mask=row_ok, other=-1)
    return rows, row_ok, rows64, xinv, f, ylab


@triton.jit
def _argmax_update(c, col_ok, best, arg, first_col):
    """The running arg-max of the cosines (first column on ties; ``first_col`` is the tile's first
    column, in ``arg``'s dtype); the index reduction runs only when some row's best improves."""
    cm = tl.where(col_ok[None, :], c, float("-inf"))
    if tl.sum((tl.max(cm, axis=1) > best).to(tl.int32), axis=0) > 0:
        tb, ti = tl.max(cm, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tb > best
        best = tl.where(better, tb, best)
        arg = tl.where(better, first_col + ti.to(arg.dtype), arg)
    return best, arg


@triton.jit
def _store_partials(m_ptr, l_ptr, best_ptr, arg_ptr, sv_ptr, part, B, rows64, row_ok, run_m, run_l, best, arg,
                    svc):
    """One split's per-row partial statistics, at ``[part, rows]`` of the ``[S, B]`` buffers."""
    out = tl.cast(part, tl.int64) * B + rows64
    tl.store(m_ptr + out, run_m, mask=row_ok)
    tl.store(l_ptr + out, run_l, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(arg_ptr + out, arg.to(tl.int64), mask=row_ok)
    tl.store(sv_ptr + out, svc, mask=row_ok)
    return out


@triton.jit
def step_prologue_kernel(
    x_ptr, w_ptr, y_ptr, m2_ptr, m3_ptr,
    xinv_ptr, f_ptr, slope_ptr, ylab_ptr,     # [B] fp32 outputs, ylab int64
    B, C, D, stride_x, stride_w, ignore_index,
    m1, m2_val, m3_val,
    M2_VEC: tl.constexpr, M3_VEC: tl.constexpr, POLICY: tl.constexpr, STRAIGHT: tl.constexpr,
    W_CAST: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """O(B·D) prologue, one program per ``BLOCK_R`` rows: ``xinv = 1/max(‖x‖, ε)``, the raw target
    cosine from the gathered (rounded) ``W[y]`` row, and the target transform of SPEC §2:
    ``f = cos(m1·θ + m2) − m3`` (``POLICY`` 1: ``c − m2·sin(m2) − m3`` past π; 2: ``c`` when ``c ≤ 0``;
    3, AdaFace's clip: ``c`` clamped to ``±(1 − ε)`` and the angle to ``[ε, π − ε]``, ε = 1e-3),
    its slope ``m1·sin(m1·θ + m2)/sin θ`` (1 under the policies' fallbacks and ``STRAIGHT``; 0 where the
    raw cosine left [-1, 1], and under ``POLICY`` 3 without ``STRAIGHT`` where either clip acts).
    ``m2``/``m3`` are per-row tensors (``M2_VEC``/``M3_VEC``) or scalars."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < C)
    ysafe = tl.where(valid & in_range, y, 0)
    xx = tl.zeros([BLOCK_R], dtype=tl.float32)
    xw = tl.zeros([BLOCK_R], dtype=tl.float32)
    ww = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (ds < D)[None, :]
        xv = tl.load(x_ptr + rows64[:, None] * stride_x + ds[None, :], mask=m, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + ysafe[:, None] * stride_w + ds[None, :], mask=m, other=0.0)
        wv = _to_input(wv, x_ptr.dtype.element_ty, W_CAST, UPCAST).to(tl.float32)
        xx += tl.sum(xv * xv, axis=1)
        xw += tl.sum(xv * wv, axis=1)
        ww += tl.sum(wv * wv, axis=1)
    xinv = 1.0 / tl.maximum(tl.sqrt(xx), 1e-12)
    raw = xw * xinv / tl.maximum(tl.sqrt(ww), 1e-12)
    if M2_VEC:
        m2 = tl.load(m2_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    else:
        m2 = tl.zeros([BLOCK_R], dtype=tl.float32) + m2_val
    if M3_VEC:
        m3 = tl.load(m3_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    else:
        m3 = tl.zeros([BLOCK_R], dtype=tl.float32) + m3_val
    inside = (raw >= -1.0) & (raw <= 1.0)
    if POLICY == 3:  # "clip" (AdaFace): the same eps as fusedface._engine.CLIP_EPS
        lim = 1.0 - CLIP_EPS
        clipped = (raw < -lim) | (raw > lim)
        c = tl.minimum(tl.maximum(raw, -lim), lim)
    else:
        c = tl.minimum(tl.maximum(raw, -1.0), 1.0)
    angle = m1 * _acos(c) + m2
    if POLICY == 3:
        clipped = clipped | (angle < CLIP_EPS) | (angle > 3.141592653589793 - CLIP_EPS)
        angle = tl.minimum(tl.maximum(angle, CLIP_EPS), 3.141592653589793 - CLIP_EPS)
    sin_a, cos_a = _sincos(angle)
    f = cos_a - m3
    slope = m1 * sin_a / tl.sqrt(tl.maximum(1.0 - c * c, 1e-12))
    if POLICY == 3:
        slope = tl.where(clipped, 0.0, slope)
    if POLICY == 1:  # "threshold"
        past = angle > 3.141592653589793
        sin_m2, _ = _sincos(m2)
        f = tl.where(past, c - m2 * sin_m2 - m3, f)
        slope = tl.where(past, 1.0, slope)
    if POLICY == 2:  # "easy"
        easy = c > 0
        f = tl.where(easy, f, c)
        slope = tl.where(easy, slope, 1.0)
    if STRAIGHT:
        slope = tl.zeros([BLOCK_R], dtype=tl.float32) + 1.0
    slope = tl.where(inside, slope, 0.0)
    # NaN in, NaN out (the clamp and min/max may drop a NaN); a label outside [0, C): NaN loss
    f = tl.where((raw != raw) | (valid & (in_range == 0)), float("nan"), f)
    ylab = tl.where(valid, tl.where(in_range, y, -2), -1)
    tl.store(xinv_ptr + rows64, xinv, mask=row_ok)
    tl.store(f_ptr + rows64, f, mask=row_ok)
    tl.store(slope_ptr + rows64, slope, mask=row_ok)
    tl.store(ylab_ptr + rows64, ylab, mask=row_ok)


@triton.jit
def step_fwd_kernel(
    x_ptr, w_ptr, xinv_ptr, f_ptr, ylab_ptr,
    winv_ptr,                                  # [C] fp32 output (written by the first row block)
    m_ptr, l_ptr, best_ptr, arg_ptr, sv_ptr,   # [S, B] partials (m, l in log2 units)
    e_ptr,                                     # [S, B, D] fp32 partial numerators (NEED_DX)
    B, C, D, stride_x, stride_w, n_splits,
    scale, sv_a, sv_b,
    NEGATIVE: tl.constexpr, COUNT_SV: tl.constexpr, NEED_DX: tl.constexpr, W_CAST: tl.constexpr,
    SPLIT: tl.constexpr, RESCALE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    T_DOT: tl.constexpr, X_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward over one row block and one contiguous range of class tiles (grid: row blocks × splits).

    Per tile: raw products streamed over ``D`` (the squared norms of the tile's ``W`` rows from the same
    loads: ``winv``, stored once), ``c``, logits ``z₂`` (log2 units), online max ``m`` and sum
    ``l = Σ exp2(z₂ − m)``; the arg-max of ``c`` (first column on ties) and the support-vector count;
    with ``NEED_DX`` the numerator ``E += (p·slope·winv)_{negatives} @ W_tile``, ``p = exp2(z₂ − m)``
    (the same probabilities as the sum), rescaled by ``exp2(m_old − m_new)`` when a row max moves.
    A NaN centre makes ``l`` NaN (NaN in, NaN out). ``T_DOT``: both products transposed (classes,
    then features, on the M side of the MMA), so a 32-row block still runs warpgroup MMA and ``E``
    (``[D, BLOCK_M]`` fp32, the largest register tenant) is half the size of a 64-row block's."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, xinv, f, ylab = _row_block_in(pid_m, B, xinv_ptr, f_ptr, ylab_ptr, BLOCK_M)
    # labels and class indices in int32 (``C`` is an int32 argument): fewer live registers in the loop
    ylab = ylab.to(tl.int32)
    s2 = scale * LOG2E
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D

    run_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    svc = tl.zeros([BLOCK_M], dtype=tl.int32)
    if NEED_DX:
        if T_DOT:
            e = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        else:
            e = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if X_RES:  # the row block of x, loaded once: the only operand streamed per tile is W's
        xres = tl.load(x_ptr + rows64[:, None] * stride_x + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :],
                       other=0.0)
    n_tiles = tl.cdiv(C, BLOCK_N)
    t0, t1 = _split_tiles(n_tiles, n_splits, pid_s)
    lane = tl.arange(0, BLOCK_N)
    for t in range(t0, t1):
        base = tl.cast(t, tl.int64) * BLOCK_N
        cols = t * BLOCK_N + lane
        col_ok = cols < C
        w_tile = w_ptr + base * stride_w
        wsq = tl.zeros([BLOCK_N], dtype=tl.float32)  # 0 on padding columns
        if X_RES:  # one load (and rounding) of the W tile feeds the norms, the logits and the numerator
            wt = _load_wt(w_tile, lane, col_ok, dcols, d_ok, stride_w, x_ptr.dtype.element_ty, W_CAST, UPCAST)
            wf = wt.to(tl.float32)
            wsq += tl.sum(wf * wf, axis=1)
            acc = _dot(xres, tl.trans(wt), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        elif T_DOT:
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_t, wsq = _tile_products_t(x_ptr, w_tile, rows, row_ok, lane, col_ok, D, stride_x, stride_w,
                                          acc_t, wsq, W_CAST, UPCAST, PRECISION, BLOCK_K)
            acc = tl.trans(acc_t)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc, wsq = _tile_products(x_ptr, w_tile, rows, row_ok, lane, col_ok, D, stride_x, stride_w, acc,
                                      wsq, W_CAST, UPCAST, PRECISION, True, BLOCK_K)
        winv = 1.0 / tl.maximum(tl.sqrt(wsq), 1e-12)
        if pid_m == 0:
            tl.store(winv_ptr + cols, winv, mask=col_ok)
        raw = acc * xinv[:, None] * winv[None, :]
        c, lab, sv, z2 = _tile_epilogue(raw, ylab, cols, col_ok, f, s2, sv_a, sv_b, NEGATIVE)
        # a NaN/Inf centre in this tile: its squared norm is not finite
        new_m, p, alpha, run_l = _online_update(z2, run_m, run_l,
                                                tl.sum((wsq < float("inf")).to(tl.int32), axis=0) < BLOCK_N)
        if NEED_DX:
            pe = tl.where(lab, 0.0, p * _tile_slope(raw, sv, sv_a, NEGATIVE)) * winv[None, :]
            if not X_RES:
                wt = _load_wt(w_tile, lane, col_ok, dcols, d_ok, stride_w, x_ptr.dtype.element_ty, W_CAST, UPCAST)
            if T_DOT:
                if tl.sum((new_m > run_m).to(tl.int32), axis=0) > 0:
                    e = e * alpha[None, :]
                e = _pdot(tl.trans(pe), tl.trans(lab), tl.trans(wt), e, False, SPLIT, RESCALE, PRECISION, UPCAST,
                          True)
            else:
                if tl.sum((new_m > run_m).to(tl.int32), axis=0) > 0:
                    e = e * alpha[:, None]
                if SPLIT:
                    e = _pdot_split_joined(pe, wt, e, RESCALE, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
                else:
                    e = _pdot(pe, lab, wt, e, False, SPLIT, RESCALE, PRECISION, UPCAST, False)
        run_m = new_m
        if COUNT_SV:
            svc += tl.sum(sv.to(tl.int32), axis=1)
        best, arg = _argmax_update(c, col_ok, best, arg, t * BLOCK_N)

    out = _store_partials(m_ptr, l_ptr, best_ptr, arg_ptr, sv_ptr, pid_s, B, rows64, row_ok, run_m, run_l, best,
                          arg, svc)
    if NEED_DX:
        if T_DOT:
            tl.store(e_ptr + out[None, :] * D + dcols[:, None], e, mask=row_ok[None, :] & d_ok[:, None])
        else:
            tl.store(e_ptr + out[:, None] * D + dcols[None, :], e, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def step_merge_kernel(
    m_ptr, l_ptr, best_ptr, arg_ptr, sv_ptr, e_ptr, f_ptr, ylab_ptr,
    lse_ptr, rows_ptr, pred_ptr, svc_ptr, ebar_ptr,
    B, D, n_splits, scale,
    NEED_DX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the class splits, ``BLOCK_R`` rows per program, in split order (deterministic):
    ``lse = ln2·(M + log2 Σ_s l_s·exp2(m_s − M))``, the row loss ``lse − s·f`` (0 on ignored rows),
    the best cosine's column (lowest on ties), the support-vector count, and with ``NEED_DX``
    ``E_b = Σ_s E_s·exp2(m_s − M) / L``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    big_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        big_m = tl.maximum(big_m, tl.load(m_ptr + s * B + rows64, mask=row_ok, other=0.0))
    big_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_R], dtype=tl.int64)
    svc = tl.zeros([BLOCK_R], dtype=tl.int32)
    if NEED_DX:
        e = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        at = s * B + rows64
        w = tl.exp2(tl.load(m_ptr + at, mask=row_ok, other=0.0) - big_m)
        big_l += tl.load(l_ptr + at, mask=row_ok, other=0.0) * w
        b = tl.load(best_ptr + at, mask=row_ok, other=float("-inf"))
        better = b > best
        best = tl.where(better, b, best)
        arg = tl.where(better, tl.load(arg_ptr + at, mask=row_ok, other=0), arg)
        svc += tl.load(sv_ptr + at, mask=row_ok, other=0)
        if NEED_DX:
            e += tl.load(e_ptr + at[:, None] * D + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0.0) * w[:, None]
    lse = (big_m + tl.log2(big_l)) * LN2
    f = tl.load(f_ptr + rows64, mask=row_ok, other=0.0)
    ylab = tl.load(ylab_ptr + rows64, mask=row_ok, other=-1)
    loss = tl.where(ylab != -1, lse - scale * f, 0.0)
    tl.store(lse_ptr + rows64, lse, mask=row_ok)
    tl.store(rows_ptr + rows64, loss, mask=row_ok)
    tl.store(pred_ptr + rows64, arg, mask=row_ok)
    tl.store(svc_ptr + rows64, svc, mask=row_ok)
    if NEED_DX:
        tl.store(ebar_ptr + rows64[:, None] * D + dcols[None, :], e / big_l[:, None],
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def step_reduce_kernel(rows_ptr, ylab_ptr, loss_ptr, wscale_ptr, B, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``loss = Σ rows`` (``/ max(n_valid, 1)`` when ``MEAN``), summed in a fixed order;
    ``wscale`` (the per-row weight of the backward) is ``1/max(n_valid, 1)`` or 1."""
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        r = b0 + tl.arange(0, BLOCK)
        ok = r < B
        tot += tl.load(rows_ptr + r, mask=ok, other=0.0)
        cnt += (tl.load(ylab_ptr + r, mask=ok, other=-1) != -1).to(tl.int32)
    total = tl.sum(tot, axis=0)
    if MEAN:
        inv = 1.0 / tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float32)
    else:
        inv = 1.0
    tl.store(loss_ptr, total * inv)
    tl.store(wscale_ptr, inv)


@triton.jit
def step_dw_kernel(
    x_ptr, w_ptr, xinv_ptr, winv_ptr, ylab_ptr, f_ptr, lse_ptr, slope_ptr, g_ptr, wscale_ptr,
    dw_ptr, s1_ptr, s2_ptr,
    B, C, D, stride_x, stride_w, stride_dw, stride_s,
    scale, sv_a, sv_b,
    wd, momentum, damp1, neg_lr, first, nesterov,
    decay, lerp_w, beta2, w2, neg_step, bc2_sqrt, eps,
    NEGATIVE: tl.constexpr, PER_ROW: tl.constexpr, W_CAST: tl.constexpr, SPLIT: tl.constexpr,
    RESCALE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GRAD_T: tl.constexpr,
    RESIDENT: tl.constexpr, T_RECOMP: tl.constexpr,
    OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, ROUND_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Class-stationary backward (grid: class tiles × feature chunks): one recompute of each tile, then

        Gw_k = Σ_b dℓ/dc_bk·x̂_b        (one 16-bit dot over the negatives, ``dℓ/dc·xinv`` rounded;
                                         the label entries as exact fp32 rank-1 updates)
        r_k  = Σ_b dℓ/dc_bk·raw_bk      (fp32, from the tile)

    and the W-side Jacobian in-kernel, ``dW_k = (Gw_k − r_k·winv_k·W_k)·winv_k`` (``W`` as rounded when
    ``W_CAST``), stored once in ``W``'s dtype. ``gl`` and ``dcy`` are formed per row block from the
    upstream gradient (no separate kernel). ``RESIDENT`` (one feature chunk covers ``D``): the class
    tile of ``W`` is loaded (and rounded) once per program and each row block of ``x`` once, for both
    dots — the only streamed operand is ``x``, one read per row block, so the L2 traffic per FLOP falls
    with ``BLOCK_N`` (``2·BLOCK_N`` FLOP per byte of ``x``). ``T_RECOMP`` (with ``RESIDENT``): the
    recompute runs class-major (``W_tile · x_blockᵀ``), so a 32-row block still has 64 classes on the
    M side of the warpgroup MMA and the ``[BLOCK_D, BLOCK_N]`` accumulator leaves room for 64 classes.

    ``OPTIM`` (the in-backward optimizer, ``fusedface.optim``): 0 stores ``dW`` in ``dw_ptr``; 1 (SGD) and
    2 (AdamW) apply the update to the class tile instead (:func:`_optim_apply`: ``W`` and the state
    rows ``s1``/``s2``, row stride ``stride_s``, updated in place; ``dw_ptr`` unused). Safe because the
    grid has one feature chunk (``BLOCK_D >= D``, the launcher asserts it): no other program reads this
    tile of ``W``, and ``step_dx_kernel`` (which reads ``W[y]``) is launched before this kernel."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    lane = tl.arange(0, BLOCK_N)
    base = tl.cast(pid_n, tl.int64) * BLOCK_N
    cols64 = base + lane
    col_ok = cols64 < C
    w_tile = w_ptr + base * stride_w
    winv = tl.load(winv_ptr + cols64, mask=col_ok, other=0.0)
    dcols = tl.cast(pid_d, tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    s2 = scale * LOG2E
    if GRAD_T:
        gw = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    else:
        gw = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    wsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    if RESIDENT:
        wres = tl.load(w_tile + lane[:, None] * stride_w + dcols[None, :], mask=col_ok[:, None] & d_ok[None, :],
                       other=0.0)
        wres = _to_input(wres, x_ptr.dtype.element_ty, W_CAST, UPCAST)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        xinv, f, ylab, lse, gl, dcy = _row_block_bwd(rows, row_ok, xinv_ptr, f_ptr, ylab_ptr, lse_ptr, slope_ptr,
                                                     g_ptr, wscale_ptr, scale, PER_ROW)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xd = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if RESIDENT:
            if T_RECOMP:
                acc = tl.trans(_dot(wres, tl.trans(xd), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST,
                                    PRECISION))
            else:
                acc = _dot(xd, tl.trans(wres), acc, UPCAST, PRECISION)
        else:
            acc, wsq = _tile_products(x_ptr, w_tile, rows, row_ok, lane, col_ok, D, stride_x, stride_w, acc, wsq,
                                      W_CAST, UPCAST, PRECISION, False, BLOCK_K)
        raw = acc * xinv[:, None] * winv[None, :]
        c, lab, sv, z2 = _tile_epilogue(raw, ylab, cols64, col_ok, f, s2, sv_a, sv_b, NEGATIVE)
        dc = _tile_dc(raw, z2, sv, lab, row_ok[:, None] & col_ok[None, :], lse, gl, dcy, scale, sv_a, NEGATIVE)
        r += tl.sum(dc * raw, axis=0)
        q = dc * xinv[:, None]
        if not SPLIT:
            q = tl.where(lab, 0.0, q)  # the label entries are added exactly below
        if GRAD_T:
            gw = _pdot(q, lab, tl.trans(xd), gw, False, SPLIT, RESCALE, PRECISION, UPCAST, True)
        else:
            gw = _pdot(tl.trans(q), tl.trans(lab), xd, gw, False, SPLIT, RESCALE, PRECISION, UPCAST, False)
        if not SPLIT:
            # the label column's term dcy_b·x̂_b, exactly in fp32: a rank-1 update of the class's row of the
            # accumulator for each row of the block whose label falls in this tile (a few per tile at
            # most; most tiles have none and skip the loop) — no tensor-core work, no rounding to 16 bits
            if tl.sum(tl.sum(lab.to(tl.int32), axis=1), axis=0) > 0:
                coef = dcy * xinv
                for i in range(0, BLOCK_M):
                    yi = tl.load(ylab_ptr + m0 + i, mask=m0 + i < B, other=-1)
                    if (yi >= base) & (yi < base + BLOCK_N):
                        ci = (yi - base).to(tl.int32)
                        ki = tl.sum(tl.where(tl.arange(0, BLOCK_M) == i, coef, 0.0), axis=0)
                        xrow = tl.load(x_ptr + (m0 + i) * stride_x + dcols, mask=d_ok, other=0.0).to(tl.float32)
                        if GRAD_T:
                            gw = tl.where(lane[None, :] == ci, gw + ki * xrow[:, None], gw)
                        else:
                            gw = tl.where(lane[:, None] == ci, gw + ki * xrow[None, :], gw)
    if GRAD_T:
        gw = tl.trans(gw)
    mask = col_ok[:, None] & d_ok[None, :]
    w_in = tl.load(w_tile + lane[:, None] * stride_w + dcols[None, :], mask=mask, other=0.0)
    w_in = _to_input(w_in, x_ptr.dtype.element_ty, W_CAST, UPCAST).to(tl.float32)
    dw = (gw - r[:, None] * winv[:, None] * w_in) * winv[:, None]
    if OPTIM == 0:
        tl.store(dw_ptr + cols64[:, None] * stride_dw + dcols[None, :], _cast(dw, dw_ptr.dtype.element_ty, UPCAST),
                 mask=mask)
    else:
        # the update of this class tile (one feature chunk: d32 covers D); int32 offsets within the tile
        d32 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        s_off = lane[:, None] * stride_s + d32[None, :]
        _optim_apply(dw, w_tile + lane[:, None] * stride_w + d32[None, :], s1_ptr + base * stride_s + s_off,
                     s2_ptr + base * stride_s + s_off, mask,
                     wd, momentum, damp1, neg_lr, first, nesterov, decay, lerp_w, beta2, w2, neg_step, bc2_sqrt,
                     eps, OPTIM, MOMENTUM, ROUND_BITS)


@triton.jit
def step_dx_kernel(
    x_ptr, w_ptr, xinv_ptr, ylab_ptr, f_ptr, lse_ptr, slope_ptr, g_ptr, wscale_ptr, e_ptr,
    dx_ptr,
    B, D, stride_x, stride_w, scale,
    PER_ROW: tl.constexpr, GX_GIVEN: tl.constexpr, W_CAST: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dL/dx`` for ``BLOCK_R`` rows (one chunk covers ``D``): ``G = s·gl·E + dcy·winv_y·W[y]`` (the
    label column in fp32 from the gathered row; ``GX_GIVEN``: ``E`` already is ``G``, the hybrid's
    cuBLAS product), then the x-side Jacobian ``(G − (G·x̂)·x̂)·xinv``, stored in ``x``'s dtype."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dcols = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (dcols < D)[None, :]
    xinv = tl.load(xinv_ptr + rows64, mask=row_ok, other=0.0)
    g = tl.load(e_ptr + rows64[:, None] * D + dcols[None, :], mask=m, other=0.0)
    if GX_GIVEN:
        pass
    else:
        ylab = tl.load(ylab_ptr + rows64, mask=row_ok, other=-1)
        f = tl.load(f_ptr + rows64, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
        slope_y = tl.load(slope_ptr + rows64, mask=row_ok, other=0.0)
        gl, dcy = _row_grads(rows64, row_ok, ylab, f, lse, slope_y, g_ptr, wscale_ptr, scale, PER_ROW)
        ysafe = tl.where(ylab >= 0, ylab, 0)
        wy = tl.load(w_ptr + ysafe[:, None] * stride_w + dcols[None, :], mask=m, other=0.0)
        wy = _to_input(wy, x_ptr.dtype.element_ty, W_CAST, UPCAST).to(tl.float32)
        winv_y = 1.0 / tl.maximum(tl.sqrt(tl.sum(wy * wy, axis=1)), 1e-12)
        g = scale * gl[:, None] * g + (dcy * winv_y)[:, None] * wy
    xh = tl.load(x_ptr + rows64[:, None] * stride_x + dcols[None, :], mask=m, other=0.0).to(tl.float32) \
        * xinv[:, None]
    dx = (g - tl.sum(g * xh, axis=1)[:, None] * xh) * xinv[:, None]
    tl.store(dx_ptr + rows64[:, None] * D + dcols[None, :], _cast(dx, dx_ptr.dtype.element_ty, UPCAST), mask=m)


@triton.jit
def hybrid_fwd_kernel(
    buf_ptr, xinv_ptr, winv_ptr, f_ptr, ylab_ptr,
    m_ptr, l_ptr, best_ptr, arg_ptr, sv_ptr,
    B, n, c0, part0, n_parts,
    scale, sv_a, sv_b,
    NEGATIVE: tl.constexpr, COUNT_SV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward epilogue over one chunk's raw products ``buf [B, n]`` (classes ``c0 … c0 + n``,
    from cuBLAS): the same online statistics as ``step_fwd_kernel``, written to partial ``part0 + split``
    (grid: row blocks × ``n_parts`` splits of the chunk's tiles)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, xinv, f, ylab = _row_block_in(pid_m, B, xinv_ptr, f_ptr, ylab_ptr, BLOCK_M)
    s2 = scale * LOG2E
    run_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int64)
    svc = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_tiles = tl.cdiv(n, BLOCK_N)
    t0, t1 = _split_tiles(n_tiles, n_parts, pid_s)
    for t in range(t0, t1):
        loc = tl.cast(t, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = loc < n
        cols64 = c0 + loc
        winv = tl.load(winv_ptr + cols64, mask=col_ok, other=0.0)
        acc = tl.load(buf_ptr + rows64[:, None] * n + loc[None, :], mask=row_ok[:, None] & col_ok[None, :],
                      other=0.0)
        raw = acc * xinv[:, None] * winv[None, :]
        c, lab, sv, z2 = _tile_epilogue(raw, ylab, cols64, col_ok, f, s2, sv_a, sv_b, NEGATIVE)
        # a NaN centre: its winv is NaN (the launcher sets an Inf centre's winv to NaN too)
        run_m, _, _, run_l = _online_update(z2, run_m, run_l,
                                            tl.sum((winv == winv).to(tl.int32), axis=0) < BLOCK_N)
        if COUNT_SV:
            svc += tl.sum(sv.to(tl.int32), axis=1)
        best, arg = _argmax_update(c, col_ok, best, arg, c0 + tl.cast(t, tl.int64) * BLOCK_N)
    _store_partials(m_ptr, l_ptr, best_ptr, arg_ptr, sv_ptr, part0 + pid_s, B, rows64, row_ok, run_m, run_l, best,
                    arg, svc)


@triton.jit
def hybrid_bwd_kernel(
    buf_ptr, xinv_ptr, winv_ptr, f_ptr, ylab_ptr, lse_ptr, slope_ptr, g_ptr, wscale_ptr,
    coef_ptr,                                  # [n] output: −r_k·winv_k²
    B, n, c0,
    scale, sv_a, sv_b,
    NEGATIVE: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward epilogue over one chunk's recomputed raw products, class-stationary (grid: column
    tiles of the chunk; each program loops over all rows, so no atomics): ``dℓ/dc`` (``dcy`` on the
    label column) written back in place times ``winv`` — the left operand of both cuBLAS gradient
    products — and the Jacobian coefficient ``−winv_k²·Σ_b dℓ/dc_bk·raw_bk``."""
    pid = tl.program_id(0)
    loc = tl.cast(pid, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = loc < n
    cols64 = c0 + loc
    winv = tl.load(winv_ptr + cols64, mask=col_ok, other=0.0)
    s2 = scale * LOG2E
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows64 = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows64 < B
        xinv, f, ylab, lse, gl, dcy = _row_block_bwd(rows64, row_ok, xinv_ptr, f_ptr, ylab_ptr, lse_ptr, slope_ptr,
                                                     g_ptr, wscale_ptr, scale, PER_ROW)
        at = rows64[:, None] * n + loc[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        raw = tl.load(buf_ptr + at, mask=ok, other=0.0) * xinv[:, None] * winv[None, :]
        c, lab, sv, z2 = _tile_epilogue(raw, ylab, cols64, col_ok, f, s2, sv_a, sv_b, NEGATIVE)
        dc = _tile_dc(raw, z2, sv, lab, ok, lse, gl, dcy, scale, sv_a, NEGATIVE)
        r += tl.sum(dc * raw, axis=0)
        tl.store(buf_ptr + at, dc * winv[None, :], mask=ok)
    tl.store(coef_ptr + loc, -r * winv * winv, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# the in-backward optimizer's update (fusedface.optim): one helper for the dW epilogue and the hybrid
# ----------------------------------------------------------------------------------------------

@triton.jit
def _optim_apply(g, w_ptrs, s1_ptrs, s2_ptrs, mask,
                 wd, momentum, damp1, neg_lr, first, nesterov,
                 decay, lerp_w, beta2, w2, neg_step, bc2_sqrt, eps,
                 OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, ROUND_BITS: tl.constexpr):
    """``torch.optim``'s update of one tile of ``W`` from its gradient, in fp32 registers, op for op as
    ``torch.optim.SGD``'s / ``torch.optim.AdamW``'s single-tensor code (``fusedface._inbackward``):
    ``g`` the fp32 gradient (rounded here to ``W``'s dtype, as the dense path stores it); loads ``W``
    and the state rows in their dtypes and stores them back rounded (``ROUND_BITS``: bf16 rounded on
    the bits, as the interpreter's cast truncates).

    ``OPTIM == 1`` (SGD): ``d = g + wd·p``; with ``MOMENTUM``: ``buf = d`` on the first step (``first``),
    else ``momentum·buf + (1 − dampening)·d``; ``d = d + momentum·buf`` (``nesterov``) or ``buf``;
    ``p += (−lr)·d``. ``OPTIM == 2`` (AdamW): ``p *= 1 − lr·wd``; ``m = lerp(m, g, 1 − β1)``;
    ``v = β2·v + ((1 − β2)·g)·g``; ``p += (−lr/bc1)·m / (√v / √bc2 + eps)``. The host folds the scalars
    (``damp1 = 1 − dampening``, ``neg_lr``, ``decay = 1 − lr·wd``, ``lerp_w = 1 − β1``, ``w2 = 1 − β2``,
    ``neg_step = −lr/bc1``, ``bc2_sqrt``) in Python floats as ``torch.optim`` does; the square root
    and the divisions round to nearest (``sqrt_rn``/``div_rn``), as ``torch``'s CUDA kernels.

    Register pressure (this runs in the dW kernel's epilogue, whose accumulator fills half the register
    file): at most three fp32 tiles are live. AdamW forms ``v`` and its denominator first, then ``m``
    (``g`` dies), and loads ``W`` last; SGD needs ``W`` first (weight decay)."""
    w_ty = w_ptrs.dtype.element_ty
    g = _cast(g, w_ty, ROUND_BITS).to(tl.float32)
    if OPTIM == 1:
        p = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        d = g + wd * p
        if MOMENTUM:
            buf = tl.load(s1_ptrs, mask=mask, other=0.0).to(tl.float32)
            buf = tl.where(first != 0, d, buf * momentum + damp1 * d)
            tl.store(s1_ptrs, _cast(buf, s1_ptrs.dtype.element_ty, ROUND_BITS), mask=mask)
            d = tl.where(nesterov != 0, d + momentum * buf, buf)
        p = p + neg_lr * d
    else:
        v = tl.load(s2_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = v * beta2 + (w2 * g) * g
        tl.store(s2_ptrs, _cast(v, s2_ptrs.dtype.element_ty, ROUND_BITS), mask=mask)
        denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        m = tl.load(s1_ptrs, mask=mask, other=0.0).to(tl.float32)
        diff = g - m
        m = tl.where(lerp_w < 0.5, m + lerp_w * diff, g - diff * (1.0 - lerp_w))  # torch's lerp, both branches
        tl.store(s1_ptrs, _cast(m, s1_ptrs.dtype.element_ty, ROUND_BITS), mask=mask)
        p = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) * decay
        p = p + tl.math.div_rn(neg_step * m, denom)
    tl.store(w_ptrs, _cast(p, w_ty, ROUND_BITS), mask=mask)


@triton.jit
def optim_update_kernel(
    g_ptr, w_ptr, s1_ptr, s2_ptr,
    n_rows, D, stride_g, stride_w, stride_s,
    wd, momentum, damp1, neg_lr, first, nesterov,
    decay, lerp_w, beta2, w2, neg_step, bc2_sqrt, eps,
    OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, ROUND_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The hybrid's update: rows ``0 … n_rows`` of ``W`` (and of the state) from their fp32 gradient
    ``g [n_rows, D]`` (one class chunk's ``dL/dW``, formed by cuBLAS), elementwise
    (grid: row blocks × feature blocks), with :func:`_optim_apply`."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (dcols < D)[None, :]
    g = tl.load(g_ptr + rows64[:, None] * stride_g + dcols[None, :], mask=mask, other=0.0)
    s_off = rows64[:, None] * stride_s + dcols[None, :]
    _optim_apply(g, w_ptr + rows64[:, None] * stride_w + dcols[None, :], s1_ptr + s_off, s2_ptr + s_off, mask,
                 wd, momentum, damp1, neg_lr, first, nesterov, decay, lerp_w, beta2, w2, neg_step, bc2_sqrt, eps,
                 OPTIM, MOMENTUM, ROUND_BITS)
