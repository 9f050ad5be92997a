// The backward of the CPU kernels. Per band of source rows (schedule.h's bands), gN = grad / D'
// and gD of the rows it reaches are prepared in a ring of rows of its run of bands, one run per
// thread (rows its previous band also reached are kept); every source pixel gathers from its
// four taps and writes only its own gradients: no atomics, and results independent of the
// thread count.
#include "../tensor.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "kernels.h"
#include "packed.h"
#include "tap_chunk.h"

namespace softsplat {
namespace cpu {

namespace {

// Lanes of the blocked gather (Gather::rows_blocked, eight channels and more): the prepared
// values of a target, and a pixel's, in blocks of kGatherBlock, zero-padded. (Measured against
// 16: less padding, and faster from 8 to 64 channels.) With 128-bit vectors only (SSE2, NEON)
// blocks of 4: a tap's four dots of 8 lanes and their operands took more registers than there
// are, and were kept on the stack.
#if defined(__AVX__)
constexpr int64_t kGatherBlock = 8;
#else
constexpr int64_t kGatherBlock = 4;
#endif

inline bool blocked_gather(int64_t C) {
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  return C >= 8;
#else
  return false;
#endif
}

// Values per target in Prepare's layout: kPacked for up to three channels (packed.h); the
// channels and gD rounded up to whole blocks for the blocked gather; else the channels and gD.
inline int64_t prepared_stride(int64_t C, bool normalised) {
  if (packed_layout(C)) return kPacked;
  const int64_t K = C + (normalised ? 1 : 0);
  return blocked_gather(C) ? (K + kGatherBlock - 1) / kGatherBlock * kGatherBlock : K;
}

// The backward's gN = grad / D' and gD (docs/spec.md), pixel-major: K values per target pixel (the
// C channels' gN, then gD when the mode normalises; zero-padded to kPacked in the packed
// layout), for rows [lo, hi) of image n into g: row y at g + (y - lo) * pitch(), target x at
// (x + 1) * K in it. The pixel before and after each row are left as they are: the caller's
// zeros, which a tap outside the image reads (the AVX-512 gather loads a row's two taps at once).
template <typename acc_t>
struct Prepare {
  const acc_t* grad;
  View4 grad_view;
  const acc_t* result;  // out; null for sum
  View4 result_view;
  const acc_t* norm;    // D; null for sum
  const acc_t* grad_norm;
  View4 grad_norm_view;
  int normalisation;
  int64_t C, H, W;
  int64_t K;  // values per target in g: prepared_stride (the lanes past C and gD: zeros)

  int64_t pitch() const { return (W + 2) * K; }

  // gN of channel c of row y into `channel` (W values): grad / D' (`by`: D' of the row; null
  // for sum); with `sum` (the row's gD so far), sum -= gN * out, channel by channel.
  void channel_row(int64_t n, int64_t c, int64_t y, const acc_t* by, acc_t* __restrict sum, acc_t* __restrict channel) const {
    // A broadcast gradient (stride 0, as sum().backward() gives) and a contiguous one each have
    // their loop.
    const acc_t* gc = grad + grad_view.at(n, c, y, 0);
    const int64_t step = grad_view.x;
    const acc_t one = acc_t(1);
    if (step == 0)
      for (int64_t x = 0; x < W; ++x) channel[x] = gc[0] / (by ? by[x] : one);
    else if (step == 1)
      for (int64_t x = 0; x < W; ++x) channel[x] = gc[x] / (by ? by[x] : one);
    else
      for (int64_t x = 0; x < W; ++x) channel[x] = gc[x * step] / (by ? by[x] : one);
    if (!sum) return;
    const acc_t* r = result + result_view.at(n, c, y, 0);
    if (result_view.x == 1)
      for (int64_t x = 0; x < W; ++x) sum[x] -= channel[x] * r[x];
    else
      for (int64_t x = 0; x < W; ++x) sum[x] -= channel[x] * r[x * result_view.x];
  }

  // gD of row y from its sum over the channels (in place): 0 where D' does not pass D's
  // gradient, plus the normaliser's own gradient.
  void normaliser_row(int64_t n, int64_t y, acc_t* __restrict sum) const {
    const acc_t* D = norm + (n * H + y) * W;
    const acc_t* extra = grad_norm ? grad_norm + grad_norm_view.at(n, 0, y, 0) : nullptr;
    // The normalisation a compile-time constant, so that the loop vectorises (with it a
    // variable, it did not).
    auto pass = [&](auto code) {
      constexpr int kNormalisation = decltype(code)::value;
      for (int64_t x = 0; x < W; ++x) sum[x] = normaliser_passes_gradient(D[x], kNormalisation) ? sum[x] : acc_t(0);
    };
    with_normalisation(normalisation, pass);
    if (extra)
      for (int64_t x = 0; x < W; ++x) sum[x] += extra[x * grad_norm_view.x];
  }

  void divisors(int64_t n, int64_t y, acc_t* __restrict divisor) const {
    const acc_t* D = norm + (n * H + y) * W;
    for (int64_t x = 0; x < W; ++x) divisor[x] = safe_normaliser(D[x], normalisation);
  }

