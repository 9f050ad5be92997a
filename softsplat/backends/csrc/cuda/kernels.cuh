// CUDA kernels of softmax splatting. Free of torch types: raw pointers, sizes and element strides,
// templated on the input's scalar type, the accumulation type (float, or double for double) and
// the index type (int when every offset fits, else long long). The same source is compiled by
// nvcc for the cpp backend, by NVRTC for the CuPy backend, and by g++ through the test suite's
// host shim (conformance/host/shim.h) so the tests execute it on the CPU.
//
// Forward: one thread per source pixel atomically adds its weighted channels and its weight to
// the four taps (atomics: the order of additions, hence the last bits, vary run to run), then
// one thread per output element divides. The ordered forward (taken when determinism is asked
// for) sums every target's contributions in one fixed order instead: by source pixel index
// (count, scan, place, order, weigh, gather below); its float adds are plain, not atomic, so
// the same inputs give the same bits on every run. Backward: one thread per target pixel
// prepares gN = grad / D' and gD, then one thread per source pixel gathers from its taps and
// writes only its own gradients: no atomics, so it is deterministic as it is.
#pragma once

#include "../taps.h"

namespace softsplat {

// Grid-stride loop over [0, total) in index_t; blockIdx.x * blockDim.x is formed in index_t so
// it cannot wrap in 32-bit unsigned arithmetic. (Left defined for the host tests' loop probe,
// conformance/host/cupy_host.cpp.)
#define SOFTSPLAT_KERNEL_LOOP(i, total)                                                        \
  for (index_t i = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +     \
                   static_cast<index_t>(threadIdx.x);                                          \
       i < (total); i += static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x))

// Decodes `pixel`, an index into [N, H, W], and fills its taps from `flow`; false when the
// pixel lands nowhere. The one entry of every kernel into the tap math of taps.h.
template <typename acc_t, typename index_t>
__device__ __forceinline__ bool source_taps(index_t pixel, const acc_t* flow, long long fl_sn, long long fl_sc,
                                            long long fl_sy, long long fl_sx, index_t H, index_t W, index_t& n,
                                            index_t& y, index_t& x, Taps<acc_t, index_t>& taps) {
  x = pixel % W;
  y = (pixel / W) % H;
  n = pixel / (W * H);
  const acc_t* source = flow + n * (index_t)fl_sn + y * (index_t)fl_sy + x * (index_t)fl_sx;
  return make_taps<acc_t, index_t>(x, y, source[0], source[(index_t)fl_sc], H, W, taps);
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void splat_forward_kernel(
    const scalar_t* __restrict__ input, long long in_sn, long long in_sc, long long in_sy, long long in_sx,
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    const acc_t* __restrict__ metric, long long me_sn, long long me_sy, long long me_sx,
    index_t N, index_t C, index_t H, index_t W, int kind,
    const acc_t* __restrict__ maximum,  // stable, max: M [N, 1, H, W] contiguous; else null
    acc_t* __restrict__ out,          // [N, C, H, W] contiguous, zeroed
    acc_t* __restrict__ normaliser) { // [N, 1, H, W] contiguous, zeroed; null for sum
  SOFTSPLAT_KERNEL_LOOP(pixel, N * H * W) {
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    if (!source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps)) continue;
    const acc_t m = metric ? metric[n * (index_t)me_sn + y * (index_t)me_sy + x * (index_t)me_sx] : acc_t(0);
    const index_t plane = H * W;
    index_t at[4];  // ty * W + tx of each tap, within a plane
    acc_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      at[k] = tap_y(taps, k) * W + tap_x(taps, k);
      // stable, max: each tap's weight is exp(metric - M(tap)), or 1 or 0; otherwise one per pixel
      w[k] = !taps.keep[k] ? acc_t(0)
             : weighs_per_tap(kind) ? tap_weight(kind, m, maximum[n * plane + at[k]]) : pixel_weight<acc_t>(kind, m);
      if (kind != SUM && taps.keep[k]) atomicAdd(normaliser + n * plane + at[k], taps.weight[k] * w[k]);
    }
    // Each input value is read once and added to the four taps.
    for (index_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(input[n * (index_t)in_sn + c * (index_t)in_sc + y * (index_t)in_sy + x * (index_t)in_sx]);
      acc_t* out_plane = out + (n * C + c) * plane;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // b * (v * w): the oracle's order of operations
        if (taps.keep[k]) atomicAdd(out_plane + at[k], kind == SUM ? taps.weight[k] * v : taps.weight[k] * (v * w[k]));
      }
    }
  }
}

