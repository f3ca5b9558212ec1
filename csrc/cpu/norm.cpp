// RMSNorm forward on the CPU.
//
// Letters: N rows, D the normalised (last) dim, C the chunk of a row widened to fp32 at a time.
//
// Each row is read twice: once for the sum of squares, once for the scaled output. A 16-bit row is
// widened into a small stack buffer one chunk at a time (instead of into a [D] heap scratch per thread),
// so nothing is allocated inside the parallel region and the buffer stays in L1. The fp32 math follows
// the reference exactly: ms = sum(x^2) / D, r = 1 / sqrt(ms + eps), y = (x * r) * w, one rounding at the
// end; only the order of the sum differs (vector lanes), which the fp32 tolerance covers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common.h"
#include "../ops.h"

namespace r1k {
namespace {

// Elements per widened chunk: 2 KiB of fp32, small enough for the stack and L1, long enough that the
// vector loops dominate the per-chunk overhead.
constexpr int64_t kChunk = 512;

// Below this many elements per call a parallel region costs more (thread wake-up, a few microseconds)
// than it saves.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;

template <int DT>
inline void widen_chunk(float* dst, const storage_t<DT>* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = widen<DT>(src[i]);
}

// A chunk of a row as fp32: the row itself when it already is, else widened into `buf`.
template <int DT>
inline const float* chunk_f32(float* buf, const storage_t<DT>* x, int64_t n) {
  if constexpr (DT == kFloat32) {
    return x;
  } else {
    widen_chunk<DT>(buf, x, n);
    return buf;
  }
}

template <int DT>
void norm_row(storage_t<DT>* out, const storage_t<DT>* x, const float* w, int64_t D, float eps) {
  float buf[kChunk];
  float sum_sq = 0.f;
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t n = std::min(kChunk, D - c0);
    const float* v = chunk_f32<DT>(buf, x + c0, n);
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = 0; i < n; ++i) part += v[i] * v[i];
    sum_sq += part;
  }
  const float r = 1.0f / std::sqrt(sum_sq / static_cast<float>(D) + eps);
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t n = std::min(kChunk, D - c0);
    const float* v = chunk_f32<DT>(buf, x + c0, n);
    const float* wc = w + c0;
    storage_t<DT>* o = out + c0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = narrow<DT>(v[i] * r * wc[i]);
  }
}

template <int DT>
void norm_rows(const RmsNormArgs& a, const float* w, int num_threads) {
  using S = storage_t<DT>;
  const S* x = static_cast<const S*>(a.x);
  S* out = static_cast<S*>(a.out);
  const int64_t N = a.n_rows, D = a.d;
  const int64_t xs = a.x_row_stride, os = a.out_row_stride;
  const float eps = a.eps;
#ifdef _OPENMP
  const bool parallel = N > 1 && N * D >= kParallelMinElems;
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (parallel)
#else
  (void)num_threads;
#endif
  for (int64_t n = 0; n < N; ++n) norm_row<DT>(out + n * os, x + n * xs, w, D, eps);
}

// The weight as fp32: the caller's pointer when it already is, else a widened copy in `storage` (one
// pass over D, small next to the N * D of the rows).
template <int DT>
const float* weight_f32(const void* weight, int64_t D, std::vector<float>& storage) {
  if constexpr (DT == kFloat32) {
    return static_cast<const float*>(weight);
  } else {
    storage.resize(static_cast<size_t>(D));
    widen_chunk<DT>(storage.data(), static_cast<const storage_t<DT>*>(weight), D);
    return storage.data();
  }
}

}  // namespace

void rms_norm_cpu(const RmsNormArgs& a, int num_threads) {
  if (a.n_rows == 0 || a.d == 0) return;
  std::vector<float> wbuf;
  const float* w = nullptr;
  switch (a.weight_dtype) {
    case kFloat32: w = weight_f32<kFloat32>(a.weight, a.d, wbuf); break;
    case kFloat16: w = weight_f32<kFloat16>(a.weight, a.d, wbuf); break;
    case kBFloat16: w = weight_f32<kBFloat16>(a.weight, a.d, wbuf); break;
    default: R1K_CHECK(false, "rms_norm_cpu: weight_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", a.weight_dtype);
  }
  switch (a.dtype) {
    case kFloat32: norm_rows<kFloat32>(a, w, num_threads); break;
    case kFloat16: norm_rows<kFloat16>(a, w, num_threads); break;
    case kBFloat16: norm_rows<kBFloat16>(a, w, num_threads); break;
    default: R1K_CHECK(false, "rms_norm_cpu: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", a.dtype);
  }
}

}  // namespace r1k
