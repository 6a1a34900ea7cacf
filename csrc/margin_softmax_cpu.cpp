// The CPU implementation of the three tile kernels (fusedface/_engine.py), with the tile loop in C++.
//
// Work split. The classes are cut into tiles of `cols` classes and the tiles into one contiguous
// range per worker (at::parallel_for over workers, so the split — and therefore the summation
// order — depends only on the thread count, never on scheduling). A worker owns everything it
// touches: one [cols, rows] tile buffer, its own running per-row state (forward), its own
// embedding-gradient accumulator (backward), and the rows of dW of its tiles. Its GEMMs run
// single-threaded inside the parallel region (ATen/BLAS do not nest), on data that stays in the
// core's L2: the tile buffer is sized to about 512 KiB (FUSEDFACE_NATIVE_TILE_BYTES).
//
// GEMMs go through ATen: fp32 ones to oneDNN's matmul (at::native::mkldnn_matmul) where oneDNN has
// its AVX-512 kernels (on AMD CPUs MKL's sgemm runs a generic AVX2 path at half the speed), else
// at::mm; fp64 ones to at::mm (MKL/OpenBLAS dgemm).
//
// Per tile (forward): S = W_tile · xᵀ (ATen GEMM, class-major [cols, rows]), then ONE fused
// epilogue (margin_softmax_cpu_epilogue.h) folds it into the worker's online log-sum-exp, arg-max
// and support-vector count. After the pass the workers' states are merged per row.
// Per tile (backward): recompute S (or read the kept block), the epilogue turns it into
// dc·winv in place, then Gx_w += (dc·winv)ᵀ·W_tile and H = (dc·winv)·x̂ (two GEMMs), and the
// W-side normalisation Jacobian turns H into the tile's rows of dW.
//
// Precision: GEMMs and epilogues run in the accumulation dtype (fp32, fp64 for fp64 inputs); 16-bit
// inputs are widened tile by tile. When x and W are both bf16, the products are exact in bf16, so
// the forward/recompute GEMMs may run on oneDNN's bf16 units with fp32 accumulation and output
// ("bf32" fpmath mode) without changing the result; with fast_grad the two gradient GEMMs become
// bf16 GEMMs too, which rounds dc to bf16 (like autocast training). The opt-in bf16-GEMM mode
// (bf16_gemm, FUSEDFACE_NATIVE_PRECISION=bf16) makes every tile GEMM a plain bf16 GEMM with bf16
// output, as torch.mm of bf16 tensors is: the epilogues compute in fp32 on the (widened) bf16
// products, and the gradients still accumulate across tiles in fp32. See docs/native.md.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "margin_softmax.h"
#include "margin_softmax_cpu_epilogue.h"

// oneDNN's matmul as ATen exports it (TORCH_API in aten/src/ATen/native/mkldnn/Matmul.h, a header
// the wheels do not ship): result = beta·result + alpha·mat1·mat2. Declared weak, so the module still
// loads — and falls back to at::mm — with a torch that lacks it.
namespace at {
namespace native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace fusedface {
namespace {

using cpu::BackwardRows;
using cpu::BackwardTile;
using cpu::ForwardState;
using cpu::Margin;
using cpu::Rows;
using cpu::Tile;

int64_t env_int(const char* name, int64_t fallback, int64_t min_value = 1) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(v, &end, 10);
  FF_CHECK(end != v && *end == '\0' && parsed >= min_value, "environment variable ", name, "=", v,
           " must be an integer >= ", min_value);
  return static_cast<int64_t>(parsed);
}

// How one call is cut into work.
struct Plan {
  int64_t B = 0, C = 0, D = 0;
  int64_t rows = 0;     // batch rows per GEMM (row block)
  int64_t cols = 0;     // classes per tile
  int64_t ntiles = 0;
  int64_t workers = 0;
  int64_t tile_begin(int64_t w) const { return w * ntiles / workers; }
};

// `tile` (the engine's memory-budget tile width) is an upper bound; within it the width is chosen
// so that one [cols, rows] buffer of the accumulation dtype fits the per-core cache budget.
// bf16_gemm: in the bf16-GEMM mode a tile's GEMMs are twice as fast, so at small D the fixed cost of
// each ATen GEMM call (dispatch, oneDNN primitive lookup, scratch allocation) weighs more; the default
// budget grows as 1/D below D = 512 (2 MiB at D <= 128: 1.14 vs 1.21 of mm4 at C = 100,000, D = 128,
// best of 10 interleaved runs; at D = 512, 512 KiB stayed best). Both are cache-friendly enough: the
// epilogues stream the tile once or twice, the GEMM reads it once.
// K: rows of W per class (sub-centres); a tile of `cols` classes then holds cols·K rows of products.
Plan make_plan(int64_t B, int64_t C, int64_t D, int64_t tile, size_t elt, bool bf16_gemm = false, int64_t K = 1) {
  Plan p;
  p.B = B;
  p.C = C;
  p.D = D;
  p.rows = std::min<int64_t>(B, env_int("FUSEDFACE_NATIVE_ROW_BLOCK", 1024));
  const int64_t grow = bf16_gemm ? std::clamp<int64_t>(512 / std::max<int64_t>(D, 1), 1, 4) : 1;
  const int64_t budget = env_int("FUSEDFACE_NATIVE_TILE_BYTES", grow * 512 * 1024);
  int64_t cols = budget / (p.rows * static_cast<int64_t>(elt) * K);
  cols = std::max<int64_t>(16, std::min<int64_t>(4096, cols / 16 * 16));
  p.cols = std::max<int64_t>(1, std::min({cols, tile, C}));
  p.ntiles = (C + p.cols - 1) / p.cols;
  p.workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.ntiles));
  return p;
}