  void rows(int64_t n, int64_t lo, int64_t hi, acc_t* g) const {
    if (blocked_gather(C)) {
      rows_by_blocks(n, lo, hi, g);
      return;
    }
    // Each row as planes first (the channels' gN, then gD, then zeros), in loops that vectorise,
    // then interleaved into g.
    const int64_t used = C + (norm ? 1 : 0);
    std::vector<acc_t> divisor(W), planes(std::max(used, K) * W, acc_t(0));
    auto plane = [&](int64_t c) { return planes.data() + c * W; };
    for (int64_t y = lo; y < hi; ++y) {
      acc_t* sum = norm ? plane(C) : nullptr;
      if (norm) {
        divisors(n, y, divisor.data());
        std::fill(sum, sum + W, acc_t(0));
      }
      for (int64_t c = 0; c < C; ++c) channel_row(n, c, y, norm ? divisor.data() : nullptr, sum, plane(c));
      if (norm) normaliser_row(n, y, sum);
      acc_t* row = g + (y - lo) * pitch() + K;
      if (K == kPacked) {
        const acc_t* const lanes[kPacked] = {plane(0), plane(1), plane(2), plane(3)};
        interleave(lanes, row, W);
      } else {
        for (int64_t c = 0; c < used; ++c)
          for (int64_t x = 0; x < W; ++x) row[x * K + c] = plane(c)[x];
      }
    }
  }

#if defined(__AVX2__)
  // Channels [c0, c0 + 8) of row y (float; the gradient's and the result's rows contiguous) as
  // channel_row computes them, 8 targets at a time, transposed straight into Prepare's layout
  // (`row`: target 0's values; target x's lanes c0.. at row + x * K + c0), with no planes in
  // between. The same values and sums, in the same order per target.
  void block_row(int64_t n, int64_t c0, int64_t y, const float* by, float* sum, float* row) const {
    constexpr int kLanes = 8;
    const float* gc[kLanes];
    const float* r[kLanes] = {};
    for (int j = 0; j < kLanes; ++j) {
      gc[j] = grad + grad_view.at(n, c0 + j, y, 0);
      if (sum) r[j] = result + result_view.at(n, c0 + j, y, 0);
    }
    int64_t x = 0;
    for (; x + kLanes <= W; x += kLanes) {
      const __m256 d = by ? _mm256_loadu_ps(by + x) : _mm256_set1_ps(1.0f);
      __m256 v[kLanes];
      for (int j = 0; j < kLanes; ++j) v[j] = _mm256_div_ps(_mm256_loadu_ps(gc[j] + x), d);
      if (sum) {
        __m256 s = _mm256_loadu_ps(sum + x);
        for (int j = 0; j < kLanes; ++j) s = _mm256_sub_ps(s, _mm256_mul_ps(v[j], _mm256_loadu_ps(r[j] + x)));
        _mm256_storeu_ps(sum + x, s);
      }
      transpose_8(v);
      for (int k = 0; k < kLanes; ++k) _mm256_storeu_ps(row + (x + k) * K + c0, v[k]);
    }
    for (; x < W; ++x)
      for (int j = 0; j < kLanes; ++j) {
        const float value = gc[j][x] / (by ? by[x] : 1.0f);
        row[x * K + c0 + j] = value;
        if (sum) sum[x] -= value * r[j][x];
      }
  }
#endif

#if defined(SOFTSPLAT_VECTOR_EXTENSION) && !defined(__AVX__)
  // block_row with 128-bit vectors (SSE2, NEON): channels [c0, c0 + 4) of row y, 4 targets at a
  // time, transposed by 4 x 4 tiles straight into Prepare's layout. The same values and sums, in
  // the same order per target, as channel_row.
  void block_row(int64_t n, int64_t c0, int64_t y, const float* by, float* sum, float* row) const {
    using Q = Quad<float>;
    constexpr int kLanes = 4;
    const float* gc[kLanes];
    const float* r[kLanes] = {};
    for (int j = 0; j < kLanes; ++j) {
      gc[j] = grad + grad_view.at(n, c0 + j, y, 0);
      if (sum) r[j] = result + result_view.at(n, c0 + j, y, 0);
    }
    int64_t x = 0;
    for (; x + kLanes <= W; x += kLanes) {
      Q d = {1.0f, 1.0f, 1.0f, 1.0f}, v[kLanes];
      if (by) load_lanes(d, by + x);
      for (int j = 0; j < kLanes; ++j) {
        load_lanes(v[j], gc[j] + x);
        v[j] /= d;
      }
      if (sum) {
        Q total;
        load_lanes(total, sum + x);
        for (int j = 0; j < kLanes; ++j) {
          Q result_lanes;
          load_lanes(result_lanes, r[j] + x);
          total -= v[j] * result_lanes;
        }
        store_lanes(sum + x, total);
      }
      transpose_quads(v);
      for (int k = 0; k < kLanes; ++k) store_lanes(row + (x + k) * K + c0, v[k]);
    }
    for (; x < W; ++x)
      for (int j = 0; j < kLanes; ++j) {
        const float value = gc[j][x] / (by ? by[x] : 1.0f);
        row[x * K + c0 + j] = value;
        if (sum) sum[x] -= value * r[j][x];
      }
  }
#endif

  // rows() in Prepare's blocked layout (K: whole blocks of kGatherBlock lanes): a block of
  // channels at a time over all the rows, a block of whole channels straight into place
  // (block_row, with AVX2 or 128-bit vectors), the others, and gD's, through planes as rows()
  // makes them. gD sums over the channels in their order as rows() does: the same values.
  void rows_by_blocks(int64_t n, int64_t lo, int64_t hi, acc_t* g) const {
    const int64_t count = hi - lo, used = C + (norm ? 1 : 0);
    std::vector<acc_t> divisor(norm ? count * W : 0), sums(norm ? count * W : 0, acc_t(0));
    std::vector<acc_t> planes(kGatherBlock * W);
    if (norm)
      for (int64_t y = lo; y < hi; ++y) divisors(n, y, divisor.data() + (y - lo) * W);
    const View4 planes_view = plane_strides(W);
    for (int64_t c0 = 0; c0 < used; c0 += kGatherBlock) {
      const int64_t lanes = std::min(kGatherBlock, used - c0);
      for (int64_t y = lo; y < hi; ++y) {
        const acc_t* by = norm ? divisor.data() + (y - lo) * W : nullptr;
        acc_t* sum = norm ? sums.data() + (y - lo) * W : nullptr;
#if defined(__AVX2__) || (defined(SOFTSPLAT_VECTOR_EXTENSION) && !defined(__AVX__))
        if constexpr (std::is_same_v<acc_t, float>) {  // block_row's lanes: kGatherBlock
          if (c0 + kGatherBlock <= C && grad_view.x == 1 && (!norm || result_view.x == 1)) {
            block_row(n, c0, y, by, sum, g + (y - lo) * pitch() + K);
            continue;
          }
        }
#endif
        for (int64_t c = c0; c < std::min(c0 + lanes, C); ++c) channel_row(n, c, y, by, sum, planes.data() + (c - c0) * W);
        if (norm && c0 + lanes > C) {  // the block of gD: every channel is in its sum
          normaliser_row(n, y, sum);
          std::copy(sum, sum + W, planes.data() + (C - c0) * W);
        }
        pack_block<kGatherBlock>(planes.data(), planes_view, static_cast<const acc_t*>(nullptr), lanes,
                                 g + (y - lo) * pitch() + K + c0, K, W);
      }
    }
  }
};

// Rows of Prepare's layout, `count` of them and one more of zeros, left uninitialised but for
// the zeros Prepare leaves to its caller (the pixel before and after each row, the extra row):
// Prepare writes every other value. On 2 MB pages where the system gives them on request
// (advise_huge_pages): such a buffer is often a hundred megabytes or more (a target's C + 1
// values, for every row of the image), and a fresh one written page by page took as long as
// the gather itself in page faults.
template <typename acc_t>
struct PreparedRows {
  Tensor storage;
  acc_t* data;

