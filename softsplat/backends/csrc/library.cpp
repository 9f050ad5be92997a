// The `softsplat` op library: the schemas, defined once for every device. The CPU kernels
// (cpu/ops.cpp) and the CUDA launchers (cuda/ops.cu) register their implementations of them.
#include "tensor.h"

#include "schemas.h"

STABLE_TORCH_LIBRARY(softsplat, m) {
  SOFTSPLAT_DEFINE_OPS(m);
  SOFTSPLAT_DEFINE_FUSED_STABLE(m);
}
