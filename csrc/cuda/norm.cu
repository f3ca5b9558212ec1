// RMSNorm forward on CUDA.
//
// Letters: N rows, D the normalised (last) dim, V elements per packed access (16 bytes / sizeof(T) on
// the vector path, 1 on the scalar path), L = 32 lanes of a warp, W warps per block (warp-per-row).
//
// Layout of the work: for D <= kWarpMaxD one warp owns a row (W rows per block, no shared memory, no
// barrier); above it one block owns a row and reduces through shared memory. Each row is read twice, the
// second time from L1/L2: caching a whole row in registers would need a kernel per D range, and RMSNorm
// is bound by the DRAM traffic (one read, one write), which the re-read does not add to.
// The fp32 math mirrors the reference: ms = sum(x^2) / D, r = rsqrt(ms + eps), y = (x * r) * w.
#include <algorithm>
#include <cstdint>

#include "../ops.h"
#include "utils.cuh"

namespace r1k {
namespace cuda {
namespace {

// Rows up to this long go warp-per-row: at most 1024 / V / L packed accesses per lane, few enough that
// one warp keeps up with the memory system; longer rows would leave a lone warp latency-bound.
constexpr int kWarpMaxD = 1024;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxThreads = 1024;

template <typename T, typename TW, int V, bool kWarpPerRow>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_fwd_kernel(T* __restrict__ out, const T* __restrict__ x, const TW* __restrict__ w, int64_t N,
                    int D, int64_t x_row_stride, int64_t out_row_stride, float eps) {
  int64_t row;
  int tid, nthreads;
  if constexpr (kWarpPerRow) {
    row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    tid = threadIdx.x & 31;
    nthreads = 32;
    // The whole warp leaves together, so the full-mask shuffles below stay valid.
    if (row >= N) return;
  } else {
    row = blockIdx.x;
    tid = threadIdx.x;
    nthreads = blockDim.x;
  }
  using PT = Pack<T, V>;
  using PW = Pack<TW, V>;
  const PT* xv = reinterpret_cast<const PT*>(x + row * x_row_stride);
  PT* ov = reinterpret_cast<PT*>(out + row * out_row_stride);
  const PW* wv = reinterpret_cast<const PW*>(w);
  const int nvec = D / V;  // the launcher guarantees V divides D

  float sum_sq = 0.f;
  for (int c = tid; c < nvec; c += nthreads) {
    const PT p = xv[c];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float f = to_float(p.v[j]);
      sum_sq += f * f;
    }
  }
  if constexpr (kWarpPerRow) {
    sum_sq = warp_sum(sum_sq);
  } else {
    sum_sq = block_sum(sum_sq);
  }
  const float r = rsqrtf(sum_sq / static_cast<float>(D) + eps);

  for (int c = tid; c < nvec; c += nthreads) {
    const PT p = xv[c];
    const PW q = wv[c];
    PT o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(to_float(p.v[j]) * r * to_float(q.v[j]));
    ov[c] = o;
  }
}

template <typename T, typename TW, int V>
void launch(const RmsNormArgs& a, cudaStream_t stream) {
  T* out = static_cast<T*>(a.out);
  const T* x = static_cast<const T*>(a.x);
  const TW* w = static_cast<const TW*>(a.weight);
  const int D = static_cast<int>(a.d);
  if (D <= kWarpMaxD) {
    const int64_t blocks = (a.n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    rms_norm_fwd_kernel<T, TW, V, true><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(
        out, x, w, a.n_rows, D, a.x_row_stride, a.out_row_stride, a.eps);
  } else {
    // One packed access per thread when the row fits in a block, else each thread loops; a multiple of
    // 32 so that block_sum's full-mask shuffles see whole warps.
    const int nvec = D / V;
    const int threads = std::min(kMaxThreads, (nvec + 31) / 32 * 32);
    rms_norm_fwd_kernel<T, TW, V, false><<<static_cast<unsigned>(a.n_rows), threads, 0, stream>>>(
        out, x, w, a.n_rows, D, a.x_row_stride, a.out_row_stride, a.eps);
  }
  R1K_CUDA_CHECK(cudaGetLastError());
}

// The 16-byte path needs every access aligned: x and out (their base pointers and every row start, so
// also the row strides) to 16 bytes, the weight to its own pack size, and D a multiple of V.
template <typename T, typename TW>
void launch_vec_or_scalar(const RmsNormArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.d % V == 0 && a.x_row_stride % V == 0 && a.out_row_stride % V == 0 &&
                   aligned(a.x, 16) && aligned(a.out, 16) && aligned(a.weight, sizeof(TW) * V);
  if (vec) {
    launch<T, TW, V>(a, stream);
  } else {
    launch<T, TW, 1>(a, stream);
  }
}

template <int DT>
void dispatch_weight(const RmsNormArgs& a, cudaStream_t stream) {
  using T = typename CudaType<DT>::type;
  switch (a.weight_dtype) {
    case kFloat32: return launch_vec_or_scalar<T, float>(a, stream);
    case kFloat16: return launch_vec_or_scalar<T, __half>(a, stream);
    case kBFloat16: return launch_vec_or_scalar<T, __nv_bfloat16>(a, stream);
    default:
      R1K_CHECK(false, "rms_norm_cuda: weight_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ",
                a.weight_dtype);
  }
}

}  // namespace
}  // namespace cuda

void rms_norm_cuda(const RmsNormArgs& a, int device, std::uintptr_t stream) {
  if (a.n_rows == 0 || a.d == 0) return;
  // Grid sizes are 32-bit; the bindings report this limit as a ValueError before we get here.
  R1K_CHECK(a.n_rows <= INT32_MAX && a.d <= INT32_MAX, "rms_norm_cuda: n_rows and d must be < 2^31, got n_rows=",
            a.n_rows, ", d=", a.d);
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: return cuda::dispatch_weight<kFloat32>(a, s);
    case kFloat16: return cuda::dispatch_weight<kFloat16>(a, s);
    case kBFloat16: return cuda::dispatch_weight<kBFloat16>(a, s);
    default:
      R1K_CHECK(false, "rms_norm_cuda: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", a.dtype);
  }
}

}  // namespace r1k