// max(*address, value) with replaces_maximum's NaN rule, as fire-and-forget integer atomics on
// the bits (one reduction per tap, no compare-and-swap loop), as the Triton kernels take it:
// every NaN is first made the positive quiet NaN (which then beats every other value both ways)
// and -0.0 is made +0.0; a non-negative float orders as its bits taken as a signed integer, a
// negative one inversely as its bits taken unsigned. The target starts at -inf.
__device__ __forceinline__ void atomic_maximum(float* address, float value) {
  value = value != value ? __uint_as_float(0x7fc00000u) : value + 0.0f;
  const int bits = __float_as_int(value);
  if (bits >= 0)
    atomicMax(reinterpret_cast<int*>(address), bits);
  else
    atomicMin(reinterpret_cast<unsigned int*>(address), __float_as_uint(value));
}

__device__ __forceinline__ void atomic_maximum(double* address, double value) {
  value = value != value ? __longlong_as_double(0x7ff8000000000000LL) : value + 0.0;
  const long long bits = __double_as_longlong(value);
  if (bits >= 0)
    atomicMax(reinterpret_cast<long long*>(address), bits);
  else
    atomicMin(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(bits));
}

// M of stable splatting: per target, the maximum metric over the pixels with a kept tap on it;
// of max splatting (kind MAX), over the kept taps of positive weight (counts_for_maximum).
// `maximum` is filled with -inf beforehand. Max is exact and order-free: deterministic.
template <typename acc_t, typename index_t>
__global__ void splat_maximum_kernel(
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    const acc_t* __restrict__ metric, long long me_sn, long long me_sy, long long me_sx,
    index_t N, index_t H, index_t W, int kind, acc_t* __restrict__ maximum) {
  SOFTSPLAT_KERNEL_LOOP(pixel, N * H * W) {
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    if (!source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps)) continue;
    const acc_t m = metric[n * (index_t)me_sn + y * (index_t)me_sy + x * (index_t)me_sx];
    for (int k = 0; k < 4; ++k)
      if (counts_for_maximum(kind, taps.keep[k], taps.weight[k]))
        atomic_maximum(maximum + (n * H + tap_y(taps, k)) * W + tap_x(taps, k), m);
  }
}

template <typename acc_t, typename index_t>
__global__ void splat_normalise_kernel(acc_t* __restrict__ out, const acc_t* __restrict__ normaliser,
                                       index_t N, index_t C, index_t H, index_t W, int normalisation) {
  SOFTSPLAT_KERNEL_LOOP(element, N * C * H * W) {
    const index_t pixel = element % (H * W), n = element / (C * H * W);
    out[element] = out[element] / safe_normaliser(normaliser[n * H * W + pixel], normalisation);
  }
}

