// Channels side by side in blocks of up to 16 lanes: moving values between planes (NCHW) and a
// pixel-major layout, by 4 x 4 tiles where the vector extension is there. The forward's blocked
// scatter and the backward's blocked gather use them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

namespace softsplat {
namespace cpu {

// How far ahead along a plane, in values, pack_block and unpack_block_row ask for the next cache
// lines: a block reads or writes its planes side by side (16, or the backward's C planes of the
// input gradient), more streams than the hardware prefetchers follow (512 bytes ahead measured
// best for a 64-channel forward at 540x960).
constexpr int64_t kPrefetchAhead = 128;

// The strides of planes of W values side by side (pack_block's view of them).
inline View4 plane_strides(int64_t W) {
  View4 view;
  view.c = W;
  view.x = 1;
  return view;
}

// Whether scalar_t is a 16-bit float (Half, BFloat16), which the forward widens (widen_block)
// before it packs its values.
template <typename scalar_t>
constexpr bool kNarrow = std::is_same_v<scalar_t, Half> || std::is_same_v<scalar_t, BFloat16>;

// The block of `lanes` channels at `count` pixels of a 16-bit float input (`pixel`: its first
// channel at the first pixel; `view`: its strides) widened to float into `wide` (lanes x count
// values); returns the strides to read them with, for pack_block or pack_values: planes of count
// values, or with channels side by side (channels_last) `lanes` values per pixel.
template <typename scalar_t>
View4 widen_block(const scalar_t* __restrict pixel, const View4& view, int64_t lanes, int64_t count,
                  float* __restrict wide) {
  View4 strides;
  if (view.c == 1 && view.x != 1) {
    if (view.x == lanes) {
      widen(pixel, wide, lanes * count);  // the block is every channel: one run
    } else {
      for (int64_t i = 0; i < count; ++i) widen(pixel + i * view.x, wide + i * lanes, lanes);
    }
    strides.c = 1;
    strides.x = lanes;
    return strides;
  }
  for (int64_t j = 0; j < lanes; ++j) {
    if (view.x == 1) {
      widen(pixel + j * view.c, wide + j * count, count);
    } else {
      for (int64_t i = 0; i < count; ++i) wide[j * count + i] = static_cast<float>(pixel[j * view.c + i * view.x]);
    }
  }
  strides.c = count;
  strides.x = 1;
  return strides;
}

#if defined(SOFTSPLAT_VECTOR_EXTENSION)
template <typename acc_t>
using Quad = typename Vector<acc_t, 4>::type;

// Loads and stores by reference: no value of a vector type crosses a call (no vector-ABI
// dependence).
template <typename V, typename acc_t>
inline void load_lanes(V& v, const acc_t* p) {
  std::memcpy(&v, p, sizeof v);
}

template <typename V, typename acc_t>
inline void store_lanes(acc_t* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// The 4 x 4 transpose of r (rows become columns), in place; V: a Quad.
template <typename V>
inline void transpose_quads(V r[4]) {
  const V t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5), t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
  const V t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5), t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
  r[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  r[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  r[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  r[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}
#endif

#if defined(__AVX512F__)
// The 16 x 16 transpose of r (rows become columns), in place: four rounds of 16 shuffles, where
// 4 x 4 tiles take twice the instructions.
inline void transpose_16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane q: a(4q) b(4q) a(4q+1) b(4q+1), and +2
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  auto low = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  auto high = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  for (int i = 0; i < 16; i += 4) {  // r[i + j]: rows i..i+3 of column j + 4q in lane q
    r[i] = low(t[i], t[i + 2]);
    r[i + 1] = high(t[i], t[i + 2]);
    r[i + 2] = low(t[i + 1], t[i + 3]);
    r[i + 3] = high(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // 0x88: lanes 0 and 2 of each; 0xDD: lanes 1 and 3
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);           // columns j, j + 8 of rows 0-7
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);       // j + 4, j + 12
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);  // rows 8-15
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[j + 4] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[j + 12] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}
#endif

#if defined(__AVX2__)
// The 8 x 8 transpose of r (rows become columns), in place: 24 shuffles (4 x 4 tiles take 32,
// of half the width).
inline void transpose_8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}
#endif

// values[i * stride + j] = x * w of channel j of the block (`pixel`: its first channel at the
// first pixel; `view`: its strides) at pixel i < count, for j < lanes; lanes [lanes, L) zero. w
// null: x. Planes (view.x 1) of float and double by 4 x 4 tiles, whole blocks of channels side
// by side (view.c 1) a vector at a time, the rest one value at a time.
template <int L, typename scalar_t, typename acc_t>
void pack_block(const scalar_t* __restrict pixel, const View4& view, const acc_t* __restrict w, int64_t lanes,
                acc_t* __restrict values, int64_t stride, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (L == 16 && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (; view.x == 1 && lanes == 16 && i + 16 <= count; i += 16) {  // whole blocks: 16 x 16 tiles
      for (int64_t j = 0; j < 16; ++j) __builtin_prefetch(pixel + j * view.c + i + kPrefetchAhead);
      const __m512 scale = w ? _mm512_loadu_ps(w + i) : _mm512_set1_ps(1);
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        r[j] = _mm512_loadu_ps(pixel + j * view.c + i);
        if (w) r[j] = _mm512_mul_ps(r[j], scale);
      }
      transpose_16(r);
      for (int k = 0; k < 16; ++k) _mm512_storeu_ps(values + (i + k) * stride, r[k]);
    }
  }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (L == 16 && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (; view.x == 1 && lanes == L && i + 8 <= count; i += 8) {  // whole blocks: 8 x 8 tiles
      if (i % 16 == 0)
        for (int64_t j = 0; j < L; ++j) __builtin_prefetch(pixel + j * view.c + i + kPrefetchAhead);
      const __m256 scale = w ? _mm256_loadu_ps(w + i) : _mm256_set1_ps(1);
      for (int64_t j = 0; j < L; j += 8) {
        __m256 r[8];
        for (int k = 0; k < 8; ++k) {
          r[k] = _mm256_loadu_ps(pixel + (j + k) * view.c + i);
          if (w) r[k] = _mm256_mul_ps(r[k], scale);
        }
        transpose_8(r);
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(values + (i + k) * stride + j, r[k]);
      }
    }
  }
#endif
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const int64_t tiled = lanes / 4 * 4;
    for (; view.x == 1 && i + 4 <= count; i += 4) {
      if (i % 16 == 0)  // a cache line of each plane
        for (int64_t j = 0; j < lanes; ++j) __builtin_prefetch(pixel + j * view.c + i + kPrefetchAhead);
      Quad<acc_t> scale;
      if (w) load_lanes(scale, w + i);
      for (int64_t j = 0; j < tiled; j += 4) {
        Quad<acc_t> r[4];
        for (int k = 0; k < 4; ++k) {
          load_lanes(r[k], pixel + (j + k) * view.c + i);
          if (w) r[k] *= scale;
        }
        transpose_quads(r);
        for (int k = 0; k < 4; ++k) store_lanes(values + (i + k) * stride + j, r[k]);
      }
      for (int64_t k = 0; k < 4; ++k) {
        acc_t* lane = values + (i + k) * stride;
        for (int64_t j = tiled; j < lanes; ++j) lane[j] = w ? pixel[j * view.c + i + k] * w[i + k] : pixel[j * view.c + i + k];
        for (int64_t j = lanes; j < L; ++j) lane[j] = acc_t(0);
      }
    }
  }
#endif
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // Channels side by side already (channels_last): a whole block per pixel, one vector.
    using Lanes = typename Vector<acc_t, L>::type;
    for (; view.c == 1 && lanes == L && i < count; ++i) {
      Lanes v;
      load_lanes(v, pixel + i * view.x);
      if (w) v *= w[i];
      store_lanes(values + i * stride, v);
    }
  }
