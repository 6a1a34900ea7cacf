// Entry points of the CPU epilogues (margin_softmax_cpu_epilogue.h), one per dtype, each compiled for
// three x86-64 levels and dispatched once on the running CPU. Plain C++ over raw pointers (no torch
// header), so the vectoriser sees simple loops and the file compiles fast.
#include "margin_softmax_cpu_epilogue.h"

namespace fusedface {
namespace cpu {
namespace {

enum class Isa { kBaseline = 0, kV3 = 1, kV4 = 2 };

Isa detect_isa() {
#if FF_CPU_MULTIVERSION
  __builtin_cpu_init();
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kV4;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kV3;
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4) return Isa::kV4;
  if (v3) return Isa::kV3;
#endif
#endif
  return Isa::kBaseline;
}

Isa isa() {
  static const Isa level = detect_isa();
  return level;
}

}  // namespace

// FF_ENTRY(name, params, call): three builds of `call` and a dispatcher `name(params)`.
#if FF_CPU_MULTIVERSION
#define FF_ENTRY(NAME, PARAMS, CALL)                              \
  namespace {                                                     \
  FF_TARGET_V4 void NAME##_v4 PARAMS { CALL; }                    \
  FF_TARGET_V3 void NAME##_v3 PARAMS { CALL; }                    \
  void NAME##_base PARAMS { CALL; }                               \
  }                                                               \
  void NAME PARAMS {                                              \
    switch (isa()) {                                              \
      case Isa::kV4:                                              \
        NAME##_v4 FF_ARGS;                                        \
        return;                                                   \
      case Isa::kV3:                                              \
        NAME##_v3 FF_ARGS;                                        \
        return;                                                   \
      default:                                                    \
        NAME##_base FF_ARGS;                                      \
    }                                                             \
  }
#else
#define FF_ENTRY(NAME, PARAMS, CALL) \
  void NAME PARAMS { CALL; }
#endif

#define FF_ARGS (t, p, st, mg)
FF_ENTRY(forward_tile, (const Tile<float>& t, const Rows<float>& p, const ForwardState<float>& st, Margin<float> mg),
         forward_tile_impl(t, p, st, mg))
FF_ENTRY(forward_tile,
         (const Tile<double>& t, const Rows<double>& p, const ForwardState<double>& st, Margin<double> mg),
         forward_tile_impl(t, p, st, mg))
#undef FF_ARGS

#define FF_ARGS (t, p, mg)
FF_ENTRY(backward_tile, (const BackwardTile<float, float>& t, const BackwardRows<float>& p, Margin<float> mg),
         backward_tile_impl(t, p, mg))
FF_ENTRY(backward_tile, (const BackwardTile<double, double>& t, const BackwardRows<double>& p, Margin<double> mg),
         backward_tile_impl(t, p, mg))
#undef FF_ARGS

#define FF_ARGS (t, xinv, y, k, topv, topi)
FF_ENTRY(npt_tile, (const Tile<float>& t, const float* xinv, const int32_t* y, int k, float* topv, int64_t* topi),
         npt_tile_impl(t, xinv, y, k, topv, topi))
FF_ENTRY(npt_tile,
         (const Tile<double>& t, const double* xinv, const int32_t* y, int k, double* topv, int64_t* topi),
         npt_tile_impl(t, xinv, y, k, topv, topi))
#undef FF_ARGS

#define FF_ARGS (src, ld_src, dst, arg, ld_dst, cols, rows, K, xinv, winv)
FF_ENTRY(subcenter_max,
         (const float* src, int64_t ld_src, float* dst, int32_t* arg, int64_t ld_dst, int64_t cols, int64_t rows,
          int K, const float* xinv, const float* winv),
         subcenter_max_impl(src, ld_src, dst, arg, ld_dst, cols, rows, K, xinv, winv))
FF_ENTRY(subcenter_max,
         (const double* src, int64_t ld_src, double* dst, int32_t* arg, int64_t ld_dst, int64_t cols, int64_t rows,
          int K, const double* xinv, const double* winv),
         subcenter_max_impl(src, ld_src, dst, arg, ld_dst, cols, rows, K, xinv, winv))
#undef FF_ARGS

#define FF_ARGS (dc, arg, ld_dc, out, ld_out, cols, rows, K, winv)
FF_ENTRY(subcenter_expand,
         (const float* dc, const int32_t* arg, int64_t ld_dc, float* out, int64_t ld_out, int64_t cols, int64_t rows,
          int K, const float* winv),
         subcenter_expand_impl(dc, arg, ld_dc, out, ld_out, cols, rows, K, winv))
FF_ENTRY(subcenter_expand,
         (const double* dc, const int32_t* arg, int64_t ld_dc, double* out, int64_t ld_out, int64_t cols,
          int64_t rows, int K, const double* winv),
         subcenter_expand_impl(dc, arg, ld_dc, out, ld_out, cols, rows, K, winv))
#undef FF_ARGS

#define FF_ARGS (src, ld_src, dst, ld_dst, cols, rows)
FF_ENTRY(widen_tile, (const bf16_bits* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t cols, int64_t rows),
         widen_tile_impl(src, ld_src, dst, ld_dst, cols, rows))
FF_ENTRY(narrow_tile, (const float* src, int64_t ld_src, bf16_bits* dst, int64_t ld_dst, int64_t cols, int64_t rows),
         narrow_tile_impl(src, ld_src, dst, ld_dst, cols, rows))
#undef FF_ARGS

#define FF_ARGS (src, dst, n)
FF_ENTRY(accumulate_bf16, (const bf16_bits* src, float* dst, int64_t n), accumulate_bf16_impl(src, dst, n))
#undef FF_ARGS

#define FF_ARGS (H, Wt, winv, out, n, D)
FF_ENTRY(w_jacobian_bf16,
         (const bf16_bits* H, const bf16_bits* Wt, const float* winv, bf16_bits* out, int64_t n, int64_t D),
         w_jacobian_bf16_impl(H, Wt, winv, out, n, D))
FF_ENTRY(w_jacobian_bf16,
         (const float* H, const bf16_bits* Wt, const float* winv, bf16_bits* out, int64_t n, int64_t D),
         w_jacobian_bf16_impl(H, Wt, winv, out, n, D))
#undef FF_ARGS

const char* epilogue_isa() {
  switch (isa()) {
    case Isa::kV4:
      return "x86-64-v4 (AVX-512, 512-bit vectors)";
    case Isa::kV3:
      return "x86-64-v3 (AVX2+FMA)";
    default:
      return FF_CPU_MULTIVERSION ? "x86-64 baseline (SSE2)" : "single build for the compiler's default target";
  }
}

}  // namespace cpu
}  // namespace fusedface
