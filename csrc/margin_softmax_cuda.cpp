// The CUDA implementation of the three tile kernels: the tile loop, the cuBLAS GEMMs (through
// ATen) and the launches of the epilogue kernels (margin_softmax_cuda.cu). Compiled only when torch
// is a CUDA build and a toolkit is present (setup.py / CMakeLists.txt); it is the only file that
// includes torch's CUDA headers.
//
// Per tile on the current stream: S = x·W_tileᵀ ([B, T] row-major, fp32/fp64 GEMM; TF32 when the
// user allowed it for fp32 matmuls), then the epilogue kernel. The tile width is the engine's
// memory-budget `tile` (on a GPU one wide tile keeps the device busy; the CPU code narrows it to a
// cache-sized width instead). With K sub-centres per class a tile of `cols` classes is cols·K rows
// of W and of products; the epilogues reduce over each class's K (margin_softmax_cuda.cu), and the
// gradient GEMMs and the Jacobian run over the cols·K rows. Running per-row state lives in device vectors; no host
// synchronisation anywhere (labels are not range-checked here for that reason: the public API
// checks them on the host when asked to, fusedface.set_input_checks).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "margin_softmax.h"
#include "margin_softmax_cuda.h"

namespace fusedface {
namespace {

#define FF_CUDA_CHECK(expr)                                                                        \
  do {                                                                                             \
    const cudaError_t ff_err = (expr);                                                             \
    TORCH_CHECK(ff_err == cudaSuccess, "fusedface: CUDA kernel launch failed: ", cudaGetErrorString(ff_err)); \
  } while (0)

cuda::OutDtype out_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::OutDtype::kFloat32;
    case at::kDouble:
      return cuda::OutDtype::kFloat64;
    case at::kHalf:
      return cuda::OutDtype::kFloat16;
    case at::kBFloat16:
      return cuda::OutDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "fusedface: unsupported dtype for dW: ", t);
  }
}

// W rows [j0, j0 + n) in the accumulation dtype: a view when W already is, else widened into buf
at::Tensor w_tile(const at::Tensor& W, at::Tensor& buf, int64_t j0, int64_t n) {
  at::Tensor src = W.narrow(0, j0, n);
  if (!buf.defined()) return src;
  at::Tensor dst = buf.narrow(0, 0, n * W.size(1)).view({n, W.size(1)});
  dst.copy_(src);
  return dst;
}

