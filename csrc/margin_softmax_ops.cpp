// The dispatcher schemas of the native tile kernels, the checks they share on every device, and
// the Python module `fusedface._C` itself (importing it loads the library and its registrations).
//
// Ops (namespace `fusedface`, prefix `native_` so they never collide with the Triton backend's
// `fusedface::margin_forward` & co., registered from Python by fusedface/backends/triton_tiles.py):
//   native_margin_forward, native_margin_backward, native_npt_forward
// CPU kernels: margin_softmax_cpu.cpp. CUDA kernels (CUDA builds only): margin_softmax_cuda.cpp.
// Fake (shape-only) kernels for torch.compile: fusedface/backends/native.py (torch.library.register_fake).
// Integer flags rather than bools, as torch.compile prefers. The extensions' arguments (q, rt, thr, K;
// margin_softmax.h) are appended with defaults that keep the seed losses' kernels.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "margin_softmax.h"

namespace fusedface {

at::ScalarType acc_dtype(const at::Tensor& x, const at::Tensor& W) {
  return (x.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

namespace {
bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_tile_inputs(const char* op, const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv,
                       const at::Tensor& winv, const at::Tensor& y, int64_t tile) {
  FF_CHECK(x.dim() == 2, op, ": x (embeddings) must be 2-D [B, D], got shape ", x.sizes());
  FF_CHECK(W.dim() == 2, op, ": W (class centres) must be 2-D [C, D], got shape ", W.sizes());
  FF_CHECK(x.size(1) == W.size(1), op, ": x has D=", x.size(1), " features but W has D=", W.size(1));
  FF_CHECK(x.size(0) > 0 && W.size(0) > 0, op, ": needs B > 0 rows and C > 0 classes, got B=", x.size(0),
           ", C=", W.size(0));
  FF_CHECK(W.size(0) < (int64_t{1} << 31), op, ": C=", W.size(0), " classes is more than 2^31 - 1; shard W");
  FF_CHECK(is_float_type(x.scalar_type()) && is_float_type(W.scalar_type()), op,
           ": x and W must be fp16, bf16, fp32 or fp64, got ", x.scalar_type(), " and ", W.scalar_type());
  FF_CHECK_DEVICE(W, x.device());
  FF_CHECK_CONTIGUOUS(x);
  FF_CHECK_CONTIGUOUS(W);
  FF_CHECK(tile >= 1, op, ": tile must be >= 1 (classes per tile), got ", tile);
  const auto acc = acc_dtype(x, W);
  FF_CHECK(xinv.dim() == 1 && xinv.size(0) == x.size(0) && xinv.scalar_type() == acc, op,
           ": xinv must be a ", acc, " vector of length B=", x.size(0), ", got ", xinv.scalar_type(), " ",
           xinv.sizes());
  FF_CHECK(winv.dim() == 1 && winv.size(0) == W.size(0) && winv.scalar_type() == acc, op,
           ": winv must be a ", acc, " vector of length C=", W.size(0), ", got ", winv.scalar_type(), " ",
           winv.sizes());
  FF_CHECK(y.dim() == 1 && y.size(0) == x.size(0) && y.scalar_type() == at::kLong, op,
           ": y (labels) must be an int64 vector of length B=", x.size(0), ", got ", y.scalar_type(), " ", y.sizes());
  FF_CHECK_DEVICE(xinv, x.device());
  FF_CHECK_DEVICE(winv, x.device());
  FF_CHECK_DEVICE(y, x.device());
}

at::Tensor check_extensions(const char* op, const at::Tensor& x, const at::Tensor& W,
                            const std::optional<at::Tensor>& rt, double thr, int64_t K, at::ScalarType acc) {
  FF_CHECK(K >= 1, op, ": K (sub-centres per class) must be >= 1, got ", K);
  FF_CHECK(W.size(0) % K == 0, op, ": W has ", W.size(0), " rows, not a multiple of K=", K,
           " sub-centres per class (W must be [C·K, D])");
  FF_CHECK(!std::isnan(thr), op, ": thr (the inter-class filtering threshold) is NaN; pass 2.0 to turn it off");
  if (!rt.has_value() || !rt->defined()) return at::Tensor();
  const at::Tensor& r = *rt;
  FF_CHECK(r.dim() == 1 && r.size(0) == x.size(0) && r.scalar_type() == acc, op, ": rt must be a ", acc,
           " vector of length B=", x.size(0), ", got ", r.scalar_type(), " ", r.sizes());
  FF_CHECK_DEVICE(r, x.device());
  return r;
}

// The extensions' arguments come last, with defaults, so calls written for the seed losses still work.
TORCH_LIBRARY(fusedface, m) {
  m.def(
      "native_margin_forward(Tensor x, Tensor W, Tensor xinv, Tensor winv, Tensor y, Tensor f, float scale, "
      "float a, float b, int tile, int keep_block, int bf16_gemm=0, float q=0., Tensor? rt=None, float thr=2., "
      "int K=1) -> (Tensor lse, Tensor pred, Tensor sv, Tensor block)");
  m.def(
      "native_margin_backward(Tensor x, Tensor W, Tensor xinv, Tensor winv, Tensor y, Tensor f, Tensor lse, "
      "Tensor gl, Tensor dcy, Tensor? block, float scale, float a, float b, int tile, int need_dx, int need_dW, "
      "int fast_grad, int bf16_gemm=0, float q=0., Tensor? rt=None, float thr=2., int K=1) -> (Tensor Gx, "
      "Tensor dW)");
  m.def(
      "native_npt_forward(Tensor x, Tensor W, Tensor xinv, Tensor winv, Tensor y, int k, int tile) "
      "-> (Tensor values, Tensor index)");
}

}  // namespace fusedface

// ------------------------------------------------------------------------ the Python module

#ifndef FUSEDFACE_WITH_CUDA
#define FUSEDFACE_WITH_CUDA 0
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  const std::string cpu = fusedface::cpu_build_info();
  return Py_BuildValue("{s:s,s:O}", "cpu", cpu.c_str(), "cuda", FUSEDFACE_WITH_CUDA ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: what this build of the native backend contains (CPU code path, CUDA)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "fusedface native backend: registers the fusedface::native_* ops with the dispatcher "
                          "(CPU kernels; CUDA kernels when built so). Use it through fusedface.backends.native.",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "WITH_CUDA", FUSEDFACE_WITH_CUDA);
  return mod;
}