// Labels as int32 (the epilogue compares them with column indices in vector lanes), checked here:
// every label is a class index or −1 (ignored row).
at::Tensor labels_int32(const at::Tensor& y, int64_t C) {
  const at::Tensor yc = y.contiguous();
  const int64_t* p = yc.data_ptr<int64_t>();
  for (int64_t i = 0; i < yc.numel(); ++i) {
    FF_CHECK(p[i] >= -1 && p[i] < C, "y (labels) must hold class indices in [0, C=", C,
             ") or -1 for ignored rows; row ", i, " holds ", p[i]);
  }
  return yc.to(at::kInt);
}

// While alive, lets oneDNN run fp32 matmuls on bf16 units (fp32 accumulation and output). Set once
// around a whole parallel region (the setting is process-global, so it must not flip while workers
// run; another Python thread running fp32 matmuls at that very moment would see it too). Only used
// when every fp32 GEMM operand of the region is exactly representable in bf16.
class OneDnnBf16Matmul {
 public:
  explicit OneDnnBf16Matmul(bool enable)
      : enable_(enable && env_int("FUSEDFACE_NATIVE_ONEDNN_BF16", 1, 0) != 0 &&
                at::globalContext().userEnabledMkldnn()) {
    if (!enable_) return;
    auto& ctx = at::globalContext();
    prev_ = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    ctx.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, at::Float32Precision::BF16);
  }
  ~OneDnnBf16Matmul() {
    if (enable_) {
      at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, prev_);
    }
  }
  OneDnnBf16Matmul(const OneDnnBf16Matmul&) = delete;
  OneDnnBf16Matmul& operator=(const OneDnnBf16Matmul&) = delete;

 private:
  bool enable_;
  at::Float32Precision prev_ = at::Float32Precision::NONE;
};

// Whether fp32 tile GEMMs go to oneDNN (at::native::mkldnn_matmul) rather than at::mm (MKL or
// OpenBLAS): where oneDNN has its AVX-512 kernels. On the AMD EPYC of the project's CI, MKL runs its
// generic AVX2 path (about 100 GFLOP/s per core) and oneDNN its AVX-512 one (about 220): measured in
// docs/native.md. FUSEDFACE_NATIVE_ONEDNN=0 turns it off; torch.backends.mkldnn.enabled=False too.
bool onednn_fp32_available() {
  static const bool ok = [] {
    if (&at::native::mkldnn_matmul == nullptr) return false;
    if (env_int("FUSEDFACE_NATIVE_ONEDNN", 1, 0) == 0) return false;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    // what mkldnn_matmul itself requires of the CPU for fp32 (it throws otherwise)
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
  }();
  return ok && at::globalContext().userEnabledMkldnn();
}

// out (=, or += when accumulate) A·B, all in one dtype; views may be strided or transposed.
void gemm(at::Tensor& out, const at::Tensor& A, const at::Tensor& B, bool accumulate = false) {
  if (out.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
      A.size(1) > 0 && onednn_fp32_available()) {
    at::native::mkldnn_matmul(A, B, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    at::addmm_out(out, out, A, B);
  } else {
    at::mm_out(out, A, B);
  }
}

// Large buffers written once per step (the kept block, dW) are first touched inside the pass; with
// transparent huge pages in "madvise" mode (the common default), asking for huge pages cuts the
// page-fault cost of that first touch about threefold (92 → 31 ms for 200 MB measured here). Only
// advice: nothing changes if the kernel says no.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes < 8 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// W rows [j0, j0 + n) in the accumulation dtype: a view when W already is, else widened into buf.
at::Tensor w_tile(const at::Tensor& W, at::Tensor& buf, int64_t j0, int64_t n) {
  at::Tensor src = W.narrow(0, j0, n);
  if (!buf.defined()) return src;
  at::Tensor dst = buf.narrow(0, 0, n);
  dst.copy_(src);
  return dst;
}

// The W-side normalisation Jacobian of one tile: with H_k = winv_k·Σ_b dℓ/dc_bk·x̂_b,
// dW_k = H_k − (H_k·W_k)·winv_k²·W_k  (= (G_k − (G_k·ŵ_k)ŵ_k)·winv_k, SPEC §2). out may alias H.
template <typename T, typename OutT>
void w_jacobian(const T* H,     // [n, D]
                const T* Wt,    // [n, D]
                const T* winv,  // [n]
                OutT* out,      // [n, D]
                int64_t n, int64_t D) {
  for (int64_t k = 0; k < n; ++k) {
    const T* h = H + k * D;
    const T* w = Wt + k * D;
    T dot = T(0);
    for (int64_t d = 0; d < D; ++d) dot += h[d] * w[d];
    const T coef = dot * winv[k] * winv[k];
    OutT* o = out + k * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<OutT>(h[d] - coef * w[d]);
  }
}

template <typename T>
void w_jacobian_into(const at::Tensor& H, const at::Tensor& Wt, const T* winv, at::Tensor out) {
  const int64_t n = H.size(0), D = H.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fusedface_w_jacobian", [&] {
    w_jacobian<T, scalar_t>(H.data_ptr<T>(), Wt.data_ptr<T>(), winv, out.data_ptr<scalar_t>(), n, D);
  });
}

