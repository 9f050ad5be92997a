// What every CPU kernel reads: element strides of a tensor, the flow and metric of a call
// (Sources) with each row's per-pixel weights, and the fixed orders the kernels keep.
#pragma once

#include "../tensor.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../taps.h"
#include "simd.h"

namespace softsplat {
namespace cpu {

// A new output of a megabytes or more asked onto 2 MB pages (Linux, where transparent huge pages
// are given on request: THP "madvise", the common default), before its first write: writing a
// fresh buffer then faults once per 2 MB instead of once per 4 KB page, which on a 132 MB result
// ([1, 64, 540, 960] float) takes as long as the splat itself. Only the 2 MB-aligned interior is
// advised; pages already in use are left as they are; nothing changes where THP is off.
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * static_cast<uintptr_t>(t.element_size());
  if (start == 0 || bytes < 2 * kHuge) return;
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)t;
#endif
}

struct View4 {  // element strides of an [N, C, H, W] tensor
  int64_t n, c, y, x;
  explicit View4(const Tensor& t) : n(t.stride(0)), c(t.stride(1)), y(t.stride(2)), x(t.stride(3)) {}
  View4() : n(0), c(0), y(0), x(0) {}
  int64_t at(int64_t in, int64_t ic, int64_t iy, int64_t ix) const { return in * n + ic * c + iy * y + ix * x; }
};

// The flow [N, 2, H, W] and metric [N, 1, H, W] (null for sum and avg), both contiguous.
template <typename acc_t>
struct Sources {
  const acc_t* flow;
  const acc_t* metric;
  int64_t H, W;
  int kind;
  const acc_t* maximum;  // stable: M [N, 1, H, W] contiguous; else null
  const acc_t* shift = nullptr;  // soft: w = exp(metric - shift[n]) (StableShortcut), else exp(metric)

  const acc_t* flow_row(int64_t n, int64_t component, int64_t y) const { return flow + ((n * 2 + component) * H + y) * W; }
  const acc_t* metric_row(int64_t n, int64_t y) const { return metric + (n * H + y) * W; }

  // The per-pixel weights w of source row y: pixel_weight (1, metric or exp(metric)), computed
  // a row at a time so that exp vectorises; soft with a shift: exp(metric - shift[n]). Stable:
  // the metric (TapChunk::fill_stable).
  void row_weights(int64_t n, int64_t y, acc_t* w) const {
    if (!metric) {
      std::fill(w, w + W, acc_t(1));
      return;
    }
    const acc_t* m = metric_row(n, y);
    if (kind == SOFT && shift) {
      for (int64_t x = 0; x < W; ++x) w[x] = m[x] - shift[n];
      exp_inplace(w, W);
    } else if (kind == SOFT) {
      exp_copy(m, w, W);
    } else {
      std::copy(m, m + W, w);
    }
  }
};

// f(std::integral_constant<int, code>()) for a normalisation code, so that a loop inside f sees
// it as a constant (with it a variable, loops did not vectorise).
template <typename F>
void with_normalisation(int normalisation, const F& f) {
  switch (normalisation) {
    case ADDEPS: f(std::integral_constant<int, ADDEPS>()); break;
    case ZEROEPS: f(std::integral_constant<int, ZEROEPS>()); break;
    case CLIPEPS: f(std::integral_constant<int, CLIPEPS>()); break;
    default: f(std::integral_constant<int, RAW>());
  }
}

// How the CPU kernels finish a target of four channels or more: x / D' as x * (1 / D'), one
// division per target instead of one per channel (up to three channels, where the division is
// not what costs, they divide). The product is within about an ulp of the quotient unless
// 1 / D' is out of the normal range, |D'| within (0, 2^-126) or (2^126, inf) in float
// ((0, 2^-1022), (2^1022, inf) in double); there it is the quotient itself (with D' 0, inf or
// NaN the two are the same). A function of x and D' alone: every path finishes a target to
// the same bits.
template <typename T>
inline bool finishes_by_product(T divisor) {
  constexpr T low = std::numeric_limits<T>::min(), high = T(1) / std::numeric_limits<T>::min();
  const T size = divisor < T(0) ? -divisor : divisor;
  return !((size > T(0)) & (size < low)) & !((size > high) & (size < std::numeric_limits<T>::infinity()));
}

template <typename T>
inline T finished(T x, T divisor, T factor) {
  return finishes_by_product(divisor) ? x * factor : x / divisor;
}

// factor[x] = 1 / divisor[x] for a row of W targets; whether every target of it finishes by the
// product (then x * factor[x] finishes each, in a loop that vectorises).
template <typename T>
inline bool finishing_factors(const T* __restrict divisor, T* __restrict factor, int64_t W) {
  int quotients = 0;
  for (int64_t x = 0; x < W; ++x) {
    factor[x] = T(1) / divisor[x];
    quotients |= !finishes_by_product(divisor[x]);
  }
  return !quotients;
}

// visit(i) for a chunk's pixels i < count in the order the scatters take them: even columns,
// then odd ones. Pixels side by side usually share two targets; visited one after the other,
// each update would wait for the previous one's store. Fixed, so sums stay reproducible. Two
// plain loops, which are cheaper than an index computed per pixel.
template <typename Visit>
inline void in_pixel_order(int64_t count, const Visit& visit) {
  for (int64_t first = 0; first < 2; ++first)
    for (int64_t i = first; i < count; i += 2) visit(i);
}

}  // namespace cpu
}  // namespace softsplat
