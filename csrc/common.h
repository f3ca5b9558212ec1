// Shared by every native file (C++ and CUDA host code): dtype codes, the error macros, and the
// fp16 / bf16 <-> fp32 conversions the CPU kernels use.
//
// The extension never includes torch headers (DESIGN "The compiled extension"): tensors arrive as raw
// pointers plus sizes, row strides in elements and one of the dtype codes below, which the Python side
// (r1kernels/ops/_native.py) writes from torch dtypes.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace r1k {

// The dtype codes of the Python <-> native boundary. Keep in step with DTYPE_CODES in
// r1kernels/ops/_native.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline int dtype_size(int code) { return code == kFloat32 ? 4 : 2; }

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
inline void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

// Concatenates the arguments with operator<< (so messages can carry the offending value).
template <typename... Args>
inline std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  return os.str();
}

}  // namespace r1k

// Argument errors: pybind11 translates std::invalid_argument into Python's ValueError, so a bad size or
// pointer reaches the caller as ValueError without this header depending on pybind11 (the .cu files
// include it too). Usage: R1K_CHECK(d >= 0, "rms_norm: d must be >= 0, got ", d);
#define R1K_CHECK(cond, ...)                                                 \
  do {                                                                       \
    if (!(cond)) throw std::invalid_argument(::r1k::str_cat(__VA_ARGS__));   \
  } while (0)

// Failures that are not the caller's argument (CUDA runtime errors, ...): RuntimeError in Python.
#define R1K_FAIL(...) throw std::runtime_error(::r1k::str_cat(__VA_ARGS__))

namespace r1k {

// ---------------------------------------------------------------------------------------------------
// fp16 / bf16 <-> fp32 on the CPU, as bit manipulation (no compiler half-float type needed, so the same
// code builds with any C++17 compiler and target). The functions are branch-free (a choice between two
// computed values is an integer mask) so that GCC and Clang vectorise the loops that call them. All round
// to nearest even, as torch does, so a CPU kernel output matches a torch cast of the same fp32 value bit
// for bit; NaN stays a quiet NaN, with no promise about its payload (torch's own scalar and vector
// conversions disagree on it).
// These rely on exact IEEE fp32 arithmetic: never compile them with -ffast-math.

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// bf16 is the top half of an fp32, so widening is a shift.
inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. NaN must not round into
  // infinity, so it becomes the quiet NaN 0x7FC0 (as c10::BFloat16's scalar conversion does).
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
  return static_cast<uint16_t>((0x7FC0u & is_nan) | (rounded & ~is_nan));
}

// IEEE half -> fp32, the exponent-rebias scheme of Maratyszcza's FP16 library: shift the half's exponent
// and mantissa into fp32 position and rescale by 2^-112 (normal numbers); subnormals go through a magic
// number subtraction. Both are computed and one is kept.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // drops the sign
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = 1u << 27;
  // An integer mask rather than `?:`: GCC will not if-convert a select between two fp results under its
  // default -ftrapping-math, and the branch would stop the caller's loop from vectorising.
  const uint32_t use_denormal = 0u - static_cast<uint32_t>(two_w < denormalized_cutoff);
  const uint32_t bits = sign | (f32_to_bits(denormalized) & use_denormal) | (f32_to_bits(normalized) & ~use_denormal);
  return f32_from_bits(bits);
}

// fp32 -> IEEE half, round to nearest even, overflow to infinity, NaN to the signed quiet NaN 0x7E00 (as
// c10::Half's scalar conversion does). The scale_to_inf / scale_to_zero products let the fp32 adder do the rounding
// (same scheme as above).
inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const float abs_f = f32_from_bits(w & 0x7fffffffu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);  // integer mask, see f16_to_f32
  return static_cast<uint16_t>((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan));
}

// Storage of each dtype code in the CPU kernels (fp16 and bf16 travel as their 16-bit patterns) and the
// widening / narrowing to fp32, selected at compile time so the loops that use them stay vectorisable.
template <int DT> struct Storage { using type = uint16_t; };
template <> struct Storage<kFloat32> { using type = float; };
template <int DT> using storage_t = typename Storage<DT>::type;

template <int DT>
inline float widen(storage_t<DT> v) {
  if constexpr (DT == kFloat32) return v;
  else if constexpr (DT == kFloat16) return f16_to_f32(v);
  else return bf16_to_f32(v);
}

template <int DT>
inline storage_t<DT> narrow(float v) {
  if constexpr (DT == kFloat32) return v;
  else if constexpr (DT == kFloat16) return f32_to_f16(v);
  else return f32_to_bf16(v);
}

}  // namespace r1k
