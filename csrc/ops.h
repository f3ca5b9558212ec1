// Every native entry point, declared once. bindings.cpp validates the arguments and calls these;
// cpu/*.cpp and cuda/*.cu define them. Plain C++ (no pybind11, no CUDA types) so both g++ and nvcc
// read it.
//
// Letters: N rows, D the normalised (last) dim.
#pragma once

#include <cstdint>
#include <string>

namespace r1k {

// RMSNorm forward over rows: out[n, :] = x[n, :] * rsqrt(mean(x[n, :]^2) + eps) * weight, in fp32,
// stored in x's dtype. Strides are in elements; columns are contiguous (stride 1).
struct RmsNormArgs {
  void* out;             // [N, D] in `dtype`, row stride out_row_stride (>= D when N > 1)
  const void* x;         // [N, D] in `dtype`, row stride x_row_stride (any value >= 0)
  const void* weight;    // [D] contiguous, in `weight_dtype`
  int64_t n_rows;        // N
  int64_t d;             // D
  int64_t x_row_stride;
  int64_t out_row_stride;
  int dtype;             // DType code of x and out
  int weight_dtype;      // DType code of weight
  float eps;
};

// Runs on the calling thread plus up to `num_threads` OpenMP threads (0: the OpenMP default).
void rms_norm_cpu(const RmsNormArgs& a, int num_threads);

#ifdef R1K_WITH_CUDA
// Launches on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream) of CUDA device
// `device`; returns without synchronising. Throws std::runtime_error on a launch error.
void rms_norm_cuda(const RmsNormArgs& a, int device, std::uintptr_t stream);

// "" if this module's CUDA kernels can run on `device` (an image for its architecture was compiled in),
// else the CUDA runtime's reason.
std::string cuda_device_problem(int device);
#endif

}  // namespace r1k