// a contiguous [rows, n] view at the start of a flat buffer (keeps every GEMM output dense)
at::Tensor dense(const at::Tensor& flat, int64_t rows, int64_t n) {
  return flat.narrow(0, 0, rows * n).view({rows, n});
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv, const at::Tensor& y,
    const at::Tensor& f, double scale, double a, double b, int64_t tile, double q, const at::Tensor& rt,
    double thr, int64_t K) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = x.options().dtype(acc);
  const int64_t B = x.size(0), C = W.size(0) / K, D = x.size(1);  // C classes of K rows each
  const int64_t cols = std::max<int64_t>(1, std::min(tile, C));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor xinv_c = xinv.contiguous(), winv_c = winv.contiguous(), f_c = f.contiguous(), y_c = y.contiguous();
  const at::Tensor rt_c = rt.defined() ? rt.contiguous() : at::Tensor();
  const T* rt_p = rt_c.defined() ? rt_c.data_ptr<T>() : nullptr;
  at::Tensor wbuf = W.scalar_type() == acc ? at::Tensor() : at::empty({cols * K * D}, opt);
  at::Tensor sbuf = at::empty({B * cols * K}, opt);
  at::Tensor m = at::full({B}, -std::numeric_limits<T>::infinity(), opt);
  at::Tensor l = at::zeros({B}, opt);
  at::Tensor cbest = at::full({B}, -std::numeric_limits<T>::infinity(), opt);
  at::Tensor cidx = at::zeros({B}, opt.dtype(at::kLong));
  at::Tensor nsv = at::zeros({B}, opt.dtype(at::kInt));
  for (int64_t j0 = 0; j0 < C; j0 += cols) {
    const int64_t nc = std::min(cols, C - j0), nrw = nc * K;
    const at::Tensor Wt = w_tile(W, wbuf, j0 * K, nrw);
    at::Tensor S = dense(sbuf, B, nrw);
    at::mm_out(S, xa, Wt.t());
    FF_CUDA_CHECK(cuda::launch_margin_forward_tile<T>(
        S.data_ptr<T>(), nrw, B, nc, j0, xinv_c.data_ptr<T>(), winv_c.data_ptr<T>() + j0 * K, f_c.data_ptr<T>(),
        y_c.data_ptr<int64_t>(), static_cast<T>(scale), static_cast<T>(a), static_cast<T>(b), static_cast<T>(q),
        static_cast<T>(thr), rt_p, static_cast<int>(K), m.data_ptr<T>(), l.data_ptr<T>(), cbest.data_ptr<T>(),
        cidx.data_ptr<int64_t>(), nsv.data_ptr<int32_t>(), stream));
  }
  return {m + at::log(l), cidx, nsv, at::empty({0}, opt)};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv, const at::Tensor& y,
    const at::Tensor& f, const at::Tensor& lse, const at::Tensor& gl, const at::Tensor& dcy, double scale, double a,
    double b, int64_t tile, bool need_dx, bool need_dW, double q, const at::Tensor& rt, double thr, int64_t K) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = x.options().dtype(acc);
  const int64_t B = x.size(0), C = W.size(0) / K, D = x.size(1);  // C classes of K rows each
  if (!need_dx && !need_dW) return {at::empty({0}, opt), at::empty({0}, W.options())};
  const int64_t cols = std::max<int64_t>(1, std::min(tile, C));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor xinv_c = xinv.contiguous(), winv_c = winv.contiguous(), f_c = f.contiguous();
  const at::Tensor lse_c = lse.contiguous(), dcy_c = dcy.contiguous(), y_c = y.contiguous();
  const at::Tensor sgl = gl.contiguous() * scale;
  const at::Tensor rt_c = rt.defined() ? rt.contiguous() : at::Tensor();
  const T* rt_p = rt_c.defined() ? rt_c.data_ptr<T>() : nullptr;
  const at::Tensor xh = need_dW ? (xa * xinv_c.unsqueeze(1)).contiguous() : at::Tensor();  // x̂ [B, D]
  at::Tensor Gx = need_dx ? at::zeros({B, D}, opt) : at::empty({0}, opt);
  at::Tensor dW = need_dW ? at::empty_like(W) : at::empty({0}, W.options());
  at::Tensor wbuf = W.scalar_type() == acc ? at::Tensor() : at::empty({cols * K * D}, opt);
  at::Tensor hbuf = (need_dW && W.scalar_type() != acc) ? at::empty({cols * K * D}, opt) : at::Tensor();
  at::Tensor sbuf = at::empty({B * cols * K}, opt);
  for (int64_t j0 = 0; j0 < C; j0 += cols) {
    const int64_t nc = std::min(cols, C - j0), r0 = j0 * K, nrw = nc * K;  // the tile's rows of W
    const at::Tensor Wt = w_tile(W, wbuf, r0, nrw);
    at::Tensor S = dense(sbuf, B, nrw);
    at::mm_out(S, xa, Wt.t());
    FF_CUDA_CHECK(cuda::launch_margin_backward_tile<T>(
        S.data_ptr<T>(), nrw, B, nc, j0, xinv_c.data_ptr<T>(), winv_c.data_ptr<T>() + r0, f_c.data_ptr<T>(),
        lse_c.data_ptr<T>(), sgl.data_ptr<T>(), dcy_c.data_ptr<T>(), y_c.data_ptr<int64_t>(), static_cast<T>(scale),
        static_cast<T>(a), static_cast<T>(b), static_cast<T>(q), static_cast<T>(thr), rt_p, static_cast<int>(K),
        stream));
    if (need_dx) at::addmm_out(Gx, Gx, S, Wt);  // Gx += (dc·winv)·W_tile
    if (need_dW) {
      at::Tensor H = hbuf.defined() ? dense(hbuf, nrw, D) : dW.narrow(0, r0, nrw);
      at::mm_out(H, S.t(), xh);  // H = (dc·winv)ᵀ·x̂
      FF_CUDA_CHECK(cuda::launch_w_jacobian<T>(H.data_ptr<T>(), Wt.data_ptr<T>(), winv_c.data_ptr<T>() + r0,
                                               dW.narrow(0, r0, nrw).data_ptr(), out_dtype(W.scalar_type()), nrw, D,
                                               stream));
    }
  }
  return {Gx, dW};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> npt_impl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv,
                                            const at::Tensor& winv, const at::Tensor& y, int64_t k, int64_t tile) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = x.options().dtype(acc);
  const int64_t B = x.size(0), C = W.size(0), D = x.size(1);
  const int64_t cols = std::max<int64_t>(1, std::min(tile, C));
  const int kpad = cuda::npt_kpad(k);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor xinv_c = xinv.contiguous(), winv_c = winv.contiguous(), y_c = y.contiguous();
  at::Tensor wbuf = W.scalar_type() == acc ? at::Tensor() : at::empty({cols * D}, opt);
  at::Tensor sbuf = at::empty({B * cols}, opt);
  at::Tensor run_v = at::full({B, kpad}, -std::numeric_limits<T>::infinity(), opt);
  at::Tensor run_i = at::full({B, kpad}, -1, opt.dtype(at::kLong));
  for (int64_t j0 = 0; j0 < C; j0 += cols) {
    const int64_t nc = std::min(cols, C - j0);
    const at::Tensor Wt = w_tile(W, wbuf, j0, nc);
    at::Tensor S = dense(sbuf, B, nc);
    at::mm_out(S, xa, Wt.t());
    FF_CUDA_CHECK(cuda::launch_npt_tile<T>(S.data_ptr<T>(), nc, B, nc, j0, xinv_c.data_ptr<T>(),
                                           winv_c.data_ptr<T>() + j0, y_c.data_ptr<int64_t>(), kpad,
                                           run_v.data_ptr<T>(), run_i.data_ptr<int64_t>(), stream));
  }
  return {run_v.narrow(1, 0, k).contiguous(), run_i.narrow(1, 0, k).contiguous()};
}

