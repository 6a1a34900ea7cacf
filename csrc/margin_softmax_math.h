// The per-element math of the margin-softmax family (SPEC §2), written once for the CPU code
// (margin_softmax_cpu.cpp) and the CUDA kernels (margin_softmax_cuda.cu).
//
// Notation, for one row b and one class column j of a tile:
//   r  = (x_b · W_j) · xinv_b · winv_j     the raw cosine (a GEMM output scaled by inverse norms)
//   c  = clamp(r, -1, 1)                   the cosine; torch.clamp's gradient rule: 1 on [-1, 1], else 0
//   f  = f_b                               the row's target value T(c_by) (computed per row, before the pass)
//   sv = c > f and j != y_b                a support vector (mis-classified negative); no gradient
//   g  = sv ? a·c + b : c                  the negative rewrite; (a, b) = (1, 0) for "none",
//                                          (t, t-1) "sv", (1, t) "mv_fixed", (t+1, t) "mv_adaptive"
//   z  = s·f on the label column, s·g elsewhere
//   ℓ  = logsumexp_j z_j − s·f             (online: a running max m and sum l of exp(z − m))
//   dℓ/dc_j = s·exp(z_j − lse)·gl·(sv ? a : 1)·[−1 ≤ r ≤ 1] on negatives; the label column's
//   gradient (dcy_b) is known per row before the pass (see fusedface/_engine.py).
//
// The extensions (issue 16; the `torch` backend is the executable definition), used by a separate
// specialisation of every loop so the affine path above does no extra work:
//   thr                                    inter-class filtering threshold (2 = off: c never exceeds it)
//   filt = c > thr and j != y_b            a filtered negative: g = 0, slope 0, not a support vector
//   sv   = c > f and j != y_b and !filt
//   g    = sv ? (q·c + a + t_b)·c + b : c  the general rewrite, t_b = rt[b] (0 without rt); q = 1,
//                                          a = b = 0 is CurricularFace's g = c·(t_b + c)
//   dg/dc = sv ? 2q·c + a + t_b : 1        (0 where filtered)
//   sub-centres K: r of a class is the max over its K sub-centre rows' raw cosines (first arg-max);
//   the class's dℓ/dc flows to the arg-max row only.
//
// Every function is branch-free where it matters (selects, not ifs) so the CPU loops vectorise
// and CUDA warps do not diverge. Nothing here allocates, throws or knows about tensors.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif

namespace fusedface {
namespace math {

// exp / log that resolve to the CUDA device intrinsics' accurate versions on the device and to
// <cmath> on the host (the CPU hot loops use their own vectorisable exp, see margin_softmax_cpu.cpp).
FF_HD float ff_exp(float v) {
#if defined(__CUDA_ARCH__)
  return ::expf(v);
#else
  return std::exp(v);
#endif
}
FF_HD double ff_exp(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}
FF_HD float ff_log(float v) {
#if defined(__CUDA_ARCH__)
  return ::logf(v);
#else
  return std::log(v);
#endif
}
FF_HD double ff_log(double v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return std::log(v);
#endif
}

// r = (x·w)·xinv·winv, in this order (the order of the `torch` backend).
template <typename T>
FF_HD T raw_cosine(T dot, T xinv, T winv) {
  return dot * xinv * winv;
}

// clamp to [-1, 1]; NaN passes through (as torch.clamp).
template <typename T>
FF_HD T clamp_cos(T r) {
  return r < T(-1) ? T(-1) : (r > T(1) ? T(1) : r);
}

// 1 where torch.clamp passes the gradient (-1 <= r <= 1), else 0.
template <typename T>
FF_HD T clamp_pass(T r) {
  return (r >= T(-1)) & (r <= T(1)) ? T(1) : T(0);
}

// a negative column whose cosine exceeds the row's target value (strict, SPEC §2).
template <typename T>
FF_HD bool is_support(T c, T f, bool label) {
  return (c > f) & !label;
}

// the rewritten cosine g of a negative column.
template <typename T>
FF_HD T rewrite(T c, bool sv, T a, T b) {
  return sv ? a * c + b : c;
}

// dg/dc of a negative column (the mask itself carries no gradient).
template <typename T>
FF_HD T rewrite_slope(bool sv, T a) {
  return sv ? a : T(1);
}

// the logit z of one column: s·f on the label column (sf = s·f_b), s·g elsewhere.
template <typename T>
FF_HD T logit(T c, bool label, bool sv, T s, T sf, T a, T b) {
  return label ? sf : s * rewrite(c, sv, a, b);
}

// --- the extensions' general form (lin = a + t_b, computed once per row) ---

// a negative column filtered out by inter-class filtering (strict, thr = 2 never filters).
template <typename T>
FF_HD bool is_filtered(T c, T thr, bool label) {
  return (c > thr) & !label;
}

// the general rewrite g = (q·c + lin)·c + b of a support vector (c otherwise); 0 when filtered.
template <typename T>
FF_HD T rewrite3(T c, bool sv, bool filt, T q, T lin, T b) {
  return filt ? T(0) : (sv ? (q * c + lin) * c + b : c);
}

// its slope dg/dc = 2q·c + lin on support vectors, 1 on other negatives, 0 when filtered.
template <typename T>
FF_HD T rewrite3_slope(T c, bool sv, bool filt, T q, T lin) {
  return filt ? T(0) : (sv ? T(2) * q * c + lin : T(1));
}

// the logit with the general rewrite and filtering.
template <typename T>
FF_HD T logit3(T c, bool label, bool sv, bool filt, T s, T sf, T q, T lin, T b) {
  return label ? sf : s * rewrite3(c, sv, filt, q, lin, b);
}

// dℓ/dc of a negative column: s·gl·p·slope·clamp_pass with p = exp(z − lse) and sgl = s·gl_b.
// A row with gl = 0 (ignored, or no upstream gradient) gives exactly 0 even if p overflowed.
template <typename T>
FF_HD T negative_grad(T sgl, T p, T slope, T pass) {
  return sgl != T(0) ? sgl * p * slope * pass : T(0);
}

// Online log-sum-exp (Milakov & Gimelshein 2018): fold the pair (m2, l2) — a maximum and a sum of
// exp(z − m2) — into the running pair (m, l). Either pair may be empty (m = −inf, l = 0).
template <typename T>
FF_HD void lse_merge(T& m, T& l, T m2, T l2) {
  const T mn = m > m2 ? m : m2;
  if (mn == -INFINITY) return;  // both empty
  l = l * ff_exp(m - mn) + l2 * ff_exp(m2 - mn);
  m = mn;
}

// the log-sum-exp of a running pair.
template <typename T>
FF_HD T lse_value(T m, T l) {
  return m + ff_log(l);
}

// arg-max merge with a deterministic tie rule: the larger value wins, equal values keep the
// smaller column index (the first occurrence, as torch.argmax).
template <typename T>
FF_HD bool better_max(T v, int64_t i, T best_v, int64_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

}  // namespace math
}  // namespace fusedface
