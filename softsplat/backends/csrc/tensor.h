// What the compiled code uses of torch: only torch's stable ABI (torch/csrc/stable and
// torch/headeronly), so one compiled library serves every torch release from the oldest the
// build targets on (TORCH_TARGET_VERSION, set by the build; docs/design.md, "Prebuilt
// libraries"). Tensors, allocation, dtype dispatch and the CPU thread pool come from here.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace softsplat {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

// The dtype the kernels accumulate in for scalar_t: float for Half and BFloat16, else scalar_t.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, Half> || std::is_same_v<scalar_t, BFloat16>, float, scalar_t>;

// "[2, 3, 4, 5]", for messages.
inline std::string shape(const Tensor& t) {
  std::ostringstream text;
  text << "[";
  for (int64_t d = 0; d < t.dim(); ++d) text << (d ? ", " : "") << t.size(d);
  text << "]";
  return text.str();
}

inline std::string device_name(const Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : t.is_cpu() ? "cpu" : "another device";
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && a.is_cpu() == b.is_cpu() && a.get_device_index() == b.get_device_index();
}

// A new uninitialised tensor of `dtype` on `like`'s device.
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
}

inline Tensor empty(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_empty(like, sizes, dtype);
}

inline Tensor zeros(std::initializer_list<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_zeros(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
}

inline Tensor full(std::initializer_list<int64_t> sizes, double value, ScalarType dtype, const Tensor& like) {
  Tensor t = empty(sizes, dtype, like);
  torch::stable::fill_(t, value);
  return t;
}

// `t` itself when contiguous (no call into torch), else a contiguous copy.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// t's data as T* (nullptr for an undefined tensor).
template <typename T>
inline T* ptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// f(scalar_t{}) for float32 and float64 (and, with `halves`, float16 and bfloat16); for another
// dtype, an error naming `what`.
template <bool halves, typename F>
inline void dispatch_floating(ScalarType type, const char* what, const F& f) {
  if (type == ScalarType::Float) return f(float{});
  if (type == ScalarType::Double) return f(double{});
  if constexpr (halves) {
    if (type == ScalarType::Half) return f(Half{});
    if (type == ScalarType::BFloat16) return f(BFloat16{});
  }
  STD_TORCH_CHECK(false, what, ": expected ", halves ? "float32, float64, float16 or bfloat16" : "float32 or float64",
                  ", got ", torch::headeronly::toString(type));
}

}  // namespace softsplat