// A bf16 tensor's storage as the epilogue sees it (bit patterns).
cpu::bf16_bits* bf16_data(const at::Tensor& t) { return reinterpret_cast<cpu::bf16_bits*>(t.data_ptr<at::BFloat16>()); }

// The W-side Jacobian of the bf16-GEMM mode: H bf16 (one row block) or fp32 (summed), W_tile bf16.
void w_jacobian_bf16_into(const at::Tensor& H, const at::Tensor& Wt, const float* winv, at::Tensor out) {
  const int64_t n = H.size(0), D = H.size(1);
  if (H.scalar_type() == at::kBFloat16) {
    cpu::w_jacobian_bf16(bf16_data(H), bf16_data(Wt), winv, bf16_data(out), n, D);
  } else {
    cpu::w_jacobian_bf16(H.data_ptr<float>(), bf16_data(Wt), winv, bf16_data(out), n, D);
  }
}

bool both_bf16(const at::Tensor& x, const at::Tensor& W) {
  return x.scalar_type() == at::kBFloat16 && W.scalar_type() == at::kBFloat16;
}

// Whether a call runs in the bf16-GEMM mode: asked for, bf16 x and W, fp32 accumulation. fp16 inputs
// keep their fp32 GEMMs (no fp16 GEMM units on the CPUs this targets; torch.mm of fp16 is slower
// than the widened fp32 GEMM there).
template <typename T>
bool use_bf16_gemm(bool bf16_gemm, const at::Tensor& x, const at::Tensor& W) {
  return bf16_gemm && std::is_same_v<T, float> && both_bf16(x, W);
}

// ------------------------------------------------------------------------------------- forward

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv,
    const at::Tensor& y, const at::Tensor& f, double scale, double a, double b, int64_t tile,
    bool keep_block, bool bf16_gemm, double q, const at::Tensor& rt, double thr, int64_t K) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t B = x.size(0), C = W.size(0) / K, D = x.size(1);  // C classes of K rows each
  // bf16-GEMM mode: bf16 tiles (the kept block holds fp32 cosines, so it keeps the exact GEMM); not
  // with sub-centres (their backward has no bf16-GEMM route, and both passes must see one cosine)
  const bool g16 = use_bf16_gemm<T>(bf16_gemm, x, W) && !keep_block && K == 1;
  const Plan plan = make_plan(B, C, D, tile, sizeof(T), g16, K);
  const int64_t nw = plan.workers;

  const at::Tensor xT = g16 ? x.t().contiguous() : x.to(acc).t().contiguous();  // [D, B]
  const at::Tensor y32 = labels_int32(y, C);          // [B]
  const at::Tensor xinv_c = xinv.contiguous(), winv_c = winv.contiguous(), f_c = f.contiguous();
  const at::Tensor sf = f_c * scale;  // [B] the label column's logit
  at::Tensor block = keep_block ? at::empty({C, B}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  advise_huge_pages(block);

  const auto opt = x.options().dtype(acc);
  at::Tensor m = at::full({nw, B}, -std::numeric_limits<T>::infinity(), opt);
  at::Tensor l = at::zeros({nw, B}, opt);
  at::Tensor cbest = at::full({nw, B}, -std::numeric_limits<T>::infinity(), opt);
  at::Tensor cidx = at::zeros({nw, B}, opt.dtype(at::kInt));
  at::Tensor nsv = at::zeros({nw, B}, opt.dtype(at::kInt));

  const Margin<T> mg{static_cast<T>(scale), static_cast<T>(a), static_cast<T>(b), static_cast<T>(q),
                     static_cast<T>(thr)};
  const T* winv_p = winv_c.data_ptr<T>();
  const at::Tensor rt_c = rt.defined() ? rt.contiguous() : at::Tensor();
  const Rows<T> rows_all{xinv_c.data_ptr<T>(), f_c.data_ptr<T>(), sf.data_ptr<T>(), y32.data_ptr<int32_t>(),
                         rt_c.defined() ? rt_c.data_ptr<T>() : nullptr};

  OneDnnBf16Matmul bf16_units(both_bf16(x, W) && !g16);  // exact: every operand is a bf16 value
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set again in each worker
    for (int64_t w = w0; w < w1; ++w) {
      at::Tensor sbuf = keep_block ? at::Tensor() : at::empty({plan.cols * K, plan.rows}, opt);
      at::Tensor sbuf16 = g16 ? at::empty({plan.cols, plan.rows}, opt.dtype(at::kBFloat16)) : at::Tensor();
      at::Tensor wbuf = (g16 || W.scalar_type() == acc) ? at::Tensor() : at::empty({plan.cols * K, D}, opt);
      at::Tensor rbuf = K > 1 ? at::empty({plan.cols, plan.rows}, opt) : at::Tensor();  // classes' r
      const ForwardState<T> st_w{m.data_ptr<T>() + w * B, l.data_ptr<T>() + w * B, cbest.data_ptr<T>() + w * B,
                                 cidx.data_ptr<int32_t>() + w * B, nsv.data_ptr<int32_t>() + w * B};
      for (int64_t t = plan.tile_begin(w); t < plan.tile_begin(w + 1); ++t) {
        const int64_t j0 = t * plan.cols, nc = std::min(plan.cols, C - j0);
        const at::Tensor Wt = w_tile(W, wbuf, j0 * K, nc * K);  // [nc·K, D]
        for (int64_t b0 = 0; b0 < B; b0 += plan.rows) {
          const int64_t nr = std::min(plan.rows, B - b0);
          at::Tensor S = keep_block ? block.narrow(0, j0, nc).narrow(1, b0, nr)
                                    : sbuf.narrow(0, 0, nc * K).narrow(1, 0, nr);  // [nc·K, nr]
          const Rows<T> rp{rows_all.xinv + b0, rows_all.f + b0, rows_all.sf + b0, rows_all.y + b0,
                           rows_all.rt != nullptr ? rows_all.rt + b0 : nullptr};
          const ForwardState<T> st{st_w.m + b0, st_w.l + b0, st_w.cbest + b0, st_w.cidx + b0, st_w.nsv + b0};
          if constexpr (std::is_same_v<T, float>) {
            if (g16) {  // bf16 W tile (a view of W) · bf16 xᵀ → bf16 products, widened into S
              at::Tensor S16 = sbuf16.narrow(0, 0, nc).narrow(1, 0, nr);
              at::mm_out(S16, Wt, xT.narrow(1, b0, nr));
              cpu::widen_tile(bf16_data(S16), S16.stride(0), S.data_ptr<float>(), S.stride(0), nc, nr);
            }
          }
          if (!g16) gemm(S, Wt, xT.narrow(1, b0, nr));
          if (K > 1) {  // the classes' raw cosines (max over sub-centres), then the scaled epilogue
            at::Tensor R = rbuf.narrow(0, 0, nc).narrow(1, 0, nr);
            cpu::subcenter_max(S.data_ptr<T>(), S.stride(0), R.data_ptr<T>(), nullptr, R.stride(0), nc, nr,
                               static_cast<int>(K), rp.xinv, winv_p + j0 * K);
            const Tile<T> tv{R.data_ptr<T>(), R.stride(0), nc, nr, j0, winv_p + j0 * K, /*scaled=*/true};
            cpu::forward_tile(tv, rp, st, mg);
            continue;
          }
          const Tile<T> tv{S.data_ptr<T>(), S.stride(0), nc, nr, j0, winv_p + j0};
          cpu::forward_tile(tv, rp, st, mg);
        }
      }
    }
  });

  // merge the workers' states row by row (fixed order: deterministic for a given thread count)
  at::Tensor lse = at::empty({B}, opt);
  at::Tensor pred = at::empty({B}, opt.dtype(at::kLong));
  at::Tensor sv = at::empty({B}, opt.dtype(at::kInt));
  const T *mp = m.data_ptr<T>(), *lp = l.data_ptr<T>(), *cp = cbest.data_ptr<T>();
  const int32_t *ip = cidx.data_ptr<int32_t>(), *np = nsv.data_ptr<int32_t>();
  T* lse_p = lse.data_ptr<T>();
  int64_t* pred_p = pred.data_ptr<int64_t>();
  int32_t* sv_p = sv.data_ptr<int32_t>();
  for (int64_t r = 0; r < B; ++r) {
    T mm = -std::numeric_limits<T>::infinity(), ll = T(0), best = -std::numeric_limits<T>::infinity();
    int64_t arg = 0;
    int32_t count = 0;
    for (int64_t w = 0; w < nw; ++w) {
      math::lse_merge(mm, ll, mp[w * B + r], lp[w * B + r]);
      if (math::better_max(cp[w * B + r], static_cast<int64_t>(ip[w * B + r]), best, arg) &&
          !std::isinf(cp[w * B + r])) {
        best = cp[w * B + r];
        arg = ip[w * B + r];
      }
      count += np[w * B + r];
    }
    lse_p[r] = math::lse_value(mm, ll);
    pred_p[r] = arg;
    sv_p[r] = count;
  }
  return {lse, pred, sv, block};
}