  PreparedRows(int64_t count, int64_t pitch, int64_t K, const Tensor& like)
      : storage(empty({(count + 1) * pitch}, like.scalar_type(), like)) {
    advise_huge_pages(storage);
    data = ptr<acc_t>(storage);
    for (int64_t r = 0; r < count; ++r) {
      std::fill(data + r * pitch, data + r * pitch + K, acc_t(0));
      std::fill(data + (r + 1) * pitch - K, data + (r + 1) * pitch, acc_t(0));
    }
    std::fill(data + count * pitch, data + (count + 1) * pitch, acc_t(0));
  }
};

// The backward's gather: every source pixel reads gN (and gD) at its four taps and writes its
// own gradients; only those asked for (non-null) are computed.
template <typename scalar_t, typename acc_t>
struct Gather {
  const scalar_t* in;
  View4 in_view;
  const Sources<acc_t>& src;
  int64_t C;
  scalar_t* gi;
  acc_t* gf;
  acc_t* gm;

  // Source rows [y_begin, y_end) of image n, whose kept taps all lie in target rows [lo, hi):
  // row[r - lo + 1] holds target row r's values (Prepare's layout, padded with zeros), for r in
  // [lo - 1, hi] (the ends: a row of zeros, for dropped taps). CC is C when a compile-time constant, so that the
  // per-channel sums live in registers.
  template <int CC, bool Stable, bool Normalised>
  void rows(int64_t n, int64_t y_begin, int64_t y_end, const acc_t* const* row, int64_t lo) const {
#if defined(__AVX512F__) && defined(__AVX512VL__)
    if constexpr (std::is_same_v<acc_t, float> && packed_layout(CC)) {
      if (src.H < std::numeric_limits<int32_t>::max() && src.W < std::numeric_limits<int32_t>::max()) {
        rows_packed<CC, Stable, Normalised>(n, y_begin, y_end, row, lo);
        return;
      }
    }
#elif defined(SOFTSPLAT_VECTOR_EXTENSION)
    if constexpr (std::is_same_v<acc_t, float> && packed_layout(CC)) {
      rows_quads<CC, Stable, Normalised>(n, y_begin, y_end, row, lo);
      return;
    }
#endif
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
    if (CC == 0 && blocked_gather(C)) {
      rows_blocked<Stable, Normalised>(n, y_begin, y_end, row, lo);
      return;
    }
#endif
    const int64_t H = src.H, W = src.W, HW = H * W, channels = CC > 0 ? CC : C;
    constexpr bool normalised = Normalised;  // sum is not
    const int64_t K = channels + (normalised ? 1 : 0);  // values used per target
    const int64_t stride = prepared_stride(channels, normalised);  // Prepare's layout
    constexpr int64_t kLocal = CC > 0 ? CC + 1 : 1;
    acc_t local_gathered[kLocal], local_x[kLocal], local_splatted[kLocal];
    std::vector<acc_t> heap_gathered(CC > 0 ? 0 : C + 1), heap_x(CC > 0 ? 0 : C + 1), heap_splatted(CC > 0 ? 0 : C + 1), w(W);
    acc_t* gathered = CC > 0 ? local_gathered : heap_gathered.data();
    acc_t* x_values = CC > 0 ? local_x : heap_x.data();
    acc_t* splatted = CC > 0 ? local_splatted : heap_splatted.data();
    auto chunk = std::make_unique<TapChunk<acc_t>>();
    acc_t dx[4] = {}, dy[4] = {};  // stay 0 unless gf is asked for
    for (int64_t y = y_begin; y < y_end; ++y) {
      src.row_weights(n, y, w.data());
      for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
        const int64_t count = std::min(kChunk, W - x_begin);
        chunk->template fill<true>(src, n, y, x_begin, count);
        if (Stable) chunk->fill_stable(src.maximum + n * HW, w.data() + x_begin, W, count, src.kind);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t x = x_begin + i;
          // Computed for every pixel, landed or not, as autograd does through the oracle: a
          // pixel that lands nowhere gathers zeros, and 0 * inf stays NaN as it does there.
          for (int64_t c = 0; c < channels; ++c) x_values[c] = static_cast<acc_t>(in[in_view.at(n, c, y, x)]);
          for (int64_t c = 0; c <= channels; ++c) gathered[c] = 0;
          // The values splatted beside the weight: x * w (oracle's order); stable: per tap, below.
          const acc_t pixel_w = normalised ? w[x] : acc_t(1);
          x_values[channels] = 1;  // beside the channels, the normaliser's value
          for (int64_t c = 0; c < K; ++c) splatted[c] = x_values[c] * pixel_w;
          acc_t grad_fx = 0, grad_fy = 0;
          const unsigned keep = chunk->keep[i];
          if (keep && gf) factor_derivatives(chunk->factors(i), dx, dy);
          // Where the taps' values are (those of dropped taps are not read).
          const acc_t* north = keep ? row[chunk->y0[i] - lo + 1] + chunk->x0[i] * stride : nullptr;
          const acc_t* south = keep ? row[chunk->y0[i] - lo + 2] + chunk->x0[i] * stride : nullptr;
          for (int k = 0; k < 4; ++k) {
            if (!(keep >> k & 1)) continue;
            const acc_t* values = (k < 2 ? north : south) + (k & 1) * stride;
            // The weight splatted beside the input: per tap for stable, else per pixel (and
            // then applied to the input gradient once, below).
            const acc_t tap_w = Stable ? chunk->stable[k][i] : pixel_w;
            const acc_t b = Stable ? chunk->weight[k][i] * tap_w : chunk->weight[k][i];
            acc_t dot = 0;  // d loss / d weight[k]: the splatted values times gN, then gD
            for (int64_t c = 0; c < K; ++c) {
              gathered[c] += b * values[c];
              dot += values[c] * (Stable ? x_values[c] * tap_w : splatted[c]);
            }
            grad_fx += dx[k] * dot;
            grad_fy += dy[k] * dot;
          }
          const bool per_pixel = normalised && !Stable;  // w multiplies once, here
          if (gi) {
            for (int64_t c = 0; c < channels; ++c)
              gi[((n * channels + c) * H + y) * W + x] = static_cast<scalar_t>(per_pixel ? gathered[c] * w[x] : gathered[c]);
          }
          if (gf) {
            gf[((n * 2 + 0) * H + y) * W + x] = grad_fx;
            gf[((n * 2 + 1) * H + y) * W + x] = grad_fy;
          }
          if (gm) {
            acc_t grad_w = 0;
            for (int64_t c = 0; c < channels; ++c) grad_w += gathered[c] * x_values[c];
            grad_w += gathered[channels];
            // stable: d exp(m - M) / dm is the tap weight, already in gathered[]; max: none
            gm[(n * H + y) * W + x] = src.kind == MAX ? acc_t(0) : Stable ? grad_w : grad_w * weight_derivative(src.kind, w[x]);
          }
        }
      }
    }
  }
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
  // rows() for eight channels and more: a pixel's values side by side in blocks of kGatherBlock
  // lanes (Prepare's layout, zero-padded: the channels' gN, then gD), so that every tap is a few
  // vector multiply-adds over its target's values. A chunk's inputs are packed pixel-major first
  // (pack_block, x, then 1 beside gD) and its gathered values moved into the input gradient's
  // planes after (unpack_block_row). The same terms as rows(); a dot over the lanes sums
  // lane-wise across the blocks, then over the lanes in a fixed tree.
  template <bool Stable, bool Normalised>
  void rows_blocked(int64_t n, int64_t y_begin, int64_t y_end, const acc_t* const* row, int64_t lo) const {
    using Lanes = typename Vector<acc_t, kGatherBlock>::type;
    const int64_t H = src.H, W = src.W, HW = H * W;
    const int64_t stride = prepared_stride(C, Normalised), blocks = stride / kGatherBlock;
    std::vector<acc_t> w(W), x_values(kChunk * stride), gathered(kChunk * stride);
    auto chunk = std::make_unique<TapChunk<acc_t>>();
    std::vector<Lanes> sums(static_cast<size_t>(blocks));
    acc_t dx[4] = {}, dy[4] = {};  // stay 0 unless gf is asked for
    auto total = [](const Lanes& v) {  // the lanes' sum, as a fixed tree
      acc_t a[kGatherBlock];
      std::memcpy(a, &v, sizeof a);
      for (int64_t width = kGatherBlock / 2; width > 0; width /= 2)
        for (int64_t i = 0; i < width; ++i) a[i] += a[i + width];
      return a[0];
    };
    for (int64_t y = y_begin; y < y_end; ++y) {
      src.row_weights(n, y, w.data());
      for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
        const int64_t count = std::min(kChunk, W - x_begin);
        chunk->template fill<true>(src, n, y, x_begin, count);
        if (Stable) chunk->fill_stable(src.maximum + n * HW, w.data() + x_begin, W, count, src.kind);
        const scalar_t* pixels = in + in_view.at(n, 0, y, x_begin);
        for (int64_t c = 0; c < C; c += kGatherBlock)
          pack_block<kGatherBlock>(pixels + c * in_view.c, in_view, static_cast<const acc_t*>(nullptr),
                                   std::min(kGatherBlock, C - c), x_values.data() + c, stride, count);
        if (Normalised)
          for (int64_t i = 0; i < count; ++i) x_values[i * stride + C] = acc_t(1);  // beside gD
        for (int64_t i = 0; i < count; ++i) {
          const int64_t x = x_begin + i;
          const acc_t* xs = x_values.data() + i * stride;
          // Computed for every pixel, landed or not, as rows() does.
          const acc_t pixel_w = Normalised ? w[x] : acc_t(1);
          acc_t grad_fx = 0, grad_fy = 0;
          const unsigned keep = chunk->keep[i];
          if (keep && gf) factor_derivatives(chunk->factors(i), dx, dy);
          const acc_t* north = keep ? row[chunk->y0[i] - lo + 1] + chunk->x0[i] * stride : nullptr;
          const acc_t* south = keep ? row[chunk->y0[i] - lo + 2] + chunk->x0[i] * stride : nullptr;
          acc_t* g = gathered.data() + i * stride;
          Lanes weight_dot{};  // for gm: the gathered values times x (gD's times 1)
          if (keep == TapChunk<acc_t>::kAll) {
            // The four taps a block at a time: the block's sums, the pixel's x (times the tap
            // weight) and the four dots stay in registers. The same terms in the same order as
            // the loop over taps below.
            const acc_t* values[4] = {north, north + stride, south, south + stride};
            acc_t tap_w[4], b[4];
            for (int k = 0; k < 4; ++k) {
              tap_w[k] = Stable ? chunk->stable[k][i] : pixel_w;
              b[k] = Stable ? chunk->weight[k][i] * tap_w[k] : chunk->weight[k][i];
            }
            Lanes dot[4] = {};
            for (int64_t j = 0; j < blocks; ++j) {
              Lanes x_lanes, sum{};
              load_lanes(x_lanes, xs + j * kGatherBlock);
              const Lanes splat = x_lanes * pixel_w;  // not stable: every tap's
              for (int k = 0; k < 4; ++k) {
                Lanes v;
                load_lanes(v, values[k] + j * kGatherBlock);
                sum += b[k] * v;
                dot[k] += v * (Stable ? x_lanes * tap_w[k] : splat);
              }
              store_lanes(g + j * kGatherBlock, sum);
              if (gm) weight_dot += sum * x_lanes;
            }
            for (int k = 0; k < 4; ++k) {
              const acc_t d = total(dot[k]);
              grad_fx += dx[k] * d;
              grad_fy += dy[k] * d;
            }
          } else {
            for (auto& sum : sums) sum = Lanes{};
            for (int k = 0; k < 4; ++k) {
              if (!(keep >> k & 1)) continue;
              const acc_t* values = (k < 2 ? north : south) + (k & 1) * stride;
              const acc_t tap_w = Stable ? chunk->stable[k][i] : pixel_w;
              const acc_t b = Stable ? chunk->weight[k][i] * tap_w : chunk->weight[k][i];
              Lanes dot{};
              for (int64_t j = 0; j < blocks; ++j) {
                Lanes v, x_lanes;
                load_lanes(v, values + j * kGatherBlock);
                load_lanes(x_lanes, xs + j * kGatherBlock);
                sums[j] += b * v;
                dot += v * (x_lanes * tap_w);
              }
              const acc_t d = total(dot);
              grad_fx += dx[k] * d;
              grad_fy += dy[k] * d;
            }
            for (int64_t j = 0; j < blocks; ++j) {
              store_lanes(g + j * kGatherBlock, sums[j]);
              if (gm) {
                Lanes x_lanes;
                load_lanes(x_lanes, xs + j * kGatherBlock);
                weight_dot += sums[j] * x_lanes;
              }
            }
          }
          if (gf) {
            gf[((n * 2 + 0) * H + y) * W + x] = grad_fx;
            gf[((n * 2 + 1) * H + y) * W + x] = grad_fy;
          }
          if (gm) {
            const acc_t grad_w = total(weight_dot);  // the channels' gathered * x, then gD's gathered * 1
            // stable: d exp(m - M) / dm is the tap weight, already in gathered; max: none
            gm[(n * H + y) * W + x] = src.kind == MAX ? acc_t(0) : Stable ? grad_w : grad_w * weight_derivative(src.kind, w[x]);
          }
        }
        if (gi) {
          const bool per_pixel = Normalised && !Stable;  // w multiplies once, here
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (per_pixel)
              for (int64_t i = 0; i < count; ++i) {
                acc_t* g = gathered.data() + i * stride;
                for (int64_t c = 0; c < C; ++c) g[c] *= w[x_begin + i];
              }
            auto plane = [&](int64_t c) { return gi + (n * C + c) * HW + y * W + x_begin; };
            unpack_block_row<false>(gathered.data(), stride, plane, C, static_cast<const acc_t*>(nullptr), count);
          } else {
            for (int64_t c = 0; c < C; ++c) {
              scalar_t* target = gi + (n * C + c) * HW + y * W + x_begin;
              for (int64_t i = 0; i < count; ++i) {
                const acc_t g = gathered[i * stride + c];
                target[i] = static_cast<scalar_t>(per_pixel ? g * w[x_begin + i] : g);
              }
            }
          }
        }
      }
    }
  }
