// Stable soft splatting's shortcut (StableShortcut) and the metric ranges that decide it.
#pragma once

#include "../tensor.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace softsplat {
namespace cpu {

// Stable splatting's shortcut. A tap's weight is exp(m - M(t)) (m the pixel's metric, M(t) the
// target's maximum) = exp(m - R) * exp(R - M(t)) for any R. With R the image's largest metric,
// the scatter splats plain soft weights exp(m - R) <= 1, and once a target's sums are final
// they are multiplied by exp(R - M(t)): one exp per pixel and one per target, instead of one
// per tap. Both factors stay finite: M(t) >= m for every pixel with a tap on t, so where a sum
// holds a contribution R - M(t) <= R - m <= kStableSpread (elsewhere the exponent is clamped to
// it, and multiplies zeros). Taken for an image whose metrics are all finite and spread over at
// most kStableSpread, so that no weight exp(m - R) nears the subnormals (e^-40 in float32,
// where products with the tap weights and the input stay normal); other images take the
// per-tap weights. Equal to them up to rounding: an exp and a product more per term.
template <typename acc_t>
constexpr acc_t kStableSpread = sizeof(acc_t) == sizeof(float) ? acc_t(40) : acc_t(300);

// The smallest and largest of row[0..W) per lane into low and high (NaN ignored), and in bad a
// sum of m - m, NaN unless every m is finite. Restrict-qualified, so that the loop vectorises.
template <typename acc_t, int Lanes>
void row_range(const acc_t* __restrict row, int64_t W, acc_t* __restrict low, acc_t* __restrict high,
               acc_t* __restrict bad) {
  auto update = [&](int lane, acc_t m) {
    low[lane] = m < low[lane] ? m : low[lane];
    high[lane] = m > high[lane] ? m : high[lane];
    bad[lane] += m - m;
  };
  int64_t x = 0;
  for (; x + Lanes <= W; x += Lanes)
    for (int lane = 0; lane < Lanes; ++lane) update(lane, row[x + lane]);
  for (; x < W; ++x) update(0, row[x]);
}

// Per source row of the N images, row_range's lanes: filled by StableShortcut's own pass, or by
// maximum_kernel's bands as they read the rows (the fused stable forward).
template <typename acc_t>
struct MetricRanges {
  static constexpr int kLanes = 16;
  int64_t W;
  std::vector<acc_t> low, high, bad;
  MetricRanges(int64_t rows, int64_t W)
      : W(W), low(rows * kLanes, std::numeric_limits<acc_t>::infinity()),
        high(rows * kLanes, -std::numeric_limits<acc_t>::infinity()), bad(rows * kLanes, acc_t(0)) {}
  // Row `index` (n * H + y) of the metric, `row` its W values.
  void measure(int64_t index, const acc_t* row) {
    row_range<acc_t, kLanes>(row, W, &low[index * kLanes], &high[index * kLanes], &bad[index * kLanes]);
  }
};

template <typename acc_t>
struct StableShortcut {
  std::vector<acc_t> shift;  // R per image
  std::vector<char> taken;   // per image

  // From each image's metrics (Sources::metric), a pass in parallel over rows.
  StableShortcut(const Sources<acc_t>& src, int64_t N) : shift(N), taken(N) {
    MetricRanges<acc_t> ranges(N * src.H, src.W);
    torch::stable::parallel_for(0, N * src.H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) ranges.measure(i, src.metric + i * src.W);
    });
    decide(ranges, N, src.H);
  }
  // From ranges measured elsewhere, every row's.
  StableShortcut(const MetricRanges<acc_t>& ranges, int64_t N, int64_t H) : shift(N), taken(N) { decide(ranges, N, H); }

  void decide(const MetricRanges<acc_t>& ranges, int64_t N, int64_t H) {
    if (H == 0 || ranges.W == 0) return;
    const auto& low = ranges.low;
    const auto& high = ranges.high;
    const auto& bad = ranges.bad;
    const int64_t per_image = H * MetricRanges<acc_t>::kLanes;
    for (int64_t n = 0; n < N; ++n) {
      const auto first = n * per_image, last = (n + 1) * per_image;
      const acc_t lowest = *std::min_element(low.begin() + first, low.begin() + last);
      const acc_t highest = *std::max_element(high.begin() + first, high.begin() + last);
      const bool finite = std::all_of(bad.begin() + first, bad.begin() + last, [](acc_t b) { return b == acc_t(0); });
      shift[n] = highest;
      taken[n] = finite && highest - lowest <= kStableSpread<acc_t>;
    }
  }
  bool any() const { return std::any_of(taken.begin(), taken.end(), [](char t) { return t != 0; }); }
};

}  // namespace cpu
}  // namespace softsplat