// ------------------------------------------------------------------------------------ backward

// One worker's tiles in the bf16-GEMM mode: every GEMM a plain bf16 one on bf16 operands (views of W,
// the bf16 xᵀ and x̂), writing bf16, as torch.mm does. Per tile and row block: recompute the bf16
// products; widen them into the fp32 tile, where the epilogue writes dc·winv; round that to bf16;
// Gx_w (fp32) += the bf16 product (dc·winv)ᵀ·W_tile; H = (dc·winv)·x̂ in bf16 (summed in fp32 over
// row blocks when there are several); the Jacobian writes the tile's rows of dW from it.
void backward_worker_bf16(int64_t w, const Plan& plan, const at::Tensor& W, const at::Tensor& xT16,
                          const at::Tensor& xh16, const float* winv_p, const BackwardRows<float>& rows_all,
                          const Margin<float> mg, bool need_dx, bool need_dW, at::Tensor gx, at::Tensor& dW) {
  const auto opt16 = W.options().dtype(at::kBFloat16);
  const int64_t B = plan.B, C = plan.C, D = plan.D;
  const bool one_block = plan.rows >= B;
  at::Tensor sbuf = at::empty({plan.cols, plan.rows}, opt16);  // products, then dc·winv
  at::Tensor fbuf = at::empty({plan.cols, plan.rows}, opt16.dtype(at::kFloat));  // the epilogue's fp32 tile
  at::Tensor gtmp = need_dx ? at::empty({plan.rows, D}, opt16) : at::Tensor();
  at::Tensor htmp = need_dW ? at::empty({plan.cols, D}, opt16) : at::Tensor();
  at::Tensor hsum = (need_dW && !one_block) ? at::empty({plan.cols, D}, opt16.dtype(at::kFloat)) : at::Tensor();
  for (int64_t t = plan.tile_begin(w); t < plan.tile_begin(w + 1); ++t) {
    const int64_t j0 = t * plan.cols, nc = std::min(plan.cols, C - j0);
    const at::Tensor Wt = W.narrow(0, j0, nc);  // [nc, D] bf16 view
    at::Tensor ht = need_dW ? htmp.narrow(0, 0, nc) : at::Tensor();
    for (int64_t b0 = 0; b0 < B; b0 += plan.rows) {
      const int64_t nr = std::min(plan.rows, B - b0);
      at::Tensor S = sbuf.narrow(0, 0, nc).narrow(1, 0, nr);  // [nc, nr] bf16
      at::mm_out(S, Wt, xT16.narrow(1, b0, nr));
      const BackwardRows<float> rp{rows_all.xinv + b0, rows_all.f + b0, rows_all.sf + b0, rows_all.lse + b0,
                                   rows_all.sgl + b0, rows_all.dcy + b0, rows_all.y + b0,
                                   rows_all.rt != nullptr ? rows_all.rt + b0 : nullptr};
      at::Tensor Fs = fbuf.narrow(0, 0, nc).narrow(1, 0, nr);
      float* fp = Fs.data_ptr<float>();
      cpu::widen_tile(bf16_data(S), S.stride(0), fp, Fs.stride(0), nc, nr);
      const BackwardTile<float, float> tv{fp, Fs.stride(0), fp, Fs.stride(0), nc, nr, j0, winv_p + j0, false};
      cpu::backward_tile(tv, rp, mg);
      cpu::narrow_tile(fp, Fs.stride(0), bf16_data(S), S.stride(0), nc, nr);
      if (need_dx) {
        at::Tensor g = gtmp.narrow(0, 0, nr);
        at::mm_out(g, S.t(), Wt);
        cpu::accumulate_bf16(bf16_data(g), gx.data_ptr<float>() + b0 * D, nr * D);  // rows b0.. of [B, D]
      }
      if (need_dW) {
        at::mm_out(ht, S, xh16.narrow(0, b0, nr));
        if (!one_block) {
          at::Tensor hs = hsum.narrow(0, 0, nc);
          if (b0 == 0) {
            hs.copy_(ht);
          } else {
            hs.add_(ht);
          }
        }
      }
    }
    if (need_dW) w_jacobian_bf16_into(one_block ? ht : hsum.narrow(0, 0, nc), Wt, winv_p + j0, dW.narrow(0, j0, nc));
  }
}

