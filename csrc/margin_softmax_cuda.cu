// CUDA epilogue kernels of the native backend. The tile GEMMs run in cuBLAS through ATen
// (margin_softmax_cuda.cpp); these kernels do what comes after each GEMM, with the per-element math
// of margin_softmax_math.h (the same header the CPU epilogues use):
//
//   margin_forward_tile_kernel   one block per batch row: online log-sum-exp, arg-max cosine and
//                                support-vector count of the row's tile columns, then ONE update of the
//                                row's running state (tiles run in order on one stream: no atomics).
//   margin_backward_tile_kernel  elementwise: dℓ/dc·winv in place of the raw products.
//   w_jacobian_kernel            one block per class: dW_k = H_k − (H_k·W_k)·winv_k²·W_k.
//   npt_tile_kernel<K>           one block per batch row: per-thread top-K in registers (unrolled,
//                                K a template constant so nothing spills), K rounds of a block arg-max,
//                                then a merge with the row's running top-K.
//
// The two margin kernels come in four specialisations each: kExt (the general rewrite with a
// per-row t_b and inter-class filtering) and kSub (K > 1 sub-centres per class: a tile row holds
// cols·K products, row-major by class then sub-centre; a thread reduces a class's K raw cosines to
// their max and, backward, writes the class's dℓ/dc·winv to the arg-max product and 0 to the others).
// The seed losses (kExt = kSub = false) run the loops they always did.
//
// Offsets are int64 (C·D and B·T exceed 2^31 at millions of classes). Accumulation in T (fp32, or
// fp64 for fp64 inputs); `expf`/`exp` are the accurate ones (no --use_fast_math).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "margin_softmax_cuda.h"
#include "margin_softmax_math.h"

namespace fusedface {
namespace cuda {
namespace {

using namespace fusedface::math;

constexpr int kThreads = 256;  // threads per block of the row kernels (8 warps)
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -INFINITY;
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -static_cast<double>(INFINITY);
}

// ------------------------------------------------------------------------- block reductions

// (max, sum of exp) pairs
template <typename T>
__device__ __forceinline__ void warp_lse(T& m, T& l) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T m2 = __shfl_down_sync(0xffffffffu, m, o);
    const T l2 = __shfl_down_sync(0xffffffffu, l, o);
    lse_merge(m, l, m2, l2);
  }
}

// (value, index) arg-max, ties to the smaller index
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T v2 = __shfl_down_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_down_sync(0xffffffffu, i, o);
    if (better_max(v2, i2, v, i)) {
      v = v2;
      i = i2;
    }
  }
}

__device__ __forceinline__ int warp_sum(int c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
  return c;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
  return c;
}

// block arg-max over kThreads threads; the result is valid in every thread
template <typename T>
__device__ __forceinline__ void block_argmax(T& v, int64_t& i, T* sv, int64_t* si) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_argmax(v, i);
  __syncthreads();  // the shared slots may still be read from the previous round
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (better_max(sv[w], si[w], v, i)) {
      v = sv[w];
      i = si[w];
    }
  }
}

// the raw cosine of class j: its product's, or (kSub) the largest of its K sub-centres' (the first
// on ties; `arg` receives that sub-centre)
template <typename T, bool kSub>
__device__ __forceinline__ T class_raw_cosine(const T* __restrict__ Srow, const T* __restrict__ winv, int64_t j,
                                              int K, T xs, int& arg) {
  if constexpr (kSub) {
    const T* Sj = Srow + j * K;
    const T* wj = winv + j * K;
    T r = raw_cosine(Sj[0], xs, wj[0]);
    arg = 0;
    for (int k = 1; k < K; ++k) {
      const T rk = raw_cosine(Sj[k], xs, wj[k]);
      if (rk > r) {
        r = rk;
        arg = k;
      }
    }
    return r;
  } else {
    arg = 0;
    return raw_cosine(Srow[j], xs, winv[j]);
  }
}

