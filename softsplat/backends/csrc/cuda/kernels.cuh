// CUDA kernels of softmax splatting. Free of torch types: raw pointers, sizes and element strides,
// templated on the input's scalar type, the accumulation type (float, or double for double) and
// the index type (int when every offset fits, else long long). The same source is compiled by
// nvcc for the cpp backend, by NVRTC for the CuPy backend, and by g++ through the test suite's
// host shim (conformance/host/shim.h) so the tests execute it on the CPU.
//
// Forward: one thread per source pixel and block of lanes atomically adds the block's weighted
// channels (and the weight, the normaliser's lane) to the four taps of a pixel-major
// accumulator, a 16-byte quad of lanes per atomic operation (atomics: the order of additions,
// hence the last bits, vary run to run), then one thread per target and block of channels
// writes the result planes, divided, and D. The ordered forward (taken when determinism is
// asked for) sums every target's contributions in one fixed order instead: by source pixel
// index (key, a stable sort, ends, weigh, gather below); its float adds are plain, not atomic,
// so the same inputs give the same bits on every run. Backward: one thread per target pixel prepares gN = grad / D' and gD,
// then one thread per source pixel gathers from its taps and writes only its own gradients: no
// atomics, so it is deterministic as it is.
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

// The atomic forward adds into an accumulator of forward_lanes(C, kind) lanes per target,
// pixel-major ([N, H, W, lanes]): the C channels side by side, then (but for sum) the
// normaliser, then zeros up to a multiple of 4. A pixel's adds into one tap are then 16-byte
// quads of neighbouring lanes: on sm_90 one vector reduction each (REDG.E.ADD.F32x4), four
// times fewer than one per channel and plane; elsewhere (sm_80, float64) four scalar ones.
template <typename index_t>
__host__ __device__ __forceinline__ index_t forward_lanes(index_t C, int kind) {
  return (C + (kind != SUM ? 1 : 0) + 3) / 4 * 4;
}

// target[0..3] += (a, b, c, d), atomically per lane: four scalar atomic adds, or for float
// where sm_90's vector reduction is there, one.
template <typename acc_t>
__device__ __forceinline__ void add_quad(acc_t* target, acc_t a, acc_t b, acc_t c, acc_t d) {
  atomicAdd(target, a);
  atomicAdd(target + 1, b);
  atomicAdd(target + 2, c);
  atomicAdd(target + 3, d);
}

#if defined(SOFTSPLAT_VECTOR_ATOMICS) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
__device__ __forceinline__ void add_quad(float* target, float a, float b, float c, float d) {
  atomicAdd(reinterpret_cast<float4*>(target), make_float4(a, b, c, d));
}
#endif

