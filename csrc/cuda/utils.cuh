// CUDA helpers shared by the .cu files: error checking, the device guard, dtype code -> CUDA type, fp32
// conversions, packed vector loads and warp / block sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

// A failed runtime call becomes std::runtime_error (RuntimeError in Python) naming the call, the place
// and the runtime's own words, because "an illegal memory access" alone does not say which kernel.
#define R1K_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    const cudaError_t r1k_err_ = (expr);                                                            \
    if (r1k_err_ != cudaSuccess)                                                                    \
      R1K_FAIL("r1kernels._C: ", #expr, " failed at ", __FILE__, ":", __LINE__, ": ",               \
               cudaGetErrorName(r1k_err_), ": ", cudaGetErrorString(r1k_err_));                     \
  } while (0)

namespace r1k {
namespace cuda {

// Makes `device` current for the scope and restores the previous one. This module links its own copy of
// the CUDA runtime (cudart_static), but the current device lives in the driver's per-thread context, so
// it is the one torch set; the guard makes a launch land on the tensors' device even when torch's
// current device is another.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    R1K_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      R1K_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    // Best effort: a destructor must not throw, and the launch's own error has already been reported.
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

template <int DT> struct CudaType;
template <> struct CudaType<kFloat32> { using type = float; };
template <> struct CudaType<kFloat16> { using type = __half; };
template <> struct CudaType<kBFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements loaded / stored as one access: 16 bytes become one 128-bit instruction (wider
// packs split into several). The alignment is part of the type, so a Pack pointer must be aligned to
// sizeof(T) * N; the launchers check that before choosing a packed path.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// Each warp reduces the per-warp partials itself, which saves the second barrier a broadcast through
// shared memory would need. Call at most once per kernel: the partials buffer is not reset.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? partial[lane] : 0.f);
}

inline bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace cuda
}  // namespace r1k
