// The Python module r1kernels._C: argument validation and the pybind11 glue around the native kernels.
//
// Letters: N rows (n_rows), D the normalised dim (d).
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