#endif
  // The input and metric gradients of a chunk of row y (pixels [x_begin, x_begin + count)) from
  // its gathered lanes as planes (the CC channels, then gD's), for the packed gathers
  // (rows_quads, rows_packed); `pixels`: the chunk's input, `wx`: its weights.
  template <int CC, bool Stable, bool Normalised>
  void packed_gradients(int64_t n, int64_t y, int64_t x_begin, int64_t count, const scalar_t* pixels, const float* wx,
                        const float (*gathered)[kChunk]) const {
    const int64_t H = src.H, W = src.W, HW = H * W;
    if (gi) {
      const bool per_pixel = Normalised && !Stable;  // w multiplies once, here
      for (int c = 0; c < CC; ++c) {
        scalar_t* target = gi + (n * CC + c) * HW + y * W + x_begin;
        const float* g = gathered[c];
        if (per_pixel)
          for (int64_t i = 0; i < count; ++i) target[i] = static_cast<scalar_t>(g[i] * wx[i]);
        else
          for (int64_t i = 0; i < count; ++i) target[i] = static_cast<scalar_t>(g[i]);
      }
    }
    if (gm) {
      float* target = gm + (n * H + y) * W + x_begin;
      for (int64_t i = 0; i < count; ++i) {
        float grad_w = 0;
        for (int c = 0; c < CC; ++c) grad_w += gathered[c][i] * static_cast<float>(pixels[i * in_view.x + c * in_view.c]);
        grad_w += gathered[CC][i];
        // stable: d exp(m - M) / dm is the tap weight, already in gathered
        target[i] = src.kind == MAX ? acc_t(0) : Stable ? grad_w : grad_w * weight_derivative(src.kind, wx[i]);
      }
    }
  }

