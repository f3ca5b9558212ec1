// MoE routing gate and token alignment on CUDA (semantics: r1kernels/reference/moe.py).
//
// Letters: T tokens, E experts, G groups, P = E / G experts per group, K experts chosen per token,
// L = 32 lanes of a warp, J experts per lane (E <= L * J), W warps per block; for the alignment N = T * K
// slots, BM the block size, S_max the padded list's length.
//
// Routing: one warp per token. Lane l holds experts l, l + 32, ... (coalesced loads, any E up to 512,
// not only powers of two). The group scores need a group's experts together, so the token's choices go
// through shared memory once, laid out group by group with one pad word per group (P + 1 apart: a lane
// per group reads without bank conflicts when P is even); lane g then scans group g. Groups and experts
// are chosen by rounds of a warp argmax in the reference's order (larger value first, ties to the lower
// index); chosen experts are struck off with a per-lane bit mask rather than overwritten with -inf, so
// even -inf choices are ordered exactly as the reference's stable sort orders them.
//
// Alignment: kernel 1 is one block: shared-memory counts, a block-wide prefix sum of the padded counts
// (each expert's first row), block_expert by binary search over the run ends, and the sentinel fill.
// Kernel 2 has one block per expert scanning the slots in order: per 2048-slot chunk, each warp's ballot
// of matches per step, one prefix sum over the (step, warp) table, and each match's place is its table
// offset plus the matches of lower lanes, so slots keep their ascending order within the expert.
#include <cstdint>
#include <limits>

#include "../ops.h"
#include "utils.cuh"

namespace r1k {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kNoIndex = std::numeric_limits<int>::max();

// ---------------------------------------------------------------------------------------------------
// Routing

constexpr int kRouteWarps = 4;
constexpr int kMaxG = kMoeRouteCudaMaxE;  // P >= 1
// Choices laid out group by group, one pad word after each group: index e + e / P < E + G.
constexpr int kChoiceWords = kMoeRouteCudaMaxE + kMaxG;

// (v, i) comes before (w, j) in the reference's order: the larger value, then the lower index.
__device__ __forceinline__ bool before(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// The first of all lanes' (v, i) in that order; every lane gets it (indices are distinct, so the order
// is total and the butterfly agrees on one winner).
__device__ __forceinline__ void warp_first(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, off);
    const int oi = __shfl_xor_sync(kFull, i, off);
    if (before(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

template <typename T, int J>
__global__ void __launch_bounds__(32 * kRouteWarps) moe_route_kernel(const MoeRouteArgs a) {
  __shared__ float s_choice[kRouteWarps][kChoiceWords];
  __shared__ float s_gscore[kRouteWarps][kMaxG];
  __shared__ unsigned char s_kept[kRouteWarps][kMaxG];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const T* logits = static_cast<const T*>(a.logits);
  const int E = a.n_experts, G = a.n_group, P = E / G, K = a.top_k;
  const float neg_inf = -INFINITY;

  // The whole warp walks the same tokens, so every shuffle below has all 32 lanes.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp; t < a.n_tokens;
       t += static_cast<int64_t>(gridDim.x) * kRouteWarps) {
    const T* row = logits + t * a.stride_t;
    float sc[J];  // scores of my experts lane + 32 j (0 past E)
    float ch[J];  // choices (-inf past E and, with groups, in dropped groups)
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int e = lane + 32 * j;
      sc[j] = e < E ? to_float(row[e * a.stride_e]) : neg_inf;
    }
    if (a.softmax) {
      float mx = neg_inf;
#pragma unroll
      for (int j = 0; j < J; ++j) mx = fmaxf(mx, sc[j]);
      mx = warp_max(mx);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        sc[j] = lane + 32 * j < E ? expf(sc[j] - mx) : 0.f;
        sum += sc[j];
      }
      sum = warp_sum(sum);
#pragma unroll
      for (int j = 0; j < J; ++j) sc[j] = sc[j] / sum;
    } else {
      // torch's formula for the fp32 sigmoid, 1 / (1 + exp(-x)), with the accurate expf.
#pragma unroll
      for (int j = 0; j < J; ++j) sc[j] = lane + 32 * j < E ? 1.f / (1.f + expf(-sc[j])) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int e = lane + 32 * j;
      ch[j] = e < E ? (a.bias != nullptr ? sc[j] + a.bias[e] : sc[j]) : neg_inf;
    }

    if (G > 1) {
      float* sch = s_choice[warp];
      float* sgs = s_gscore[warp];
      unsigned char* kept = s_kept[warp];
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int e = lane + 32 * j;
        if (e < E) sch[e + e / P] = ch[j];
      }
      __syncwarp();
      for (int g = lane; g < G; g += 32) {
        // top1 / top2 as torch.topk(2) gives them: a tied maximum fills both.
        const float* gp = sch + g * (P + 1);
        float top1 = neg_inf, top2 = neg_inf;
        for (int p = 0; p < P; ++p) {
          const float v = gp[p];
          if (v > top1) {
            top2 = top1;
            top1 = v;
          } else if (v > top2) {
            top2 = v;
          }
        }
        sgs[g] = (a.top2_sum && P >= 2) ? top1 + top2 : top1;
        kept[g] = 0;
      }
      __syncwarp();
      for (int r = 0; r < a.topk_group; ++r) {
        float bv = neg_inf;
        int bi = kNoIndex;
        for (int g = lane; g < G; g += 32)
          if (!kept[g] && before(sgs[g], g, bv, bi)) {
            bv = sgs[g];
            bi = g;
          }
        warp_first(bv, bi);
        if (lane == 0) kept[bi] = 1;
        __syncwarp();
      }
      // Dropped groups' experts are masked with -inf, not 0.0: biased scores can be negative.
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int e = lane + 32 * j;
        if (e < E && !kept[e / P]) ch[j] = neg_inf;
      }
      __syncwarp();  // the next token rewrites this warp's shared rows
    }