// One thread per (n, block of kForwardLanes lanes, source pixel): element e is pixel e % (H * W)
// of block (e / (H * W)) % blocks of batch n (blocks = ceil(lanes / kForwardLanes)), so
// neighbouring threads take neighbouring pixels (coalesced loads), and an image of few pixels
// and many channels still fills the device. Each thread computes its pixel's taps, then adds its
// block's lanes into the four taps, a quad at a time: b * (v * w) per channel (sum: b * v), b * w
// into the normaliser's lane (b * (1 * w), the same bits), b * (0 * w) into the padding (never
// read).
constexpr int kForwardLanes = 16;

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void splat_forward_kernel(
    const scalar_t* __restrict__ input, long long in_sn, long long in_sc, long long in_sy, long long in_sx,
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    const acc_t* __restrict__ metric, long long me_sn, long long me_sy, long long me_sx,
    index_t N, index_t C, index_t H, index_t W, int kind,
    const acc_t* __restrict__ maximum,  // stable, max: M [N, 1, H, W] contiguous; else null
    acc_t* __restrict__ sums) {         // [N, H, W, forward_lanes(C, kind)], zeroed
  const index_t plane = H * W, lanes = forward_lanes(C, kind);
  const index_t blocks = (lanes + kForwardLanes - 1) / kForwardLanes;
  SOFTSPLAT_KERNEL_LOOP(element, N * blocks * plane) {
    const index_t block = element / plane % blocks;
    const index_t pixel = element / (plane * blocks) * plane + element % plane;  // into [N, H, W]
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    if (!source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps)) continue;
    const acc_t m = metric ? metric[n * (index_t)me_sn + y * (index_t)me_sy + x * (index_t)me_sx] : acc_t(0);
    // The block's values, each input value read once, all of them before the first add (the
    // loads in flight together): channel, normaliser (1) or padding (0), by lane.
    const index_t first = block * kForwardLanes;
    const index_t count = lanes - first < kForwardLanes ? lanes - first : index_t(kForwardLanes);
    const scalar_t* values = input + n * (index_t)in_sn + y * (index_t)in_sy + x * (index_t)in_sx;
    acc_t v[kForwardLanes];
#pragma unroll
    for (int j = 0; j < kForwardLanes; ++j) {
      const index_t c = first + j;
      v[j] = c < C ? static_cast<acc_t>(values[c * (index_t)in_sc]) : acc_t(c == C && kind != SUM ? 1 : 0);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (!taps.keep[k]) continue;
      const index_t at = (n * H + tap_y(taps, k)) * W + tap_x(taps, k);
      // stable, max: the tap's weight is exp(metric - M(tap)), or 1 or 0; otherwise one per
      // pixel; sum: 1 (b * (v * 1) is b * v, the same bits)
      const acc_t w = kind == SUM ? acc_t(1)
                      : weighs_per_tap(kind) ? tap_weight(kind, m, maximum[at]) : pixel_weight<acc_t>(kind, m);
      const acc_t b = taps.weight[k];
      acc_t* target = sums + at * lanes + first;
      // b * (v * w): the oracle's order of operations (padding: 0 times w, never read)
#pragma unroll
      for (int q = 0; q < kForwardLanes / 4; ++q)
        if (4 * q < count)
          add_quad(target + 4 * q, b * (v[4 * q] * w), b * (v[4 * q + 1] * w), b * (v[4 * q + 2] * w), b * (v[4 * q + 3] * w));
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

// out = sums / D' (normaliser null: out = sums), both [N, C, H, W], rounded to out_t, per
// target and block of kNormaliseChannels channels: each thread reads its target's D once and
// finishes the block's channels (stores coalesced across threads, as in a plane). The ordered
// forward's result rounded into a 16-bit input's dtype (its gather divides).
constexpr int kNormaliseChannels = 8;

template <typename out_t, typename acc_t, typename index_t>
__global__ void splat_normalise_kernel(const acc_t* sums, const acc_t* __restrict__ normaliser, out_t* out,
                                       index_t N, index_t C, index_t H, index_t W, int normalisation) {
  const index_t plane = H * W, blocks = (C + kNormaliseChannels - 1) / kNormaliseChannels;
  SOFTSPLAT_KERNEL_LOOP(index, N * blocks * plane) {
    const index_t pixel = index % plane, block = index / plane % blocks, n = index / (plane * blocks);
    const bool divides = normaliser != nullptr;
    const acc_t divisor = divides ? safe_normaliser(normaliser[n * plane + pixel], normalisation) : acc_t(1);
    const index_t first = block * kNormaliseChannels;
    const index_t last = C - first < kNormaliseChannels ? C : first + kNormaliseChannels;
    for (index_t c = first; c < last; ++c) {
      const index_t at = (n * C + c) * plane + pixel;
      out[at] = static_cast<out_t>(divides ? sums[at] / divisor : sums[at]);
    }
  }
}

// The atomic forward's result from its accumulator `sums` ([N, H, W, lanes], lanes =
// forward_lanes(C, kind)), in one pass: out [N, C, H, W] = sums / D' (or sums, when `divides`
// is false), rounded to out_t (a 16-bit input's dtype, or acc_t), and the normaliser's lane
// into `normaliser` [N, 1, H, W] (null for sum). One thread per target and block of
// kNormaliseChannels channels: it reads its channels' lanes (32 neighbouring bytes) and its
// target's D, and writes its channels' planes (coalesced across threads); block 0 writes D.
template <typename out_t, typename acc_t, typename index_t>
__global__ void splat_finish_kernel(const acc_t* __restrict__ sums, index_t lanes, out_t* __restrict__ out,
                                    acc_t* __restrict__ normaliser, index_t N, index_t C, index_t H, index_t W,
                                    int normalisation, int divides) {
  const index_t plane = H * W;
  const index_t blocks = C > 0 ? (C + kNormaliseChannels - 1) / kNormaliseChannels : index_t(1);
  SOFTSPLAT_KERNEL_LOOP(index, N * blocks * plane) {
    const index_t pixel = index % plane, block = index / plane % blocks, n = index / (plane * blocks);
    const acc_t* target = sums + (n * plane + pixel) * lanes;
    const acc_t D = normaliser ? target[C] : acc_t(0);
    if (normaliser && block == 0) normaliser[n * plane + pixel] = D;
    const acc_t divisor = divides ? safe_normaliser(D, normalisation) : acc_t(1);
    const index_t first = block * kNormaliseChannels;
    const index_t last = C - first < kNormaliseChannels ? C : first + kNormaliseChannels;
    for (index_t c = first; c < last; ++c)
      out[(n * C + c) * plane + pixel] = static_cast<out_t>(divides ? target[c] / divisor : target[c]);
  }
}

// ---- The ordered forward: every target sums its contributions in one fixed order ----
//
// A tap is (source pixel p, corner k), numbered 4 * p + k. Sorted by target, stably, the taps
// of each target come in ascending source pixel order (a pixel's four taps reach four
// different targets); every step is parallel over taps, targets or (target, channel block),
// and no step depends on the order in which threads run (no atomics at all):
// 1. splat_key_kernel: per source pixel, each tap's key: its target's index n * H * W + ty * W
//    + tx, or N * H * W (past every target) for a tap that is not kept.
// 2. a stable sort of the keys (torch's sort with stable=True, between the launches): `sorted`
//    and `order`, the tap numbers in that order. The slots of target t are then
//    [end(t - 1), end(t)), every target's slots in ascending source pixel order.
// 3. splat_ends_kernel: per target, end(t) = how many keys are at most t (a binary search).
// 4. splat_weigh_kernel: per slot, its tap's bilinear weight b and per-tap weight w (computed
//    as the atomic forward computes them) and its source pixel's offset into `input`.
// 5. splat_gather_kernel: per target and block of kSplatChannelBlock channels, in slot order,
//    the sums of b * (v * w) (sum: b * v) of each channel of the block, and D = the sum of
//    b * w, each slot read once; divided by D' as splat_normalise_kernel divides. A target
//    many pixels reach costs its threads time in proportion to their number (one pass over the
//    slots), never a sort.
//
// Keys, ends and offsets are index_t: the launchers take the 32-bit kernels only where
// 4 * N * H * W (the number of taps) fits too. `order` is the sort's int64 indices.
constexpr int kSplatChannelBlock = 8;  // channels a gather thread sums

// The slots of `target`: [begin, end).
template <typename index_t>
__device__ __forceinline__ void slot_range(const index_t* __restrict__ ends, index_t target, index_t& begin,
                                           index_t& end) {
  begin = target > 0 ? ends[target - 1] : index_t(0);
  end = ends[target];
}

template <typename acc_t, typename index_t>
__global__ void splat_key_kernel(
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    index_t N, index_t H, index_t W,
    index_t* __restrict__ keys) {  // [4 * N * H * W]
  const index_t targets = N * H * W;
  SOFTSPLAT_KERNEL_LOOP(pixel, targets) {
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    index_t* key = keys + 4 * pixel;
    if (!source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps)) {
      for (int k = 0; k < 4; ++k) key[k] = targets;
      continue;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) key[k] = taps.keep[k] ? (n * H + tap_y(taps, k)) * W + tap_x(taps, k) : targets;
  }
}

// ends[t] = how many of sorted[0, slots) are at most t: the end of target t's slots.
template <typename index_t>
__global__ void splat_ends_kernel(const index_t* __restrict__ sorted, index_t slots, index_t targets,
                                  index_t* __restrict__ ends) {
  SOFTSPLAT_KERNEL_LOOP(target, targets) {
    index_t low = 0, high = slots;
    while (low < high) {
      const index_t middle = low + (high - low) / 2;
      if (sorted[middle] <= target) low = middle + 1; else high = middle;
    }
    ends[target] = low;
  }
}

template <typename acc_t, typename index_t>
__global__ void splat_weigh_kernel(
    long long in_sn, long long in_sy, long long in_sx,  // input's strides: each slot's offset into it
    const acc_t* __restrict__ flow, long long fl_sn, long long fl_sc, long long fl_sy, long long fl_sx,
    const acc_t* __restrict__ metric, long long me_sn, long long me_sy, long long me_sx,
    index_t N, index_t H, index_t W, int kind,
    const acc_t* __restrict__ maximum,    // stable, max: M [N, 1, H, W] contiguous; else null
    const long long* __restrict__ order,  // [4 * N * H * W]: the tap of each slot
    const index_t* __restrict__ ends,
    index_t* __restrict__ offsets,        // [4 * N * H * W]: each slot's source offset into input
    acc_t* __restrict__ bilinear,         // [4 * N * H * W]: each slot's bilinear weight
    acc_t* __restrict__ weight) {         // [4 * N * H * W]: each slot's w; null for sum
  const index_t targets = N * H * W, kept = ends[targets - 1];  // the slots past `kept`: taps not kept
  SOFTSPLAT_KERNEL_LOOP(slot, kept) {
    const index_t tap = static_cast<index_t>(order[slot]), pixel = tap / 4;
    const int corner = static_cast<int>(tap - 4 * pixel);
    index_t n, y, x;
    Taps<acc_t, index_t> taps;
    source_taps(pixel, flow, fl_sn, fl_sc, fl_sy, fl_sx, H, W, n, y, x, taps);  // it lands: it has a slot
    acc_t b = 0;
    index_t at = 0;  // ty * W + tx
#pragma unroll
    for (int k = 0; k < 4; ++k)  // constant indices: the taps stay in registers
      if (k == corner) {
        b = taps.weight[k];
        at = tap_y(taps, k) * W + tap_x(taps, k);
      }
    const acc_t m = metric ? metric[n * (index_t)me_sn + y * (index_t)me_sy + x * (index_t)me_sx] : acc_t(0);
    bilinear[slot] = b;
    // as splat_forward_kernel weighs the tap
    if (weight)
      weight[slot] = weighs_per_tap(kind) ? tap_weight(kind, m, maximum[n * H * W + at]) : pixel_weight<acc_t>(kind, m);
    offsets[slot] = n * (index_t)in_sn + y * (index_t)in_sy + x * (index_t)in_sx;
  }
}

// One thread per (n, block of channels, target): element e is target e % (H * W) of block
// (e / (H * W)) % blocks of batch n; neighbouring threads take neighbouring targets, so each
// channel's stores are coalesced. blocks = max(1, ceil(C / kSplatChannelBlock)); the threads of
// block 0 write D (every block sums it, the same bits).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void splat_gather_kernel(
    const scalar_t* __restrict__ input, long long in_sc,
    index_t N, index_t C, index_t H, index_t W, int kind, int normalisation,
    const index_t* __restrict__ ends,
    const index_t* __restrict__ offsets,  // offsets into input, from splat_weigh_kernel
    const acc_t* __restrict__ bilinear, const acc_t* __restrict__ weight,  // weight: null for sum
    acc_t* __restrict__ normaliser,  // [N, 1, H, W] contiguous; null for sum
    acc_t* __restrict__ out) {       // [N, C, H, W] contiguous
  const index_t plane = H * W;
  const index_t blocks = C > 0 ? (C + kSplatChannelBlock - 1) / kSplatChannelBlock : index_t(1);
  SOFTSPLAT_KERNEL_LOOP(element, N * blocks * plane) {
    const index_t at = element % plane, n = element / (blocks * plane), block = element / plane - n * blocks;
    const index_t target = n * plane + at, first = block * kSplatChannelBlock;
    const index_t channels = C - first < kSplatChannelBlock ? C - first : index_t(kSplatChannelBlock);
    index_t begin, end;
    slot_range<index_t>(ends, target, begin, end);
    const scalar_t* values = input + first * (index_t)in_sc;
    acc_t sums[kSplatChannelBlock];
#pragma unroll
    for (int j = 0; j < kSplatChannelBlock; ++j) sums[j] = 0;
    acc_t D = 0;
    for (index_t s = begin; s < end; ++s) {
      const scalar_t* source = values + offsets[s];
      const acc_t b = bilinear[s], w = kind == SUM ? acc_t(1) : weight[s];
      D += b * w;
#pragma unroll
      for (int j = 0; j < kSplatChannelBlock; ++j) {
        if (j < channels) {
          const acc_t v = static_cast<acc_t>(source[j * (index_t)in_sc]);
          // b * (v * w): the oracle's order of operations, as splat_forward_kernel adds it
          sums[j] += kind == SUM ? b * v : b * (v * w);
        }
      }
    }
    if (kind != SUM && block == 0) normaliser[target] = D;
    const acc_t divisor = kind == SUM ? acc_t(1) : safe_normaliser(D, normalisation);
    acc_t* destination = out + (n * C + first) * plane + at;
#pragma unroll
    for (int j = 0; j < kSplatChannelBlock; ++j)
      if (j < channels) destination[j * plane] = kind == SUM ? sums[j] : sums[j] / divisor;
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