// Backward. Per tile and row block: recompute S (or read the kept block), the epilogue writes
// dc·winv, then Gx_w += (dc·winv)ᵀ·W_tile and H (+)= (dc·winv)·x̂, and after the row blocks the
// Jacobian turns H into the tile's rows of dW.
//
// fast16 (fast_grad with bf16 x and W): dc·winv is rounded to bf16 after the epilogue and the two
// gradient GEMMs are plain bf16 GEMMs on oneDNN's bf16 units (bf16 W and x̂ operands; each tile's partial
// product rounded to bf16 and then accumulated in fp32), while the recompute stays an exact
// bf16-product GEMM with fp32 output. About the precision of autocast training; off by default.
template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv,
    const at::Tensor& y, const at::Tensor& f, const at::Tensor& lse, const at::Tensor& gl,
    const at::Tensor& dcy, const at::Tensor& block, double scale, double a, double b, int64_t tile,
    bool need_dx, bool need_dW, bool fast_grad, bool bf16_gemm, double q, const at::Tensor& rt, double thr,
    int64_t K) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = x.options().dtype(acc);
  const int64_t B = x.size(0), C = W.size(0) / K, D = x.size(1);  // C classes of K rows each
  const bool kept = block.defined() && block.numel() > 0;
  // bf16-GEMM mode: the recompute too writes bf16 (a kept block is fp32: it is read as it is); the
  // gradient GEMMs are those of fast_grad either way. Sub-centres: exact recompute (as their forward)
  const bool g16 = use_bf16_gemm<T>(bf16_gemm, x, W) && !kept && K == 1;
  const bool fast16 = (fast_grad || bf16_gemm) && both_bf16(x, W) && std::is_same_v<T, float>;
  const Plan plan = make_plan(B, C, D, tile, sizeof(T), g16, K);
  const int64_t nw = plan.workers;

  if (!need_dx && !need_dW) return {at::empty({0}, opt), at::empty({0}, W.options())};

  const at::Tensor xa = x.to(acc).contiguous();                             // [B, D]
  const at::Tensor xT = kept ? at::Tensor() : (g16 ? x.t().contiguous() : xa.t().contiguous());  // [D, B]
  const at::Tensor xinv_c = xinv.contiguous(), winv_c = winv.contiguous();
  const at::Tensor xh = need_dW ? (xa * xinv_c.unsqueeze(1)).contiguous() : at::Tensor();  // [B, D] x̂
  const at::Tensor xh16 = (need_dW && fast16) ? xh.to(at::kBFloat16) : at::Tensor();  // x̂ in bf16
  const at::Tensor y32 = labels_int32(y, C);
  const at::Tensor f_c = f.contiguous(), lse_c = lse.contiguous(), dcy_c = dcy.contiguous();
  const at::Tensor sf = f_c * scale, sgl = gl.contiguous() * scale;

  at::Tensor gx_w = need_dx ? at::zeros({nw, B, D}, opt) : at::Tensor();  // one accumulator per worker
  at::Tensor dW = need_dW ? at::empty_like(W) : at::empty({0}, W.options());
  advise_huge_pages(dW);

  const Margin<T> mg{static_cast<T>(scale), static_cast<T>(a), static_cast<T>(b), static_cast<T>(q),
                     static_cast<T>(thr)};
  const T* winv_p = winv_c.data_ptr<T>();
  const at::Tensor rt_c = rt.defined() ? rt.contiguous() : at::Tensor();
  const BackwardRows<T> rows_all{xinv_c.data_ptr<T>(), f_c.data_ptr<T>(), sf.data_ptr<T>(), lse_c.data_ptr<T>(),
                                 sgl.data_ptr<T>(), dcy_c.data_ptr<T>(), y32.data_ptr<int32_t>(),
                                 rt_c.defined() ? rt_c.data_ptr<T>() : nullptr};
  // sub-centres: the epilogue reads the classes' r and writes dℓ/dc (winv_j = 1), subcenter_expand
  // then scales it by the arg-max row's winv
  const at::Tensor ones = K > 1 ? at::ones({plan.cols}, opt) : at::Tensor();

  // bf16 units for the fp32 GEMMs only where every operand is a bf16 value (the recompute of bf16
  // inputs) — the setting is process-global, so it is on for the whole region or not at all: with
  // bf16 inputs and no fast_grad, the gradient GEMMs are fp32 GEMMs on fp32 dc, so it stays off.
  OneDnnBf16Matmul bf16_units(both_bf16(x, W) && fast16 && !g16);
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set again in each worker
    for (int64_t w = w0; w < w1; ++w) {
      if constexpr (std::is_same_v<T, float>) {
        if (g16) {
          backward_worker_bf16(w, plan, W, xT, xh16, winv_p, rows_all, mg, need_dx, need_dW,
                               need_dx ? gx_w[w] : at::Tensor(), dW);
          continue;
        }
      }
      const int64_t ck = plan.cols * K;  // W rows of a full tile
      at::Tensor sbuf = at::empty({ck, plan.rows}, opt);  // recomputed tile, or dc of a kept one
      at::Tensor dbuf16 = fast16 ? at::empty({ck, plan.rows}, opt.dtype(at::kBFloat16)) : at::Tensor();
      at::Tensor gtmp16 = (fast16 && need_dx) ? at::empty({plan.rows, D}, opt.dtype(at::kBFloat16)) : at::Tensor();
      at::Tensor htmp16 = (fast16 && need_dW) ? at::empty({ck, D}, opt.dtype(at::kBFloat16)) : at::Tensor();
      at::Tensor wbuf = W.scalar_type() == acc ? at::Tensor() : at::empty({ck, D}, opt);
      at::Tensor hbuf = (need_dW && W.scalar_type() != acc) ? at::empty({ck, D}, opt) : at::Tensor();
      at::Tensor rbuf = K > 1 ? at::empty({plan.cols, plan.rows}, opt) : at::Tensor();  // classes' r, then dc
      at::Tensor abuf = K > 1 ? at::empty({plan.cols, plan.rows}, opt.dtype(at::kInt)) : at::Tensor();  // arg-max
      for (int64_t t = plan.tile_begin(w); t < plan.tile_begin(w + 1); ++t) {
        const int64_t j0 = t * plan.cols, nc = std::min(plan.cols, C - j0);
        const int64_t r0 = j0 * K, nrw = nc * K;        // the tile's rows of W
        const at::Tensor Wt = w_tile(W, wbuf, r0, nrw);  // [nc·K, D] acc
        at::Tensor H;
        if (need_dW) H = hbuf.defined() ? hbuf.narrow(0, 0, nrw) : dW.narrow(0, r0, nrw);  // [nc·K, D]
        for (int64_t b0 = 0; b0 < B; b0 += plan.rows) {
          const int64_t nr = std::min(plan.rows, B - b0);
          at::Tensor raw = sbuf.narrow(0, 0, nrw).narrow(1, 0, nr);  // [nc·K, nr]
          at::Tensor in = kept ? block.narrow(0, j0, nc).narrow(1, b0, nr) : raw;
          if (!kept) gemm(raw, Wt, xT.narrow(1, b0, nr));
          const BackwardRows<T> rp{rows_all.xinv + b0, rows_all.f + b0, rows_all.sf + b0, rows_all.lse + b0,
                                   rows_all.sgl + b0, rows_all.dcy + b0, rows_all.y + b0,
                                   rows_all.rt != nullptr ? rows_all.rt + b0 : nullptr};
          at::Tensor out = raw;  // dc·winv in place of the recomputed products (or beside a kept block)
          if (K > 1) {  // reduce to classes, dℓ/dc per class, back to the arg-max rows (0 elsewhere)
            at::Tensor R = rbuf.narrow(0, 0, nc).narrow(1, 0, nr), A = abuf.narrow(0, 0, nc).narrow(1, 0, nr);
            cpu::subcenter_max(raw.data_ptr<T>(), raw.stride(0), R.data_ptr<T>(), A.data_ptr<int32_t>(), R.stride(0),
                               nc, nr, static_cast<int>(K), rp.xinv, winv_p + r0);
            const BackwardTile<T, T> tv{R.data_ptr<T>(), R.stride(0), R.data_ptr<T>(), R.stride(0),
                                        nc, nr, j0, ones.data_ptr<T>(), /*scaled=*/true};
            cpu::backward_tile(tv, rp, mg);
            cpu::subcenter_expand(R.data_ptr<T>(), A.data_ptr<int32_t>(), R.stride(0), raw.data_ptr<T>(),
                                  raw.stride(0), nc, nr, static_cast<int>(K), winv_p + r0);
          } else {
            const BackwardTile<T, T> tv{in.data_ptr<T>(), in.stride(0), out.data_ptr<T>(), out.stride(0),
                                        nc, nr, j0, winv_p + j0, kept};
            cpu::backward_tile(tv, rp, mg);
          }
          if (fast16) {
            at::Tensor out16 = dbuf16.narrow(0, 0, nrw).narrow(1, 0, nr);  // [nc·K, nr] bf16 dc·winv
            out16.copy_(out);
            if (need_dx) {
              at::Tensor gt = gtmp16.narrow(0, 0, nr);
              at::mm_out(gt, out16.t(), W.narrow(0, r0, nrw));
              gx_w[w].narrow(0, b0, nr).add_(gt);
            }
            if (need_dW) {
              at::Tensor ht = htmp16.narrow(0, 0, nrw);
              at::mm_out(ht, out16, xh16.narrow(0, b0, nr));
              if (b0 == 0) {
                H.copy_(ht);
              } else {
                H.add_(ht);
              }
            }
            continue;
          }
          if (need_dx) {
            at::Tensor g = gx_w[w].narrow(0, b0, nr);  // [nr, D]
            gemm(g, out.t(), Wt, /*accumulate=*/true);
          }
          if (need_dW) {
            const at::Tensor xb = xh.narrow(0, b0, nr);
            gemm(H, out, xb, /*accumulate=*/b0 > 0);
          }
        }
        if (need_dW) w_jacobian_into<T>(H, Wt, winv_p + r0, dW.narrow(0, r0, nrw));
      }
    }
  });

  at::Tensor Gx = at::empty({0}, opt);
  if (need_dx) {
    Gx = gx_w[0].clone();
    for (int64_t w = 1; w < nw; ++w) Gx.add_(gx_w[w]);
  }
  return {Gx, dW};
}