// ---- The ordered forward: every target sums its contributions in one fixed order ----
//
// 1. splat_count_kernel: per source pixel, an integer atomic add of 1 to the count of each
//    target it has a kept tap on (integer adds commute: the counts are exact in any order).
// 2. splat_scan_kernel / splat_scan_add_kernel: the counts become each target's first slot
//    (an exclusive prefix sum, chunk by chunk, the chunks' totals scanned the same way).
// 3. splat_place_kernel: per source pixel, each kept tap takes the next slot of its target
//    (an integer atomic increment) and writes the pixel's index there; afterwards each target's
//    counter holds its end, so target t's slots are [end(t - 1), end(t)). Which pixel gets
//    which slot varies run to run.
// 4. splat_order_kernel: per target, its slots sorted by source pixel index (unique within a
//    target: a pixel's four taps reach four different targets). From here on, nothing varies.
// 5. splat_weigh_kernel: per target, in slot order, each slot's bilinear weight b and per-tap
//    weight w (computed as the atomic forward computes them) and D = sum of b * w, added in slot
//    order; the slot's pixel index is replaced by the pixel's offset into `input`.
// 6. splat_gather_kernel: per output element, the sum of b * (v * w) (sum: b * v) over the
//    target's slots in order, divided by D' as splat_normalise_kernel divides.
//
// Counts, slots and offsets are index_t-sized: the launchers take the 32-bit kernels only where
// 4 * N * H * W (the most slots there can be) fits too.
template <typename index_t>
struct count_type;
template <>
struct count_type<int> {
  typedef unsigned int type;  // CUDA's atomicAdd takes unsigned int and unsigned long long
};
template <>
struct count_type<long long> {
  typedef unsigned long long type;
};

// The slots of `target`: [begin, end).
template <typename index_t>
__device__ __forceinline__ void slot_range(const typename count_type<index_t>::type* __restrict__ ends, index_t target,
                                           index_t& begin, index_t& end) {
  begin = target > 0 ? static_cast<index_t>(ends[target - 1]) : index_t(0);
  end = static_cast<index_t>(ends[target]);
}

template <typename acc_t, typename index_t>
__global__ void splat_count_kernel(
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    index_t N, index_t H, index_t W,
    typename count_type<index_t>::type* __restrict__ ends) {  // [N * H * W], zeroed
  typedef typename count_type<index_t>::type count_t;
  SOFTSPLAT_KERNEL_LOOP(pixel, N * H * W) {
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    if (!source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps)) continue;
    for (int k = 0; k < 4; ++k)
      if (taps.keep[k]) atomicAdd(ends + (n * H + tap_y(taps, k)) * W + tap_x(taps, k), count_t(1));
  }
}

// Each chunk of `chunk` elements of data[0, length) replaced by its exclusive prefix sum, its
// total written to sums[chunk index] (when sums is not null): one thread per chunk.
template <typename index_t>
__global__ void splat_scan_kernel(typename count_type<index_t>::type* __restrict__ data, index_t length, index_t chunk,
                                  typename count_type<index_t>::type* __restrict__ sums) {
  typedef typename count_type<index_t>::type count_t;
  SOFTSPLAT_KERNEL_LOOP(j, (length + chunk - 1) / chunk) {
    const index_t begin = j * chunk, end = length - begin < chunk ? length : begin + chunk;
    count_t running = 0;
    for (index_t i = begin; i < end; ++i) {
      const count_t value = data[i];
      data[i] = running;
      running += value;
    }
    if (sums) sums[j] = running;
  }
}

// data[i] += sums[i / chunk]: the chunks' scanned totals added to their elements.
template <typename index_t>
__global__ void splat_scan_add_kernel(typename count_type<index_t>::type* __restrict__ data, index_t length,
                                      index_t chunk, const typename count_type<index_t>::type* __restrict__ sums) {
  SOFTSPLAT_KERNEL_LOOP(i, length) { data[i] += sums[i / chunk]; }
}

template <typename acc_t, typename index_t>
__global__ void splat_place_kernel(
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    index_t N, index_t H, index_t W,
    typename count_type<index_t>::type* __restrict__ ends,  // in: each target's first slot; out: its end
    index_t* __restrict__ slots) {                           // [4 * N * H * W]: source pixel indices
  typedef typename count_type<index_t>::type count_t;
  SOFTSPLAT_KERNEL_LOOP(pixel, N * H * W) {
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    if (!source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps)) continue;
    for (int k = 0; k < 4; ++k)
      if (taps.keep[k]) slots[atomicAdd(ends + (n * H + tap_y(taps, k)) * W + tap_x(taps, k), count_t(1))] = pixel;
  }
}