// ------------------------------------------------------------------------------ forward

template <typename T, bool kExt, bool kSub>
__global__ void __launch_bounds__(kThreads) margin_forward_tile_kernel(
    const T* __restrict__ S, int64_t ld, int64_t cols, int64_t j0, const T* __restrict__ xinv,
    const T* __restrict__ winv, const T* __restrict__ f, const int64_t* __restrict__ y, T s, T a, T b, T q,
    T thr, const T* __restrict__ rt, int K, T* __restrict__ m, T* __restrict__ l, T* __restrict__ cbest,
    int64_t* __restrict__ cidx, int32_t* __restrict__ nsv) {
  __shared__ T sh_m[kWarps], sh_l[kWarps], sh_c[kWarps];
  __shared__ int64_t sh_i[kWarps];
  __shared__ int sh_n[kWarps];

  const int64_t row = blockIdx.x;
  const T* Srow = S + row * ld;
  const T xs = xinv[row], fr = f[row], sf = s * fr;
  const int64_t yl = y[row] - j0;  // the label's column in this tile (out of range when elsewhere)
  T lin = a;
  if constexpr (kExt) lin = a + (rt != nullptr ? rt[row] : T(0));

  T tm = neg_inf<T>(), tl = T(0), cb = neg_inf<T>();
  int64_t ci = INT64_MAX;
  int cnt = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    int arg;
    const T c = clamp_cos(class_raw_cosine<T, kSub>(Srow, winv, j, K, xs, arg));
    const bool lab = j == yl;
    bool sv;
    T z;
    if constexpr (kExt) {
      const bool filt = is_filtered(c, thr, lab);
      sv = is_support(c, fr, lab) & !filt;
      z = logit3(c, lab, sv, filt, s, sf, q, lin, b);
    } else {
      sv = is_support(c, fr, lab);
      z = logit(c, lab, sv, s, sf, a, b);
    }
    if (z > tm) {  // one exp per element: rescale only when the maximum moves
      tl = tl * ff_exp(tm - z) + T(1);
      tm = z;
    } else {
      tl += ff_exp(z - tm);
    }
    cnt += sv ? 1 : 0;
    if (c > cb) {  // columns ascend within a thread: strict > keeps the first occurrence
      cb = c;
      ci = j;
    }
  }
  warp_lse(tm, tl);
  warp_argmax(cb, ci);
  cnt = warp_sum(cnt);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh_m[warp] = tm;
    sh_l[warp] = tl;
    sh_c[warp] = cb;
    sh_i[warp] = ci;
    sh_n[warp] = cnt;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      lse_merge(tm, tl, sh_m[w], sh_l[w]);
      if (better_max(sh_c[w], sh_i[w], cb, ci)) {
        cb = sh_c[w];
        ci = sh_i[w];
      }
      cnt += sh_n[w];
    }
    T rm = m[row], rl = l[row];
    lse_merge(rm, rl, tm, tl);
    m[row] = rm;
    l[row] = rl;
    if (ci != INT64_MAX && better_max(cb, ci + j0, cbest[row], cidx[row])) {
      cbest[row] = cb;
      cidx[row] = ci + j0;
    }
    nsv[row] += cnt;
  }
}

// ----------------------------------------------------------------------------- backward

