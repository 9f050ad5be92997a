// Runs CUDA kernels on the CPU, for tests: compiled by g++ (C++20) from the very same kernel
// source as nvcc and NVRTC compile. blockIdx/threadIdx are thread-local; a launch is a parallel
// loop over blocks, each running its threads one after another; atomicAdd is a real atomic
// (std::atomic_ref), so blocks on different CPU threads race exactly as they may on a GPU, and
// computes what the device's does: float32 adds flush subnormals to zero. As a GPU promises no
// order, neither does a launch here: its blocks run in a shuffled order, and each block's
// threads in a rotated, possibly reversed order, drawn afresh for every launch (from a launch
// counter and SOFTSPLAT_HOST_SEED), so code whose result depends on the order of its atomic
// adds gives different bits from launch to launch here too. Built, as the device
// code, without contraction into FMAs (-ffp-contract=off; nvcc --fmad=false). The
// splatting kernels use neither shared memory nor __syncthreads, which this shim does not offer.
#pragma once

#include "tensor.h"

#include <atomic>
#include <bit>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <type_traits>
#include <vector>

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

// The work counter: while on, the launches and the atomic operations the kernels issue are
// counted (one atomic add, or max or min, per call of atomicAdd, atomicMax, atomicMin), and the
// most atomic adds one GPU thread issued, so a test can pin what the device code does per call,
// per pixel and per thread (docs/performance.md).
struct WorkCounter {
  std::atomic<bool> on{false};
  std::atomic<long long> launches{0}, adds{0}, maxima{0}, busiest{0};
};

inline WorkCounter& work_counter() {
  static WorkCounter counter;
  return counter;
}

inline thread_local long long thread_adds = 0;  // the atomic adds of the GPU thread running here

inline void count_work(std::atomic<long long> WorkCounter::*field) {
  WorkCounter& counter = work_counter();
  if (!counter.on.load(std::memory_order_relaxed)) return;
  (counter.*field).fetch_add(1, std::memory_order_relaxed);
  if (field == &WorkCounter::adds) ++thread_adds;
}

// The adds of the GPU thread that just ran (thread_adds), kept if the most yet.
inline void count_thread() {
  WorkCounter& counter = work_counter();
  long long seen = counter.busiest.load(std::memory_order_relaxed);
  while (seen < thread_adds && !counter.busiest.compare_exchange_weak(seen, thread_adds, std::memory_order_relaxed)) {
  }
  thread_adds = 0;
}

// A subnormal float32 flushed to zero (of its sign), as the GPU's float32 atomic add does
// with its operands and its result (SASS RED.E.ADD.F32.FTZ.RN).
inline float flush_subnormal(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v; }

// target += value, flushed as the device's float32 atomic add (FTZ); returns the value seen.
inline float add_flushed(float* address, float value) {
  std::atomic_ref<float> target(*address);
  float seen = target.load(std::memory_order_relaxed);
  while (!target.compare_exchange_weak(seen, flush_subnormal(flush_subnormal(seen) + flush_subnormal(value)),
                                       std::memory_order_relaxed)) {
  }
  return seen;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  count_work(&WorkCounter::adds);
  if constexpr (std::is_same_v<T, float>) {  // as the device: flush to zero (FTZ)
    return add_flushed(address, value);
  } else {  // float64 atomics keep subnormals on the device too
    return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
  }
}

// sm_90's vector reduction: four float lanes added by one atomic operation (counted once, as
// the device issues one REDG.E.ADD.F32x4), each lane a float32 atomic add as above. The
// kernels take it here as nvcc compiles them for sm_90 (kernels.cuh, add_quad).
#define SOFTSPLAT_VECTOR_ATOMICS 1

