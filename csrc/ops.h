// Every native entry point, declared once. bindings.cpp validates the arguments and calls these;
// cpu/*.cpp and cuda/*.cu define them. Plain C++ (no pybind11, no CUDA types) so both g++ and nvcc
// read it.
//
// Letters: N rows, D the normalised (last) dim (RMSNorm); the MoE entries spell out their own.
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

// MoE routing gate (semantics: r1kernels/reference/moe.py, moe_route). Letters: T tokens, E experts,
// G groups, P = E / G experts per group, K experts chosen per token.
//   scores = sigmoid(logits) or softmax(logits) over E (fp32); choice = scores + bias;
//   with G > 1 keep the topk_group groups of best score (top-2 sum or max of choice), others -> -inf;
//   the K best choices (ties: lower index first) in descending order; weights = their scores,
//   / (sum + 1e-20) when norm, * scale; counts[e] += number of tokens that chose e.
struct MoeRouteArgs {
  const void* logits;    // [T, E] in `dtype`, element strides stride_t, stride_e (any values >= 0)
  const float* bias;     // [E] fp32 contiguous, or nullptr for none
  float* weights;        // [T, K] fp32 out, contiguous
  int32_t* expert_ids;   // [T, K] int32 out, contiguous
  int32_t* counts;       // [E] int32, zeroed by the caller; the kernels add to it
  int64_t n_tokens;      // T
  int64_t stride_t;
  int64_t stride_e;
  int n_experts;         // E
  int n_group;           // G, divides E
  int topk_group;        // in [1, G]
  int top_k;             // K, in [1, topk_group * P]
  int dtype;             // DType code of logits
  bool softmax;          // scores by softmax (else sigmoid)
  bool top2_sum;         // group score = sum of its top 2 choices (else the max; P = 1 uses the max)
  bool norm;             // renormalise the K weights
  float scale;           // routed_scaling_factor
};

void moe_route_cpu(const MoeRouteArgs& a, int num_threads);

// MoE token alignment (semantics: reference moe_align). Letters: N = T * K slots, E experts, BM the
// block size, S_max = ceil((N + min(E, N) * (BM - 1)) / BM) * BM.
struct MoeAlignArgs {
  const void* expert_ids;  // [N] contiguous, int64 if ids_int64 else int32; ids outside [0, E) are ignored
  bool ids_int64;
  int64_t n_slots;         // N
  int n_experts;           // E
  int block_size;          // BM
  int64_t s_max;           // S_max (the caller's buffers are this long)
  int32_t* sorted_slots;   // [S_max] out: slots by expert, ascending within one, sentinel N elsewhere
  int32_t* block_expert;   // [S_max / BM] out: each block's expert, -1 past num_padded
  int32_t* num_padded;     // [1] out
  int32_t* counts;         // [E] out
  int32_t* workspace;      // [E] scratch: each expert's first row in sorted_slots
};

// Limits of the CUDA MoE kernels, known to the bindings whether or not the CUDA part is built.
constexpr int kMoeRouteCudaMaxE = 512;  // 16 experts per lane of the token's warp
constexpr int kMoeRouteCudaMaxP = 64;   // experts per group
constexpr int kMoeRouteCudaMaxK = 32;   // one chosen expert per lane
constexpr int kMoeAlignCudaMaxE = 4096; // two [E] int32 arrays in shared memory

// Absorbed MLA decode over a paged latent cache (semantics: r1kernels/reference/mla.py, mla_decode).
// Letters: B requests, Sq new tokens per request, H heads, R = Sq * H query rows per request, C latent row
// width, Dv value width (the first Dv columns of a row), N pages, P page size, M pages per request,
// S KV splits. Query s of request b sees positions < len_b - Sq + s + 1 (causal) or < len_b, with
// len_b = clamp(cache_seqlens[b], 0, M * P); rows past a request's length are never read; a row that sees
// nothing gives 0 and lse = -inf.
struct MlaDecodeArgs {
  const void* q;                 // [B, Sq, H, C] contiguous, `dtype`, 16-byte aligned
  const void* kv;                // [N, P, C] `dtype`, element strides kv_page_stride, kv_row_stride, 1
  const int32_t* block_table;    // [B, M] int32, row stride bt_stride
  const int32_t* cache_seqlens;  // [B] int32 contiguous
  void* out;                     // [B, Sq, H, Dv] contiguous, `dtype`
  float* lse;                    // [B, H, Sq] fp32 contiguous (natural log)
  float* ws_out;                 // [S, B, R, Dv] fp32 scratch when S > 1, else unused
  float* ws_lse;                 // [S, B, R] fp32 scratch when S > 1, else unused
  int64_t batch;                 // B (<= 65535)
  int64_t sq;                    // Sq
  int64_t heads;                 // H
  int64_t head_dim;              // C (kMlaCudaHeadDim)
  int64_t head_dim_v;            // Dv (kMlaCudaHeadDimV)
  int64_t num_pages;             // N
  int64_t page_size;             // P
  int64_t max_pages;             // M
  int64_t kv_page_stride;        // elements, multiple of 8
  int64_t kv_row_stride;         // elements, multiple of 8
  int64_t bt_stride;             // elements
  int num_splits;                // S in [1, kMlaCudaMaxSplits]
  int dtype;                     // kFloat16 or kBFloat16
  bool causal;
  float softmax_scale;
};

// What the CUDA MLA decode kernel takes (known to the bindings whether or not the CUDA part is built).
constexpr int kMlaCudaHeadDim = 576;   // C
constexpr int kMlaCudaHeadDimV = 512;  // Dv
constexpr int kMlaCudaMaxSplits = 64;  // S

#ifdef R1K_WITH_CUDA
// Launches on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream) of CUDA device
// `device`; returns without synchronising. Throws std::runtime_error on a launch error.
void rms_norm_cuda(const RmsNormArgs& a, int device, std::uintptr_t stream);

// Same launch conventions. moe_route_cuda takes E <= kMoeRouteCudaMaxE, P <= kMoeRouteCudaMaxP and
// K <= kMoeRouteCudaMaxK (one warp per token); moe_align_cuda takes E <= kMoeAlignCudaMaxE.
void moe_route_cuda(const MoeRouteArgs& a, int device, std::uintptr_t stream);
void moe_align_cuda(const MoeAlignArgs& a, int device, std::uintptr_t stream);

// MLA decode (mla.cu): out and lse for every row; S = a.num_splits (> 1 uses ws_out / ws_lse and a merge
// kernel). mla_decode_cuda_num_splits picks S from the shapes (R rows per request, max_tokens = M * P)
// and the device's SM count; it never looks at cache_seqlens.
void mla_decode_cuda(const MlaDecodeArgs& a, int device, std::uintptr_t stream);
int mla_decode_cuda_num_splits(int64_t batch, int64_t rows, int64_t max_tokens, int device);

// "" if this module's CUDA kernels can run on `device` (an image for its architecture was compiled in),
// else the CUDA runtime's reason.
std::string cuda_device_problem(int device);
#endif

}  // namespace r1k