// values[root] moved down the max-heap values[0, size) to where it belongs.
template <typename index_t>
__device__ __forceinline__ void sift_down(index_t* __restrict__ values, index_t root, index_t size) {
  const index_t moving = values[root];
  for (;;) {
    index_t child = 2 * root + 1;
    if (child >= size) break;
    if (child + 1 < size && values[child + 1] > values[child]) ++child;
    if (!(values[child] > moving)) break;
    values[root] = values[child];
    root = child;
  }
  values[root] = moving;
}

// values[0, size) in ascending order: insertion sort for the few slots of a usual target,
// heapsort (no recursion, O(size log size)) for a target that many pixels reach.
template <typename index_t>
__device__ __forceinline__ void sort_ascending(index_t* __restrict__ values, index_t size) {
  if (size <= 16) {
    for (index_t i = 1; i < size; ++i) {
      const index_t moving = values[i];
      index_t j = i;
      for (; j > 0 && values[j - 1] > moving; --j) values[j] = values[j - 1];
      values[j] = moving;
    }
    return;
  }
  for (index_t root = size / 2; root > 0; --root) sift_down(values, root - 1, size);
  for (index_t last = size - 1; last > 0; --last) {
    const index_t largest = values[0];
    values[0] = values[last];
    values[last] = largest;
    sift_down(values, index_t(0), last);
  }
}

template <typename index_t>
__global__ void splat_order_kernel(const typename count_type<index_t>::type* __restrict__ ends, index_t targets,
                                   index_t* __restrict__ slots) {
  SOFTSPLAT_KERNEL_LOOP(target, targets) {
    index_t begin, end;
    slot_range<index_t>(ends, target, begin, end);
    sort_ascending(slots + begin, end - begin);
  }
}

