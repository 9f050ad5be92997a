// The cpp backend's CUDA implementation of the `softsplat` ops (defined in library.cpp):
// kernels run on the input's device (device guard) and on that device's current stream. Only
// torch's stable ABI is used (tensor.h), as by the CPU kernels.
#include <cuda_runtime.h>

#ifndef USE_CUDA
#define USE_CUDA  // declares the C shim's CUDA functions (the current stream)
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "../tensor.h"

namespace softsplat {
namespace launch {

// The current stream of the current device (the guard made it the input's).
inline cudaStream_t current_stream() {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(torch::stable::accelerator::getCurrentDeviceIndex(), &stream) ==
                      AOTI_TORCH_SUCCESS,
                  "softsplat: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

inline void check_launch() {
  const cudaError_t error = cudaGetLastError();
  STD_TORCH_CHECK(error == cudaSuccess, "softsplat: CUDA kernel launch failed: ", cudaGetErrorString(error));
}

}  // namespace launch
}  // namespace softsplat

#define SOFTSPLAT_DEVICE_GUARD(tensor) \
  const torch::stable::accelerator::DeviceGuard device_guard((tensor).get_device_index())
#define SOFTSPLAT_LAUNCH(kernel, blocks, threads, ...)                                        \
  do {                                                                                       \
    kernel<<<blocks, threads, 0, softsplat::launch::current_stream()>>>(__VA_ARGS__);         \
    softsplat::launch::check_launch();                                                       \
  } while (0)

#include "launch.h"

STABLE_TORCH_LIBRARY_IMPL(softsplat, CUDA, m) {
  m.impl("splat_forward", TORCH_BOX(&softsplat::launch::splat_forward));
  m.impl("splat_backward", TORCH_BOX(&softsplat::launch::splat_backward));
  m.impl("splat_maximum", TORCH_BOX(&softsplat::launch::splat_maximum));
}
