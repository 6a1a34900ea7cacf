// Launchers of the CUDA epilogue kernels (margin_softmax_cuda.cu): raw pointers and a stream, no
// torch types, so the kernels compile with a plain `nvcc` (ci/check_cuda.sh) and the ATen layer
// (margin_softmax_cuda.cpp, CUDA builds of torch only) stays a thin C++ file.
//
// A GPU tile is ROW-MAJOR: S[b·ld + j] for batch row b and tile column j (cuBLAS computes
// S = x·W_tileᵀ). Every launcher enqueues on `stream` and returns the launch status
// (cudaGetLastError), which the caller checks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedface {
namespace cuda {

// output dtype of the W-side Jacobian (W's dtype)
enum class OutDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Forward epilogue of one tile of `cols` classes: folds the tile into the running per-row state.
//   S [rows, ld] raw products x·W_r (cols·K used: class j's sub-centres at j·K … j·K + K − 1),
//   xinv [rows], winv [cols·K] (the tile's rows of W), f [rows], y [rows] (class label or −1),
//   q, thr, rt [rows] or null: the general rewrite and filtering (margin_softmax_math.h; q = 0,
//   thr = 2, rt = null and K = 1 run the seed losses' kernel), state m, l, cbest [rows] (T),
//   cidx [rows] int64 (a class index), nsv [rows] int32.
template <typename T>
cudaError_t launch_margin_forward_tile(const T* S, int64_t ld, int64_t rows, int64_t cols, int64_t j0,
                                       const T* xinv, const T* winv, const T* f, const int64_t* y, T s, T a,
                                       T b, T q, T thr, const T* rt, int K, T* m, T* l, T* cbest, int64_t* cidx,
                                       int32_t* nsv, cudaStream_t stream);

// Backward epilogue of one tile, in place: S (raw products) becomes dℓ/dc · winv_r (with K > 1 on
// each (row, class)'s arg-max sub-centre, 0 on its other sub-centres).
//   lse [rows], sgl [rows] = s·gl, dcy [rows] (label column gradient).
template <typename T>
cudaError_t launch_margin_backward_tile(T* S, int64_t ld, int64_t rows, int64_t cols, int64_t j0,
                                        const T* xinv, const T* winv, const T* f, const T* lse, const T* sgl,
                                        const T* dcy, const int64_t* y, T s, T a, T b, T q, T thr, const T* rt,
                                        int K, cudaStream_t stream);

// W-side normalisation Jacobian of one tile: out_k = H_k − (H_k·W_k)·winv_k²·W_k.
//   H [n, D], Wt [n, D], winv [n] in T; out [n, D] of dtype `out_dtype` (may alias H when T).
template <typename T>
cudaError_t launch_w_jacobian(const T* H, const T* Wt, const T* winv, void* out, OutDtype out_dtype, int64_t n,
                              int64_t D, cudaStream_t stream);

// NPT streaming top-k of one tile: merges the tile's best kpad columns (label excluded) into the
// running lists run_v [rows, kpad] (descending), run_i [rows, kpad]. kpad ∈ {1, 2, 4, 8, 16}.
template <typename T>
cudaError_t launch_npt_tile(const T* S, int64_t ld, int64_t rows, int64_t cols, int64_t j0, const T* xinv,
                            const T* winv, const int64_t* y, int kpad, T* run_v, int64_t* run_i,
                            cudaStream_t stream);

// the kpad a given k runs with (the next power of two)
inline int npt_kpad(int64_t k) {
  int p = 1;
  while (p < k) p *= 2;
  return p;
}

}  // namespace cuda
}  // namespace fusedface
