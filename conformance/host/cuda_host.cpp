// Test-only library `softsplat_cuda_host`: the CUDA kernels of csrc/cuda/kernels.cuh and their
// launchers, compiled by g++ through the host shim and registered for CPU tensors, so the
// conformance suite executes the real kernel logic on a machine without a GPU.
#include "shim.h"

#define SOFTSPLAT_DEVICE_GUARD(tensor)
#define SOFTSPLAT_LAUNCH(kernel, blocks, threads, ...) \
  softsplat_host::launch(kernel, softsplat_host::dim3(blocks), softsplat_host::dim3(threads), __VA_ARGS__)

#include "schemas.h"
#include "tensor.h"
#include "cuda/launch.h"

SOFTSPLAT_HOST_THREAD_PROBE

STABLE_TORCH_LIBRARY(softsplat_cuda_host, m) { SOFTSPLAT_DEFINE_OPS(m); }

STABLE_TORCH_LIBRARY_IMPL(softsplat_cuda_host, CPU, m) {
  m.impl("splat_forward", TORCH_BOX(&softsplat::launch::splat_forward));
  m.impl("splat_backward", TORCH_BOX(&softsplat::launch::splat_backward));
  m.impl("splat_maximum", TORCH_BOX(&softsplat::launch::splat_maximum));
}