struct alignas(16) float4 {
  float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline float4 atomicAdd(float4* address, float4 value) {
  if (reinterpret_cast<std::uintptr_t>(address) % 16 != 0) {  // a fault on the device
    std::fprintf(stderr, "softsplat host shim: float4 atomicAdd at %p, not 16-byte aligned\n", static_cast<void*>(address));
    std::abort();
  }
  count_work(&WorkCounter::adds);
  float* lane = &address->x;
  return float4{add_flushed(lane, value.x), add_flushed(lane + 1, value.y), add_flushed(lane + 2, value.z),
                add_flushed(lane + 3, value.w)};
}

// Integer atomic max and min (the scatter-max's), returning the value seen, as CUDA's do.
template <typename T>
inline T atomicMax(T* address, T value) {
  count_work(&WorkCounter::maxima);
  std::atomic_ref<T> target(*address);
  T seen = target.load(std::memory_order_relaxed);
  while (seen < value && !target.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
  return seen;
}

template <typename T>
inline T atomicMin(T* address, T value) {
  count_work(&WorkCounter::maxima);
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

// The orders of one launch: SplitMix64 of the launch's seed and an index.
inline uint64_t mix(uint64_t value) {
  value += 0x9e3779b97f4a7c15ULL;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ULL;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebULL;
  return value ^ (value >> 31);
}

// A new seed for every launch of the process: SOFTSPLAT_HOST_SEED (default 0) and a launch count.
inline uint64_t launch_seed() {
  static const uint64_t base = [] {
    const char* text = std::getenv("SOFTSPLAT_HOST_SEED");
    return text ? std::strtoull(text, nullptr, 10) : 0ULL;
  }();
  static std::atomic<uint64_t> launches{0};
  return mix(base ^ mix(launches.fetch_add(1, std::memory_order_relaxed)));
}

// The thread probe: while on, every GPU thread's run is timed (CPU time) and the longest
// and the total kept, so a test can see how the work of a launch is spread over its threads (a
// GPU runs its threads in parallel: a launch takes at least as long as its longest thread).
struct ThreadProbe {
  std::atomic<bool> on{false};
  std::atomic<long long> longest{0}, total{0};
};

// The CPU time of the calling thread (ns): what the thread ran, not time others ran while it waited.
inline long long thread_time() {
  timespec now;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return now.tv_sec * 1000000000LL + now.tv_nsec;
}

inline ThreadProbe& thread_probe() {
  static ThreadProbe probe;
  return probe;
}

// Runs blocks [first, last) of a launch of `grid` blocks (a test can run a few blocks of a
// grid too large to run whole): in a shuffled order, on torch's CPU threads, each block's
// threads from a drawn start, forwards or backwards.
template <typename... Parameters, typename... Arguments>
void launch_blocks(void (*kernel)(Parameters...), dim3 grid, dim3 block, unsigned int first, unsigned int last,
                   Arguments... arguments) {
  const uint64_t seed = launch_seed();
  std::vector<unsigned int> order(last - first);
  std::iota(order.begin(), order.end(), first);
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[mix(seed + i) % i]);  // Fisher-Yates
  torch::stable::parallel_for(0, static_cast<int64_t>(order.size()), 1, [&](int64_t begin, int64_t end) {
    gridDim = grid;
    blockDim = block;
    for (int64_t i = begin; i < end; ++i) {
      const unsigned int b = order[i];
      blockIdx = dim3(b);
      const uint64_t draw = mix(seed ^ (0x5851f42d4c957f2dULL * (b + 1ULL)));
      const unsigned int start = static_cast<unsigned int>(draw % block.x);
      const bool backwards = (draw >> 63) != 0;
      const bool timed = thread_probe().on.load(std::memory_order_relaxed);
      for (unsigned int step = 0; step < block.x; ++step) {
        threadIdx = dim3((start + (backwards ? block.x - 1 - step : step)) % block.x);
        if (!timed) {
          kernel(static_cast<Parameters>(arguments)...);
          count_thread();
          continue;
        }
        const long long begin = thread_time();
        kernel(static_cast<Parameters>(arguments)...);
        const long long took = thread_time() - begin;
        count_thread();
        ThreadProbe& probe = thread_probe();
        probe.total.fetch_add(took, std::memory_order_relaxed);
        long long seen = probe.longest.load(std::memory_order_relaxed);
        while (seen < took && !probe.longest.compare_exchange_weak(seen, took, std::memory_order_relaxed)) {
        }
      }
    }
  });
}

template <typename... Parameters, typename... Arguments>
void launch(void (*kernel)(Parameters...), dim3 grid, dim3 block, Arguments... arguments) {
  count_work(&WorkCounter::launches);
  launch_blocks(kernel, grid, block, 0, grid.x, arguments...);
}

}  // namespace softsplat_host

// The thread probe of this library: switched on (or off) by `on`; returns the longest and the
// total run of one GPU thread (ns) since the last call, and starts both afresh. Also defines the
// work counter's entry, softsplat_host_work_counts.
#define SOFTSPLAT_HOST_THREAD_PROBE                                                                  \
  extern "C" void softsplat_host_thread_probe(int on, long long* longest, long long* total) {      \
    softsplat_host::ThreadProbe& probe = softsplat_host::thread_probe();                           \
    *longest = probe.longest.exchange(0);                                                         \
    *total = probe.total.exchange(0);                                                             \
    probe.on.store(on != 0);                                                                      \
  }                                                                                               \
  /* The work counter likewise: launches, atomic adds, atomic maxima and minima, the most atomic  \
     adds of one GPU thread. */                                                                   \
  extern "C" void softsplat_host_work_counts(int on, long long* launches, long long* adds, long long* maxima, \
                                             long long* busiest) {                                \
    softsplat_host::WorkCounter& counter = softsplat_host::work_counter();                         \
    *launches = counter.launches.exchange(0);                                                     \
    *adds = counter.adds.exchange(0);                                                             \
    *maxima = counter.maxima.exchange(0);                                                         \
    *busiest = counter.busiest.exchange(0);                                                       \
    counter.on.store(on != 0);                                                                    \
  }

using softsplat_host::__double_as_longlong;
using softsplat_host::__float_as_int;
using softsplat_host::__float_as_uint;
using softsplat_host::__longlong_as_double;
using softsplat_host::__uint_as_float;
using softsplat_host::atomicAdd;
using softsplat_host::atomicMax;
using softsplat_host::atomicMin;
using softsplat_host::float4;
using softsplat_host::make_float4;
using softsplat_host::blockDim;
using softsplat_host::blockIdx;
using softsplat_host::gridDim;
using softsplat_host::threadIdx;