    // K rounds of the warp argmax; lane k keeps the k-th pick, so the outputs are written coalesced.
    unsigned taken = 0;  // bit j: my expert lane + 32 j was picked
    float my_w = 0.f, wsum = 0.f;
    int my_id = 0;
    for (int k = 0; k < K; ++k) {
      float bv = neg_inf;
      int bi = kNoIndex;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int e = lane + 32 * j;
        if (e < E && !((taken >> j) & 1u) && before(ch[j], e, bv, bi)) {
          bv = ch[j];
          bi = e;
        }
      }
      warp_first(bv, bi);
      float mine = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (lane + 32 * j == bi) {
          mine = sc[j];
          taken |= 1u << j;
        }
      const float w = __shfl_sync(kFull, mine, bi & 31);
      wsum += w;
      if (lane == k) {
        my_w = w;
        my_id = bi;
      }
    }
    if (lane < K) {
      // As the reference: w / (sum + 1e-20), then the scale.
      const float w = (a.norm ? my_w / (wsum + 1e-20f) : my_w) * a.scale;
      a.weights[t * K + lane] = w;
      a.expert_ids[t * K + lane] = my_id;
      // Integer atomics: exact whatever the order, so the counts are deterministic.
      atomicAdd(a.counts + my_id, 1);
    }
  }
}

