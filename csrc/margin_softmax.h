// The three tile kernels of the fused algorithm (fusedface/_engine.py documents their contract),
// as ATen-level functions: declarations shared by the op registration (margin_softmax_ops.cpp),
// the CPU implementation (margin_softmax_cpu.cpp) and the CUDA layer (margin_softmax_cuda.cpp).
//
// Shapes: x [B, D], W [C·K, D] (fp16/bf16/fp32/fp64, contiguous; K sub-centres per class, row
// j·K + k of class j), y [B] int64 (class label or −1). "acc" is the accumulation dtype: fp64 when x
// or W is fp64, else fp32. Per-row and per-row-of-W vectors (xinv [B], winv [C·K], f [B], lse [B],
// gl [B], dcy [B], rt [B]) are in acc.
//
// The extensions (issue 16, margin_softmax_math.h): q (the general rewrite g = (q·c + a + t_b)·c + b),
// rt (t_b per row, or none: 0), thr (inter-class filtering threshold, 2 = off), K (sub-centres). The
// defaults q = 0, rt = none, thr = 2, K = 1 run the seed losses' loops unchanged.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

// Checks at the boundary, with messages for users (flash-attention's CHECK_SHAPE style).
#define FF_CHECK(cond, ...) TORCH_CHECK(cond, "fusedface: ", __VA_ARGS__)
#define FF_CHECK_SHAPE(t, ...)                                                                   \
  FF_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape ",               \
           at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())
#define FF_CHECK_DTYPE(t, dt) \
  FF_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define FF_CHECK_DEVICE(t, dev) \
  FF_CHECK((t).device() == (dev), #t " is on ", (t).device(), " but x is on ", (dev), "; move them to one device")
#define FF_CHECK_CONTIGUOUS(t) FF_CHECK((t).is_contiguous(), #t " must be contiguous; call .contiguous() first")

namespace fusedface {

// the accumulation dtype of a pair of inputs
at::ScalarType acc_dtype(const at::Tensor& x, const at::Tensor& W);

// checks shared by the three ops (CPU and CUDA); `op` names the op in messages
void check_tile_inputs(const char* op, const at::Tensor& x, const at::Tensor& W, const at::Tensor& xinv,
                       const at::Tensor& winv, const at::Tensor& y, int64_t tile);

// checks of the extensions' arguments (K divides W's rows, rt a [B] acc vector on x's device, thr
// not NaN); returns rt, or an undefined tensor when none was given
at::Tensor check_extensions(const char* op, const at::Tensor& x, const at::Tensor& W,
                            const std::optional<at::Tensor>& rt, double thr, int64_t K, at::ScalarType acc);

// margin_forward: one pass over class tiles.
//   returns lse [B] acc, pred [B] int64 (arg-max cosine), sv [B] int32 (support vectors),
//   With K > 1: pred is a class index, `tile` counts classes, keep_block must be 0.
//   block: [C, B] acc holding the raw (unclamped) cosines r when keep_block != 0, else [0]; handing
//   it to margin_backward skips the recomputing GEMM (memory C·B·sizeof(acc): only when it fits).
//   bf16_gemm != 0 (CPU, bf16 x and W, no kept block): the tile GEMMs write bf16 products, as
//   torch.mm of bf16 does; the epilogue still computes in fp32 (docs/native.md, "Precision").
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_forward_cpu(
    const at::Tensor& x,     // [B, D]
    const at::Tensor& W,     // [C, D]
    const at::Tensor& xinv,  // [B] acc
    const at::Tensor& winv,  // [C] acc
    const at::Tensor& y,     // [B] int64
    const at::Tensor& f,     // [B] acc, target value f_b
    double scale, double a, double b, int64_t tile, int64_t keep_block, int64_t bf16_gemm,
    double q, const std::optional<at::Tensor>& rt, double thr, int64_t K);

// margin_backward: recompute (or read the kept block), dℓ/dc, two GEMMs per tile.
//   returns Gx [B, D] acc (Σ_k dℓ/dc_bk·ŵ_k; [0] when !need_dx) and dW [C·K, D] in W's dtype with
//   the normalisation Jacobian applied ([0] when !need_dW); with K > 1 a class's dℓ/dc goes to its
//   arg-max sub-centre row only. fast_grad (bf16 x and W, CPU): the two
//   gradient GEMMs in bf16; bf16_gemm: the recompute too (implies fast_grad).
std::tuple<at::Tensor, at::Tensor> margin_backward_cpu(
    const at::Tensor& x,      // [B, D]
    const at::Tensor& W,      // [C, D]
    const at::Tensor& xinv,   // [B] acc
    const at::Tensor& winv,   // [C] acc
    const at::Tensor& y,      // [B] int64
    const at::Tensor& f,      // [B] acc
    const at::Tensor& lse,    // [B] acc, from the forward
    const at::Tensor& gl,     // [B] acc, upstream gradient per row (0 on ignored rows)
    const at::Tensor& dcy,    // [B] acc, dℓ/dc on the label column
    const std::optional<at::Tensor>& block,  // [C, B] acc from margin_forward(keep_block=1), or none
    double scale, double a, double b, int64_t tile, int64_t need_dx, int64_t need_dW, int64_t fast_grad,
    int64_t bf16_gemm, double q, const std::optional<at::Tensor>& rt, double thr, int64_t K);

// npt_forward: streaming top-k of the cosines over the columns other than the label.
//   returns values [B, k] acc (descending) and their columns [B, k] int64.
std::tuple<at::Tensor, at::Tensor> npt_forward_cpu(
    const at::Tensor& x,     // [B, D]
    const at::Tensor& W,     // [C, D]
    const at::Tensor& xinv,  // [B] acc
    const at::Tensor& winv,  // [C] acc
    const at::Tensor& y,     // [B] int64
    int64_t k, int64_t tile);

// a short description of the CPU build: the epilogue's instruction set, threads
std::string cpu_build_info();

}  // namespace fusedface
