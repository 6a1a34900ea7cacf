// The fused per-tile epilogues of the CPU backend: what runs on a class tile right after its GEMM.
//
// A tile is CLASS-MAJOR: `cols` class rows of `rows` batch rows each, element (j, b) at
// data[j·ld + b] (the GEMM computes W_tile · xᵀ). Each epilogue walks the batch rows in groups of
// NV lanes (16 floats / 8 doubles: one AVX-512 register), keeps the per-row values of its group
// (inverse norm, target value, label, running maxima and counts) in registers, and streams over
// the tile's classes; the inner `for v < NV` loops are what the compiler vectorises. Rows left
// over after the last full group run with NV = 1.
//
// The per-element math comes from margin_softmax_math.h (shared with the CUDA kernels); only the
// exponential is specific to this file: a branch-free exp (Cody–Waite range reduction and a
// degree-6 polynomial, max relative error 8e-8 measured over [-87, 88] in steps of 1e-3;
// the fp32 tests of tests/test_native.py hold the losses and gradients to 1e-5) that the compiler can
// inline into a vector loop. fp64 uses std::exp.
//
// Every entry point is compiled three times on x86-64 (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA,
// and baseline SSE2) and the first call picks the best one for the running CPU, so one build runs
// everywhere and uses AVX-512 where it exists.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "margin_softmax_math.h"

// Function multiversioning by hand: each entry point is compiled for x86-64-v4 (AVX-512, with 512-bit
// vectors preferred — GCC's default for AVX-512 targets is 256-bit, which left the 16-lane groups
// in pairs of ymm registers and spilled mask registers), x86-64-v3 (AVX2 + FMA) and the baseline, and
// the first call picks the best one the CPU runs (margin_softmax_cpu_epilogue.cpp). GCC and clang on
// x86-64; elsewhere one build for the compiler's default target.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(FUSEDFACE_NO_MULTIVERSION)
#define FF_CPU_MULTIVERSION 1
#define FF_TARGET_V4 __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#define FF_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define FF_CPU_MULTIVERSION 0
#endif

#if defined(__GNUC__)
#define FF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FF_ALWAYS_INLINE inline
#endif