#if defined(SOFTSPLAT_VECTOR_EXTENSION) && !(defined(__AVX512F__) && defined(__AVX512VL__))
  // rows() for float and up to three channels (Prepare's packed layout: four lanes per target)
  // below AVX-512 (AVX2, SSE2, NEON), one pixel at a time in 4-lane vectors: a tap's values are
  // one vector (a dropped tap reads the rows' zeros, as rows_packed does). The same terms and
  // the same trees as rows_packed: gathered = (b_0 v_0 + b_2 v_2) + (b_1 v_1 + b_3 v_3);
  // dot_k = (p_0 + p_2) + (p_1 + p_3) over the lanes p of v_k times the splatted lanes, the four
  // taps' at once by a 4 x 4 transpose; grad_fx = (f_0 + f_2) + (f_1 + f_3) with f_k = dx_k dot_k
  // for kept taps, 0 for dropped ones (and grad_fy likewise).
  template <int CC, bool Stable, bool Normalised>
  void rows_quads(int64_t n, int64_t y_begin, int64_t y_end, const float* const* row, int64_t lo) const {
    static_assert(packed_layout(CC), "one to three channels");
    using Q = Quad<float>;
    const int64_t H = src.H, W = src.W, HW = H * W;
    std::vector<float> w(W);
    auto chunk = std::make_unique<TapChunk<float>>();
    alignas(64) float splatted[kChunk * kPacked], gathered[kPacked][kChunk];
    for (int64_t y = y_begin; y < y_end; ++y) {
      src.row_weights(n, y, w.data());
      for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
        const int64_t count = std::min(kChunk, W - x_begin);
        const float* wx = w.data() + x_begin;
        chunk->template fill<true>(src, n, y, x_begin, count);
        if (Stable) chunk->fill_stable(src.maximum + n * HW, wx, W, count, src.kind);
        const scalar_t* pixels = in + in_view.at(n, 0, y, x_begin);
        pack_values<CC, Stable>(pixels, in_view, Normalised ? wx : nullptr, splatted, count);
        float* grad_x = gf ? gf + (n * 2 * H + y) * W + x_begin : nullptr;
        for (int64_t i = 0; i < count; ++i) {
          const unsigned keep = chunk->keep[i];
          const int64_t r = chunk->y0[i] - lo + 1, column = chunk->x0[i] * kPacked;
          const float* top = keep ? row[r] + column : row[0];
          const float* bottom = keep ? row[r + 1] + column : row[0];
          Q v[4], splat;
          load_lanes(v[0], top);
          load_lanes(v[1], top + kPacked);
          load_lanes(v[2], bottom);
          load_lanes(v[3], bottom + kPacked);
          load_lanes(splat, splatted + i * kPacked);
          float b[4];
          Q products[4];
          for (int k = 0; k < 4; ++k) {
            const float s = Stable ? chunk->stable[k][i] : 1.0f;
            b[k] = Stable ? chunk->weight[k][i] * s : chunk->weight[k][i];
            products[k] = v[k] * (Stable ? splat * s : splat);
          }
          const Q sum = (b[0] * v[0] + b[2] * v[2]) + (b[1] * v[1] + b[3] * v[3]);
          for (int c = 0; c < kPacked; ++c) gathered[c][i] = sum[c];
          if (!grad_x) continue;
          transpose_quads(products);  // lane k of products[p]: lane p of tap k's products
          const Q dot = (products[0] + products[2]) + (products[1] + products[3]);
          const float north = chunk->north[i], south = chunk->south[i], west = chunk->west[i], east = chunk->east[i];
          const Q dx = {-north, north, -south, south}, dy = {-west, -east, west, east};
          const Q zero = {0.0f, 0.0f, 0.0f, 0.0f};
          const Vector<int32_t, 4>::type bit = {1, 2, 4, 8};
          const auto kept = (static_cast<int32_t>(keep) & bit) != 0;
          const Q fx = kept ? dot * dx : zero, fy = kept ? dot * dy : zero;
          grad_x[i] = (fx[0] + fx[2]) + (fx[1] + fx[3]);
          grad_x[HW + i] = (fy[0] + fy[2]) + (fy[1] + fy[3]);
        }
        packed_gradients<CC, Stable, Normalised>(n, y, x_begin, count, pixels, wx, gathered);
      }
    }
  }
