// Runs CUDA kernels on the CPU, for tests: compiled by g++ (C++20) from the very same kernel
// source as nvcc and NVRTC compile. blockIdx/threadIdx are thread-local; a launch is a parallel
// loop over blocks, each running its threads one after another; atomicAdd is a real atomic
// (std::atomic_ref), so blocks on different CPU threads race exactly as they may on a GPU, and
// computes what the device's does: float32 adds flush subnormals to zero. Built, as the device
// code, without contraction into FMAs (-ffp-contract=off; nvcc --fmad=false). The
// splatting kernels use neither shared memory nor __syncthreads, which this shim does not offer.
#pragma once

#include "tensor.h"

#include <atomic>
#include <bit>
#include <cmath>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

namespace softsplat_host {

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

// A subnormal float32 flushed to zero (of its sign), as the GPU's float32 atomic add does
// with its operands and its result (SASS RED.E.ADD.F32.FTZ.RN).
inline float flush_subnormal(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v; }

template <typename T>
inline T atomicAdd(T* address, T value) {
  if constexpr (std::is_same_v<T, float>) {  // as the device: flush to zero (FTZ)
    std::atomic_ref<float> target(*address);
    float seen = target.load(std::memory_order_relaxed);
    while (!target.compare_exchange_weak(seen, flush_subnormal(flush_subnormal(seen) + flush_subnormal(value)),
                                         std::memory_order_relaxed)) {
    }
    return seen;
  } else {  // float64 atomics keep subnormals on the device too
    return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
  }
}

// Integer atomic max and min (the scatter-max's), returning the value seen, as CUDA's do.
template <typename T>
inline T atomicMax(T* address, T value) {
  std::atomic_ref<T> target(*address);
  T seen = target.load(std::memory_order_relaxed);
  while (seen < value && !target.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
  return seen;
}

template <typename T>
inline T atomicMin(T* address, T value) {
  std::atomic_ref<T> target(*address);
  T seen = target.load(std::memory_order_relaxed);
  while (value < seen && !target.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
  return seen;
}

inline unsigned int __float_as_uint(float v) { return std::bit_cast<unsigned int>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __uint_as_float(unsigned int v) { return std::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }

// Runs blocks [first, last) of a launch of `grid` blocks (a test can run a few blocks of a
// grid too large to run whole).
template <typename... Parameters, typename... Arguments>
void launch_blocks(void (*kernel)(Parameters...), dim3 grid, dim3 block, unsigned int first, unsigned int last,
                   Arguments... arguments) {
  torch::stable::parallel_for(first, last, 1, [&](int64_t begin, int64_t end) {
    gridDim = grid;
    blockDim = block;
    for (int64_t b = begin; b < end; ++b) {
      blockIdx = dim3(static_cast<unsigned int>(b));
      for (unsigned int t = 0; t < block.x; ++t) {
        threadIdx = dim3(t);
        kernel(static_cast<Parameters>(arguments)...);
      }
    }
  });
}

template <typename... Parameters, typename... Arguments>
void launch(void (*kernel)(Parameters...), dim3 grid, dim3 block, Arguments... arguments) {
  launch_blocks(kernel, grid, block, 0, grid.x, arguments...);
}

}  // namespace softsplat_host

using softsplat_host::__double_as_longlong;
using softsplat_host::__float_as_int;
using softsplat_host::__float_as_uint;
using softsplat_host::__longlong_as_double;
using softsplat_host::__uint_as_float;
using softsplat_host::atomicAdd;
using softsplat_host::atomicMax;
using softsplat_host::atomicMin;
using softsplat_host::blockDim;
using softsplat_host::blockIdx;
using softsplat_host::gridDim;
using softsplat_host::threadIdx;
