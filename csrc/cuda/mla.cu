// Absorbed MLA decode over the paged latent cache on sm_90, with tensor cores (mma.sync) (semantics:
// r1kernels/reference/mla.py, mla_decode).
//
// Letters: B requests, Sq new query tokens per request, H heads, R = Sq * H query rows of one request
// (row r = s * H + h, the order of q[b] in memory), C = 576 the latent row width (K dim of Q.K^T),
// Dv = 512 the value width, N cache pages, P page size, M pages per request, BM = 64 query rows per CTA
// tile, BN = 32 KV tokens per pipeline stage, S the number of KV splits, W = 8 warps per CTA.
//
// Work: one CTA per (query-row tile of BM rows, split, request). Split s of a request takes tokens
// [s * chunk, min(len, (s + 1) * chunk)) with chunk = ceil(ceil(len / S) / BN) * BN, computed on the device
// from cache_seqlens (the host never reads it); S itself comes from the shapes and the SM count. Per
// stage of BN tokens:
//   1. the stage's KV rows arrive by cp.async (16-byte copies, one page lookup per row, double-buffered;
//      tokens past the split's end are zero-filled, never read, so NaN in unused slots cannot leak);
//   2. S = Q.K^T [BM x BN] by mma.sync m16n8k16 (fp32 accumulate), warp w owns rows (w % 4) * 16 and
//      columns (w / 4) * 16, A (Q) and B (K) by ldmatrix from shared memory; S goes to shared memory;
//   3. online softmax in fp32 (4 threads per row, exp2 with the scale folded in), the causal / length mask
//      applied per row; P in the input dtype to shared memory, each row's rescale factor beside it;
//   4. O = O * alpha + P.V [BM x Dv] by mma.sync, warp w owns the Dv columns w * 64 .. w * 64 + 63 of all
//      BM rows (128 fp32 accumulators per thread); V = the first Dv columns of the same KV rows, loaded as
//      the B operand by ldmatrix.trans.
// With S = 1 the CTA writes out (O / l, in the input dtype) and lse directly; with S > 1 it writes O / l
// and lse per split to an fp32 workspace and a second kernel merges the splits by their lse.
// A row that sees no token keeps l = 0 and gives 0 and lse = -inf.
//
// Shared memory: Q [BM][C + 8] and 2 KV stages [BN][C + 8] (rows padded by 16 bytes, so the 8 row
// addresses of one ldmatrix fall in 8 different 16-byte bank groups), S [BM][BN + 4] fp32,
// P [BM][BN + 8], per-row alpha, l, m: 164,864 bytes, one CTA per SM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../ops.h"
#include "utils.cuh"