#endif
#if defined(__AVX512F__) && defined(__AVX512VL__)
  // rows() for float and up to three channels (Prepare's packed layout: four lanes per target),
  // with AVX-512, four pixels at a time. A pixel's values are one 16-lane vector, lanes 4k..4k+3
  // holding tap k's four lanes (a row's two taps are adjacent: two loads; a dropped tap reads
  // zeros). The same terms as rows(), grouped the same way per tap: gathered = sum_k
  // b_k * values_k; dot_k = sum_c values_k[c] * splatted[c]; grad_fx = sum_k dx_k * dot_k and
  // grad_fy likewise, over kept taps. The sums over taps and channels run as trees, across the
  // four pixels' vectors at once (transposes), so that each pixel takes few shuffles.
  template <int CC, bool Stable, bool Normalised>
  void rows_packed(int64_t n, int64_t y_begin, int64_t y_end, const float* const* row, int64_t lo) const {
    static_assert(packed_layout(CC), "one to three channels");
    constexpr int kGroup = 4;  // pixels per step
    const int64_t H = src.H, W = src.W, HW = H * W;
    std::vector<float> w(W);
    auto chunk = std::make_unique<TapChunk<float>>();
    // Per pixel of a chunk: its taps (TapChunk, with coordinates), the values splatted beside
    // the weight as kPacked lanes (pack_values: x * w per channel, then w; for stable x and 1,
    // for sum x and 0; zeros), and the gathered lanes as planes.
    alignas(64) float splatted[kChunk * kPacked], gathered[kPacked][kChunk];
    // A keep mask's bit k at bit 4k: pixel p's taps in the lanes 4k + p of the dots.
    static constexpr unsigned short kSpread[16] = {0x0000, 0x0001, 0x0010, 0x0011, 0x0100, 0x0101, 0x0110, 0x0111,
                                                   0x1000, 0x1001, 0x1010, 0x1011, 0x1100, 0x1101, 0x1110, 0x1111};
    const __m512i transpose = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    // Lane 4k + p: dx_k and dy_k of pixel p (tap_derivatives' signs).
    const __m512 sign_x = _mm512_set_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 sign_y = _mm512_set_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    // Four floats in each 128-bit block. Through the integer form: GCC 12 fails with an internal
    // compiler error on _mm512_broadcast_f32x4 of a load when sanitizers are on.
    auto broadcast = [](const float* four) {
      return _mm512_castsi512_ps(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(four))));
    };
    for (int64_t y = y_begin; y < y_end; ++y) {
      src.row_weights(n, y, w.data());
      for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
        const int64_t count = std::min(kChunk, W - x_begin);
        const int64_t padded = (count + kGroup - 1) / kGroup * kGroup;
        const float* wx = w.data() + x_begin;
        chunk->template fill<true>(src, n, y, x_begin, count);
        chunk->pad(count, padded);  // the rest lands nowhere
        if (Stable) chunk->fill_stable(src.maximum + n * HW, wx, W, count, src.kind);
        const scalar_t* pixels = in + in_view.at(n, 0, y, x_begin);
        pack_values<CC, Stable>(pixels, in_view, Normalised ? wx : nullptr, splatted, count);
        std::fill(splatted + count * kPacked, splatted + padded * kPacked, 0.0f);
        float* grad_x = gf ? gf + (n * 2 * H + y) * W + x_begin : nullptr;
        for (int64_t i = 0; i < padded; i += kGroup) {
          __m512 dots[kGroup], sums[kGroup];
          unsigned kept_dots = 0;
          for (int p = 0; p < kGroup; ++p) {
            const int64_t j = i + p;
            const unsigned keep = chunk->keep[j];
            // Its taps' values: zeros where a tap lies outside the image (the rows' padding and
            // the rows of zeros at the ends, as row[0]); a pixel that lands nowhere reads row[0].
            const int64_t r = chunk->y0[j] - lo + 1, column = chunk->x0[j] * kPacked;
            const float* top = keep ? row[r] + column : row[0];
            const float* bottom = keep ? row[r + 1] + column : row[0];
            const __m512 values = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(top))), _mm256_castps_pd(_mm256_loadu_ps(bottom)), 1));
            const __m512 x_horizontal =
                _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(chunk->west[j]), _mm512_set1_ps(chunk->east[j]));
            const __m512 y_vertical =
                _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(chunk->north[j]), _mm512_set1_ps(chunk->south[j]));
            __m512 b = _mm512_mul_ps(x_horizontal, y_vertical);  // make_taps's weight[k], per lane
            __m512 splat = broadcast(splatted + j * kPacked);
            if (Stable) {  // tap k's weight s_k: b_k * s_k, and values times x * s_k
              const __m512 s = _mm512_mask_blend_ps(
                  0xFF00, _mm512_mask_blend_ps(0x00F0, _mm512_set1_ps(chunk->stable[0][j]), _mm512_set1_ps(chunk->stable[1][j])),
                  _mm512_mask_blend_ps(0xF000, _mm512_set1_ps(chunk->stable[2][j]), _mm512_set1_ps(chunk->stable[3][j])));
              b = _mm512_mul_ps(b, s);
              splat = _mm512_mul_ps(splat, s);
            }
            dots[p] = _mm512_mul_ps(values, splat);
            sums[p] = _mm512_mul_ps(b, values);
            kept_dots |= static_cast<unsigned>(kSpread[keep]) << p;
          }
          // Lane 4k + p: dot_k of pixel p (a 4 x 4 transpose per tap, adding as it goes).
          const __m512 low01 = _mm512_add_ps(_mm512_unpacklo_ps(dots[0], dots[1]), _mm512_unpackhi_ps(dots[0], dots[1]));
          const __m512 low23 = _mm512_add_ps(_mm512_unpacklo_ps(dots[2], dots[3]), _mm512_unpackhi_ps(dots[2], dots[3]));
          const __m512 dot = _mm512_add_ps(
              _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(low01), _mm512_castps_pd(low23))),
              _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(low01), _mm512_castps_pd(low23))));
          if (grad_x) {
            const __m512 dx =
                _mm512_mul_ps(_mm512_mask_blend_ps(0xFF00, broadcast(chunk->north + i), broadcast(chunk->south + i)), sign_x);
            const __m512 dy =
                _mm512_mul_ps(_mm512_mask_blend_ps(0xF0F0, broadcast(chunk->west + i), broadcast(chunk->east + i)), sign_y);
            const __m512 fx = _mm512_maskz_mul_ps(static_cast<__mmask16>(kept_dots), dot, dx);
            const __m512 fy = _mm512_maskz_mul_ps(static_cast<__mmask16>(kept_dots), dot, dy);
            // Sums over the taps: block 0 grad_fx, block 2 grad_fy, of the four pixels.
            __m512 both = _mm512_add_ps(_mm512_shuffle_f32x4(fx, fy, 0x44), _mm512_shuffle_f32x4(fx, fy, 0xEE));
            both = _mm512_add_ps(both, _mm512_shuffle_f32x4(both, both, 0xB1));
            const __mmask8 valid = static_cast<__mmask8>(count - i >= kGroup ? 0xF : (1u << (count - i)) - 1);
            _mm_mask_storeu_ps(grad_x + i, valid, _mm512_castps512_ps128(both));
            _mm_mask_storeu_ps(grad_x + HW + i, valid, _mm512_extractf32x4_ps(both, 2));
          }
          // Block p: pixel p's gathered lanes (sums over the taps); then lane 4c + p.
          const __m512 pair01 = _mm512_add_ps(_mm512_shuffle_f32x4(sums[0], sums[1], 0x44), _mm512_shuffle_f32x4(sums[0], sums[1], 0xEE));
          const __m512 pair23 = _mm512_add_ps(_mm512_shuffle_f32x4(sums[2], sums[3], 0x44), _mm512_shuffle_f32x4(sums[2], sums[3], 0xEE));
          const __m512 by_pixel = _mm512_add_ps(_mm512_shuffle_f32x4(pair01, pair23, 0x88), _mm512_shuffle_f32x4(pair01, pair23, 0xDD));
          const __m512 by_lane = _mm512_permutexvar_ps(transpose, by_pixel);
          _mm_store_ps(gathered[0] + i, _mm512_castps512_ps128(by_lane));
          if (CC > 1 || gm) _mm_store_ps(gathered[1] + i, _mm512_extractf32x4_ps(by_lane, 1));
          if (CC > 2 || (CC == 2 && gm)) _mm_store_ps(gathered[2] + i, _mm512_extractf32x4_ps(by_lane, 2));
          if (CC == 3 && gm) _mm_store_ps(gathered[3] + i, _mm512_extractf32x4_ps(by_lane, 3));
        }
        packed_gradients<CC, Stable, Normalised>(n, y, x_begin, count, pixels, wx, gathered);
      }
    }
  }