// ----------------------------------------------------------------------------------------- NPT

template <typename T>
std::tuple<at::Tensor, at::Tensor> npt_impl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv,
                                            const at::Tensor& winv, const at::Tensor& y, int64_t k, int64_t tile) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = x.options().dtype(acc);
  const int64_t B = x.size(0), C = W.size(0), D = x.size(1);
  const Plan plan = make_plan(B, C, D, tile, sizeof(T));
  const int64_t nw = plan.workers;

  const at::Tensor xT = x.to(acc).t().contiguous();  // [D, B]
  const at::Tensor y32 = labels_int32(y, C);
  const at::Tensor xinv_c = xinv.contiguous(), winv_c = winv.contiguous();
  at::Tensor topv = at::full({nw, B, k}, -std::numeric_limits<T>::infinity(), opt);
  at::Tensor topi = at::full({nw, B, k}, -1, opt.dtype(at::kLong));
  const T* winv_p = winv_c.data_ptr<T>();
  const T* xinv_p = xinv_c.data_ptr<T>();
  const int32_t* y_p = y32.data_ptr<int32_t>();

  OneDnnBf16Matmul bf16_units(both_bf16(x, W));
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set again in each worker
    for (int64_t w = w0; w < w1; ++w) {
      at::Tensor sbuf = at::empty({plan.cols, plan.rows}, opt);
      at::Tensor wbuf = W.scalar_type() == acc ? at::Tensor() : at::empty({plan.cols, D}, opt);
      T* tv_w = topv.data_ptr<T>() + w * B * k;
      int64_t* ti_w = topi.data_ptr<int64_t>() + w * B * k;
      for (int64_t t = plan.tile_begin(w); t < plan.tile_begin(w + 1); ++t) {
        const int64_t j0 = t * plan.cols, nc = std::min(plan.cols, C - j0);
        const at::Tensor Wt = w_tile(W, wbuf, j0, nc);
        for (int64_t b0 = 0; b0 < B; b0 += plan.rows) {
          const int64_t nr = std::min(plan.rows, B - b0);
          at::Tensor S = sbuf.narrow(0, 0, nc).narrow(1, 0, nr);
          gemm(S, Wt, xT.narrow(1, b0, nr));
          const Tile<T> tv{S.data_ptr<T>(), S.stride(0), nc, nr, j0, winv_p + j0};
          cpu::npt_tile(tv, xinv_p + b0, y_p + b0, static_cast<int>(k), tv_w + b0 * k, ti_w + b0 * k);
        }
      }
    }
  });

  // merge the workers' sorted lists: larger value first, equal values by smaller column
  at::Tensor values = at::empty({B, k}, opt);
  at::Tensor index = at::empty({B, k}, opt.dtype(at::kLong));
  const T* tvp = topv.data_ptr<T>();
  const int64_t* tip = topi.data_ptr<int64_t>();
  T* vp = values.data_ptr<T>();
  int64_t* ip = index.data_ptr<int64_t>();
  std::vector<int64_t> head(nw);
  for (int64_t r = 0; r < B; ++r) {
    std::fill(head.begin(), head.end(), 0);
    for (int64_t q = 0; q < k; ++q) {
      int64_t pick = -1;
      for (int64_t w = 0; w < nw; ++w) {
        if (head[w] >= k) continue;
        const int64_t o = (w * B + r) * k + head[w];
        if (pick < 0) {
          pick = w;
          continue;
        }
        const int64_t po = (pick * B + r) * k + head[pick];
        const bool unset_best = tip[po] < 0, unset_cand = tip[o] < 0;
        if (unset_best && !unset_cand) {
          pick = w;
        } else if (!unset_cand && math::better_max(tvp[o], tip[o], tvp[po], tip[po])) {
          pick = w;
        }
      }
      const int64_t po = (pick * B + r) * k + head[pick];
      vp[r * k + q] = tvp[po];
      ip[r * k + q] = tip[po];
      ++head[pick];
    }
  }
  return {values, index};
}