template <typename T, bool kExt, bool kSub>
__global__ void __launch_bounds__(kThreads) margin_backward_tile_kernel(
    T* __restrict__ S, int64_t ld, int64_t cols, int64_t j0, const T* __restrict__ xinv,
    const T* __restrict__ winv, const T* __restrict__ f, const T* __restrict__ lse, const T* __restrict__ sgl,
    const T* __restrict__ dcy, const int64_t* __restrict__ y, T s, T a, T b, T q, T thr, const T* __restrict__ rt,
    int K) {
  const int64_t row = blockIdx.x;
  T* Srow = S + row * ld;
  const T xs = xinv[row], fr = f[row], sf = s * fr, lr = lse[row], g = sgl[row], gy = dcy[row];
  const int64_t yl = y[row] - j0;
  T lin = a;
  if constexpr (kExt) lin = a + (rt != nullptr ? rt[row] : T(0));
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.y) * kThreads) {
    int arg = 0;
    T r, wj = T(1);
    if constexpr (kSub) {
      r = class_raw_cosine<T, true>(Srow, winv, j, K, xs, arg);
    } else {
      wj = winv[j];
      r = raw_cosine(Srow[j], xs, wj);
    }
    const T c = clamp_cos(r);
    const bool lab = j == yl;
    T dn;
    if constexpr (kExt) {
      const bool filt = is_filtered(c, thr, lab);
      const bool sv = is_support(c, fr, lab) & !filt;
      const T z = logit3(c, lab, sv, filt, s, sf, q, lin, b);
      const T p = ff_exp(z - lr);
      dn = negative_grad(g, p, rewrite3_slope(c, sv, filt, q, lin), clamp_pass(r));
    } else {
      const bool sv = is_support(c, fr, lab);
      const T z = logit(c, lab, sv, s, sf, a, b);
      // computed unconditionally and selected after: branching around the fp64 exp made ptxas spill
      const T p = ff_exp(z - lr);
      dn = negative_grad(g, p, rewrite_slope(sv, a), clamp_pass(r));
    }
    const T dc = lab ? gy : dn;
    if constexpr (kSub) {  // to the arg-max sub-centre's product, 0 to the others
      T* Sj = Srow + j * K;
      const T* wk = winv + j * K;
      for (int k = 0; k < K; ++k) Sj[k] = k == arg ? dc * wk[k] : T(0);
    } else {
      Srow[j] = dc * wj;
    }
  }
}

// ------------------------------------------------------------------------------ Jacobian

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double to_out<double>(float v) {
  return static_cast<double>(v);
}
template <>
__device__ __forceinline__ __half to_out<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename OutT>
__device__ __forceinline__ OutT to_out_d(double v) {
  return to_out<OutT>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_out_d<double>(double v) {
  return v;
}

template <typename T, typename OutT>
__device__ __forceinline__ OutT convert(T v) {
  if constexpr (sizeof(T) == 8) {
    return to_out_d<OutT>(v);
  } else {
    return to_out<OutT>(v);
  }
}

template <typename T, typename OutT>
__global__ void __launch_bounds__(kThreads) w_jacobian_kernel(const T* __restrict__ H, const T* __restrict__ Wt,
                                                              const T* __restrict__ winv, OutT* out, int64_t D) {
  __shared__ T sh[kWarps];
  const int64_t k = blockIdx.x;
  const T* h = H + k * D;
  const T* w = Wt + k * D;
  T dot = T(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) dot += h[d] * w[d];
  dot = warp_sum(dot);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = dot;
  __syncthreads();
  T total = T(0);
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += sh[i];
  const T coef = total * winv[k] * winv[k];
  __syncthreads();  // every thread has read H's row before any writes it (out may alias H)
  OutT* o = out + k * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) o[d] = convert<T, OutT>(h[d] - coef * w[d]);
}

// ----------------------------------------------------------------------------------- NPT