void check_vec(const char* name, const at::Tensor& t, int64_t n, at::ScalarType acc, const at::Device& dev) {
  FF_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == acc && t.device() == dev, name, " must be a ", acc,
           " vector of length ", n, " on ", dev, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_forward_cuda(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv, const at::Tensor& y,
    const at::Tensor& f, double scale, double a, double b, int64_t tile, int64_t keep_block, int64_t bf16_gemm,
    double q, const std::optional<at::Tensor>& rt, double thr, int64_t K) {
  (void)bf16_gemm;  // CPU-only mode: CUDA GEMMs run in the accumulation dtype
  check_tile_inputs("native_margin_forward", x, W, xinv, winv, y, tile);
  const auto acc = acc_dtype(x, W);
  check_vec("f", f, x.size(0), acc, x.device());
  const at::Tensor rtt = check_extensions("native_margin_forward", x, W, rt, thr, K, acc);
  FF_CHECK(keep_block == 0, "native_margin_forward: keep_block is implemented on CPU only; on CUDA the "
           "recomputing backward is used (pass keep_block=0)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (acc == at::kDouble) return forward_impl<double>(x, W, xinv, winv, y, f, scale, a, b, tile, q, rtt, thr, K);
  return forward_impl<float>(x, W, xinv, winv, y, f, scale, a, b, tile, q, rtt, thr, K);
}

std::tuple<at::Tensor, at::Tensor> margin_backward_cuda(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv, const at::Tensor& winv, const at::Tensor& y,
    const at::Tensor& f, const at::Tensor& lse, const at::Tensor& gl, const at::Tensor& dcy,
    const std::optional<at::Tensor>& block, double scale, double a, double b, int64_t tile, int64_t need_dx,
    int64_t need_dW, int64_t fast_grad, int64_t bf16_gemm, double q, const std::optional<at::Tensor>& rt, double thr,
    int64_t K) {
  (void)fast_grad;  // CUDA GEMMs run in the accumulation dtype (TF32 follows torch's matmul setting)
  (void)bf16_gemm;
  check_tile_inputs("native_margin_backward", x, W, xinv, winv, y, tile);
  const auto acc = acc_dtype(x, W);
  const int64_t B = x.size(0);
  check_vec("f", f, B, acc, x.device());
  check_vec("lse", lse, B, acc, x.device());
  check_vec("gl", gl, B, acc, x.device());
  check_vec("dcy", dcy, B, acc, x.device());
  const at::Tensor rtt = check_extensions("native_margin_backward", x, W, rt, thr, K, acc);
  FF_CHECK(!(block.has_value() && block->defined() && block->numel() > 0),
           "native_margin_backward: a kept block is CPU-only; pass block=None on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (acc == at::kDouble) {
    return backward_impl<double>(x, W, xinv, winv, y, f, lse, gl, dcy, scale, a, b, tile, need_dx != 0, need_dW != 0,
                                 q, rtt, thr, K);
  }
  return backward_impl<float>(x, W, xinv, winv, y, f, lse, gl, dcy, scale, a, b, tile, need_dx != 0, need_dW != 0, q,
                              rtt, thr, K);
}

std::tuple<at::Tensor, at::Tensor> npt_forward_cuda(const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv,
                                                    const at::Tensor& winv, const at::Tensor& y, int64_t k,
                                                    int64_t tile) {
  check_tile_inputs("native_npt_forward", x, W, xinv, winv, y, tile);
  FF_CHECK(k >= 1 && k <= 16, "k must be in [1, 16] (the streamed top-k holds at most 16 columns), got ", k);
  FF_CHECK(k <= W.size(0) - 1, "k=", k, " nearest negative proxies need at least k + 1 classes, W has C=", W.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (acc_dtype(x, W) == at::kDouble) return npt_impl<double>(x, W, xinv, winv, y, k, tile);
  return npt_impl<float>(x, W, xinv, winv, y, k, tile);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedface, CUDA, m) {
  m.impl("native_margin_forward", &margin_forward_cuda);
  m.impl("native_margin_backward", &margin_backward_cuda);
  m.impl("native_npt_forward", &npt_forward_cuda);
}

}  // namespace fusedface
