// The Python module r1kernels._C: argument validation and the pybind11 glue around the native kernels.
//
// Letters: N rows (n_rows), D the normalised dim (d); for MoE: T tokens, E experts, K chosen per token.
//
// Tensors arrive as raw addresses (Python ints from tensor.data_ptr()), sizes, row strides in elements
// and dtype codes (common.h). Nothing here knows about torch, so one build works with any torch version;
// r1kernels/ops/_native.py turns tensors into these arguments. Every check raises ValueError naming the
// argument and the value that came, because a wrong pointer or stride would otherwise surface as a
// crash or as silently wrong numbers.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "common.h"
#include "ops.h"

namespace py = pybind11;

namespace r1k {
namespace {

constexpr const char* kDtypeHelp = "0 (float32), 1 (float16) or 2 (bfloat16)";

std::string hex(std::uintptr_t p) {
  std::ostringstream os;
  os << "0x" << std::hex << p;
  return os.str();
}

// Bytes from the first to one past the last element of `rows` rows of `d` elements `stride` apart.
// Both callers have checked that the product cannot overflow.
int64_t span_bytes(int64_t rows, int64_t d, int64_t stride, int elem) { return ((rows - 1) * stride + d) * elem; }

void check_pointer(const char* fn, const char* name, std::uintptr_t p, int elem, const char* dtype) {
  R1K_CHECK(p != 0, fn, ": ", name, " is a null pointer (pass tensor.data_ptr() of a non-empty tensor)");
  R1K_CHECK(p % static_cast<std::uintptr_t>(elem) == 0, fn, ": ", name, " must be aligned to its element size (",
            elem, " bytes for ", dtype, "), got address ", hex(p));
}

void check_disjoint(const char* fn, const char* a_name, std::uintptr_t a, int64_t a_bytes, const char* b_name,
                    std::uintptr_t b, int64_t b_bytes) {
  const bool overlap = a < b + static_cast<std::uintptr_t>(b_bytes) && b < a + static_cast<std::uintptr_t>(a_bytes);
  R1K_CHECK(!overlap, fn, ": ", a_name, " must not overlap ", b_name, " (in-place is not supported): ", a_name,
            " spans [", hex(a), ", +", a_bytes, ") and ", b_name, " spans [", hex(b), ", +", b_bytes, ")");
}

RmsNormArgs rms_norm_args(const char* fn, std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight,
                          int64_t n_rows, int64_t d, int64_t x_row_stride, int64_t out_row_stride, int dtype,
                          int weight_dtype, double eps) {
  R1K_CHECK(valid_dtype(dtype), fn, ": dtype must be ", kDtypeHelp, ", got ", dtype);
  R1K_CHECK(valid_dtype(weight_dtype), fn, ": weight_dtype must be ", kDtypeHelp, ", got ", weight_dtype);
  R1K_CHECK(n_rows >= 0, fn, ": n_rows must be >= 0, got ", n_rows);
  R1K_CHECK(d >= 0, fn, ": d must be >= 0, got ", d);
  // A stride of 0 is a broadcast row (torch's expand); reading it N times is fine.
  R1K_CHECK(x_row_stride >= 0, fn, ": x_row_stride must be >= 0 (elements), got ", x_row_stride);
  if (n_rows > 1) {
    R1K_CHECK(out_row_stride >= d, fn, ": out_row_stride must be >= d (", d,
              ") so that output rows do not overlap, got ", out_row_stride);
  } else {
    R1K_CHECK(out_row_stride >= 0, fn, ": out_row_stride must be >= 0 (elements), got ", out_row_stride);
  }
  R1K_CHECK(std::isfinite(eps) && eps >= 0.0 && eps <= FLT_MAX, fn, ": eps must be a finite number >= 0, got ", eps);

  if (n_rows > 0 && d > 0) {
    const int elem = dtype_size(dtype);
    const int welem = dtype_size(weight_dtype);
    // Byte offsets must fit in int64 (and so in the address space) for the index math in the kernels.
    const int64_t max_elems = std::numeric_limits<int64_t>::max() / 4;
    const int64_t max_stride = std::max(x_row_stride, out_row_stride);
    R1K_CHECK(d <= max_elems && (n_rows - 1) <= (max_elems - d) / std::max<int64_t>(max_stride, 1), fn,
              ": n_rows=", n_rows, ", d=", d, " and row strides ", x_row_stride, "/", out_row_stride,
              " address more memory than exists");
    check_pointer(fn, "out", out, elem, dtype_name(dtype));
    check_pointer(fn, "x", x, elem, dtype_name(dtype));
    check_pointer(fn, "weight", weight, welem, dtype_name(weight_dtype));
    const int64_t out_bytes = span_bytes(n_rows, d, out_row_stride, elem);
    check_disjoint(fn, "out", out, out_bytes, "x", x, span_bytes(n_rows, d, x_row_stride, elem));
    check_disjoint(fn, "out", out, out_bytes, "weight", weight, d * welem);
  }
  RmsNormArgs a;
  a.out = reinterpret_cast<void*>(out);
  a.x = reinterpret_cast<const void*>(x);
  a.weight = reinterpret_cast<const void*>(weight);
  a.n_rows = n_rows;
  a.d = d;
  a.x_row_stride = x_row_stride;
  a.out_row_stride = out_row_stride;
  a.dtype = dtype;
  a.weight_dtype = weight_dtype;
  a.eps = static_cast<float>(eps);
  return a;
}

// Elements from the first to one past the last of a [rows, cols] view with element strides (st, se), or -1
// when that does not fit in int64 (so in no address space). rows, cols >= 1; st, se >= 0.
int64_t span_elems_2d(int64_t rows, int64_t cols, int64_t st, int64_t se) {
  const int64_t max_elems = std::numeric_limits<int64_t>::max() / 8;
  if (rows > max_elems || cols > max_elems) return -1;
  if (st > 0 && rows - 1 > max_elems / st) return -1;
  if (se > 0 && cols - 1 > max_elems / se) return -1;
  const int64_t last = (rows - 1) * st + (cols - 1) * se;
  return last > max_elems - 1 ? -1 : last + 1;
}

MoeRouteArgs moe_route_args(const char* fn, std::uintptr_t logits, std::uintptr_t bias, std::uintptr_t weights,
                            std::uintptr_t expert_ids, std::uintptr_t counts, int64_t n_tokens, int64_t n_experts,
                            int64_t stride_t, int64_t stride_e, int64_t n_group, int64_t topk_group, int64_t top_k,
                            int dtype, bool softmax, bool top2_sum, bool norm, double scale) {
  R1K_CHECK(valid_dtype(dtype), fn, ": dtype must be ", kDtypeHelp, ", got ", dtype);
  R1K_CHECK(n_tokens >= 0, fn, ": n_tokens must be >= 0, got ", n_tokens);
  R1K_CHECK(n_experts >= 1 && n_experts <= INT32_MAX, fn, ": n_experts must be in [1, 2^31), got ", n_experts);
  R1K_CHECK(n_group >= 1 && n_experts % n_group == 0, fn, ": n_group must be >= 1 and divide n_experts (",
            n_experts, "), got ", n_group);
  R1K_CHECK(topk_group >= 1 && topk_group <= n_group, fn, ": topk_group must be in [1, n_group=", n_group, "], got ",
            topk_group);
  const int64_t kept = topk_group * (n_experts / n_group);
  R1K_CHECK(top_k >= 1 && top_k <= kept, fn, ": top_k must be in [1, topk_group * n_experts / n_group = ", kept,
            "], got ", top_k);
  // A stride of 0 is a broadcast (torch's expand); reading the same logits twice is fine.
  R1K_CHECK(stride_t >= 0, fn, ": stride_t must be >= 0 (elements), got ", stride_t);
  R1K_CHECK(stride_e >= 0, fn, ": stride_e must be >= 0 (elements), got ", stride_e);
  R1K_CHECK(std::isfinite(scale) && std::fabs(scale) <= FLT_MAX, fn, ": scale must be a finite float32, got ", scale);
  if (n_tokens > 0) {
    const int elem = dtype_size(dtype);
    const int64_t logit_elems = span_elems_2d(n_tokens, n_experts, stride_t, stride_e);
    R1K_CHECK(logit_elems > 0 && n_tokens <= std::numeric_limits<int64_t>::max() / 8 / top_k, fn, ": n_tokens=",
              n_tokens, ", n_experts=", n_experts, ", top_k=", top_k, " and strides ", stride_t, "/", stride_e,
              " address more memory than exists");
    check_pointer(fn, "logits", logits, elem, dtype_name(dtype));
    check_pointer(fn, "weights", weights, 4, "float32");
    check_pointer(fn, "expert_ids", expert_ids, 4, "int32");
    check_pointer(fn, "counts", counts, 4, "int32");
    if (bias != 0) check_pointer(fn, "bias", bias, 4, "float32");
    const int64_t out_bytes = n_tokens * top_k * 4;
    const int64_t logit_bytes = logit_elems * elem;
    check_disjoint(fn, "weights", weights, out_bytes, "logits", logits, logit_bytes);
    check_disjoint(fn, "expert_ids", expert_ids, out_bytes, "logits", logits, logit_bytes);
    check_disjoint(fn, "weights", weights, out_bytes, "expert_ids", expert_ids, out_bytes);
    check_disjoint(fn, "counts", counts, n_experts * 4, "weights", weights, out_bytes);
    check_disjoint(fn, "counts", counts, n_experts * 4, "expert_ids", expert_ids, out_bytes);
    check_disjoint(fn, "counts", counts, n_experts * 4, "logits", logits, logit_bytes);
    if (bias != 0) {
      check_disjoint(fn, "weights", weights, out_bytes, "bias", bias, n_experts * 4);
      check_disjoint(fn, "expert_ids", expert_ids, out_bytes, "bias", bias, n_experts * 4);
      check_disjoint(fn, "counts", counts, n_experts * 4, "bias", bias, n_experts * 4);
    }
  }
  MoeRouteArgs a;
  a.logits = reinterpret_cast<const void*>(logits);
  a.bias = reinterpret_cast<const float*>(bias);
  a.weights = reinterpret_cast<float*>(weights);
  a.expert_ids = reinterpret_cast<int32_t*>(expert_ids);
  a.counts = reinterpret_cast<int32_t*>(counts);
  a.n_tokens = n_tokens;
  a.stride_t = stride_t;
  a.stride_e = stride_e;
  a.n_experts = static_cast<int>(n_experts);
  a.n_group = static_cast<int>(n_group);
  a.topk_group = static_cast<int>(topk_group);
  a.top_k = static_cast<int>(top_k);
  a.dtype = dtype;
  a.softmax = softmax;
  a.top2_sum = top2_sum;
  a.norm = norm;
  a.scale = static_cast<float>(scale);
  return a;
}

MlaDecodeArgs mla_decode_args(const char* fn, std::uintptr_t q, std::uintptr_t kv, std::uintptr_t block_table,
                              std::uintptr_t cache_seqlens, std::uintptr_t out, std::uintptr_t lse,
                              std::uintptr_t ws_out, std::uintptr_t ws_lse, int64_t batch, int64_t sq, int64_t heads,
                              int64_t head_dim, int64_t head_dim_v, int64_t num_pages, int64_t page_size,
                              int64_t max_pages, int64_t kv_page_stride, int64_t kv_row_stride, int64_t bt_stride,
                              int64_t num_splits, int dtype, bool causal, double softmax_scale) {
  R1K_CHECK(dtype == kFloat16 || dtype == kBFloat16, fn, ": dtype must be 1 (float16) or 2 (bfloat16), got ", dtype);
  R1K_CHECK(head_dim == kMlaCudaHeadDim, fn, ": head_dim (C) must be ", kMlaCudaHeadDim, ", got ", head_dim);
  R1K_CHECK(head_dim_v == kMlaCudaHeadDimV, fn, ": head_dim_v (Dv) must be ", kMlaCudaHeadDimV, ", got ", head_dim_v);
  R1K_CHECK(batch >= 0 && batch <= 65535, fn, ": batch must be in [0, 65535] (the CUDA grid limit), got ", batch);
  R1K_CHECK(sq >= 0, fn, ": sq must be >= 0, got ", sq);
  R1K_CHECK(heads >= 0, fn, ": heads must be >= 0, got ", heads);
  R1K_CHECK(sq == 0 || heads <= (INT32_MAX / 2) / sq, fn, ": sq * heads must be < 2^30, got sq=", sq,
            ", heads=", heads);
  R1K_CHECK(num_pages >= 1 && num_pages <= INT32_MAX, fn, ": num_pages must be in [1, 2^31), got ", num_pages);
  R1K_CHECK(page_size >= 1 && page_size <= INT32_MAX, fn, ": page_size must be in [1, 2^31), got ", page_size);
  R1K_CHECK(max_pages >= 1 && max_pages <= INT32_MAX / page_size, fn,
            ": max_pages must be >= 1 with max_pages * page_size < 2^31, got max_pages=", max_pages,
            ", page_size=", page_size);
  R1K_CHECK(kv_row_stride >= head_dim && kv_row_stride % 8 == 0, fn,
            ": kv_row_stride must be >= head_dim and a multiple of 8 elements (16-byte rows), got ", kv_row_stride);
  R1K_CHECK(kv_page_stride >= 0 && kv_page_stride % 8 == 0, fn,
            ": kv_page_stride must be >= 0 and a multiple of 8 elements, got ", kv_page_stride);
  R1K_CHECK(bt_stride >= max_pages, fn, ": bt_stride must be >= max_pages (", max_pages, "), got ", bt_stride);
  R1K_CHECK(num_splits >= 1 && num_splits <= kMlaCudaMaxSplits, fn, ": num_splits must be in [1, ",
            kMlaCudaMaxSplits, "], got ", num_splits);
  R1K_CHECK(std::isfinite(softmax_scale) && std::fabs(softmax_scale) <= FLT_MAX, fn,
            ": softmax_scale must be a finite float32, got ", softmax_scale);
  const int64_t max_elems = std::numeric_limits<int64_t>::max() / 16;
  R1K_CHECK(kv_row_stride <= max_elems / page_size, fn, ": page_size=", page_size, " and kv_row_stride=",
            kv_row_stride, " address more memory than exists");
  const int64_t kv_elems = span_elems_2d(num_pages, (page_size - 1) * kv_row_stride + head_dim, kv_page_stride, 1);
  R1K_CHECK(kv_elems > 0, fn, ": num_pages=", num_pages, ", page_size=", page_size, " and strides ", kv_page_stride,
            "/", kv_row_stride, " address more memory than exists");
  const int64_t rows = sq * heads;
  if (batch > 0 && rows > 0) {
    R1K_CHECK(batch * rows <= max_elems / head_dim / num_splits, fn, ": batch * sq * heads = ", batch * rows,
              " addresses more memory than exists");
    const int elem = dtype_size(dtype);
    check_pointer(fn, "q", q, 16, "16-byte rows");
    check_pointer(fn, "kv", kv, 16, "16-byte rows");
    check_pointer(fn, "block_table", block_table, 4, "int32");
    check_pointer(fn, "cache_seqlens", cache_seqlens, 4, "int32");
    check_pointer(fn, "out", out, 4, "pairs of 16-bit values");
    check_pointer(fn, "lse", lse, 4, "float32");
    if (num_splits > 1) {
      check_pointer(fn, "ws_out", ws_out, 16, "float4");
      check_pointer(fn, "ws_lse", ws_lse, 4, "float32");
    }
    const int64_t out_bytes = batch * rows * head_dim_v * elem;
    const int64_t lse_bytes = batch * rows * 4;
    check_disjoint(fn, "out", out, out_bytes, "q", q, batch * rows * head_dim * elem);
    check_disjoint(fn, "out", out, out_bytes, "kv", kv, kv_elems * elem);
    check_disjoint(fn, "lse", lse, lse_bytes, "out", out, out_bytes);
    check_disjoint(fn, "lse", lse, lse_bytes, "q", q, batch * rows * head_dim * elem);
    check_disjoint(fn, "lse", lse, lse_bytes, "kv", kv, kv_elems * elem);
    if (num_splits > 1) {
      const int64_t ws_bytes = num_splits * batch * rows * head_dim_v * 4;
      check_disjoint(fn, "ws_out", ws_out, ws_bytes, "out", out, out_bytes);
      check_disjoint(fn, "ws_out", ws_out, ws_bytes, "ws_lse", ws_lse, num_splits * lse_bytes);
      check_disjoint(fn, "ws_lse", ws_lse, num_splits * lse_bytes, "lse", lse, lse_bytes);
    }
  }
  MlaDecodeArgs a;
  a.q = reinterpret_cast<const void*>(q);
  a.kv = reinterpret_cast<const void*>(kv);
  a.block_table = reinterpret_cast<const int32_t*>(block_table);
  a.cache_seqlens = reinterpret_cast<const int32_t*>(cache_seqlens);
  a.out = reinterpret_cast<void*>(out);
  a.lse = reinterpret_cast<float*>(lse);
  a.ws_out = reinterpret_cast<float*>(ws_out);
  a.ws_lse = reinterpret_cast<float*>(ws_lse);
  a.batch = batch;
  a.sq = sq;
  a.heads = heads;
  a.head_dim = head_dim;
  a.head_dim_v = head_dim_v;
  a.num_pages = num_pages;
  a.page_size = page_size;
  a.max_pages = max_pages;
  a.kv_page_stride = kv_page_stride;
  a.kv_row_stride = kv_row_stride;
  a.bt_stride = bt_stride;
  a.num_splits = static_cast<int>(num_splits);
  a.dtype = dtype;
  a.causal = causal;
  a.softmax_scale = static_cast<float>(softmax_scale);
  return a;
}

}  // namespace
}  // namespace r1k