// insert (v, i) into a descending register list; strict > so equal values keep earlier columns
template <typename T, int K>
__device__ __forceinline__ void topk_insert(T (&vals)[K], int64_t (&idx)[K], T v, int64_t i) {
#pragma unroll
  for (int q = 0; q < K; ++q) {
    if (v > vals[q]) {
      const T tv = vals[q];
      const int64_t ti = idx[q];
      vals[q] = v;
      idx[q] = i;
      v = tv;
      i = ti;
    }
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) npt_tile_kernel(const T* __restrict__ S, int64_t ld, int64_t cols,
                                                            int64_t j0, const T* __restrict__ xinv,
                                                            const T* __restrict__ winv,
                                                            const int64_t* __restrict__ y, T* __restrict__ run_v,
                                                            int64_t* __restrict__ run_i) {
  __shared__ T sh_v[kWarps];
  __shared__ int64_t sh_i[kWarps];
  __shared__ T best_v[K];
  __shared__ int64_t best_i[K];

  const int64_t row = blockIdx.x;
  const T* Srow = S + row * ld;
  const T xs = xinv[row];
  const int64_t yl = y[row] - j0;

  T vals[K];
  int64_t idx[K];
#pragma unroll
  for (int q = 0; q < K; ++q) {
    vals[q] = neg_inf<T>();
    idx[q] = INT64_MAX;
  }
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    if (j == yl) continue;
    const T c = clamp_cos(raw_cosine(Srow[j], xs, winv[j]));
    if (c > vals[K - 1]) topk_insert<T, K>(vals, idx, c, j + j0);
  }
  // K rounds: the block's best head wins, its owner pops it
  for (int q = 0; q < K; ++q) {
    T v = vals[0];
    int64_t i = idx[0];
    block_argmax(v, i, sh_v, sh_i);
    if (threadIdx.x == 0) {
      best_v[q] = v;
      best_i[q] = i;
    }
    if (i != INT64_MAX && idx[0] == i) {
#pragma unroll
      for (int p = 0; p + 1 < K; ++p) {
        vals[p] = vals[p + 1];
        idx[p] = idx[p + 1];
      }
      vals[K - 1] = neg_inf<T>();
      idx[K - 1] = INT64_MAX;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // merge with the running list (earlier tiles: smaller columns)
    T* rv = run_v + row * K;
    int64_t* ri = run_i + row * K;
    T mv[K];
    int64_t mi[K];
    int a = 0, bq = 0;
#pragma unroll
    for (int q = 0; q < K; ++q) {
      const bool take_run = bq >= K || (a < K && ri[a] >= 0 &&
                                        (best_i[bq] == INT64_MAX || better_max(rv[a], ri[a], best_v[bq], best_i[bq])));
      if (take_run) {
        mv[q] = rv[a];
        mi[q] = ri[a];
        ++a;
      } else {
        mv[q] = best_v[bq];
        mi[q] = best_i[bq] == INT64_MAX ? -1 : best_i[bq];
        ++bq;
      }
    }
#pragma unroll
    for (int q = 0; q < K; ++q) {
      rv[q] = mv[q];
      ri[q] = mi[q];
    }
  }
}

int64_t grid_cols(int64_t cols) {
  const int64_t g = (cols + kThreads - 1) / kThreads;
  return g < 1 ? 1 : (g > 65535 ? 65535 : g);
}

}  // namespace

// ------------------------------------------------------------------------------ launchers

// whether a call needs the kExt specialisation (the general rewrite, a per-row t_b or filtering)
template <typename T>
bool needs_ext(T q, T thr, const T* rt) {
  return q != T(0) || thr < T(2) || rt != nullptr;
}

template <typename T>
cudaError_t launch_margin_forward_tile(const T* S, int64_t ld, int64_t rows, int64_t cols, int64_t j0,
                                       const T* xinv, const T* winv, const T* f, const int64_t* y, T s, T a,
                                       T b, T q, T thr, const T* rt, int K, T* m, T* l, T* cbest, int64_t* cidx,
                                       int32_t* nsv, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (K < 1) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(rows);
#define FF_LAUNCH(EXT, SUB)                                                                                    \
  margin_forward_tile_kernel<T, EXT, SUB><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, f, y, s, \
                                                                          a, b, q, thr, rt, K, m, l, cbest,     \
                                                                          cidx, nsv)
  const bool ext = needs_ext(q, thr, rt);
  if (!ext && K == 1) {
    FF_LAUNCH(false, false);
  } else if (!ext) {
    FF_LAUNCH(false, true);
  } else if (K == 1) {
    FF_LAUNCH(true, false);
  } else {
    FF_LAUNCH(true, true);
  }
