// Can this module's CUDA code run on a given device? Answered by asking the runtime for the attributes of
// a kernel compiled with the same architecture flags as every other kernel here: that fails exactly when
// the module holds no image (SASS for the device, or PTX it can JIT) for the device, and when the driver
// is too old for this runtime, so `backend="auto"` can pass over the CUDA backend instead of failing at
// the first launch with "no kernel image is available".
#include <string>

#include "../ops.h"
#include "utils.cuh"

namespace r1k {
namespace cuda {
namespace {
__global__ void probe_kernel() {}
}  // namespace
}  // namespace cuda

std::string cuda_device_problem(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it, so that it does not resurface at the next launch check
    return str_cat("the CUDA runtime of r1kernels._C cannot see a device (", cudaGetErrorName(err), ": ",
                   cudaGetErrorString(err), ")");
  }
  if (device < 0 || device >= count) return str_cat("CUDA device ", device, " does not exist (", count, " visible)");
  int prev = 0;
  err = cudaGetDevice(&prev);
  if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  cudaFuncAttributes attr{};
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, cuda::probe_kernel);
  if (prev != device) cudaSetDevice(prev);
  if (err != cudaSuccess) {
    cudaGetLastError();
    cudaDeviceProp prop{};
    std::string arch = "an unknown architecture";
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) arch = str_cat("sm_", prop.major, prop.minor);
    cudaGetLastError();
    return str_cat("r1kernels._C has no CUDA code that runs on device ", device, " (", arch, "; built for ",
                   R1K_CUDA_ARCHS_STR, "): ", cudaGetErrorName(err), ": ", cudaGetErrorString(err),
                   ". Rebuild with R1K_CUDA_ARCHS including this device's architecture");
  }
  return "";
}

}  // namespace r1k
