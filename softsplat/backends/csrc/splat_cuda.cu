// The cpp backend's CUDA implementation of the `softsplat` ops (defined in library.cpp):
// kernels run on the input's device (device guard) and on that device's current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define SOFTSPLAT_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())
#define SOFTSPLAT_LAUNCH(kernel, blocks, threads, ...)                                   \
  do {                                                                                  \
    kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                     \
  } while (0)

#include "splat_cuda_launch.h"

TORCH_LIBRARY_IMPL(softsplat, CUDA, m) {
  m.impl("splat_forward", &softsplat::launch::splat_forward);
  m.impl("splat_backward", &softsplat::launch::splat_backward);
  m.impl("splat_maximum", &softsplat::launch::splat_maximum);
}