#endif
};

// The rows of image n that a run's ring holds, [lo, hi). A band that starts inside them, at or
// below their first row, keeps the rows it shares with them and prepares the rest; any other
// band prepares all of its rows. The ring then holds [band.lo, max(hi, band.hi)): never more
// rows than the largest reach of the run's bands, the ring's capacity (the rows held
// before, from a first row at or above band.lo, fit it, and so do the band's).
struct Held {
  int64_t n = -1, lo = 0, hi = 0;

  // The first of `band`'s rows to prepare (then the rows up to band.hi); the band's rows are
  // held after.
  int64_t next(const Band& band) {
    if (band.n != n || band.lo < lo || band.lo >= hi) hi = band.lo;  // none reusable
    n = band.n;
    lo = band.lo;
    const int64_t first = hi;
    hi = std::max(hi, band.hi);
    return first;
  }
};

// The bands in `runs` runs of neighbours, one per task and ring: run t is bands [t * size,
// (t + 1) * size) (the last one shorter).
inline int64_t run_size(int64_t bands, int64_t runs) { return (bands + runs - 1) / runs; }

// What the rings cost for `all` in `runs` runs: the rows they prepare (each run's first band all
// of its rows, each next one those it does not share with the rows held) and the rows they hold
// (each ring's capacity, the largest reach of its run's bands).
struct RingCost {
  int64_t prepared = 0, held = 0;
};

inline RingCost ring_cost(const std::vector<Band>& all, int64_t runs) {
  const int64_t count = static_cast<int64_t>(all.size()), size = run_size(count, runs);
  RingCost cost;
  for (int64_t begin = 0; begin < count; begin += size) {
    Held held;
    int64_t capacity = 1;
    for (int64_t i = begin; i < std::min(count, begin + size); ++i) {
      cost.prepared += std::max<int64_t>(0, all[i].hi - held.next(all[i]));
      capacity = std::max(capacity, all[i].hi - all[i].lo);
    }
    cost.held += capacity;
  }
  return cost;
}

}  // namespace