template <typename T>
void launch_route(const MoeRouteArgs& a, cudaStream_t stream) {
  // Enough blocks for one token per warp up to a cap; the kernel loops when T is larger.
  const int64_t want = (a.n_tokens + kRouteWarps - 1) / kRouteWarps;
  const unsigned blocks = static_cast<unsigned>(want < (int64_t{1} << 20) ? want : (int64_t{1} << 20));
  const dim3 grid(blocks), block(32 * kRouteWarps);
  if (a.n_experts <= 32) moe_route_kernel<T, 1><<<grid, block, 0, stream>>>(a);
  else if (a.n_experts <= 64) moe_route_kernel<T, 2><<<grid, block, 0, stream>>>(a);
  else if (a.n_experts <= 128) moe_route_kernel<T, 4><<<grid, block, 0, stream>>>(a);
  else if (a.n_experts <= 256) moe_route_kernel<T, 8><<<grid, block, 0, stream>>>(a);
  else moe_route_kernel<T, 16><<<grid, block, 0, stream>>>(a);
  R1K_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------------
// Alignment

constexpr int kCountThreads = 1024;
constexpr int kPlaceWarps = 8;
constexpr int kPlaceThreads = 32 * kPlaceWarps;
constexpr int kPlaceSteps = 8;  // a chunk is kPlaceSteps rows of kPlaceThreads slots
constexpr int kPlaceChunk = kPlaceSteps * kPlaceThreads;
static_assert(kPlaceSteps * kPlaceWarps == 64, "the (step, warp) table is scanned two entries per lane");

// Exclusive prefix sum of one int per thread over the block (blockDim.x a multiple of 32); *total gets
// the block's sum. Contains two __syncthreads: every thread must call it.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int s_warp[32];
  __shared__ int s_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nwarps ? s_warp[lane] : 0;
    int wincl = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(kFull, wincl, off);
      if (lane >= off) wincl += o;
    }
    if (lane < nwarps) s_warp[lane] = wincl - w;  // each lane rewrites only the entry it read
    if (lane == 31) s_total = wincl;
  }
  __syncthreads();
  *total = s_total;
  return s_warp[warp] + incl - v;
}

template <typename I>
__global__ void __launch_bounds__(kCountThreads) moe_align_count_kernel(const MoeAlignArgs a) {
  extern __shared__ int smem[];
  const int E = a.n_experts, BM = a.block_size;
  int* s_cnt = smem;      // [E] tokens per expert
  int* s_end = smem + E;  // [E] one past each expert's padded run
  const I* ids = static_cast<const I*>(a.expert_ids);
  const int tid = threadIdx.x, nthreads = blockDim.x;

  for (int e = tid; e < E; e += nthreads) s_cnt[e] = 0;
  for (int64_t i = tid; i < a.s_max; i += nthreads) a.sorted_slots[i] = static_cast<int32_t>(a.n_slots);
  __syncthreads();
  for (int64_t i = tid; i < a.n_slots; i += nthreads) {
    const I e = ids[i];
    if (e >= 0 && e < E) atomicAdd(s_cnt + static_cast<int>(e), 1);  // ids outside [0, E) are ignored
  }
  __syncthreads();

  // Thread tid owns experts [lo, hi): their padded sizes summed, scanned over the block, then expanded.
  const int per = (E + nthreads - 1) / nthreads;
  const int lo = min(E, tid * per), hi = min(E, lo + per);
  int local = 0;
  for (int e = lo; e < hi; ++e) local += (s_cnt[e] + BM - 1) / BM * BM;
  int total = 0;
  int run = block_exclusive_scan(local, &total);
  for (int e = lo; e < hi; ++e) {
    const int c = s_cnt[e];
    a.counts[e] = c;
    a.workspace[e] = run;
    run += (c + BM - 1) / BM * BM;
    s_end[e] = run;
  }
  if (tid == 0) a.num_padded[0] = total;
  __syncthreads();

  // Block b's expert: the first whose run ends past the block's first row (empty runs end where the
  // previous one does, so they are never found); -1 past num_padded.
  const int64_t n_blocks = a.s_max / BM;
  for (int64_t b = tid; b < n_blocks; b += nthreads) {
    const int64_t row = b * BM;
    int found = -1;
    if (row < total) {
      int lo_e = 0, hi_e = E - 1;  // s_end[E - 1] == total > row, so the answer is in [lo_e, hi_e]
      while (lo_e < hi_e) {
        const int mid = (lo_e + hi_e) >> 1;
        if (s_end[mid] > row) hi_e = mid;
        else lo_e = mid + 1;
      }
      found = lo_e;
    }
    a.block_expert[b] = found;
  }
}