namespace fusedface {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// exp that vectorises: e^x = 2^n · e^r with n = round(x·log2 e), r = x − n·ln2 (ln2 split in a
// high part exact in fp32 and a low part), e^r by its degree-6 minimax polynomial on
// [−ln2/2, ln2/2] (the classic Cephes coefficients). Below −87.3 the result is 0 (the true value is
// subnormal); above 88.7 it saturates at FLT_MAX·(1+…) instead of inf, which no caller reaches
// (every argument here is a logit minus a running maximum, so ≤ 0).
FF_ALWAYS_INLINE float vexp(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
  const float scale = __builtin_bit_cast(float, bits);
  return x < lo ? 0.0f : p * scale;
}

FF_ALWAYS_INLINE double vexp(double x) { return std::exp(x); }

template <typename T>
constexpr int lanes() {
  return sizeof(T) == 4 ? 16 : 8;
}

// ---------------------------------------------------------------------------------------------
// Arguments of one tile (class-major, see the top of this file).
template <typename T>
struct Tile {
  T* data;          // [cols, ld]: raw products x·W_j (forward: replaced by the scaled raw cosine r)
  int64_t ld;       // distance between class rows, in elements
  int64_t cols;     // classes in this tile
  int64_t rows;     // batch rows in this tile
  int64_t j0;       // first class index of the tile
  const T* winv;    // [cols] inverse norms of the tile's classes
  bool scaled = false;  // forward: data already holds r (sub-centres: reduced by subcenter_max)
};

// Per-row inputs of one row block (pointers already offset to the block's first row).
template <typename T>
struct Rows {
  const T* xinv;     // [rows] 1 / max(‖x_b‖, eps)
  const T* f;        // [rows] target value f_b
  const T* sf;       // [rows] s·f_b, the label column's logit
  const int32_t* y;  // [rows] label, −1 on ignored rows
  const T* rt = nullptr;  // [rows] t_b of the general rewrite (CurricularFace), or none (t_b = 0)
};

// Running per-row state of the forward pass (one copy per worker), updated in place.
template <typename T>
struct ForwardState {
  T* m;           // [rows] running max of the logits
  T* l;           // [rows] running sum of exp(z − m)
  T* cbest;       // [rows] largest cosine so far
  int32_t* cidx;  // [rows] its column (first occurrence)
  int32_t* nsv;   // [rows] support vectors so far
};

template <typename T>
struct Margin {
  T s, a, b;       // logit scale and the negative rewrite g = a·c + b
  T q = T(0);      // the general rewrite g = (q·c + a + t_b)·c + b (margin_softmax_math.h)
  T thr = T(2);    // inter-class filtering threshold (2 = off)
};

// Whether a call needs the extensions' specialisation (the general rewrite, per-row t_b or
// filtering); otherwise the affine loops run, exactly as before the extensions.
template <typename T>
FF_ALWAYS_INLINE bool needs_ext(const Margin<T>& mg, const T* rt) {
  return mg.q != T(0) || mg.thr < T(2) || rt != nullptr;
}

// ---------------------------------------------------------------------------------------------
// Forward: two passes over the group's columns. Pass 1 scales the raw products into r (stored in
// place, so a kept block holds cosines for the backward), and finds the group's logit maxima,
// arg-max cosines and support-vector counts; pass 2 sums exp(z − new max). The running pair
// (m, l) is then rescaled once per row and tile (online log-sum-exp).
// kExt: the general rewrite and filtering (the lanes' a + t_b in lin); kScaled: the tile already
// holds r (sub-centres), so nothing is scaled or stored back.
template <typename T, int NV, bool kExt, bool kScaled>
FF_ALWAYS_INLINE void forward_group(const Tile<T>& t, int64_t b, const Rows<T>& p, const ForwardState<T>& st,
                                    const Margin<T> mg) {
  using namespace fusedface::math;
  T xs[NV], f[NV], sf[NV], zmax[NV], cb[NV], lin[NV];
  int32_t y[NV], ci[NV], ns[NV];
  for (int v = 0; v < NV; ++v) {
    if constexpr (kExt) lin[v] = mg.a + (p.rt != nullptr ? p.rt[b + v] : T(0));
    xs[v] = p.xinv[b + v];
    f[v] = p.f[b + v];
    sf[v] = p.sf[b + v];
    y[v] = p.y[b + v];
    zmax[v] = -std::numeric_limits<T>::infinity();
    cb[v] = st.cbest[b + v];
    ci[v] = st.cidx[b + v];
    ns[v] = st.nsv[b + v];
  }
  for (int64_t j = 0; j < t.cols; ++j) {
    T* row = t.data + j * t.ld + b;
    const T wj = t.winv[j];
    const int32_t col = static_cast<int32_t>(t.j0 + j);
    for (int v = 0; v < NV; ++v) {
      T r;
      if constexpr (kScaled) {
        r = row[v];
      } else {
        r = raw_cosine(row[v], xs[v], wj);
        row[v] = r;
      }
      const T c = clamp_cos(r);
      const bool lab = y[v] == col;
      bool sv;
      T z;
      if constexpr (kExt) {
        const bool filt = is_filtered(c, mg.thr, lab);
        sv = is_support(c, f[v], lab) & !filt;
        z = logit3(c, lab, sv, filt, mg.s, sf[v], mg.q, lin[v], mg.b);
      } else {
        sv = is_support(c, f[v], lab);
        z = logit(c, lab, sv, mg.s, sf[v], mg.a, mg.b);
      }
      zmax[v] = z > zmax[v] ? z : zmax[v];
      ns[v] += sv ? 1 : 0;
      const bool better = c > cb[v];
      cb[v] = better ? c : cb[v];
      ci[v] = better ? col : ci[v];
    }
  }
  T mn[NV], sum[NV];
  for (int v = 0; v < NV; ++v) {
    const T m = st.m[b + v];
    mn[v] = m > zmax[v] ? m : zmax[v];
    sum[v] = T(0);
  }
  for (int64_t j = 0; j < t.cols; ++j) {
    const T* row = t.data + j * t.ld + b;
    const int32_t col = static_cast<int32_t>(t.j0 + j);
    for (int v = 0; v < NV; ++v) {
      const T c = clamp_cos(row[v]);
      const bool lab = y[v] == col;
      T z;
      if constexpr (kExt) {
        const bool filt = is_filtered(c, mg.thr, lab);
        const bool sv = is_support(c, f[v], lab) & !filt;
        z = logit3(c, lab, sv, filt, mg.s, sf[v], mg.q, lin[v], mg.b);
      } else {
        const bool sv = is_support(c, f[v], lab);
        z = logit(c, lab, sv, mg.s, sf[v], mg.a, mg.b);
      }
      sum[v] += vexp(z - mn[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    st.l[b + v] = st.l[b + v] * vexp(st.m[b + v] - mn[v]) + sum[v];
    st.m[b + v] = mn[v];
    st.cbest[b + v] = cb[v];
    st.cidx[b + v] = ci[v];
    st.nsv[b + v] = ns[v];
  }
}

template <typename T, bool kExt, bool kScaled>
FF_ALWAYS_INLINE void forward_tile_rows(const Tile<T>& t, const Rows<T>& p, const ForwardState<T>& st,
                                        const Margin<T> mg) {
  constexpr int NV = lanes<T>();
  int64_t b = 0;
  for (; b + NV <= t.rows; b += NV) forward_group<T, NV, kExt, kScaled>(t, b, p, st, mg);
  for (; b < t.rows; ++b) forward_group<T, 1, kExt, kScaled>(t, b, p, st, mg);
}

template <typename T>
FF_ALWAYS_INLINE void forward_tile_impl(const Tile<T>& t, const Rows<T>& p, const ForwardState<T>& st,
                                        const Margin<T> mg) {
  const bool ext = needs_ext(mg, p.rt);
  if (!ext && !t.scaled) {
    forward_tile_rows<T, false, false>(t, p, st, mg);  // the seed losses: the affine loops
  } else if (!ext) {
    forward_tile_rows<T, false, true>(t, p, st, mg);
  } else if (!t.scaled) {
    forward_tile_rows<T, true, false>(t, p, st, mg);
  } else {
    forward_tile_rows<T, true, true>(t, p, st, mg);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one pass. dℓ/dc on negatives from the recomputed (or kept) cosine, dcy on the label
// column; stores dc·winv_j (what both gradient GEMMs need). `scaled`: the input already holds r
// (a kept block) rather than raw products.
template <typename T>
struct BackwardRows {
  const T* xinv;     // [rows]
  const T* f;        // [rows]
  const T* sf;       // [rows] s·f_b
  const T* lse;      // [rows] log-sum-exp from the forward
  const T* sgl;      // [rows] s·(upstream gradient of the row), 0 on ignored rows
  const T* dcy;      // [rows] dℓ/dc on the label column
  const int32_t* y;  // [rows]
  const T* rt = nullptr;  // [rows] t_b of the general rewrite, or none
};

template <typename T, typename OutT>
struct BackwardTile {
  const T* in;   // [cols, ld_in] raw products (or r when scaled)
  int64_t ld_in;
  OutT* out;     // [cols, ld_out] dc·winv_j; may alias `in` when OutT == T
  int64_t ld_out;
  int64_t cols, rows, j0;
  const T* winv;  // [cols]
  bool scaled;
};

// kInPlace: `out` is `in` (the usual recomputing case). Written through one pointer then, so the
// compiler sees the read and the write of each element as one access and vectorises without the
// run-time overlap check that would otherwise send an exactly-overlapping call to scalar code.
template <typename T, typename OutT, int NV, bool kScaled, bool kInPlace, bool kExt>
FF_ALWAYS_INLINE void backward_group(const BackwardTile<T, OutT>& t, int64_t b, const BackwardRows<T>& p,
                                     const Margin<T> mg) {
  using namespace fusedface::math;
  T xs[NV], f[NV], sf[NV], lse[NV], sgl[NV], dcy[NV], lin[NV];
  int32_t y[NV];
  for (int v = 0; v < NV; ++v) {
    if constexpr (kExt) lin[v] = mg.a + (p.rt != nullptr ? p.rt[b + v] : T(0));
    xs[v] = p.xinv[b + v];
    f[v] = p.f[b + v];
    sf[v] = p.sf[b + v];
    lse[v] = p.lse[b + v];
    sgl[v] = p.sgl[b + v];
    dcy[v] = p.dcy[b + v];
    y[v] = p.y[b + v];
  }
  for (int64_t j = 0; j < t.cols; ++j) {
    OutT* out = t.out + j * t.ld_out + b;
    const T* in;
    if constexpr (kInPlace) {
      in = reinterpret_cast<const T*>(out);
    } else {
      in = t.in + j * t.ld_in + b;
    }
    const T wj = t.winv[j];
    const int32_t col = static_cast<int32_t>(t.j0 + j);
    for (int v = 0; v < NV; ++v) {
      const T r = kScaled ? in[v] : raw_cosine(in[v], xs[v], wj);
      const T pass = clamp_pass(r);
      const T c = clamp_cos(r);
      const bool lab = y[v] == col;
      T g;
      if constexpr (kExt) {
        const bool filt = is_filtered(c, mg.thr, lab);
        const bool sv = is_support(c, f[v], lab) & !filt;
        const T z = logit3(c, lab, sv, filt, mg.s, sf[v], mg.q, lin[v], mg.b);
        const T prob = vexp(z - lse[v]);
        g = negative_grad(sgl[v], prob, rewrite3_slope(c, sv, filt, mg.q, lin[v]), pass);
      } else {
        const bool sv = is_support(c, f[v], lab);
        const T z = logit(c, lab, sv, mg.s, sf[v], mg.a, mg.b);
        const T prob = vexp(z - lse[v]);
        g = negative_grad(sgl[v], prob, rewrite_slope(sv, mg.a), pass);
      }
      g = lab ? dcy[v] : g;
      out[v] = g * wj;
    }
  }
}

template <typename T, typename OutT, bool kScaled, bool kInPlace, bool kExt>
FF_ALWAYS_INLINE void backward_tile_rows(const BackwardTile<T, OutT>& t, const BackwardRows<T>& p,
                                         const Margin<T> mg) {
  constexpr int NV = lanes<T>();
  int64_t b = 0;
  for (; b + NV <= t.rows; b += NV) backward_group<T, OutT, NV, kScaled, kInPlace, kExt>(t, b, p, mg);
  for (; b < t.rows; ++b) backward_group<T, OutT, 1, kScaled, kInPlace, kExt>(t, b, p, mg);
}

// scaled & in place: the sub-centre path (r reduced into a buffer that then receives dℓ/dc)
template <typename T, typename OutT, bool kExt>
FF_ALWAYS_INLINE void backward_tile_select(const BackwardTile<T, OutT>& t, const BackwardRows<T>& p,
                                           const Margin<T> mg) {
  bool in_place = false;
  if constexpr (std::is_same_v<T, OutT>) in_place = t.in == t.out && t.ld_in == t.ld_out;
  if (t.scaled) {
    if (in_place) {
      if constexpr (std::is_same_v<T, OutT>) backward_tile_rows<T, OutT, true, true, kExt>(t, p, mg);
    } else {
      backward_tile_rows<T, OutT, true, false, kExt>(t, p, mg);
    }
  } else if (in_place) {
    if constexpr (std::is_same_v<T, OutT>) backward_tile_rows<T, OutT, false, true, kExt>(t, p, mg);
  } else {
    backward_tile_rows<T, OutT, false, false, kExt>(t, p, mg);
  }
}

template <typename T, typename OutT>
FF_ALWAYS_INLINE void backward_tile_impl(const BackwardTile<T, OutT>& t, const BackwardRows<T>& p,
                                         const Margin<T> mg) {
  if (needs_ext(mg, p.rt)) {
    backward_tile_select<T, OutT, true>(t, p, mg);
  } else {
    backward_tile_select<T, OutT, false>(t, p, mg);  // the seed losses: the affine loops
  }
}

// ---------------------------------------------------------------------------------------------
// Sub-centres (K > 1 rows of W per class, row j·K + k): the tile GEMM gives [cols·K, ld_src] raw
// products; subcenter_max reduces them to the classes' raw cosines r_j = max_k raw·xinv·winv_{jK+k}
// ([cols, ld_dst], the first k on ties) and, when `arg` is given, the arg-max sub-centre per (class,
// row). After the (scaled) epilogue wrote dℓ/dc per class, subcenter_expand writes the gradient
// GEMMs' [cols·K, ld_out] operand: dℓ/dc·winv_{jK+k} on the arg-max row of each (class, row), 0 on
// the others. Straight loops over contiguous rows, vectorised by the compiler.
template <typename T>
FF_ALWAYS_INLINE void subcenter_max_impl(const T* src, int64_t ld_src, T* dst, int32_t* arg, int64_t ld_dst,
                                         int64_t cols, int64_t rows, int K, const T* xinv, const T* winv) {
  using namespace fusedface::math;
  for (int64_t j = 0; j < cols; ++j) {
    T* d = dst + j * ld_dst;
    const T* s0 = src + (j * K) * ld_src;
    const T w0 = winv[j * K];
    for (int64_t b = 0; b < rows; ++b) d[b] = raw_cosine(s0[b], xinv[b], w0);
    if (arg != nullptr) {
      int32_t* a = arg + j * ld_dst;
      for (int64_t b = 0; b < rows; ++b) a[b] = 0;
      for (int k = 1; k < K; ++k) {
        const T* sk = src + (j * K + k) * ld_src;
        const T wk = winv[j * K + k];
        for (int64_t b = 0; b < rows; ++b) {
          const T r = raw_cosine(sk[b], xinv[b], wk);
          const bool better = r > d[b];
          d[b] = better ? r : d[b];
          a[b] = better ? k : a[b];
        }
      }
    } else {
      for (int k = 1; k < K; ++k) {
        const T* sk = src + (j * K + k) * ld_src;
        const T wk = winv[j * K + k];
        for (int64_t b = 0; b < rows; ++b) {
          const T r = raw_cosine(sk[b], xinv[b], wk);
          d[b] = r > d[b] ? r : d[b];
        }
      }
    }
  }
}

template <typename T>
FF_ALWAYS_INLINE void subcenter_expand_impl(const T* dc, const int32_t* arg, int64_t ld_dc, T* out, int64_t ld_out,
                                            int64_t cols, int64_t rows, int K, const T* winv) {
  for (int64_t j = 0; j < cols; ++j) {
    const T* g = dc + j * ld_dc;
    const int32_t* a = arg + j * ld_dc;
    for (int k = 0; k < K; ++k) {
      T* o = out + (j * K + k) * ld_out;
      const T wk = winv[j * K + k];
      for (int64_t b = 0; b < rows; ++b) o[b] = a[b] == k ? g[b] * wk : T(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// NPT: streaming top-k (k ≤ 16) of the cosines over the columns other than the label. Each row
// keeps its k best (value, column) pairs sorted by value, descending; a column enters only when
// it beats the current k-th value (strictly, so among equal values the earlier column stays).
// The vector part computes the group's cosines and whether any lane beats its k-th value; the
// (rare, after the first tiles) insertions are scalar.
template <typename T, int NV>
FF_ALWAYS_INLINE void npt_group(const Tile<T>& t, int64_t b, const T* xinv, const int32_t* ylab, int k, T* topv,
                                int64_t* topi) {
  using namespace fusedface::math;
  T xs[NV], kth[NV];
  int32_t y[NV];
  for (int v = 0; v < NV; ++v) {
    xs[v] = xinv[b + v];
    y[v] = ylab[b + v];
    kth[v] = topv[(b + v) * k + (k - 1)];
  }
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < t.cols; ++j) {
    const T* row = t.data + j * t.ld + b;
    const T wj = t.winv[j];
    const int32_t col = static_cast<int32_t>(t.j0 + j);
    T c[NV];
    int any = 0;
    for (int v = 0; v < NV; ++v) {
      const T cv = clamp_cos(raw_cosine(row[v], xs[v], wj));
      c[v] = y[v] == col ? neg_inf : cv;
      any |= c[v] > kth[v] ? 1 : 0;
    }
    if (!any) continue;
    for (int v = 0; v < NV; ++v) {
      if (!(c[v] > kth[v])) continue;
      T* vals = topv + (b + v) * k;
      int64_t* idx = topi + (b + v) * k;
      int pos = k - 1;
      while (pos > 0 && c[v] > vals[pos - 1]) {
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
      vals[pos] = c[v];
      idx[pos] = col;
      kth[v] = vals[k - 1];
    }
  }
}

template <typename T>
FF_ALWAYS_INLINE void npt_tile_impl(const Tile<T>& t, const T* xinv, const int32_t* y, int k, T* topv,
                                    int64_t* topi) {
  constexpr int NV = lanes<T>();
  int64_t b = 0;
  for (; b + NV <= t.rows; b += NV) npt_group<T, NV>(t, b, xinv, y, k, topv, topi);
  for (; b < t.rows; ++b) npt_group<T, 1>(t, b, xinv, y, k, topv, topi);
}

// ---------------------------------------------------------------------------------------------
// bf16 tiles (the bf16-GEMM precision mode, FUSEDFACE_NATIVE_PRECISION=bf16): the GEMM writes bf16,
// seen here as bit patterns (no torch header in this file). The epilogues above do not read bf16
// themselves: with 16-bit loads in the same loop as the fp32 math, GCC sizes every vector by the
// 16-bit type (a 16-lane group becomes ymm pairs, masks spill: measured 2.5x slower). A separate
// streaming pass over the tile (L2-resident) widens it into the fp32 buffer the epilogues read, and
// another rounds their dc·winv back to bf16 for the gradient GEMMs: each a few % of the epilogue.
// Widening is exact; rounding is to nearest-even with NaN kept NaN, as c10::BFloat16 does.
using bf16_bits = uint16_t;

FF_ALWAYS_INLINE float widen(bf16_bits h) { return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16); }

FF_ALWAYS_INLINE bf16_bits to_bf16(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<bf16_bits>(v != v ? 0x7FC0u : rounded);
}

// [cols, rows] blocks with leading dimensions ld_src / ld_dst (elements)
FF_ALWAYS_INLINE void widen_tile_impl(const bf16_bits* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t cols,
                                      int64_t rows) {
  for (int64_t j = 0; j < cols; ++j) {
    const bf16_bits* s = src + j * ld_src;
    float* d = dst + j * ld_dst;
    for (int64_t b = 0; b < rows; ++b) d[b] = widen(s[b]);
  }
}

FF_ALWAYS_INLINE void narrow_tile_impl(const float* src, int64_t ld_src, bf16_bits* dst, int64_t ld_dst, int64_t cols,
                                       int64_t rows) {
  for (int64_t j = 0; j < cols; ++j) {
    const float* s = src + j * ld_src;
    bf16_bits* d = dst + j * ld_dst;
    for (int64_t b = 0; b < rows; ++b) d[b] = to_bf16(s[b]);
  }
}

// The W-side normalisation Jacobian of the bf16-GEMM mode (margin_softmax_cpu.cpp, w_jacobian, has
// the math): H_k and W_k bf16 rows, fp32 arithmetic, dW_k rounded to bf16. HT: bf16_bits, or float
// when H was summed over several row blocks.
template <typename HT>
FF_ALWAYS_INLINE void w_jacobian_bf16_impl(const HT* H, const bf16_bits* Wt, const float* winv, bf16_bits* out,
                                           int64_t n, int64_t D) {
  auto load = [](HT v) -> float {
    if constexpr (std::is_same_v<HT, float>) {
      return v;
    } else {
      return widen(v);
    }
  };
  for (int64_t k = 0; k < n; ++k) {
    const HT* h = H + k * D;
    const bf16_bits* w = Wt + k * D;
    // 16 partial sums: a plain `dot +=` loop is a serial fp32 chain the compiler may not reorder
    float part[16] = {};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      for (int v = 0; v < 16; ++v) part[v] += load(h[d + v]) * widen(w[d + v]);
    }
    float dot = 0.0f;
    for (int v = 0; v < 16; ++v) dot += part[v];
    for (; d < D; ++d) dot += load(h[d]) * widen(w[d]);
    const float coef = dot * winv[k] * winv[k];
    bf16_bits* o = out + k * D;
    for (int64_t d = 0; d < D; ++d) o[d] = to_bf16(load(h[d]) - coef * widen(w[d]));
  }
}

// dst[i] += src[i] for a bf16 src and an fp32 dst (a tile's bf16 partial embedding gradient into
// the worker's fp32 accumulator), n contiguous elements
FF_ALWAYS_INLINE void accumulate_bf16_impl(const bf16_bits* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += widen(src[i]);
}

// The entry points, one per dtype; defined (and multiversioned) in margin_softmax_cpu_epilogue.cpp.
void forward_tile(const Tile<float>& t, const Rows<float>& p, const ForwardState<float>& st, Margin<float> mg);
void forward_tile(const Tile<double>& t, const Rows<double>& p, const ForwardState<double>& st, Margin<double> mg);
void backward_tile(const BackwardTile<float, float>& t, const BackwardRows<float>& p, Margin<float> mg);
void backward_tile(const BackwardTile<double, double>& t, const BackwardRows<double>& p, Margin<double> mg);
void npt_tile(const Tile<float>& t, const float* xinv, const int32_t* y, int k, float* topv, int64_t* topi);
void widen_tile(const bf16_bits* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t cols, int64_t rows);
void narrow_tile(const float* src, int64_t ld_src, bf16_bits* dst, int64_t ld_dst, int64_t cols, int64_t rows);
void w_jacobian_bf16(const bf16_bits* H, const bf16_bits* Wt, const float* winv, bf16_bits* out, int64_t n,
                     int64_t D);
void w_jacobian_bf16(const float* H, const bf16_bits* Wt, const float* winv, bf16_bits* out, int64_t n, int64_t D);
void accumulate_bf16(const bf16_bits* src, float* dst, int64_t n);
void npt_tile(const Tile<double>& t, const double* xinv, const int32_t* y, int k, double* topv, int64_t* topi);
void subcenter_max(const float* src, int64_t ld_src, float* dst, int32_t* arg, int64_t ld_dst, int64_t cols,
                   int64_t rows, int K, const float* xinv, const float* winv);
void subcenter_max(const double* src, int64_t ld_src, double* dst, int32_t* arg, int64_t ld_dst, int64_t cols,
                   int64_t rows, int K, const double* xinv, const double* winv);
void subcenter_expand(const float* dc, const int32_t* arg, int64_t ld_dc, float* out, int64_t ld_out, int64_t cols,
                      int64_t rows, int K, const float* winv);
void subcenter_expand(const double* dc, const int32_t* arg, int64_t ld_dc, double* out, int64_t ld_out,
                      int64_t cols, int64_t rows, int K, const double* winv);

// which code path the loader picked for this CPU ("x86-64-v4", "x86-64-v3", "baseline")
const char* epilogue_isa();

}  // namespace cpu
}  // namespace fusedface