#undef FF_LAUNCH
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_margin_backward_tile(T* S, int64_t ld, int64_t rows, int64_t cols, int64_t j0,
                                        const T* xinv, const T* winv, const T* f, const T* lse, const T* sgl,
                                        const T* dcy, const int64_t* y, T s, T a, T b, T q, T thr, const T* rt,
                                        int K, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (K < 1) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(grid_cols(cols)));
#define FF_LAUNCH(EXT, SUB)                                                                                      \
  margin_backward_tile_kernel<T, EXT, SUB><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, f, lse, \
                                                                           sgl, dcy, y, s, a, b, q, thr, rt, K)
  const bool ext = needs_ext(q, thr, rt);
  if (!ext && K == 1) {
    FF_LAUNCH(false, false);
  } else if (!ext) {
    FF_LAUNCH(false, true);
  } else if (K == 1) {
    FF_LAUNCH(true, false);
  } else {
    FF_LAUNCH(true, true);
  }
#undef FF_LAUNCH
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_w_jacobian(const T* H, const T* Wt, const T* winv, void* out, OutDtype out_dtype, int64_t n,
                              int64_t D, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(n);
  switch (out_dtype) {
    case OutDtype::kFloat32:
      w_jacobian_kernel<T, float><<<grid, kThreads, 0, stream>>>(H, Wt, winv, static_cast<float*>(out), D);
      break;
    case OutDtype::kFloat64:
      w_jacobian_kernel<T, double><<<grid, kThreads, 0, stream>>>(H, Wt, winv, static_cast<double*>(out), D);
      break;
    case OutDtype::kFloat16:
      w_jacobian_kernel<T, __half><<<grid, kThreads, 0, stream>>>(H, Wt, winv, static_cast<__half*>(out), D);
      break;
    case OutDtype::kBFloat16:
      w_jacobian_kernel<T, __nv_bfloat16>
          <<<grid, kThreads, 0, stream>>>(H, Wt, winv, static_cast<__nv_bfloat16*>(out), D);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_npt_tile(const T* S, int64_t ld, int64_t rows, int64_t cols, int64_t j0, const T* xinv,
                            const T* winv, const int64_t* y, int kpad, T* run_v, int64_t* run_i,
                            cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(rows);
  switch (kpad) {
    case 1:
      npt_tile_kernel<T, 1><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, y, run_v, run_i);
      break;
    case 2:
      npt_tile_kernel<T, 2><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, y, run_v, run_i);
      break;
    case 4:
      npt_tile_kernel<T, 4><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, y, run_v, run_i);
      break;
    case 8:
      npt_tile_kernel<T, 8><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, y, run_v, run_i);
      break;
    case 16:
      npt_tile_kernel<T, 16><<<grid, kThreads, 0, stream>>>(S, ld, cols, j0, xinv, winv, y, run_v, run_i);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

#define FF_INSTANTIATE(T)                                                                                      \
  template cudaError_t launch_margin_forward_tile<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*,   \
                                                     const T*, const T*, const int64_t*, T, T, T, T, T,         \
                                                     const T*, int, T*, T*, T*, int64_t*, int32_t*,             \
                                                     cudaStream_t);                                             \
  template cudaError_t launch_margin_backward_tile<T>(T*, int64_t, int64_t, int64_t, int64_t, const T*,        \
                                                      const T*, const T*, const T*, const T*, const T*,          \
                                                      const int64_t*, T, T, T, T, T, const T*, int,              \
                                                      cudaStream_t);                                             \
  template cudaError_t launch_w_jacobian<T>(const T*, const T*, const T*, void*, OutDtype, int64_t, int64_t,    \
                                            cudaStream_t);                                                      \
  template cudaError_t launch_npt_tile<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, const T*,     \
                                          const int64_t*, int, T*, int64_t*, cudaStream_t);

FF_INSTANTIATE(float)
FF_INSTANTIATE(double)
#undef FF_INSTANTIATE

}  // namespace cuda
}  // namespace fusedface