#endif
  for (; i < count; ++i) {
    acc_t* lane = values + i * stride;
    const scalar_t* at = pixel + i * view.x;
    for (int64_t j = 0; j < lanes; ++j) {
      const acc_t x = static_cast<acc_t>(at[j * view.c]);
      lane[j] = w ? x * w[i] : x;
    }
    for (int64_t j = lanes; j < L; ++j) lane[j] = acc_t(0);
  }
}

// Planes [c_begin, c_end) of targets [x_begin, x_end) moved one value at a time, as
// unpack_block_row moves them: the planes and targets its tiles leave.
template <bool Add, typename acc_t, typename Plane>
inline void unpack_values(const acc_t* __restrict lanes, int64_t stride, const Plane& plane, int64_t c_begin,
                          int64_t c_end, const acc_t* __restrict factor, int64_t x_begin, int64_t x_end) {
  for (int64_t c = c_begin; c < c_end; ++c) {
    acc_t* p = plane(c);
    for (int64_t x = x_begin; x < x_end; ++x) {
      const acc_t value = Add ? p[x] + lanes[x * stride + c] : lanes[x * stride + c];
      p[x] = factor ? value * factor[x] : value;
    }
  }
}

// The first `count` lanes of W targets (target x's at lanes + x * stride) moved into planes:
// plane(c)[x] = lanes[x * stride + c], stored or added (Add); times `factor` (W values, the
// finishing factors of common.h) unless null. The inverse of pack_block. AVX-512 moves 16 x 16
// tiles from 16 planes on; AVX2 8 x 8 tiles from 16 planes on, and with Tiles (the forward's
// blocks: lanes side by side, stride == count) whole blocks of 8 (partial blocks measured
// slower so).
template <bool Add, bool Tiles = false, typename acc_t, typename Plane>
void unpack_block_row(const acc_t* __restrict lanes, int64_t stride, const Plane& plane, int64_t count,
                      const acc_t* __restrict factor, int64_t W) {
  int64_t x = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 16 x 16 tiles: 16 targets of each of the first count / 16 * 16 planes a store each (a
    // cache line where the planes are aligned), then those of the other planes one by one.
    const int64_t tiled = count / 16 * 16;
    for (; tiled > 0 && x + 16 <= W; x += 16) {
      for (int64_t c = 0; c < count; ++c) __builtin_prefetch(plane(c) + x + kPrefetchAhead, 1);
      const __m512 by = factor ? _mm512_loadu_ps(factor + x) : _mm512_set1_ps(1);
      for (int64_t c0 = 0; c0 < tiled; c0 += 16) {
        __m512 r[16];
        for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(lanes + (x + k) * stride + c0);
        transpose_16(r);
        for (int c = 0; c < 16; ++c) {
          acc_t* p = plane(c0 + c) + x;
          if (Add) r[c] = _mm512_add_ps(_mm512_loadu_ps(p), r[c]);
          if (factor) r[c] = _mm512_mul_ps(r[c], by);
          _mm512_storeu_ps(p, r[c]);
        }
      }
      unpack_values<Add>(lanes, stride, plane, tiled, count, factor, x, x + 16);
    }
  }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 8 x 8 tiles of the first count / 8 * 8 planes, the other planes one by one.
    const int64_t tiled = count / 8 * 8;
    const bool tiles = Tiles ? count % 8 == 0 && stride == count : count >= 16;
    for (; tiles && x + 8 <= W; x += 8) {
      if (x % 16 == 0)
        for (int64_t c = 0; c < count; ++c) __builtin_prefetch(plane(c) + x + kPrefetchAhead, 1);
      const __m256 by = factor ? _mm256_loadu_ps(factor + x) : _mm256_set1_ps(1);
      unpack_values<Add>(lanes, stride, plane, tiled, count, factor, x, x + 8);
      for (int64_t c0 = 0; c0 < tiled; c0 += 8) {
        __m256 r[8];
        for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(lanes + (x + k) * stride + c0);
        transpose_8(r);
        for (int c = 0; c < 8; ++c) {
          acc_t* p = plane(c0 + c) + x;
          if (Add) r[c] = _mm256_add_ps(_mm256_loadu_ps(p), r[c]);
          if (factor) r[c] = _mm256_mul_ps(r[c], by);
          _mm256_storeu_ps(p, r[c]);
        }
      }
    }
  }
#endif
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  const int64_t tiled = count / 4 * 4;
  for (; x + 4 <= W; x += 4) {
    if (x % 16 == 0)  // a cache line of each plane, to be written
      for (int64_t c = 0; c < count; ++c) __builtin_prefetch(plane(c) + x + kPrefetchAhead, 1);
    for (int64_t c = 0; c < tiled; c += 4) {
      Quad<acc_t> r[4];
      for (int k = 0; k < 4; ++k) load_lanes(r[k], lanes + (x + k) * stride + c);
      transpose_quads(r);
      Quad<acc_t> by;
      if (factor) load_lanes(by, factor + x);
      for (int k = 0; k < 4; ++k) {
        acc_t* p = plane(c + k) + x;
        if (Add) {
          Quad<acc_t> sum;
          load_lanes(sum, p);
          r[k] = sum + r[k];
        }
        if (factor) r[k] *= by;
        store_lanes(p, r[k]);
      }
    }
    unpack_values<Add>(lanes, stride, plane, tiled, count, factor, x, x + 4);
  }
#endif
  unpack_values<Add>(lanes, stride, plane, 0, count, factor, x, W);
}

}  // namespace cpu
}  // namespace softsplat