template <typename I>
__global__ void __launch_bounds__(kPlaceThreads) moe_align_place_kernel(const MoeAlignArgs a) {
  __shared__ int s_tab[kPlaceSteps * kPlaceWarps];  // matches per (step, warp), then their prefix
  __shared__ int s_chunk;                            // matches in the chunk
  const int e = blockIdx.x;
  const int cnt = a.counts[e];
  if (cnt == 0) return;  // block-uniform: no barrier is skipped by only part of the block
  const int start = a.workspace[e];
  const I* ids = static_cast<const I*>(a.expert_ids);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lower_lanes = (1u << lane) - 1u;

  int placed = 0;  // the same in every thread: it only ever adds s_chunk
  for (int64_t base = 0; base < a.n_slots && placed < cnt; base += kPlaceChunk) {
    // Slot base + j * kPlaceThreads + threadIdx.x: for each step j, consecutive threads read consecutive
    // slots, and the slot order is (j, warp, lane), the order of the table below.
    unsigned ballot[kPlaceSteps];
#pragma unroll
    for (int j = 0; j < kPlaceSteps; ++j) {
      const int64_t i = base + j * kPlaceThreads + threadIdx.x;
      ballot[j] = __ballot_sync(kFull, i < a.n_slots && ids[i] == e);
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kPlaceSteps; ++j) s_tab[j * kPlaceWarps + warp] = __popc(ballot[j]);
    }
    __syncthreads();
    if (warp == 0) {
      // Exclusive prefix of the 64 entries, two per lane.
      const int x0 = s_tab[2 * lane], x1 = s_tab[2 * lane + 1];
      int incl = x0 + x1;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += o;
      }
      const int excl = incl - x0 - x1;
      s_tab[2 * lane] = excl;
      s_tab[2 * lane + 1] = excl + x0;
      if (lane == 31) s_chunk = incl;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPlaceSteps; ++j) {
      if ((ballot[j] >> lane) & 1u) {
        const int pos = start + placed + s_tab[j * kPlaceWarps + warp] + __popc(ballot[j] & lower_lanes);
        a.sorted_slots[pos] = static_cast<int32_t>(base + j * kPlaceThreads + threadIdx.x);
      }
    }
    placed += s_chunk;
    __syncthreads();  // s_tab and s_chunk are rewritten by the next chunk
  }
}

template <typename I>
void launch_align(const MoeAlignArgs& a, cudaStream_t stream) {
  const size_t smem = 2 * static_cast<size_t>(a.n_experts) * sizeof(int);
  moe_align_count_kernel<I><<<1, kCountThreads, smem, stream>>>(a);
  R1K_CUDA_CHECK(cudaGetLastError());
  moe_align_place_kernel<I><<<a.n_experts, kPlaceThreads, 0, stream>>>(a);
  R1K_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace cuda

void moe_route_cuda(const MoeRouteArgs& a, int device, std::uintptr_t stream) {
  if (a.n_tokens == 0) return;
  // The bindings report these as ValueError first; here they guard the fixed-size arrays.
  R1K_CHECK(a.n_experts >= 1 && a.n_experts <= kMoeRouteCudaMaxE && a.n_group >= 1 && a.n_experts % a.n_group == 0 &&
                a.n_experts / a.n_group <= kMoeRouteCudaMaxP && a.top_k >= 1 && a.top_k <= kMoeRouteCudaMaxK,
            "moe_route_cuda: unsupported sizes E=", a.n_experts, ", G=", a.n_group, ", K=", a.top_k);
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: return cuda::launch_route<float>(a, s);
    case kFloat16: return cuda::launch_route<__half>(a, s);
    case kBFloat16: return cuda::launch_route<__nv_bfloat16>(a, s);
    default:
      R1K_CHECK(false, "moe_route_cuda: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", a.dtype);
  }
}

void moe_align_cuda(const MoeAlignArgs& a, int device, std::uintptr_t stream) {
  R1K_CHECK(a.n_experts >= 1 && a.n_experts <= kMoeAlignCudaMaxE && a.block_size >= 1,
            "moe_align_cuda: unsupported sizes E=", a.n_experts, ", BM=", a.block_size);
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.ids_int64) {
    cuda::launch_align<int64_t>(a, s);
  } else {
    cuda::launch_align<int32_t>(a, s);
  }
}

}  // namespace r1k
