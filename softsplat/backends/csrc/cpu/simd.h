// Vector helpers of the CPU kernels: exp over arrays (Sleef where the CPU has AVX2 or AVX-512),
// GCC vector types, and a branch-free maximum. Every function has a portable fallback.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../tensor.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <sleef.h>  // the vectorised math ATen's own CPU kernels use, shipped with torch
#endif
#if defined(__SSE4_1__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace softsplat {
namespace cpu {

#if defined(__GNUC__)
// GCC's (and clang's) vector extension: Lanes values of T, with element-wise arithmetic.
// Compilers without it (MSVC) take the scalar paths that use none.
#define SOFTSPLAT_VECTOR_EXTENSION 1
template <typename T, int Lanes>
struct Vector {
  typedef T type __attribute__((vector_size(Lanes * sizeof(T))));
};
#endif

#if defined(SOFTSPLAT_VECTOR_EXTENSION) && !defined(__AVX2__)
// exp of four floats for the levels without Sleef (torch ships Sleef's AVX2 and AVX-512
// functions only): x86-64's baseline (SSE2) and aarch64 (NEON), where a scalar std::exp per pixel
// was a fifth of an image's splat. Cephes's expf: x = q ln 2 + r with q = round(x / ln 2) and ln 2
// in two parts (q * kHigh exact), |r| <= ln 2 / 2; exp(r) by its minimax polynomial (within 1 ulp
// of exp over every float, as Sleef's); then times 2^q as two powers of two, so that results in
// the subnormal range are rounded once. x is clamped to [-104, 89] first: exp(-104) rounds to 0
// and exp(89) overflows to inf, as exp does below and above them; NaN stays NaN (it fails both
// compares, and every step after keeps it; its power of two is 2^0).
inline Vector<float, 4>::type exp4(Vector<float, 4>::type x) {
  using Floats = Vector<float, 4>::type;
  using Ints = Vector<int32_t, 4>::type;
  const Floats low = {-104.0f, -104.0f, -104.0f, -104.0f}, high = {89.0f, 89.0f, 89.0f, 89.0f};
  x = x > high ? high : x;
  x = x < low ? low : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (|x / ln 2| < 2^22; SSE2 has no round).
  const Floats magic = {12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f};
  const Floats q = (x * 1.44269504088896341f + magic) - magic;
  constexpr float kHigh = 0.693359375f, kLow = -2.12194440e-4f;  // ln 2 = kHigh + kLow
  const Floats r = (x - q * kHigh) - q * kLow;
  Floats p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Floats y = (p * (r * r) + r) + 1.0f;
  const Floats zero = {0.0f, 0.0f, 0.0f, 0.0f};
  const Ints n = __builtin_convertvector(q == q ? q : zero, Ints), half = n >> 1;  // NaN: 0, converted
  const Floats first = (Floats)((half + 127) << 23), second = (Floats)((n - half + 127) << 23);
  return (y * first) * second;
}
#endif

// to[i] = exp(from[i]) for i < n (from == to: in place) with Sleef's vectorised exp (1 ulp) where
// the CPU has AVX2 or AVX-512, exp4 where it has 128-bit vectors only (SSE2, NEON), else std::exp.
// The tail goes through the same vector function, so every value does.
template <typename T, int Lanes, typename Load, typename Exp, typename Store>
inline void exp_lanes(const T* from, T* to, int64_t n, Load load, Exp exp, Store store) {
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) store(to + i, exp(load(from + i)));
  if (i == n) return;
  T tail[Lanes] = {};
  std::copy(from + i, from + n, tail);
  store(tail, exp(load(tail)));
  std::copy(tail, tail + (n - i), to + i);
}

