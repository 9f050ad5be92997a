// The packed layout: up to three channels and the normaliser as four lanes per target pixel,
// pixel-major. The forward's scratch rows and the backward's prepared rows use it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "blocks.h"
#include "common.h"

namespace softsplat {
namespace cpu {

constexpr int kPacked = 4;  // lanes per target

// Whether C channels (and the normaliser) take the packed layout, kPacked lanes per target: the
// forward's scratch and the backward's prepared rows.
constexpr bool packed_layout(int64_t C) { return C >= 1 && C < kPacked; }

#if defined(__AVX512F__)
// The four vectors of planes lane[c] (16 targets each) stored pixel-major at `target` (64 floats):
// unpacks and 128-bit shuffles.
inline void store_interleaved(const __m512 lane[kPacked], float* target) {
  auto pairs = [](__m512 a, __m512 b, bool high) {
    return high ? _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
                : _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  const __m512 ab_low = _mm512_unpacklo_ps(lane[0], lane[1]), ab_high = _mm512_unpackhi_ps(lane[0], lane[1]);
  const __m512 cd_low = _mm512_unpacklo_ps(lane[2], lane[3]), cd_high = _mm512_unpackhi_ps(lane[2], lane[3]);
  // Targets (0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15), four lanes each.
  const __m512 p0 = pairs(ab_low, cd_low, false), p1 = pairs(ab_low, cd_low, true);
  const __m512 p2 = pairs(ab_high, cd_high, false), p3 = pairs(ab_high, cd_high, true);
  const __m512 q0 = _mm512_shuffle_f32x4(p0, p1, 0x44), q1 = _mm512_shuffle_f32x4(p2, p3, 0x44);  // 0 4 1 5, 2 6 3 7
  const __m512 q2 = _mm512_shuffle_f32x4(p0, p1, 0xEE), q3 = _mm512_shuffle_f32x4(p2, p3, 0xEE);  // 8 12 9 13, ...
  _mm512_storeu_ps(target, _mm512_shuffle_f32x4(q0, q1, 0x88));
  _mm512_storeu_ps(target + 16, _mm512_shuffle_f32x4(q0, q1, 0xDD));
  _mm512_storeu_ps(target + 32, _mm512_shuffle_f32x4(q2, q3, 0x88));
  _mm512_storeu_ps(target + 48, _mm512_shuffle_f32x4(q2, q3, 0xDD));
}
#endif

// target[x * kPacked + c] = plane[c][x] for x < count: planes to pixel-major lanes.
template <typename acc_t>
void interleave(const acc_t* const plane[kPacked], acc_t* __restrict target, int64_t count) {
  int64_t x = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; x + 16 <= count; x += 16) {
      __m512 lane[kPacked];
      for (int c = 0; c < kPacked; ++c) lane[c] = _mm512_loadu_ps(plane[c] + x);
      store_interleaved(lane, target + x * kPacked);
    }
  }
#endif
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  for (; x + 4 <= count; x += 4) {  // 4 x 4 tiles (SSE2, AVX2, NEON; and the rest of AVX-512's)
    Quad<acc_t> lane[kPacked];
    for (int c = 0; c < kPacked; ++c) load_lanes(lane[c], plane[c] + x);
    transpose_quads(lane);
    for (int j = 0; j < kPacked; ++j) store_lanes(target + (x + j) * kPacked, lane[j]);
  }
#endif
  for (; x < count; ++x)
    for (int c = 0; c < kPacked; ++c) target[x * kPacked + c] = plane[c][x];
}

// The lanes of `count` pixels of a row, from `pixel` (its first channel): x * w per channel, w
// (null for sum: 1 and lane CC 0), zeros; stable: x and 1. NCHW of the compute type: float with
// AVX-512 16 pixels at a time through store_interleaved, otherwise 4 x 4 tiles; channels_last,
// other types and the remainder one pixel at a time.
template <int CC, bool Stable, typename scalar_t, typename acc_t>
void pack_values(const scalar_t* __restrict pixel, const View4& view, const acc_t* __restrict w,
                 acc_t* __restrict values, int64_t count) {
  auto pack = [&](int64_t step, int64_t channel) {
    for (int64_t i = 0; i < count; ++i) {
      const acc_t scale = w && !Stable ? w[i] : acc_t(1);
      acc_t lane[kPacked] = {};
      for (int c = 0; c < CC; ++c) lane[c] = static_cast<acc_t>(pixel[i * step + c * channel]) * scale;
      lane[CC] = w ? scale : acc_t(0);
      for (int c = 0; c < kPacked; ++c) values[i * kPacked + c] = lane[c];
    }
  };
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // 16 pixels at a time (NCHW): the lanes as four vectors of planes, stored pixel-major.
    int64_t i = 0;
    for (; view.x == 1 && i + 16 <= count; i += 16) {
      const __m512 scale = w && !Stable ? _mm512_loadu_ps(w + i) : _mm512_set1_ps(1);
      __m512 lane[kPacked];
      for (int c = 0; c < kPacked; ++c) lane[c] = _mm512_setzero_ps();
      for (int c = 0; c < CC; ++c)
        lane[c] = _mm512_mul_ps(_mm512_loadu_ps(pixel + c * view.c + i), scale);
      lane[CC] = w ? scale : _mm512_setzero_ps();
      store_interleaved(lane, values + i * kPacked);
    }
    pixel += i;
    values += i * kPacked;
    if (w) w += i;
    count -= i;
  }
#endif
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Q = Quad<acc_t>;
    int64_t i = 0;
    for (; view.x == 1 && i + 4 <= count; i += 4) {
      Q scale = {acc_t(1), acc_t(1), acc_t(1), acc_t(1)};
      if (w && !Stable) load_lanes(scale, w + i);
      Q lane[kPacked] = {};
      for (int c = 0; c < CC; ++c) {
        load_lanes(lane[c], pixel + c * view.c + i);
        lane[c] *= scale;
      }
      if (w) lane[CC] = scale;
      transpose_quads(lane);
      for (int j = 0; j < kPacked; ++j) store_lanes(values + (i + j) * kPacked, lane[j]);
    }
    pixel += i;
    values += i * kPacked;
    if (w) w += i;
    count -= i;
  }
#endif
  if (view.x == 1)
    pack(1, view.c);  // NCHW
  else
    pack(view.x, view.c);  // channels_last and others
}

}  // namespace cpu
}  // namespace softsplat