template <typename acc_t, typename index_t>
__global__ void splat_weigh_kernel(
    long long in_sn, long long in_sy, long long in_sx,  // input's strides: each slot's offset into it
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    const acc_t* __restrict__ metric, long long me_sn, long long me_sy, long long me_sx,
    index_t N, index_t H, index_t W, int kind,
    const acc_t* __restrict__ maximum,  // stable, max: M [N, 1, H, W] contiguous; else null
    const typename count_type<index_t>::type* __restrict__ ends,
    index_t* __restrict__ slots,        // in: source pixel indices, sorted; out: their offsets into input
    acc_t* __restrict__ bilinear,       // [4 * N * H * W]: each slot's bilinear weight
    acc_t* __restrict__ weight,         // [4 * N * H * W]: each slot's w; null for sum
    acc_t* __restrict__ normaliser) {   // [N, 1, H, W] contiguous; null for sum
  const index_t plane = H * W;
  SOFTSPLAT_KERNEL_LOOP(target, N * plane) {
    index_t begin, end;
    slot_range<index_t>(ends, target, begin, end);
    const index_t at = target % plane;  // ty * W + tx
    acc_t D = 0;
    for (index_t s = begin; s < end; ++s) {
      index_t n, y, x;
      Taps<acc_t, index_t> taps;
      source_taps(slots[s], flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps);  // it lands: it has a slot
      acc_t b = 0;  // of the pixel's one kept tap on this target (kept taps lie inside: their `at` differ)
#pragma unroll
      for (int k = 0; k < 4; ++k)  // constant indices: the taps stay in registers
        if (taps.keep[k] && tap_y(taps, k) * W + tap_x(taps, k) == at) b = taps.weight[k];
      const acc_t m = metric ? metric[n * (index_t)me_sn + y * (index_t)me_sy + x * (index_t)me_sx] : acc_t(0);
      // as splat_forward_kernel weighs the tap
      const acc_t w = weighs_per_tap(kind) ? tap_weight(kind, m, maximum[target]) : pixel_weight<acc_t>(kind, m);
      bilinear[s] = b;
      if (weight) weight[s] = w;
      D += b * w;
      slots[s] = n * (index_t)in_sn + y * (index_t)in_sy + x * (index_t)in_sx;
    }
    if (normaliser) normaliser[target] = D;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void splat_gather_kernel(
    const scalar_t* __restrict__ input, long long in_sc,
    index_t N, index_t C, index_t H, index_t W, int kind, int normalisation,
    const typename count_type<index_t>::type* __restrict__ ends,
    const index_t* __restrict__ slots,  // offsets into input, from splat_weigh_kernel
    const acc_t* __restrict__ bilinear, const acc_t* __restrict__ weight,  // weight: null for sum
    const acc_t* __restrict__ normaliser,  // null for sum
    acc_t* __restrict__ out) {             // [N, C, H, W] contiguous
  const index_t plane = H * W;
  SOFTSPLAT_KERNEL_LOOP(element, N * C * plane) {
    const index_t at = element % plane, n = element / (C * plane), c = element / plane - n * C;
    const index_t target = n * plane + at;
    index_t begin, end;
    slot_range<index_t>(ends, target, begin, end);
    const scalar_t* channel = input + c * (index_t)in_sc;
    acc_t sum = 0;
    for (index_t s = begin; s < end; ++s) {
      const acc_t v = static_cast<acc_t>(channel[slots[s]]);
      // b * (v * w): the oracle's order of operations, as splat_forward_kernel adds it
      sum += kind == SUM ? bilinear[s] * v : bilinear[s] * (v * weight[s]);
    }
    out[element] = kind == SUM ? sum : sum / safe_normaliser(normaliser[target], normalisation);
  }
}

// g[n, :, y, x] = (gN_0 .. gN_{C-1}, gD) for the normalised kinds, (grad_0 .. grad_{C-1}) for sum:
// planar [N, K, H, W], so that neighbouring threads (neighbouring pixels) store, and gather from
// the taps of neighbouring pixels, neighbouring addresses (coalesced).
template <typename acc_t, typename index_t>
__global__ void splat_backward_prepare_kernel(
    const acc_t* __restrict__ grad, long long gr_sn, long long gr_sc, long long gr_sy, long long gr_sx,
    const acc_t* __restrict__ out,  // [N, C, H, W] contiguous; null for sum
    const acc_t* __restrict__ normaliser,  // [N, 1, H, W] contiguous; null for sum
    const acc_t* __restrict__ grad_normaliser, long long gn_sn, long long gn_sy, long long gn_sx,  // may be null
    index_t N, index_t C, index_t H, index_t W, int kind, int normalisation,
    acc_t* __restrict__ g) {
  const index_t K = C + (kind == SUM ? 0 : 1);
  SOFTSPLAT_KERNEL_LOOP(pixel, N * H * W) {
    const index_t x = pixel % W, y = (pixel / W) % H, n = pixel / (W * H), HW = H * W;
    acc_t* planes = g + n * K * HW + (pixel - n * HW);  // channel c at planes[c * HW]
    if (kind == SUM) {
      for (index_t c = 0; c < C; ++c)
        planes[c * HW] = grad[n * (index_t)gr_sn + c * (index_t)gr_sc + y * (index_t)gr_sy + x * (index_t)gr_sx];
      continue;
    }
    const acc_t D = normaliser[pixel];
    const acc_t divisor = safe_normaliser(D, normalisation);
    acc_t gD = 0;
    for (index_t c = 0; c < C; ++c) {
      const acc_t gN = grad[n * (index_t)gr_sn + c * (index_t)gr_sc + y * (index_t)gr_sy + x * (index_t)gr_sx] / divisor;
      planes[c * HW] = gN;
      gD -= gN * out[((n * C + c) * H + y) * W + x];
    }
    acc_t last = normaliser_passes_gradient(D, normalisation) ? gD : acc_t(0);
    if (grad_normaliser) last += grad_normaliser[n * (index_t)gn_sn + y * (index_t)gn_sy + x * (index_t)gn_sx];
    planes[C * HW] = last;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void splat_backward_kernel(
    const scalar_t* __restrict__ input, long long in_sn, long long in_sc, long long in_sy, long long in_sx,
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    const acc_t* __restrict__ metric, long long me_sn, long long me_sy, long long me_sx,
    const acc_t* __restrict__ g,  // from splat_backward_prepare_kernel
    index_t N, index_t C, index_t H, index_t W, int kind,
    const acc_t* __restrict__ maximum,  // stable, max: M [N, 1, H, W] contiguous; else null
    scalar_t* __restrict__ grad_input,  // [N, C, H, W] contiguous, or null
    acc_t* __restrict__ grad_flow,      // [N, 2, H, W] contiguous, or null
    acc_t* __restrict__ grad_metric) {  // [N, 1, H, W] contiguous, or null
  const bool normalised = kind != SUM;
  const index_t K = C + (normalised ? 1 : 0);
  SOFTSPLAT_KERNEL_LOOP(pixel, N * H * W) {
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    const bool lands = source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps);
    const scalar_t* values = input + n * (index_t)in_sn + y * (index_t)in_sy + x * (index_t)in_sx;
    const bool stable = weighs_per_tap(kind);  // stable and max: a weight per tap
    const acc_t m = metric ? metric[n * (index_t)me_sn + y * (index_t)me_sy + x * (index_t)me_sx] : acc_t(0);
    const acc_t w = stable ? acc_t(1) : pixel_weight<acc_t>(kind, m);  // stable: per tap, below
    acc_t dx[4], dy[4];
    if (lands) tap_derivatives(taps, dx, dy);
    const acc_t* tap_rows[4];
    acc_t tap_w[4];  // stable: exp(metric - M(tap)) (max: 1, 0 or NaN), folded into the gathers; else 1
    for (int k = 0; k < 4; ++k) {
      const bool kept = lands && taps.keep[k];
      tap_rows[k] = kept ? g + n * K * H * W + tap_y(taps, k) * W + tap_x(taps, k) : nullptr;  // channel c at [c * HW]
      tap_w[k] = kept && stable ? tap_weight(kind, m, maximum[(n * H + tap_y(taps, k)) * W + tap_x(taps, k)]) : acc_t(1);
    }

    // Per channel: gathered_c = sum over kept taps of weight * gN_c. Computed for every pixel,
    // landed or not, as autograd does through the oracle (0 * inf stays NaN there too).
    acc_t grad_fx = 0, grad_fy = 0, grad_w = 0;
    for (index_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(values[c * (index_t)in_sc]);
      const acc_t splatted = normalised ? v * w : v;
      acc_t gathered = 0;
      for (int k = 0; k < 4; ++k) {
        if (!tap_rows[k]) continue;
        const acc_t q = tap_rows[k][c * H * W];
        gathered += taps.weight[k] * (stable ? tap_w[k] * q : q);
        const acc_t tap_splatted = stable ? v * tap_w[k] : splatted;
        grad_fx += dx[k] * (q * tap_splatted);
        grad_fy += dy[k] * (q * tap_splatted);
      }
      if (grad_input)
        grad_input[((n * C + c) * H + y) * W + x] = static_cast<scalar_t>(normalised && !stable ? gathered * w : gathered);
      grad_w += gathered * v;
    }
    if (normalised) {
      for (int k = 0; k < 4; ++k) {
        if (!tap_rows[k]) continue;
        const acc_t q = tap_rows[k][C * H * W];
        grad_w += taps.weight[k] * (stable ? tap_w[k] * q : q);
        const acc_t tap_weight = stable ? tap_w[k] : w;
        grad_fx += dx[k] * (q * tap_weight);
        grad_fy += dy[k] * (q * tap_weight);
      }
    }
    if (grad_flow) {
      grad_flow[((n * 2) * H + y) * W + x] = grad_fx;
      grad_flow[((n * 2 + 1) * H + y) * W + x] = grad_fy;
    }
    // stable: d exp(m - M) / dm is the tap weight, already folded into grad_w; max: none
    if (grad_metric)
      grad_metric[(n * H + y) * W + x] = kind == MAX ? acc_t(0) : stable ? grad_w : grad_w * weight_derivative(kind, w);
  }
}

}  // namespace softsplat