void check_acc_vector(const char* name, const at::Tensor& t, int64_t n, at::ScalarType acc, const at::Device& dev) {
  FF_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be a vector of length ", n, ", got shape ", t.sizes());
  FF_CHECK(t.scalar_type() == acc, name, " must be ", acc, " (the accumulation dtype of x and W), got ",
           t.scalar_type());
  FF_CHECK(t.device() == dev, name, " is on ", t.device(), " but x is on ", dev);
}

}  // namespace

// ------------------------------------------------------------------------------ public entries

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_forward_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv, const at::Tensor& y,
    const at::Tensor& f, double scale, double a, double b, int64_t tile, int64_t keep_block, int64_t bf16_gemm,
    double q, const std::optional<at::Tensor>& rt, double thr, int64_t K) {
  check_tile_inputs("native_margin_forward", x, W, xinv, winv, y, tile);
  const auto acc = acc_dtype(x, W);
  check_acc_vector("f", f, x.size(0), acc, x.device());
  const at::Tensor rtt = check_extensions("native_margin_forward", x, W, rt, thr, K, acc);
  FF_CHECK(K == 1 || keep_block == 0, "native_margin_forward: keep_block is not implemented with sub-centres (K=", K,
           "); pass keep_block=0");
  at::AutoDispatchBelowADInplaceOrView guard;
  if (acc == at::kDouble) {
    return forward_impl<double>(x, W, xinv, winv, y, f, scale, a, b, tile, keep_block != 0, bf16_gemm != 0, q, rtt,
                                thr, K);
  }
  return forward_impl<float>(x, W, xinv, winv, y, f, scale, a, b, tile, keep_block != 0, bf16_gemm != 0, q, rtt, thr,
                             K);
}