namespace r1k {
namespace cuda {
namespace {

constexpr int kC = kMlaCudaHeadDim;     // 576
constexpr int kDv = kMlaCudaHeadDimV;   // 512
constexpr int kBM = 64;
constexpr int kBN = 32;
constexpr int kStages = 2;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kLd = kC + 8;             // elements per shared row of Q / KV
constexpr int kSLd = kBN + 4;           // floats per shared row of S
constexpr int kPLd = kBN + 8;           // elements per shared row of P
constexpr int kChunks = kC / 8;         // 16-byte chunks per latent row (72)
constexpr int kMaxSplits = kMlaCudaMaxSplits;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kC % 16 == 0 && kDv % 16 == 0 && kDv <= kC, "C and Dv must be multiples of 16, Dv <= C");
static_assert(kDv == kWarps * 64, "each warp owns 64 value columns");
static_assert(kBM == 64 && kBN == 32 && kThreads == 256, "the warp maps below assume 64 x 32 tiles, 8 warps");
static_assert(kThreads == kBN * 8 && kChunks % 8 == 0, "KV loader: 8 threads per row");
static_assert(kThreads == kBM * 4 && kBN == 4 * 8, "softmax: 4 threads per row, 8 columns each");

constexpr size_t kSmemQ = size_t(kBM) * kLd * 2;
constexpr size_t kSmemKV = size_t(kStages) * kBN * kLd * 2;
constexpr size_t kSmemS = size_t(kBM) * kSLd * 4;
constexpr size_t kSmemP = size_t(kBM) * kPLd * 2;
constexpr size_t kSmemRow = size_t(3) * kBM * 4;
constexpr size_t kSmemBytes = kSmemQ + kSmemKV + kSmemS + kSmemP + kSmemRow;
static_assert(kSmemQ % 16 == 0 && kSmemKV % 16 == 0 && kSmemS % 16 == 0 && kSmemP % 16 == 0, "16-byte regions");

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D += A.B for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one 32-bit pair of T (the low half is `lo`).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The token range of split `split` of a request with `len` cached tokens (the split layout the combine
// kernel assumes too).
__device__ __forceinline__ void split_range(int len, int splits, int split, int& begin, int& end) {
  const int per = (len + splits - 1) / splits;
  const int chunk = (per + kBN - 1) / kBN * kBN;
  const int64_t b = int64_t(split) * chunk;
  begin = static_cast<int>(b < len ? b : len);
  end = static_cast<int>(b + chunk < len ? b + chunk : len);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const MlaDecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = reinterpret_cast<T*>(smem + kSmemQ);
  float* sS = reinterpret_cast<float*>(smem + kSmemQ + kSmemKV);
  T* sP = reinterpret_cast<T*>(smem + kSmemQ + kSmemKV + kSmemS);
  float* sAlpha = reinterpret_cast<float*>(smem + kSmemQ + kSmemKV + kSmemS + kSmemP);
  float* sL = sAlpha + kBM;
  float* sM = sL + kBM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mtile = blockIdx.x, split = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int H = static_cast<int>(a.heads), Sq = static_cast<int>(a.sq);
  const int rows = Sq * H;
  const int row0 = mtile * kBM;

  // Tokens this request has (clamped to what its block-table row can address).
  int len = a.cache_seqlens[b];
  const int64_t cap = a.max_pages * a.page_size;
  len = len < 0 ? 0 : (len > cap ? static_cast<int>(cap) : len);
  int t_begin, t_end;
  split_range(len, a.num_splits, split, t_begin, t_end);
  // No row of this tile sees past its last row's causal limit.
  {
    const int s_last = (min(rows, row0 + kBM) - 1) / H;
    const int lim = a.causal ? len - Sq + s_last + 1 : len;
    t_end = min(t_end, lim);
  }
  const int n_tiles = t_end > t_begin ? (t_end - t_begin + kBN - 1) / kBN : 0;

  const int P = static_cast<int>(a.page_size);
  const T* __restrict__ kv = static_cast<const T*>(a.kv);
  const int32_t* __restrict__ bt = a.block_table + b * a.bt_stride;

  // This thread's softmax row and its limit (positions < lim_r are seen; 0 for padding rows).
  const int sm_row = tid >> 2;
  const int sm_col = (tid & 3) * 8;
  int lim_r = 0;
  if (row0 + sm_row < rows) {
    const int s = (row0 + sm_row) / H;
    lim_r = a.causal ? len - Sq + s + 1 : len;
    lim_r = min(lim_r, t_end);
  }

  if (n_tiles > 0) {
    // Q tile; rows past R are zero-filled.
    const T* qb = static_cast<const T*>(a.q) + (b * rows + row0) * int64_t(kC);
    for (int i = tid; i < kBM * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const bool ok = row0 + r < rows;
      cp_async16(smem_u32(sQ + r * kLd + c * 8), ok ? static_cast<const void*>(qb + int64_t(r) * kC + c * 8) : a.q,
                 ok ? 16 : 0);
    }
  }

  // KV stage loader: thread -> row tid / 8, chunks (tid % 8) + 8 k.
  const int ld_row = tid >> 3, ld_sub = tid & 7;
  auto load_tile = [&](int tile, int stage) {
    const int t = t_begin + tile * kBN + ld_row;
    const T* src = kv;
    bool ok = t < t_end;
    if (ok) {
      const int page = bt[t / P];
      ok = page >= 0 && page < a.num_pages;  // a bad page id reads nothing (zeros) rather than faulting
      if (ok) src = kv + int64_t(page) * a.kv_page_stride + int64_t(t % P) * a.kv_row_stride;
    }
    const uint32_t dst = smem_u32(sKV + (stage * kBN + ld_row) * kLd);
#pragma unroll
    for (int k = 0; k < kChunks / 8; ++k) {
      const int c = ld_sub + 8 * k;
      cp_async16(dst + c * 16, ok ? static_cast<const void*>(src + c * 8) : static_cast<const void*>(kv), ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }

  float acc_o[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc_o[i][j][k] = 0.f;
  float m_run = -INFINITY, l_run = 0.f;
  const float scale_log2 = a.softmax_scale * kLog2e;

  // Per-lane ldmatrix offsets.
  const int s_mr = (warp & 3) * 16, s_nc = (warp >> 2) * 16;
  const uint32_t a_addr = smem_u32(sQ + (s_mr + (lane & 15)) * kLd + (lane >> 4) * 8);
  const int b_tok = s_nc + (lane & 7) + (lane >> 4) * 8;   // K rows as the B operand of S
  const int b_col = ((lane >> 3) & 1) * 8;
  const int v_tok = (lane & 7) + ((lane >> 3) & 1) * 8;    // V rows (k dim) as the B operand of O
  const int v_col = warp * 64 + (lane >> 4) * 8;

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // this stage landed for every thread; the previous stage's readers are done
    {
      const int nxt = it + kStages - 1;
      if (nxt < n_tiles) load_tile(nxt, nxt % kStages);
      cp_async_commit();
    }
    const T* kvs = sKV + (it % kStages) * kBN * kLd;

    // ---- S = Q.K^T
    {
      float acc[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[j][k] = 0.f;
      const uint32_t b_addr = smem_u32(kvs + b_tok * kLd + b_col);
#pragma unroll
      for (int k = 0; k < kC / 16; ++k) {
        uint32_t af[4], bf[4];
        ldmatrix_x4(af, a_addr + k * 32);
        ldmatrix_x4(bf, b_addr + k * 32);
        mma16816<T>(acc[0], af, bf[0], bf[1]);
        mma16816<T>(acc[1], af, bf[2], bf[3]);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = s_nc + nt * 8 + (lane & 3) * 2;
        const int r = s_mr + (lane >> 2);
        *reinterpret_cast<float2*>(sS + r * kSLd + col) = make_float2(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<float2*>(sS + (r + 8) * kSLd + col) = make_float2(acc[nt][2], acc[nt][3]);
      }
    }
    __syncthreads();

    // ---- online softmax, 4 threads per row (consecutive lanes), 8 columns each
    {
      const float4 x0 = *reinterpret_cast<const float4*>(sS + sm_row * kSLd + sm_col);
      const float4 x1 = *reinterpret_cast<const float4*>(sS + sm_row * kSLd + sm_col + 4);
      float x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
      const int t0 = t_begin + it * kBN + sm_col;
      float mloc = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        x[j] = t0 + j < lim_r ? x[j] * scale_log2 : -INFINITY;
        mloc = fmaxf(mloc, x[j]);
      }
      mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
      mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 2));
      const float m_new = fmaxf(m_run, mloc);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run - base);  // 0 while nothing was seen
      float p[8], sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        p[j] = exp2f(x[j] - base);  // exp2(-inf) = 0 for masked columns
        sum += p[j];
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      uint4 packed;
      packed.x = pack2<T>(p[0], p[1]);
      packed.y = pack2<T>(p[2], p[3]);
      packed.z = pack2<T>(p[4], p[5]);
      packed.w = pack2<T>(p[6], p[7]);
      *reinterpret_cast<uint4*>(sP + sm_row * kPLd + sm_col) = packed;
      if ((tid & 3) == 0) sAlpha[sm_row] = alpha;
    }
    __syncthreads();

    // ---- O = O * alpha + P.V
    {
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const float al0 = sAlpha[mt * 16 + (lane >> 2)];
        const float al1 = sAlpha[mt * 16 + 8 + (lane >> 2)];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          acc_o[mt][nt][0] *= al0;
          acc_o[mt][nt][1] *= al0;
          acc_o[mt][nt][2] *= al1;
          acc_o[mt][nt][3] *= al1;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t pa[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
          ldmatrix_x4(pa[mt], smem_u32(sP + (mt * 16 + (lane & 15)) * kPLd + kk * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, smem_u32(kvs + (kk * 16 + v_tok) * kLd + v_col + np * 16));
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            mma16816<T>(acc_o[mt][2 * np], pa[mt], vb[0], vb[1]);
            mma16816<T>(acc_o[mt][2 * np + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may still be in flight when the CTA ends (ntiles == 0 commits empty groups)

  if ((tid & 3) == 0) {
    sL[sm_row] = l_run;
    sM[sm_row] = m_run;
  }
  __syncthreads();

  // ---- epilogue: O / l and lse, to out (one split) or to the workspace
  const bool direct = a.num_splits == 1;
  const int64_t ws_row0 = (int64_t(split) * a.batch + b) * rows;  // workspace row of this request's row 0
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = mt * 16 + hh * 8 + (lane >> 2);
      if (row0 + r >= rows) continue;
      const float l = sL[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int64_t grow = row0 + r;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = warp * 64 + nt * 8 + (lane & 3) * 2;
        const float v0 = acc_o[mt][nt][2 * hh] * inv, v1 = acc_o[mt][nt][2 * hh + 1] * inv;
        if (direct) {
          T* o = static_cast<T*>(a.out) + (b * rows + grow) * kDv + col;
          *reinterpret_cast<uint32_t*>(o) = pack2<T>(v0, v1);
        } else {
          float* o = a.ws_out + (ws_row0 + grow) * kDv + col;
          *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
        }
      }
    }
  }
  if (tid < kBM && row0 + tid < rows) {
    const float l = sL[tid];
    const float lse = l > 0.f ? (sM[tid] + log2f(l)) * kLn2 : -INFINITY;
    const int grow = row0 + tid;
    if (direct) {
      const int s = grow / H, h = grow % H;
      a.lse[(b * H + h) * Sq + s] = lse;
    } else {
      a.ws_lse[ws_row0 + grow] = lse;
    }
  }
}

// Merge of the S splits of one query row (one CTA of Dv / 4 threads per (row, request)): weights
// exp(lse_s - max), out = sum_s w_s O_s / sum_s w_s, lse = max + log(sum_s w_s); all -inf gives 0, -inf.
constexpr int kCombineThreads = kDv / 4;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) mla_decode_combine_kernel(const MlaDecodeArgs a) {
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_lse;
  const int rows = static_cast<int>(a.sq * a.heads);
  const int row = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int S = a.num_splits;
  const int64_t stride = a.batch * rows;  // workspace rows per split
  const int64_t r0 = b * rows + row;
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < S; s += 32) mx = fmaxf(mx, a.ws_lse[s * stride + r0]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int s = threadIdx.x; s < S; s += 32) {
      const float w = mx == -INFINITY ? 0.f : expf(a.ws_lse[s * stride + r0] - mx);
      s_w[s] = w;
      sum += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int s = threadIdx.x; s < S; s += 32) s_w[s] *= inv;
    if (threadIdx.x == 0) s_lse = sum > 0.f ? mx + logf(sum) : -INFINITY;
  }
  __syncthreads();
  const int col = threadIdx.x * 4;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < S; ++s) {
    const float w = s_w[s];
    if (w == 0.f) continue;  // splits that saw nothing (their O is 0 anyway)
    const float4 v = *reinterpret_cast<const float4*>(a.ws_out + (s * stride + r0) * kDv + col);
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  T* o = static_cast<T*>(a.out) + r0 * kDv + col;
  uint2 packed;
  packed.x = pack2<T>(acc.x, acc.y);
  packed.y = pack2<T>(acc.z, acc.w);
  *reinterpret_cast<uint2*>(o) = packed;
  if (threadIdx.x == 0) {
    const int H = static_cast<int>(a.heads), Sq = static_cast<int>(a.sq);
    a.lse[(b * H + row % H) * Sq + row / H] = s_lse;
  }
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;
};

DeviceInfo device_info(int device) {
  // Per-device attributes, read once (the guarded current device is `device`).
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && cache[device].sms > 0) return cache[device];
  DeviceInfo d;
  R1K_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  R1K_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < kMaxDevices) cache[device] = d;
  return d;
}

template <typename T>
void launch(const MlaDecodeArgs& a, cudaStream_t stream, const DeviceInfo& info) {
  R1K_CHECK(static_cast<size_t>(info.smem_optin) >= kSmemBytes, "mla_decode_cuda: the kernel needs ", kSmemBytes,
            " bytes of shared memory per block; this device allows ", info.smem_optin);
  R1K_CUDA_CHECK(cudaFuncSetAttribute(mla_decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(kSmemBytes)));
  const int rows = static_cast<int>(a.sq * a.heads);
  const dim3 grid((rows + kBM - 1) / kBM, a.num_splits, static_cast<unsigned>(a.batch));
  mla_decode_kernel<T><<<grid, kThreads, kSmemBytes, stream>>>(a);
  R1K_CUDA_CHECK(cudaGetLastError());
  if (a.num_splits > 1) {
    mla_decode_combine_kernel<T><<<dim3(rows, static_cast<unsigned>(a.batch)), kCombineThreads, 0, stream>>>(a);
    R1K_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace
}  // namespace cuda

int mla_decode_cuda_num_splits(int64_t batch, int64_t rows, int64_t max_tokens, int device) {
  if (batch <= 0 || rows <= 0 || max_tokens <= 0) return 1;
  cuda::DeviceGuard guard(device);
  const cuda::DeviceInfo info = cuda::device_info(device);
  const int64_t units = batch * ((rows + cuda::kBM - 1) / cuda::kBM);  // CTAs without splitting
  const int sms = std::max(info.sms, 1);
  // Enough CTAs already (flash-attention's rule): splitting would only add the merge.
  if (units * 5 >= int64_t(sms) * 4) return 1;
  // At most kMaxSplits, at most one wave's worth, and at least 4 stages (128 tokens) per split.
  const int64_t n_blocks = (max_tokens + cuda::kBN - 1) / cuda::kBN;
  const int max_splits = static_cast<int>(std::min<int64_t>({int64_t(kMlaCudaMaxSplits), int64_t(sms),
                                                             std::max<int64_t>(n_blocks / 4, 1)}));
  // The smallest split count whose wave efficiency is within 85% of the best (flash-attention 2).
  float eff[kMlaCudaMaxSplits + 1] = {};
  float best = 0.f;
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = double(units * s) / sms;
    eff[s] = static_cast<float>(waves / std::ceil(waves));
    best = std::max(best, eff[s]);
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eff[s] >= 0.85f * best) return s;
  return 1;
}

void mla_decode_cuda(const MlaDecodeArgs& a, int device, std::uintptr_t stream) {
  if (a.batch == 0 || a.sq == 0 || a.heads == 0) return;
  R1K_CHECK(a.head_dim == kMlaCudaHeadDim && a.head_dim_v == kMlaCudaHeadDimV && a.num_splits >= 1 &&
                a.num_splits <= kMlaCudaMaxSplits,
            "mla_decode_cuda: unsupported sizes C=", a.head_dim, ", Dv=", a.head_dim_v, ", splits=", a.num_splits);
  cuda::DeviceGuard guard(device);
  const cuda::DeviceInfo info = cuda::device_info(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat16: return cuda::launch<__half>(a, s, info);
    case kBFloat16: return cuda::launch<__nv_bfloat16>(a, s, info);
    default:
      R1K_CHECK(false, "mla_decode_cuda: dtype must be 1 (float16) or 2 (bfloat16), got ", a.dtype);
  }
}

}  // namespace r1k
