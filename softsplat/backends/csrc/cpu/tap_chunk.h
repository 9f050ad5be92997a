// The taps of a chunk of a row's pixels as arrays (TapChunk): make_taps (taps.h) in loops the
// compiler vectorises, so that the scatters and gathers only add and multiply.
#pragma once

#include <cstdint>
#include <limits>

#include "common.h"

namespace softsplat {
namespace cpu {

// metric - M(target of tap k) over a chunk's pixels, -inf where the tap is dropped or M is
// -inf. Dropped taps read M at index 0 (no masked loads); restrict-qualified parameters, so
// that the loop vectorises with gathers.
template <typename acc_t>
void stable_exponents(const acc_t* __restrict maximum, const acc_t* __restrict metric, const int64_t* __restrict corner,
                      const unsigned char* __restrict keep, int k, int64_t offset, acc_t* __restrict exponent, int64_t count) {
  const acc_t minus_infinity = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t kept = keep[i] >> k & 1;
    const acc_t M = maximum[(corner[i] + offset) * kept];
    // Conditions as acc_t compares: selects of one width, which the vectoriser takes.
    const bool dropped = static_cast<acc_t>(kept) == acc_t(0);
    exponent[i] = (dropped | (M == minus_infinity)) ? minus_infinity : metric[i] - M;
  }
}

// The taps of up to kChunk neighbouring source pixels of one row, as arrays: make_taps's
// values, computed in a loop the compiler vectorises; the scatter then only adds.
constexpr int64_t kChunk = 256;
template <typename acc_t>
struct TapChunk {
  int64_t corner[kChunk];          // flat index y0 * W + x0 of the north-west tap in the image
  acc_t weight[4][kChunk];         // bilinear weight of each tap
  unsigned char keep[kChunk];      // bit k: tap k is kept (0: the pixel lands nowhere)
  acc_t stable[4][kChunk];         // stable: exp(metric - M(tap)), 0 for dropped taps
  // With coordinates: make_taps's x0 and y0, and tap_factors (the backward's derivatives).
  int64_t x0[kChunk], y0[kChunk];
  acc_t east[kChunk], west[kChunk], south[kChunk], north[kChunk];

  static constexpr unsigned char kAll = 15;

  // Coordinates: also x0, y0 and the factors (a compile-time choice, so that the forward's loop
  // has none of their code).
  template <bool Coordinates = false>
  void fill(const Sources<acc_t>& src, int64_t n, int64_t y, int64_t x_begin, int64_t count) {
    // 32-bit tap indices where the image's sizes fit (conversions and products of half the
    // width, twice the lanes), 64-bit otherwise.
    if (src.H < std::numeric_limits<int32_t>::max() && src.W < std::numeric_limits<int32_t>::max())
      fill_with<int32_t, Coordinates>(src, n, y, x_begin, count);
    else
      fill_with<int64_t, Coordinates>(src, n, y, x_begin, count);
  }

  template <typename index_t, bool Coordinates>
  void fill_with(const Sources<acc_t>& src, int64_t n, int64_t y, int64_t x_begin, int64_t count) {
    const acc_t* flow_x = src.flow_row(n, 0, y) + x_begin;
    const acc_t* flow_y = src.flow_row(n, 1, y) + x_begin;
    const index_t H = static_cast<index_t>(src.H), W = static_cast<index_t>(src.W);
    // Two loops: the float math with 32-bit (index_t) results, then the integers (kept taps,
    // flat indices of 64 bits). Apart, the first vectorises at every level (SSE2 has no 32-bit
    // product and no 32-to-64-bit conversion, and its selects of mixed widths failed the loop).
    index_t column[kChunk], row[kChunk], landed[kChunk];
    const index_t n_pixels = static_cast<index_t>(count);
    for (index_t i = 0; i < n_pixels; ++i) {
      Taps<acc_t, index_t> t;
      landed[i] = make_taps<acc_t, index_t>(static_cast<index_t>(x_begin) + i, static_cast<index_t>(y), flow_x[i],
                                            flow_y[i], H, W, t);
      column[i] = t.x0;
      row[i] = t.y0;
      for (int k = 0; k < 4; ++k) weight[k][i] = t.weight[k];
      if (Coordinates) {
        const TapFactors<acc_t> f = tap_factors(t);
        east[i] = f.east;
        west[i] = f.west;
        south[i] = f.south;
        north[i] = f.north;
      }
    }
    // make_taps's keep, 0 where the pixel lands nowhere (its taps are those of (0, 0)).
    for (index_t i = 0; i < n_pixels; ++i)
      keep[i] = static_cast<unsigned char>(kept_taps(column[i], row[i], H, W) & -landed[i]);
    for (int64_t i = 0; i < count; ++i) corner[i] = static_cast<int64_t>(row[i]) * src.W + column[i];
    if (Coordinates)
      for (int64_t i = 0; i < count; ++i) {
        x0[i] = column[i];
        y0[i] = row[i];
      }
  }

  // tap_factors of pixel i (filled with coordinates), for factor_derivatives.
  TapFactors<acc_t> factors(int64_t i) const { return {east[i], west[i], south[i], north[i]}; }

  // Pixels [count, padded) marked as landing nowhere, with coordinates and factors 0 (so that
  // a gather over groups of pixels reads defined values).
  void pad(int64_t count, int64_t padded) {
    for (int64_t i = count; i < padded; ++i) {
      keep[i] = 0;
      x0[i] = y0[i] = 0;
      east[i] = west[i] = south[i] = north[i] = acc_t(0);
    }
  }

  // stable[k][i] = exp(metric - M(target of tap k)) for the kept taps, 0 for the others: the
  // values of stable_weight (0 where M is -inf), with a vectorised exp. `maximum`: image n's M.
  // Kind MAX: max_weight's 1, 0 or NaN instead.
  void fill_stable(const acc_t* maximum, const acc_t* metric, int64_t W, int64_t count, int kind = STABLE) {
    const int64_t offset[4] = {0, 1, W, W + 1};
    if (kind == MAX) {
      for (int k = 0; k < 4; ++k)
        for (int64_t i = 0; i < count; ++i)
          stable[k][i] = keep[i] >> k & 1 ? max_weight(metric[i], maximum[corner[i] + offset[k]]) : acc_t(0);
      return;
    }
    for (int k = 0; k < 4; ++k) {
      stable_exponents(maximum, metric, corner, keep, k, offset[k], stable[k], count);
      exp_inplace(stable[k], count);
    }
  }
};

}  // namespace cpu
}  // namespace softsplat
