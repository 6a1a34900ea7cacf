// SYNTAX-CHECK STUB (ci/check_cuda.sh only; never used by a real build). A CPU wheel of torch ships
// the c10/cuda headers but not this one, which CMake generates for CUDA builds; with it,
// csrc/margin_softmax_cuda.cpp can be compiled with -fsyntax-only against the real c10/cuda and ATen
// headers on a machine without a CUDA build of torch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