PYBIND11_MODULE(_C, m) {
  using namespace r1k;
  m.doc() =
      "r1kernels native kernels (no libtorch). Tensors are passed as data_ptr() addresses, sizes, row strides "
      "in elements and dtype codes 0=float32, 1=float16, 2=bfloat16. Use r1kernels.ops, not this module.";

#ifdef R1K_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.attr("cuda_archs") = R1K_CUDA_ARCHS_STR;
#else
  m.attr("built_with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
#ifdef _OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif

  m.def(
      "rms_norm_cpu",
      [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, int64_t n_rows, int64_t d, int64_t x_row_stride,
         int64_t out_row_stride, int dtype, int weight_dtype, double eps, int num_threads) {
        const char* fn = "r1kernels._C.rms_norm_cpu";
        RmsNormArgs a = rms_norm_args(fn, out, x, weight, n_rows, d, x_row_stride, out_row_stride, dtype,
                                      weight_dtype, eps);
        R1K_CHECK(num_threads >= 0, fn, ": num_threads must be >= 0 (0: the OpenMP default), got ", num_threads);
        rms_norm_cpu(a, num_threads);
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("n_rows"), py::arg("d"), py::arg("x_row_stride"),
      py::arg("out_row_stride"), py::arg("dtype"), py::arg("weight_dtype"), py::arg("eps"),
      py::arg("num_threads") = 0,
      // The kernel touches no Python object, so other Python threads may run meanwhile.
      py::call_guard<py::gil_scoped_release>(),
      "RMSNorm forward of N rows of D elements on the CPU: out = x * rsqrt(mean(x^2) + eps) * weight in fp32, "
      "stored in x's dtype. x, out: row-major with the given row strides (elements, columns contiguous); "
      "weight: [D] contiguous in weight_dtype. num_threads: OpenMP threads (0: the OpenMP default).");

  m.def(
      "rms_norm_cuda",
      [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, int64_t n_rows, int64_t d, int64_t x_row_stride,
         int64_t out_row_stride, int dtype, int weight_dtype, double eps, int device, std::uintptr_t stream) {
        const char* fn = "r1kernels._C.rms_norm_cuda";
#ifdef R1K_WITH_CUDA
        RmsNormArgs a = rms_norm_args(fn, out, x, weight, n_rows, d, x_row_stride, out_row_stride, dtype,
                                      weight_dtype, eps);
        R1K_CHECK(device >= 0, fn, ": device must be a CUDA device index >= 0, got ", device);
        R1K_CHECK(n_rows <= INT32_MAX, fn, ": n_rows must be < 2^31 (the CUDA grid limit), got ", n_rows);
        R1K_CHECK(d <= INT32_MAX, fn, ": d must be < 2^31, got ", d);
        rms_norm_cuda(a, device, stream);
#else
        (void)out, (void)x, (void)weight, (void)n_rows, (void)d, (void)x_row_stride, (void)out_row_stride;
        (void)dtype, (void)weight_dtype, (void)eps, (void)device, (void)stream;
        R1K_FAIL(fn, ": this build of r1kernels._C has no CUDA part (nvcc was not found at build time, or "
                     "R1K_NO_CUDA=1 was set)");
#endif
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("n_rows"), py::arg("d"), py::arg("x_row_stride"),
      py::arg("out_row_stride"), py::arg("dtype"), py::arg("weight_dtype"), py::arg("eps"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "RMSNorm forward on CUDA device `device`, enqueued on `stream` (a cudaStream_t as an int, e.g. "
      "torch.cuda.current_stream(device).cuda_stream); same arguments as rms_norm_cpu. Asynchronous.");

  m.def(
      "moe_route_cpu",
      [](std::uintptr_t logits, std::uintptr_t bias, std::uintptr_t weights, std::uintptr_t expert_ids,
         std::uintptr_t counts, int64_t n_tokens, int64_t n_experts, int64_t stride_t, int64_t stride_e,
         int64_t n_group, int64_t topk_group, int64_t top_k, int dtype, bool softmax, bool top2_sum, bool norm,
         double scale, int num_threads) {
        const char* fn = "r1kernels._C.moe_route_cpu";
        MoeRouteArgs a = moe_route_args(fn, logits, bias, weights, expert_ids, counts, n_tokens, n_experts, stride_t,
                                        stride_e, n_group, topk_group, top_k, dtype, softmax, top2_sum, norm, scale);
        R1K_CHECK(num_threads >= 0, fn, ": num_threads must be >= 0 (0: the OpenMP default), got ", num_threads);
        moe_route_cpu(a, num_threads);
      },
      py::arg("logits"), py::arg("bias"), py::arg("weights"), py::arg("expert_ids"), py::arg("counts"),
      py::arg("n_tokens"), py::arg("n_experts"), py::arg("stride_t"), py::arg("stride_e"), py::arg("n_group"),
      py::arg("topk_group"), py::arg("top_k"), py::arg("dtype"), py::arg("softmax"), py::arg("top2_sum"),
      py::arg("norm"), py::arg("scale"), py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
      "MoE routing gate of T tokens over E experts on the CPU (semantics: r1kernels.reference.moe_route). "
      "logits: [T, E] in dtype with element strides stride_t, stride_e; bias: [E] float32 or 0 for none; "
      "weights: [T, K] float32 out; expert_ids: [T, K] int32 out; counts: [E] int32, zeroed by the caller, "
      "incremented per chosen expert. softmax: scores by softmax (else sigmoid); top2_sum: group score is the "
      "sum of the top 2 (else the max); norm: renormalise the weights; scale: routed_scaling_factor.");

  m.def(
      "moe_route_cuda",
      [](std::uintptr_t logits, std::uintptr_t bias, std::uintptr_t weights, std::uintptr_t expert_ids,
         std::uintptr_t counts, int64_t n_tokens, int64_t n_experts, int64_t stride_t, int64_t stride_e,
         int64_t n_group, int64_t topk_group, int64_t top_k, int dtype, bool softmax, bool top2_sum, bool norm,
         double scale, int device, std::uintptr_t stream) {
        const char* fn = "r1kernels._C.moe_route_cuda";
        MoeRouteArgs a = moe_route_args(fn, logits, bias, weights, expert_ids, counts, n_tokens, n_experts, stride_t,
                                        stride_e, n_group, topk_group, top_k, dtype, softmax, top2_sum, norm, scale);
        R1K_CHECK(n_experts <= kMoeRouteCudaMaxE, fn, ": n_experts must be <= ", kMoeRouteCudaMaxE,
                  " (the CUDA kernel holds a token's experts in one warp), got ", n_experts);
        R1K_CHECK(n_experts / n_group <= kMoeRouteCudaMaxP, fn, ": experts per group (n_experts / n_group) must be <= ",
                  kMoeRouteCudaMaxP, ", got ", n_experts / n_group);
        R1K_CHECK(top_k <= kMoeRouteCudaMaxK, fn, ": top_k must be <= ", kMoeRouteCudaMaxK,
                  " (one chosen expert per lane), got ", top_k);
        R1K_CHECK(device >= 0, fn, ": device must be a CUDA device index >= 0, got ", device);
#ifdef R1K_WITH_CUDA
        moe_route_cuda(a, device, stream);
#else
        (void)a, (void)stream;
        R1K_FAIL(fn, ": this build of r1kernels._C has no CUDA part (nvcc was not found at build time, or "
                     "R1K_NO_CUDA=1 was set)");
#endif
      },
      py::arg("logits"), py::arg("bias"), py::arg("weights"), py::arg("expert_ids"), py::arg("counts"),
      py::arg("n_tokens"), py::arg("n_experts"), py::arg("stride_t"), py::arg("stride_e"), py::arg("n_group"),
      py::arg("topk_group"), py::arg("top_k"), py::arg("dtype"), py::arg("softmax"), py::arg("top2_sum"),
      py::arg("norm"), py::arg("scale"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "moe_route_cpu's arguments on CUDA device `device`, enqueued on `stream`; one warp per token: n_experts <= 512, "
      "n_experts / n_group <= 64, top_k <= 32. Asynchronous.");

  m.def(
      "moe_align_cuda",
      [](std::uintptr_t expert_ids, bool ids_int64, int64_t n_slots, int64_t n_experts, int64_t block_size,
         int64_t s_max, std::uintptr_t sorted_slots, std::uintptr_t block_expert, std::uintptr_t num_padded,
         std::uintptr_t counts, std::uintptr_t workspace, int device, std::uintptr_t stream) {
        const char* fn = "r1kernels._C.moe_align_cuda";
        R1K_CHECK(n_slots >= 0 && n_slots < INT32_MAX, fn, ": n_slots must be in [0, 2^31 - 1), got ", n_slots);
        R1K_CHECK(n_experts >= 1 && n_experts <= kMoeAlignCudaMaxE, fn, ": n_experts must be in [1, ",
                  kMoeAlignCudaMaxE, "] (two [E] arrays in shared memory), got ", n_experts);
        R1K_CHECK(block_size >= 1 && block_size < INT32_MAX / 2, fn, ": block_size must be in [1, 2^30), got ",
                  block_size);
        const int64_t used = std::min(n_experts, n_slots);
        const int64_t want = (n_slots + used * (block_size - 1) + block_size - 1) / block_size * block_size;
        R1K_CHECK(s_max == want, fn, ": s_max must be ceil((n_slots + min(n_experts, n_slots) * (block_size - 1)) / "
                  "block_size) * block_size = ", want, " (the length of sorted_slots), got ", s_max);
        R1K_CHECK(s_max <= INT32_MAX - block_size, fn, ": the padded list (", s_max, " rows) must stay below 2^31");
        R1K_CHECK(device >= 0, fn, ": device must be a CUDA device index >= 0, got ", device);
        if (n_slots > 0) check_pointer(fn, "expert_ids", expert_ids, ids_int64 ? 8 : 4, ids_int64 ? "int64" : "int32");
        if (s_max > 0) {
          check_pointer(fn, "sorted_slots", sorted_slots, 4, "int32");
          check_pointer(fn, "block_expert", block_expert, 4, "int32");
        }
        check_pointer(fn, "num_padded", num_padded, 4, "int32");
        check_pointer(fn, "counts", counts, 4, "int32");
        check_pointer(fn, "workspace", workspace, 4, "int32");
        MoeAlignArgs a;
        a.expert_ids = reinterpret_cast<const void*>(expert_ids);
        a.ids_int64 = ids_int64;
        a.n_slots = n_slots;
        a.n_experts = static_cast<int>(n_experts);
        a.block_size = static_cast<int>(block_size);
        a.s_max = s_max;
        a.sorted_slots = reinterpret_cast<int32_t*>(sorted_slots);
        a.block_expert = reinterpret_cast<int32_t*>(block_expert);
        a.num_padded = reinterpret_cast<int32_t*>(num_padded);
        a.counts = reinterpret_cast<int32_t*>(counts);
        a.workspace = reinterpret_cast<int32_t*>(workspace);
#ifdef R1K_WITH_CUDA
        moe_align_cuda(a, device, stream);
#else
        (void)a, (void)stream;
        R1K_FAIL(fn, ": this build of r1kernels._C has no CUDA part (nvcc was not found at build time, or "
                     "R1K_NO_CUDA=1 was set)");
#endif
      },
      py::arg("expert_ids"), py::arg("ids_int64"), py::arg("n_slots"), py::arg("n_experts"), py::arg("block_size"),
      py::arg("s_max"), py::arg("sorted_slots"), py::arg("block_expert"), py::arg("num_padded"), py::arg("counts"),
      py::arg("workspace"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "MoE token alignment (semantics: r1kernels.reference.moe_align) on CUDA device `device`, enqueued on `stream`. "
      "expert_ids: [n_slots] contiguous int32 (int64 if ids_int64); outputs int32: sorted_slots [s_max], "
      "block_expert [s_max / block_size], num_padded [1], counts [n_experts]; workspace: [n_experts] int32 scratch. "
      "Every output is written (no zeroing needed). Asynchronous.");

  m.def(
      "mla_decode_cuda",
      [](std::uintptr_t q, std::uintptr_t kv, std::uintptr_t block_table, std::uintptr_t cache_seqlens,
         std::uintptr_t out, std::uintptr_t lse, std::uintptr_t ws_out, std::uintptr_t ws_lse, int64_t batch,
         int64_t sq, int64_t heads, int64_t head_dim, int64_t head_dim_v, int64_t num_pages, int64_t page_size,
         int64_t max_pages, int64_t kv_page_stride, int64_t kv_row_stride, int64_t bt_stride, int64_t num_splits,
         int dtype, bool causal, double softmax_scale, int device, std::uintptr_t stream) {
        const char* fn = "r1kernels._C.mla_decode_cuda";
        MlaDecodeArgs a = mla_decode_args(fn, q, kv, block_table, cache_seqlens, out, lse, ws_out, ws_lse, batch, sq,
                                          heads, head_dim, head_dim_v, num_pages, page_size, max_pages,
                                          kv_page_stride, kv_row_stride, bt_stride, num_splits, dtype, causal,
                                          softmax_scale);
        R1K_CHECK(device >= 0, fn, ": device must be a CUDA device index >= 0, got ", device);
#ifdef R1K_WITH_CUDA
        mla_decode_cuda(a, device, stream);
#else
        (void)a, (void)stream;
        R1K_FAIL(fn, ": this build of r1kernels._C has no CUDA part (nvcc was not found at build time, or "
                     "R1K_NO_CUDA=1 was set)");
#endif
      },
      py::arg("q"), py::arg("kv"), py::arg("block_table"), py::arg("cache_seqlens"), py::arg("out"), py::arg("lse"),
      py::arg("ws_out"), py::arg("ws_lse"), py::arg("batch"), py::arg("sq"), py::arg("heads"), py::arg("head_dim"),
      py::arg("head_dim_v"), py::arg("num_pages"), py::arg("page_size"), py::arg("max_pages"),
      py::arg("kv_page_stride"), py::arg("kv_row_stride"), py::arg("bt_stride"), py::arg("num_splits"),
      py::arg("dtype"), py::arg("causal"), py::arg("softmax_scale"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Absorbed MLA decode over a paged latent cache (semantics: r1kernels.reference.mla_decode) on CUDA device "
      "`device`, enqueued on `stream`. q: [B, Sq, H, C] contiguous, 16-byte aligned; kv: [N, P, C] with element "
      "strides kv_page_stride, kv_row_stride, 1 (multiples of 8); block_table: [B, M] int32 with row stride "
      "bt_stride; cache_seqlens: [B] int32; out: [B, Sq, H, Dv] contiguous in dtype; lse: [B, H, Sq] float32; "
      "ws_out: [num_splits, B, Sq * H, Dv] float32 and ws_lse: [num_splits, B, Sq * H] float32 scratch (unused, may "
      "be 0, when num_splits == 1). C = 576, Dv = 512, dtype 1 (float16) or 2 (bfloat16). Asynchronous; never "
      "reads cache_seqlens on the host.");

  m.def(
      "mla_decode_cuda_num_splits",
      [](int64_t batch, int64_t rows, int64_t max_tokens, int device) -> int {
        const char* fn = "r1kernels._C.mla_decode_cuda_num_splits";
        R1K_CHECK(batch >= 0 && rows >= 0 && max_tokens >= 0, fn, ": batch, rows and max_tokens must be >= 0, got ",
                  batch, ", ", rows, ", ", max_tokens);
        R1K_CHECK(device >= 0, fn, ": device must be a CUDA device index >= 0, got ", device);
#ifdef R1K_WITH_CUDA
        return mla_decode_cuda_num_splits(batch, rows, max_tokens, device);
#else
        R1K_FAIL(fn, ": this build of r1kernels._C has no CUDA part (nvcc was not found at build time, or "
                     "R1K_NO_CUDA=1 was set)");
#endif
      },
      py::arg("batch"), py::arg("rows"), py::arg("max_tokens"), py::arg("device"),
      py::call_guard<py::gil_scoped_release>(),
      "KV splits mla_decode_cuda uses for B = batch requests of rows = Sq * H query rows and max_tokens = M * P "
      "cache positions per request, on CUDA device `device` (from the shapes and the SM count only).");

  m.def(
      "cuda_device_problem",
      [](int device) -> std::string {
#ifdef R1K_WITH_CUDA
        return cuda_device_problem(device);
#else
        (void)device;
        return "r1kernels._C was built without its CUDA part";
#endif
      },
      py::arg("device"), py::call_guard<py::gil_scoped_release>(),
      "'' if this module's CUDA kernels can run on CUDA device `device`, else why not (no image for its "
      "architecture, no driver, no such device).");
}