std::tuple<at::Tensor, at::Tensor> margin_backward_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv, const at::Tensor& y,
    const at::Tensor& f, const at::Tensor& lse, const at::Tensor& gl, const at::Tensor& dcy,
    const std::optional<at::Tensor>& block, double scale, double a, double b, int64_t tile, int64_t need_dx,
    int64_t need_dW, int64_t fast_grad, int64_t bf16_gemm, double q, const std::optional<at::Tensor>& rt, double thr,
    int64_t K) {
  check_tile_inputs("native_margin_backward", x, W, xinv, winv, y, tile);
  const auto acc = acc_dtype(x, W);
  const int64_t B = x.size(0);
  check_acc_vector("f", f, B, acc, x.device());
  check_acc_vector("lse", lse, B, acc, x.device());
  check_acc_vector("gl", gl, B, acc, x.device());
  check_acc_vector("dcy", dcy, B, acc, x.device());
  const at::Tensor rtt = check_extensions("native_margin_backward", x, W, rt, thr, K, acc);
  at::Tensor blk;
  if (block.has_value() && block->defined() && block->numel() > 0) {
    FF_CHECK(K == 1, "native_margin_backward: a kept block is not implemented with sub-centres (K=", K,
             "); pass block=None");
    blk = *block;
    FF_CHECK(blk.dim() == 2 && blk.size(0) == W.size(0) && blk.size(1) == B, "block must be the [C=", W.size(0),
             ", B=", B, "] tensor returned by native_margin_forward(keep_block=1), got shape ", blk.sizes());
    FF_CHECK(blk.scalar_type() == acc && blk.is_contiguous(), "block must be a contiguous ", acc, " tensor");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  if (acc == at::kDouble) {
    return backward_impl<double>(x, W, xinv, winv, y, f, lse, gl, dcy, blk, scale, a, b, tile, need_dx != 0,
                                 need_dW != 0, fast_grad != 0, bf16_gemm != 0, q, rtt, thr, K);
  }
  return backward_impl<float>(x, W, xinv, winv, y, f, lse, gl, dcy, blk, scale, a, b, tile, need_dx != 0,
                              need_dW != 0, fast_grad != 0, bf16_gemm != 0, q, rtt, thr, K);
}

std::tuple<at::Tensor, at::Tensor> npt_forward_cpu(const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv,
                                                   const at::Tensor& winv, const at::Tensor& y, int64_t k,
                                                   int64_t tile) {
  check_tile_inputs("native_npt_forward", x, W, xinv, winv, y, tile);
  FF_CHECK(k >= 1 && k <= 16, "k must be in [1, 16] (the streamed top-k holds at most 16 columns), got ", k);
  FF_CHECK(k <= W.size(0) - 1, "k=", k, " nearest negative proxies need at least k + 1 classes, W has C=",
           W.size(0));
  at::AutoDispatchBelowADInplaceOrView guard;
  if (acc_dtype(x, W) == at::kDouble) return npt_impl<double>(x, W, xinv, winv, y, k, tile);
  return npt_impl<float>(x, W, xinv, winv, y, k, tile);
}

std::string cpu_build_info() {
  std::ostringstream s;
  s << "epilogue: " << cpu::epilogue_isa() << "; threads: " << at::get_num_threads()
    << "; tile buffer: " << env_int("FUSEDFACE_NATIVE_TILE_BYTES", 512 * 1024) << " bytes";
  return s.str();
}

TORCH_LIBRARY_IMPL(fusedface, CPU, m) {
  m.impl("native_margin_forward", &margin_forward_cpu);
  m.impl("native_margin_backward", &margin_backward_cpu);
  m.impl("native_npt_forward", &npt_forward_cpu);
}

}  // namespace fusedface