inline void exp_copy(const float* from, float* to, int64_t n) {
#if defined(__AVX512F__)
  exp_lanes<float, 16>(from, to, n, [](const float* p) { return _mm512_loadu_ps(p); }, Sleef_expf16_u10,
                       [](float* p, __m512 v) { _mm512_storeu_ps(p, v); });
#elif defined(__AVX2__)
  exp_lanes<float, 8>(from, to, n, [](const float* p) { return _mm256_loadu_ps(p); }, Sleef_expf8_u10,
                      [](float* p, __m256 v) { _mm256_storeu_ps(p, v); });
#elif defined(SOFTSPLAT_VECTOR_EXTENSION)
  using Floats = Vector<float, 4>::type;
  exp_lanes<float, 4>(from, to, n, [](const float* p) { Floats v; std::memcpy(&v, p, sizeof v); return v; }, exp4,
                      [](float* p, Floats v) { std::memcpy(p, &v, sizeof v); });
#else
  for (int64_t i = 0; i < n; ++i) to[i] = std::exp(from[i]);
#endif
}

inline void exp_copy(const double* from, double* to, int64_t n) {
#if defined(__AVX512F__)
  exp_lanes<double, 8>(from, to, n, [](const double* p) { return _mm512_loadu_pd(p); }, Sleef_expd8_u10,
                       [](double* p, __m512d v) { _mm512_storeu_pd(p, v); });
#elif defined(__AVX2__)
  exp_lanes<double, 4>(from, to, n, [](const double* p) { return _mm256_loadu_pd(p); }, Sleef_expd4_u10,
                       [](double* p, __m256d v) { _mm256_storeu_pd(p, v); });
#else
  for (int64_t i = 0; i < n; ++i) to[i] = std::exp(from[i]);
#endif
}

template <typename T>
inline void exp_inplace(T* a, int64_t n) {
  exp_copy(a, a, n);
}

// to[i] = float(from[i]) for i < n, for the 16-bit floats (exact): BFloat16 by a shift, Half by
// F16C where the CPU has it (AVX2 and AVX-512 levels), else by torch's conversion; loops that
// vectorise, where a conversion per value in a kernel's inner loop does not.
inline void widen(const BFloat16* from, float* to, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(from[i].x) << 16;
    std::memcpy(to + i, &bits, sizeof bits);
  }
}

inline void widen(const Half* from, float* to, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(to + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + i))));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(to + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
#endif
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

// to[i] = from[i] rounded to the nearest 16-bit float, ties to even, as torch's casts round:
// Half by F16C where the CPU has it, else by torch's conversion; BFloat16 by torch's rounding
// (NaN stays NaN) in a loop that vectorises.
inline void narrow(const float* from, Half* to, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) to[i] = static_cast<Half>(from[i]);
}

inline void narrow(const float* from, BFloat16* to, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, from + i, sizeof bits);
    const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
    to[i].x = from[i] != from[i] ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

// max(current, value) as replaces_maximum takes it, NaN winning: current < value ? value :
// current keeps a NaN current, then a NaN value is taken. Two selects, which loops vectorise
// (std::max's reference and a branch on NaN do not, and with random metrics such a branch is
// mispredicted often).
template <typename acc_t>
inline acc_t maximum_of(acc_t current, acc_t value) {
  const acc_t larger = current < value ? value : current;
  return value != value ? value : larger;
}

// maximum_of for one value at a time, without branches where the CPU has SSE4.1 (random
// metrics make a branch on the compare unpredictable): maxss gives current where either is NaN,
// then a NaN value is blended in. (maximum_of itself vectorises in loops.)
template <typename acc_t>
inline acc_t scalar_maximum_of(acc_t current, acc_t value) {
#if defined(__SSE4_1__)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m128 c = _mm_set_ss(current), v = _mm_set_ss(value);
    return _mm_cvtss_f32(_mm_blendv_ps(_mm_max_ss(v, c), v, _mm_cmpunord_ss(v, v)));
  } else if constexpr (std::is_same_v<acc_t, double>) {
    const __m128d c = _mm_set_sd(current), v = _mm_set_sd(value);
    return _mm_cvtsd_f64(_mm_blendv_pd(_mm_max_sd(v, c), v, _mm_cmpunord_sd(v, v)));
  }
#endif
  return maximum_of(current, value);
}

}  // namespace cpu
}  // namespace softsplat
