// Per-pixel tap math of softmax splatting, shared by every compiled path: the C++ CPU kernels,
// the CUDA kernels (nvcc for the cpp backend, NVRTC for the CuPy backend) and the host shim that
// runs the CUDA kernels on the CPU. Free of torch and of the standard library on the device, so
// NVRTC compiles it without include paths. The pure-torch oracle is the specification.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SOFTSPLAT_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define SOFTSPLAT_HD inline
#endif

namespace softsplat {

// Mode codes: softsplat.modes.Kind and Normalisation (tests/test_contract.py compares). STABLE is soft
// splatting with each target's maximum metric M(t) subtracted: a tap's weight is
// exp(metric - M(t)), given M (from the scatter-max pass). MAX is max splatting: a tap's weight
// is 1 where metric == M(t), else 0 (max_weight). Kinds >= LINEAR read a metric.
enum Kind : int { SUM = 0, AVG = 1, LINEAR = 2, SOFT = 3, STABLE = 4, MAX = 5 };
// RAW: no division; the kernels return the numerator and the normaliser as they are.
enum Normalisation : int { ADDEPS = 0, ZEROEPS = 1, CLIPEPS = 2, RAW = 3 };

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
SOFTSPLAT_HD float floor_of(float v) { return floorf(v); }
SOFTSPLAT_HD double floor_of(double v) { return floor(v); }
SOFTSPLAT_HD float exp_of(float v) { return expf(v); }
SOFTSPLAT_HD double exp_of(double v) { return exp(v); }
SOFTSPLAT_HD bool is_finite(float v) { return isfinite(v); }
SOFTSPLAT_HD bool is_finite(double v) { return isfinite(v); }
#else
template <typename T> SOFTSPLAT_HD T floor_of(T v) { return std::floor(v); }
template <typename T> SOFTSPLAT_HD T exp_of(T v) { return std::exp(v); }
template <typename T> SOFTSPLAT_HD bool is_finite(T v) { return std::isfinite(v); }
#endif

// The four bilinear taps of one source pixel. Tap order everywhere: north-west (x0, y0),
// north-east (x0+1, y0), south-west (x0, y0+1), south-east (x0+1, y0+1).
template <typename T, typename index_t>
struct Taps {
  index_t x0, y0;
  T fx, fy;        // target coordinates
  T weight[4];     // bilinear weight of each tap
  bool keep[4];    // tap inside [0, W) x [0, H)
};

// Which taps of the cell whose north-west corner is (x0, y0) lie inside [0, W) x [0, H): bit k
// for tap k. Integer operations only (0 or 1 per side), so that a loop over pixels computing it
// vectorises apart from the float math.
template <typename index_t>
SOFTSPLAT_HD index_t kept_taps(index_t x0, index_t y0, index_t H, index_t W) {
  const index_t west = x0 >= 0, east = x0 + 1 <= W - 1, north = y0 >= 0, south = y0 + 1 <= H - 1;
  return (west & north) | (east & north) << 1 | (west & south) << 2 | (east & south) << 3;
}

// Fills `taps` for the pixel at column x, row y moved by (flow_x, flow_y); returns false when the
// pixel contributes nothing: a non-finite target, or one whose four taps all lie outside
// (floor(fx) < -1 or > W-1, likewise for y). Then `taps` holds the taps of (0, 0), never used.
// The bounds are checked in floating point and a pixel that does not land continues with
// coordinate 0, so a huge coordinate is never converted to an integer (undefined behaviour);
// after the check -1 <= x0 <= W-1 and -1 <= y0 <= H-1, which fit index_t. Branch-free (bitwise
// & on the conditions, selects), so a loop over pixels calling it vectorises on the CPU.
template <typename T, typename index_t>
SOFTSPLAT_HD bool make_taps(index_t x, index_t y, T flow_x, T flow_y, index_t H, index_t W,
                            Taps<T, index_t>& taps) {
  const T target_x = static_cast<T>(x) + flow_x;
  const T target_y = static_cast<T>(y) + flow_y;
  // floor(fx) < -1 <=> fx < -1 and floor(fx) > W-1 <=> fx >= W; NaN fails every comparison
  // and infinities fail the bounds, so this also drops non-finite targets.
  const bool lands = (target_x >= T(-1)) & (target_x < static_cast<T>(W)) & (target_y >= T(-1)) &
                     (target_y < static_cast<T>(H));
  const T fx = lands ? target_x : T(0), fy = lands ? target_y : T(0);
  // In range, so the conversion is defined; truncation rounds towards zero, floor downwards.
  index_t x0 = static_cast<index_t>(fx), y0 = static_cast<index_t>(fy);
  x0 -= static_cast<T>(x0) > fx ? 1 : 0;
  y0 -= static_cast<T>(y0) > fy ? 1 : 0;
  const T x0f = static_cast<T>(x0), y0f = static_cast<T>(y0);
  const T x1f = x0f + T(1), y1f = y0f + T(1);
  taps.x0 = x0;
  taps.y0 = y0;
  taps.fx = fx;
  taps.fy = fy;
  taps.weight[0] = (x1f - fx) * (y1f - fy);
  taps.weight[1] = (fx - x0f) * (y1f - fy);
  taps.weight[2] = (x1f - fx) * (fy - y0f);
  taps.weight[3] = (fx - x0f) * (fy - y0f);
  const index_t kept = kept_taps(x0, y0, H, W);
  for (int k = 0; k < 4; ++k) taps.keep[k] = kept >> k & 1;
  return lands;
}

// Column and row of tap k.
template <typename T, typename index_t>
SOFTSPLAT_HD index_t tap_x(const Taps<T, index_t>& taps, int k) { return taps.x0 + (k & 1); }
template <typename T, typename index_t>
SOFTSPLAT_HD index_t tap_y(const Taps<T, index_t>& taps, int k) { return taps.y0 + (k >> 1); }

// The target's distances from the sides of its cell (x0, y0)-(x0+1, y0+1), the factors of the
// bilinear weights: east = fx - x0, west = x0 + 1 - fx, south = fy - y0, north = y0 + 1 - fy.
template <typename T>
struct TapFactors {
  T east, west, south, north;
};

template <typename T, typename index_t>
SOFTSPLAT_HD TapFactors<T> tap_factors(const Taps<T, index_t>& taps) {
  const T x0f = static_cast<T>(taps.x0), y0f = static_cast<T>(taps.y0);
  return {taps.fx - x0f, x0f + T(1) - taps.fx, taps.fy - y0f, y0f + T(1) - taps.fy};
}

// d weight[k] / d fx and d fy, in the cell floor() selected (floor has zero derivative).
template <typename T>
SOFTSPLAT_HD void factor_derivatives(const TapFactors<T>& f, T dx[4], T dy[4]) {
  dx[0] = -f.north; dy[0] = -f.west;
  dx[1] = f.north;  dy[1] = -f.east;
  dx[2] = -f.south; dy[2] = f.west;
  dx[3] = f.south;  dy[3] = f.east;
}

template <typename T, typename index_t>
SOFTSPLAT_HD void tap_derivatives(const Taps<T, index_t>& taps, T dx[4], T dy[4]) {
  factor_derivatives(tap_factors(taps), dx, dy);
}

// The per-pixel weight w splatted beside the input: 1, metric or exp(metric). No maximum is
// subtracted in soft mode: an overflow of exp behaves as the reference's does.
template <typename T>
SOFTSPLAT_HD T pixel_weight(int kind, T metric) {
  return kind == LINEAR ? metric : kind == SOFT ? exp_of(metric) : T(1);
}

// d w / d metric, given w.
template <typename T>
SOFTSPLAT_HD T weight_derivative(int kind, T weight) {
  return kind == LINEAR ? T(1) : (kind == SOFT || kind == STABLE) ? weight : T(0);
}

// The stable weight of a tap on a target whose maximum metric is `maximum` (M passes no
// gradient). A target reached only by metrics of -inf has M = -inf: its weights are 0, as
// exp(-inf) is in soft mode (not exp(-inf + inf) = NaN).
template <typename T>
SOFTSPLAT_HD T stable_weight(T metric, T maximum) {
  const bool minus_infinity = maximum < T(0) && !(maximum - maximum == T(0));  // -inf - -inf is NaN
  return minus_infinity ? T(0) : exp_of(metric - maximum);
}

// The max-splatting weight of a tap on a target whose maximum metric is `maximum`: 1 where the
// pixel's metric is the maximum (ties all count), else 0; 0 where M is -inf (only metrics of
// -inf reached the target), NaN where M is NaN. No gradient reaches the metric.
template <typename T>
SOFTSPLAT_HD T max_weight(T metric, T maximum) {
  if (maximum != maximum) return maximum;
  const bool minus_infinity = maximum < T(0) && !(maximum - maximum == T(0));
  return !minus_infinity && metric == maximum ? T(1) : T(0);
}

// Whether a kind weighs each tap by its target's maximum M (stable, max): it reads `maximum`.
SOFTSPLAT_HD bool weighs_per_tap(int kind) { return kind == STABLE || kind == MAX; }

// The per-tap weight of the per_tap kinds.
template <typename T>
SOFTSPLAT_HD T tap_weight(int kind, T metric, T maximum) {
  return kind == MAX ? max_weight(metric, maximum) : stable_weight(metric, maximum);
}

// Whether a tap takes part in the scatter-max of `kind`: every kept tap for stable, the kept
// taps of positive bilinear weight for max (a tap of weight 0 carries none of its pixel).
template <typename T>
SOFTSPLAT_HD bool counts_for_maximum(int kind, bool keep, T weight) {
  return keep && (kind != MAX || weight > T(0));
}

// max(current, value) as the scatter-max computes it: NaN wins (NaN propagates as
// torch.scatter_reduce's amax propagates it), then the larger value.
template <typename T>
SOFTSPLAT_HD bool replaces_maximum(T current, T value) {
  return !(current != current) && (value != value || value > current);
}

template <typename T>
SOFTSPLAT_HD T eps() { return static_cast<T>(1e-7); }

// D' of docs/spec.md: the normaliser made safe to divide by. NaN stays NaN in every variant.
template <typename T>
SOFTSPLAT_HD T safe_normaliser(T normaliser, int normalisation) {
  if (normalisation == ADDEPS) return normaliser + eps<T>();
  if (normalisation == RAW) return T(1);
  if (normalisation == ZEROEPS) return normaliser == T(0) ? T(1) : normaliser;
  return normaliser < eps<T>() ? eps<T>() : normaliser;
}

// Whether d D' / d D is 1 (else 0): not where zeroeps replaced D, nor where clipeps clamped it
// (as torch.where and clamp_min differentiate: clamp_min passes only where D >= eps).
template <typename T>
SOFTSPLAT_HD bool normaliser_passes_gradient(T normaliser, int normalisation) {
  if (normalisation == ADDEPS) return true;
  if (normalisation == RAW) return false;  // the result does not depend on D
  if (normalisation == ZEROEPS) return !(normaliser == T(0));
  return normaliser >= eps<T>();
}

}  // namespace softsplat