// Backward: the bands in one run per thread; per band of source rows, gN and gD of the target
// rows it reaches are prepared in a ring of rows of its run (kept for the next band, which
// reaches most of them too), then the band's pixels gather from it. Where the rings would
// prepare more than 1.5 times the images' rows (reaches that jump about, or each run's reaching
// the whole image) or hold as many rows as an image, each image is prepared once, whole, and
// gathered from (a buffer of the image's size, written and read back: slower where the rings
// are not).
template <typename scalar_t, typename acc_t>
void backward_kernel(const Tensor& grad_out, const Tensor& grad_normaliser,
                     const Tensor& input, const Sources<acc_t>& src, const Tensor& out,
                     const Tensor& normaliser, int normalisation, Tensor& grad_input,
                     Tensor& grad_flow, Tensor& grad_metric) {
  const int64_t N = input.size(0), C = input.size(1), H = src.H, W = src.W;
  const bool normalised = src.kind != SUM;
  const int64_t K = prepared_stride(C, normalised);  // Prepare's layout
  const Prepare<acc_t> prepare{ptr<acc_t>(grad_out), View4(grad_out),
                               normalised ? ptr<acc_t>(out) : nullptr, normalised ? View4(out) : View4(),
                               normalised ? ptr<acc_t>(normaliser) : nullptr,
                               ptr<acc_t>(grad_normaliser),
                               grad_normaliser.defined() ? View4(grad_normaliser) : View4(),
                               normalisation, C, H, W, K};
  const Gather<scalar_t, acc_t> gather{ptr<scalar_t>(input), View4(input), src, C,
                                       ptr<scalar_t>(grad_input),
                                       ptr<acc_t>(grad_flow),
                                       ptr<acc_t>(grad_metric)};
  auto run = [&](auto channels) {
    constexpr int CC = decltype(channels)::value;
    auto rows = [&](int64_t n, int64_t y_begin, int64_t y_end, const acc_t* const* row, int64_t lo) {
      if (weighs_per_tap(src.kind))  // stable and max
        gather.template rows<CC, true, true>(n, y_begin, y_end, row, lo);
      else if (normalised)
        gather.template rows<CC, false, true>(n, y_begin, y_end, row, lo);
      else
        gather.template rows<CC, false, false>(n, y_begin, y_end, row, lo);
    };
    const std::vector<Band> all = bands(src, N);
    const int64_t count = static_cast<int64_t>(all.size());
    const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(torch::stable::get_num_threads(), count));
    // The rings: where they prepare at most 1.5 times the images' rows and hold fewer rows than
    // an image (else one image at a time, whole).
    const RingCost cost = ring_cost(all, runs);
    if (2 * cost.prepared <= 3 * N * H && cost.held < H) {
      const int64_t size = run_size(count, runs);
      torch::stable::parallel_for(0, runs, 1, [&](int64_t first_run, int64_t last_run) {
        for (int64_t begin = first_run * size; begin < std::min(count, last_run * size); begin += size) {
          const int64_t end = std::min(count, begin + size);
          // The run's bands are neighbours, and so are their reaches: the rows a band shares
          // with the previous one stay prepared, in a ring of rows (row r in slot r % capacity).
          int64_t capacity = 1;
          for (int64_t i = begin; i < end; ++i) capacity = std::max(capacity, all[i].hi - all[i].lo);
          // Zeros: the padding of each row (Prepare), and a row for the taps above and below the
          // image, which only the AVX-512 gather reads.
          const int64_t pitch = prepare.pitch();
          const PreparedRows<acc_t> ring(capacity, pitch, K, grad_out);
          const acc_t* zeros = ring.data + capacity * pitch + K;
          auto slot = [&](int64_t r) { return ring.data + (r % capacity) * pitch; };
          Held held;
          std::vector<const acc_t*> row;
          for (int64_t i = begin; i < end; ++i) {
            const Band& band = all[i];
            for (int64_t r = held.next(band); r < band.hi;) {  // the missing rows, a run of slots at a time
              const int64_t run = std::min(band.hi - r, capacity - r % capacity);
              prepare.rows(band.n, r, r + run, slot(r));
              r += run;
            }
            row.assign(static_cast<size_t>(band.hi - band.lo + 2), zeros);
            for (int64_t r = band.lo; r < band.hi; ++r) row[r - band.lo + 1] = slot(r) + K;
            rows(band.n, band.y_begin, band.y_end, row.data(), band.lo);
          }
        }
      });
      return;
    }
    const int64_t pitch = prepare.pitch();
    const PreparedRows<acc_t> g(H, pitch, K, grad_out);  // as the ring
    std::vector<const acc_t*> row(H + 2, g.data + H * pitch + K);
    for (int64_t r = 0; r < H; ++r) row[r + 1] = g.data + r * pitch + K;
    for (int64_t n = 0; n < N; ++n) {
      torch::stable::parallel_for(0, H, 16, [&](int64_t begin, int64_t end) { prepare.rows(n, begin, end, g.data + begin * pitch); });
      torch::stable::parallel_for(0, H, 4, [&](int64_t begin, int64_t end) { rows(n, begin, end, row.data(), 0); });
    }
  };
  switch (C) {
    case 1: run(std::integral_constant<int, 1>()); break;
    case 2: run(std::integral_constant<int, 2>()); break;
    case 3: run(std::integral_constant<int, 3>()); break;
    case 4: run(std::integral_constant<int, 4>()); break;
    default: run(std::integral_constant<int, 0>());
  }
}

template void backward_kernel<float, float>(const Tensor&, const Tensor&, const Tensor&, const Sources<float>&, const Tensor&, const Tensor&, int, Tensor&, Tensor&, Tensor&);
template void backward_kernel<double, double>(const Tensor&, const Tensor&, const Tensor&, const Sources<double>&, const Tensor&, const Tensor&, int, Tensor&, Tensor&, Tensor&);
template void backward_kernel<Half, float>(const Tensor&, const Tensor&, const Tensor&, const Sources<float>&, const Tensor&, const Tensor&, int, Tensor&, Tensor&, Tensor&);
template void backward_kernel<BFloat16, float>(const Tensor&, const Tensor&, const Tensor&, const Sources<float>&, const Tensor&, const Tensor&, int, Tensor&, Tensor&, Tensor&);

}  // namespace cpu
}  // namespace softsplat
