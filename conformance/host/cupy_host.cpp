// Test-only library for the `cupy-host` backend: every kernel instantiation the cupy backend
// asks NVRTC for, compiled by g++ through the host shim, and one C entry point that launches
// one by its NVRTC name expression with its arguments as CUDA's launch API takes them (an array
// of pointers to the argument values, cuLaunchKernel's kernelParams). So the cupy backend's
// own Python side (what it passes, in which order, of which type) runs against the kernels on
// the CPU, exactly as its converted arguments would reach them on a GPU.
#include "shim.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/kernels.cuh"

namespace {

using Launcher = void (*)(unsigned int blocks, unsigned int threads, void** arguments);

template <typename Kernel>
struct arity;
template <typename... Parameters>
struct arity<void (*)(Parameters...)> : std::integral_constant<size_t, sizeof...(Parameters)> {};

template <typename... Parameters, size_t... I>
void launch_with(void (*kernel)(Parameters...), unsigned int blocks, unsigned int threads, void** arguments,
                 std::index_sequence<I...>) {
  softsplat_host::launch(kernel, softsplat_host::dim3(blocks), softsplat_host::dim3(threads),
                         *static_cast<std::remove_cv_t<Parameters>*>(arguments[I])...);
}

template <auto kernel>
void launcher(unsigned int blocks, unsigned int threads, void** arguments) {
  launch_with(kernel, blocks, threads, arguments, std::make_index_sequence<arity<decltype(kernel)>::value>());
}

template <typename scalar_t, typename acc_t, typename index_t>
void add(std::map<std::string, Launcher>& table, const std::string& scalar, const std::string& acc,
         const std::string& index) {
  using namespace softsplat;
  const std::string sai = "<" + scalar + ", " + acc + ", " + index + ">", ai = "<" + acc + ", " + index + ">";
  table["softsplat::splat_forward_kernel" + sai] = &launcher<&splat_forward_kernel<scalar_t, acc_t, index_t>>;
  table["softsplat::splat_backward_kernel" + sai] = &launcher<&splat_backward_kernel<scalar_t, acc_t, index_t>>;
  // the atomic forward's result, and (16-bit inputs) rounded to input's dtype; the ordered
  // forward's 16-bit result rounded
  table["softsplat::splat_finish_kernel<" + acc + ", " + acc + ", " + index + ">"] =
      &launcher<&splat_finish_kernel<acc_t, acc_t, index_t>>;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    table["softsplat::splat_finish_kernel" + sai] = &launcher<&splat_finish_kernel<scalar_t, acc_t, index_t>>;
    table["softsplat::splat_normalise_kernel" + sai] = &launcher<&splat_normalise_kernel<scalar_t, acc_t, index_t>>;
  }
  table["softsplat::splat_maximum_kernel" + ai] = &launcher<&splat_maximum_kernel<acc_t, index_t>>;
  table["softsplat::splat_backward_prepare_kernel" + ai] = &launcher<&splat_backward_prepare_kernel<acc_t, index_t>>;
  // the ordered forward
  const std::string i = "<" + index + ">";
  table["softsplat::splat_key_kernel" + ai] = &launcher<&splat_key_kernel<acc_t, index_t>>;
  table["softsplat::splat_ends_kernel" + i] = &launcher<&splat_ends_kernel<index_t>>;
  table["softsplat::splat_weigh_kernel" + ai] = &launcher<&splat_weigh_kernel<acc_t, index_t>>;
  table["softsplat::splat_gather_kernel" + sai] = &launcher<&splat_gather_kernel<scalar_t, acc_t, index_t>>;
}

template <typename index_t>
void add_all(std::map<std::string, Launcher>& table, const std::string& index) {
  add<float, float, index_t>(table, "float", "float", index);
  add<double, double, index_t>(table, "double", "double", index);
  add<softsplat::Half, float, index_t>(table, "__half", "float", index);  // the same 16 bits as CUDA's
  add<softsplat::BFloat16, float, index_t>(table, "__nv_bfloat16", "float", index);
}

const std::map<std::string, Launcher>& table() {
  static const std::map<std::string, Launcher> kernels = [] {
    std::map<std::string, Launcher> t;
    add_all<int>(t, "int");
    add_all<long long>(t, "long long");
    return t;
  }();
  return kernels;
}

// Visits the grid-stride loop of every kernel (SOFTSPLAT_KERNEL_LOOP) makes over `total` items,
// counted, with the smallest and largest index seen; stops counting past `limit` (a loop whose
// index wrapped around would otherwise not end).
template <typename index_t>
__global__ void loop_probe_kernel(index_t total, long long limit, long long* visits, long long* smallest,
                                  long long* largest) {
  SOFTSPLAT_KERNEL_LOOP(i, total) {
    if (++*visits > limit) break;
    *smallest = std::min<long long>(*smallest, i);
    *largest = std::max<long long>(*largest, i);
  }
}

}  // namespace

// Blocks [first, last) of a launch of loop_probe_kernel over `total` items on `blocks` blocks of
// `threads`, with a 64-bit index if `wide`, else a 32-bit one; one CPU thread runs them.
// Returns the visits; smallest and largest: the indices seen.
extern "C" long long softsplat_host_loop_probe(int wide, long long total, unsigned int blocks, unsigned int threads,
                                               unsigned int first, unsigned int last, long long limit,
                                               long long* smallest, long long* largest) {
  long long visits = 0;
  *smallest = LLONG_MAX;
  *largest = LLONG_MIN;
  for (unsigned int b = first; b < last; ++b) {  // one block at a time: the counters are plain
    if (wide)
      softsplat_host::launch_blocks(&loop_probe_kernel<long long>, softsplat_host::dim3(blocks),
                                    softsplat_host::dim3(threads), b, b + 1, total, limit, &visits, smallest, largest);
    else
      softsplat_host::launch_blocks(&loop_probe_kernel<int>, softsplat_host::dim3(blocks), softsplat_host::dim3(threads),
                                    b, b + 1, static_cast<int>(total), limit, &visits, smallest, largest);
  }
  return visits;
}

SOFTSPLAT_HOST_THREAD_PROBE

// Launches the kernel named `name` (an NVRTC name expression) on `blocks` x `threads`; returns 0,
// or 1 for an unknown name.
extern "C" int softsplat_host_launch(const char* name, unsigned int blocks, unsigned int threads, void** arguments) {
  const auto found = table().find(name);
  if (found == table().end()) return 1;
  found->second(blocks, threads, arguments);
  return 0;
}
