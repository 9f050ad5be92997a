// The forward of the CPU kernels, on the band schedule (schedule.h). With up to three channels
// a band accumulates into a scratch of the rows it reaches in the packed layout (packed.h), two
// vector read-modify-writes per pixel, and moves each row into the NCHW outputs once no later
// part of the band reaches it; otherwise it adds straight into them. Phase 0 writes (or zeroes,
// then adds into) the rows it reaches; a row is finished (divided; for stable soft, rescaled
// first) by the band that writes it last, as soon as it is final. Every target receives the
// contributions of at most one band per phase, each in a fixed pixel order, phase 0 first: the
// same sums, bitwise, whatever the thread count.
#include "../tensor.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "blocks.h"
#include "packed.h"
#include "tap_chunk.h"

namespace softsplat {
namespace cpu {

namespace {

// The chunk of pixels [x_begin, x_begin + count) of row y filled, with its per-tap weights when
// Stable (`w`: the row's weights from x_begin): what the scatters add.
template <typename acc_t>
void fill_chunk(TapChunk<acc_t>& chunk, const Sources<acc_t>& src, bool stable, int64_t n, int64_t y,
                int64_t x_begin, int64_t count, const acc_t* w) {
  chunk.fill(src, n, y, x_begin, count);
  if (stable) chunk.fill_stable(src.maximum + n * src.H * src.W, w, src.W, count, src.kind);
}

// One band's contributions, added into out [N, C, H, W] and norm [N, 1, H, W] (null for sum),
// both contiguous. CC is C when it is a compile-time constant (the common channel counts).
template <int CC, bool Stable, typename scalar_t, typename acc_t>
void scatter_band(const Band& band, const scalar_t* in, const View4& in_view, const Sources<acc_t>& src,
                  int64_t C, acc_t* out, acc_t* norm) {
  const int64_t W = src.W, HW = src.H * src.W, n = band.n;
  const int64_t channels = CC > 0 ? CC : C;
  const bool weighted = src.kind != SUM;
  std::vector<acc_t> w(W);
  auto chunk = std::make_unique<TapChunk<acc_t>>();
  acc_t* out_n = out + n * channels * HW;
  acc_t* norm_n = norm ? norm + n * HW : nullptr;
  const int64_t offset[4] = {0, 1, W, W + 1};  // of tap k from the north-west one
  for (int64_t y = band.y_begin; y < band.y_end; ++y) {
    src.row_weights(n, y, w.data());
    const scalar_t* in_row = in + in_view.at(n, 0, y, 0);
    for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
      const int64_t count = std::min(kChunk, W - x_begin);
      fill_chunk(*chunk, src, Stable, n, y, x_begin, count, w.data() + x_begin);
      in_pixel_order(count, [&](int64_t i) {
        const unsigned keep = chunk->keep[i];
        if (!keep) return;
        const int64_t x = x_begin + i, corner = chunk->corner[i];
        const acc_t b[4] = {chunk->weight[0][i], chunk->weight[1][i], chunk->weight[2][i], chunk->weight[3][i]};
        // The weight splatted with tap k: w, or exp(metric - M(tap)) for stable; sum: none.
        const acc_t wx = weighted ? w[x] : acc_t(1);
        const acc_t s[4] = {Stable ? chunk->stable[0][i] : wx, Stable ? chunk->stable[1][i] : wx,
                            Stable ? chunk->stable[2][i] : wx, Stable ? chunk->stable[3][i] : wx};
        // plane[tap k] += b[k] * (v * s[k]): the oracle's order.
        auto deposit = [&](acc_t* plane, acc_t v, bool scale) {
          auto value = [&](int k) { return scale ? v * s[k] : v; };
          if (keep == TapChunk<acc_t>::kAll) {
            acc_t* p = plane + corner;
            p[0] += b[0] * value(0);
            p[1] += b[1] * value(1);
            p[W] += b[2] * value(2);
            p[W + 1] += b[3] * value(3);
            return;
          }
          for (int k = 0; k < 4; ++k)
            if (keep >> k & 1) plane[corner + offset[k]] += b[k] * value(k);
        };
        const scalar_t* pixel = in_row + x * in_view.x;
        for (int64_t c = 0; c < channels; ++c) deposit(out_n + c * HW, static_cast<acc_t>(pixel[c * in_view.c]), weighted);
        if (norm_n) deposit(norm_n, acc_t(1), true);  // b[k] * (1 * s[k]) = b[k] * s[k] exactly
      });
    }
  }
}

// The packed scatter, for up to three channels: a band adds into a scratch of the rows it
// reaches, pixel-major with four lanes per target (the channels, then the normaliser), so that
// the two horizontal taps of a pixel are one 2 x 4-lane read-modify-write, and its two rows two
// of them, instead of 4 x (C + 1) scalar ones. A band runs part by part (bands()'s bands, in row
// order); after each part, flush_rows moves the rows no later part reaches into the NCHW outputs,
// while they are still in cache. Bands whose scratch would be larger than this use scatter_band.
constexpr int64_t kPackedBytes = int64_t(16) << 20;

template <typename acc_t>
bool packs(const Band& band, int64_t C, int64_t W) {
  return packed_layout(C) && (band.hi - band.lo) * W * kPacked * static_cast<int64_t>(sizeof(acc_t)) <= kPackedBytes;
}

// A thread's scratch, rows [band.lo, band.hi) of the band it runs: a row is zeroed when a part
// first reaches it (or a flush needs it), not before, so that it is in cache when it is used.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> data;
  int64_t first = 0, W = 0;  // the band's first row; the values per row (width x lanes)
  int64_t lo = 0, hi = 0;    // rows zeroed so far: [lo, hi), empty after rows()
  std::vector<acc_t> weights;  // splat_block's row weights, of the band's source rows
  std::unique_ptr<TapChunk<acc_t>[]> taps;  // and their taps, when kept for every block
  int64_t tap_chunks = 0;                   // allocated
  std::vector<acc_t> straight;              // a final row's planes on their way to a 16-bit result

  acc_t* straight_rows(int64_t size) {
    if (straight.size() < static_cast<size_t>(size)) straight.resize(static_cast<size_t>(size));
    return straight.data();
  }

  TapChunk<acc_t>* chunks(int64_t count) {
    if (tap_chunks < count) {  // default-initialised: nothing written until filled
      taps.reset(new TapChunk<acc_t>[static_cast<size_t>(count)]);
      tap_chunks = count;
    }
    return taps.get();
  }

  // `lanes` values per target: kPacked, or a channel block's (splat_block).
  acc_t* rows(const Band& band, int64_t width, int64_t lanes = kPacked) {
    const size_t size = static_cast<size_t>((band.hi - band.lo) * width * lanes);
    if (data.size() < size) data.resize(size);
    first = lo = hi = band.lo;
    W = width * lanes;
    return data.data();
  }
  // Rows [from, to) zeroed unless they are; the zeroed rows stay one interval (rows between it
  // and [from, to) are zeroed too).
  void zero(int64_t from, int64_t to) {
    if (from >= to) return;
    auto clear = [&](int64_t a, int64_t b) {
      if (a < b) std::fill(data.data() + (a - first) * W, data.data() + (b - first) * W, acc_t(0));
    };
    if (lo == hi) {
      clear(from, to);
      lo = from;
      hi = to;
      return;
    }
    if (from < lo) clear(from, lo), lo = from;
    if (to > hi) clear(hi, to), hi = to;
  }
};

// A chunk's pixels added into `scratch`, whose first target is the image's flat index row0 (a
// band's first row times W): the lanes v of a pixel (values), times b[k] (and s[k] when stable)
// on tap k, as plane[tap k] += b[k] * (v * s[k]), the oracle's order, as in scatter_band. Pixels
// in_pixel_order. A pixel whose four taps are kept takes two read-modify-writes of two targets
// (a row's taps are neighbours); with AVX2 (float, not stable) written out, with the constants
// in registers.
template <bool Stable, typename acc_t>
void scatter_chunk(const TapChunk<acc_t>& chunk, const acc_t* __restrict values, const acc_t* __restrict tap_weights,
                   int64_t count, int64_t row0, int64_t W, acc_t* __restrict scratch) {
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
#if defined(__AVX__)
  using Pair = typename Vector<acc_t, 2 * kPacked>::type;  // the lanes of two targets
#endif
  using Lanes = typename Vector<acc_t, kPacked>::type;
#endif
  const int64_t offset[4] = {0, 1, W, W + 1};
#if defined(__AVX2__)
  const __m256i north = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), south = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
#endif
  in_pixel_order(count, [&](int64_t i) {
    const unsigned keep = chunk.keep[i];
    if (!keep) return;
    acc_t* target = scratch + (chunk.corner[i] - row0) * kPacked;
    const acc_t* lanes = values + i * kPacked;
    const acc_t s[4] = {Stable ? chunk.stable[0][i] : acc_t(1), Stable ? chunk.stable[1][i] : acc_t(1),
                        Stable ? chunk.stable[2][i] : acc_t(1), Stable ? chunk.stable[3][i] : acc_t(1)};
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
    if (keep == TapChunk<acc_t>::kAll) {
#if defined(__AVX2__)
      if constexpr (std::is_same_v<acc_t, float> && !Stable) {
        const __m256 v = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(lanes));
        const __m256 b = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(tap_weights + i * kPacked));
        float* below = target + W * kPacked;
        _mm256_storeu_ps(target, _mm256_add_ps(_mm256_loadu_ps(target), _mm256_mul_ps(_mm256_permutevar_ps(b, north), v)));
        _mm256_storeu_ps(below, _mm256_add_ps(_mm256_loadu_ps(below), _mm256_mul_ps(_mm256_permutevar_ps(b, south), v)));
        return;
      }
#endif
      Lanes v, b;  // the lanes; the four taps' weights
      std::memcpy(&v, lanes, sizeof v);
      std::memcpy(&b, tap_weights + i * kPacked, sizeof b);
#if !defined(__AVX__)
      // 128-bit vectors (SSE2, NEON): one target at a time, the same sums; the compiler built a
      // pair's eight lanes through the stack, and each read of them waited for the store.
      for (int k = 0; k < 4; ++k) {
        const Lanes value = Stable ? v * s[k] : v;
        acc_t* at = target + offset[k] * kPacked;
        Lanes sum;
        std::memcpy(&sum, at, sizeof sum);
        sum += b[k] * value;
        std::memcpy(at, &sum, sizeof sum);
      }
#else
      const Pair v2 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 0, 1, 2, 3);
      auto add = [&](int row, const Pair& weight) {  // by reference: no vector-ABI dependence
        const int k = 2 * row;
        Pair value = v2;
        if (Stable) value *= Pair{s[k], s[k], s[k], s[k], s[k + 1], s[k + 1], s[k + 1], s[k + 1]};
        acc_t* row_target = target + row * W * kPacked;
        Pair sum;
        std::memcpy(&sum, row_target, sizeof sum);
        sum += weight * value;
        std::memcpy(row_target, &sum, sizeof sum);
      };
      add(0, __builtin_shufflevector(b, b, 0, 0, 0, 0, 1, 1, 1, 1));
      add(1, __builtin_shufflevector(b, b, 2, 2, 2, 2, 3, 3, 3, 3));
#endif
      return;
    }
#endif  // else the loop below takes the four taps
    for (int k = 0; k < 4; ++k) {
      if (!(keep >> k & 1)) continue;
      const acc_t weight = chunk.weight[k][i];
      acc_t* tap = target + offset[k] * kPacked;
      for (int c = 0; c < kPacked; ++c) tap[c] += weight * (Stable ? lanes[c] * s[k] : lanes[c]);
    }
  });
}

// The contributions of one part of a band (its source rows) added into `scratch`, the band's
// rows [band.lo, band.hi) x W x kPacked. Lanes: the C channels' x * w, then w (the normaliser's
// value; 0 for sum), then zeros; stable: x and 1, times exp(metric - M(tap)) per tap.
template <int CC, bool Stable, typename scalar_t, typename acc_t>
void scatter_band_packed(const Band& band, const Band& part, const scalar_t* in, const View4& in_view,
                         const Sources<acc_t>& src, acc_t* __restrict scratch) {
  const int64_t W = src.W, n = band.n;
  const bool weighted = src.kind != SUM;
  std::vector<acc_t> w(W);
  auto chunk = std::make_unique<TapChunk<acc_t>>();
  std::vector<acc_t> values(kChunk * kPacked);
  std::vector<float> wide(kNarrow<scalar_t> ? kChunk * CC : 0);  // a 16-bit input's channels, widened
  // Per pixel, its four taps' weights side by side (one load where all four are kept).
  std::vector<acc_t> tap_weights(kChunk * kPacked);
  const acc_t* const weight_planes[kPacked] = {chunk->weight[0], chunk->weight[1], chunk->weight[2], chunk->weight[3]};
  for (int64_t y = part.y_begin; y < part.y_end; ++y) {
    src.row_weights(n, y, w.data());
    const scalar_t* in_row = in + in_view.at(n, 0, y, 0);
    for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
      const int64_t count = std::min(kChunk, W - x_begin);
      fill_chunk(*chunk, src, Stable, n, y, x_begin, count, w.data() + x_begin);
      const acc_t* chunk_w = weighted ? w.data() + x_begin : nullptr;
      if constexpr (kNarrow<scalar_t>) {
        const View4 wide_view = widen_block(in_row + x_begin * in_view.x, in_view, CC, count, wide.data());
        pack_values<CC, Stable>(wide.data(), wide_view, chunk_w, values.data(), count);
      } else {
        pack_values<CC, Stable>(in_row + x_begin * in_view.x, in_view, chunk_w, values.data(), count);
      }
      interleave(weight_planes, tap_weights.data(), count);
      scatter_chunk<Stable>(*chunk, values.data(), tap_weights.data(), count, band.lo * W, W, scratch);
    }
  }
}

// What happens to a row of the outputs once its sums are final (out, norm contiguous): images
// with the stable shortcut have them multiplied by exp(min(R - M, kStableSpread)) (NaN kept);
// then, when `divides`, out /= D' (from four channels on as common.h's finished() does).
template <typename acc_t>
struct Finish {
  acc_t* out;
  acc_t* norm;  // null for sum
  int64_t C, H, W;
  int normalisation;
  bool divides;
  const acc_t* maximum;                    // stable: M
  const StableShortcut<acc_t>* shortcut;   // stable: per image; else null

  bool scales(int64_t n) const { return shortcut && shortcut->taken[n]; }
  bool needed() const { return divides || (shortcut && shortcut->any()); }

  // Row y of image n; `scratch`: 2 W values.
  void row(int64_t n, int64_t y, acc_t* scratch) const {
    const bool scaled = scales(n);
    if (!divides && !scaled) return;
    acc_t* D = norm + (n * H + y) * W;
    acc_t* scale = scratch;
    acc_t* divisor = scratch + W;
    if (!scaled) {
      for (int64_t x = 0; x < W; ++x) divisor[x] = safe_normaliser(D[x], normalisation);
      acc_t* __restrict factor = scale;
      if (C < kPacked) {  // up to three channels: one division per channel, as the packed path
        for (int64_t c = 0; c < C; ++c) {
          acc_t* row = out + ((n * C + c) * H + y) * W;
          for (int64_t x = 0; x < W; ++x) row[x] /= divisor[x];
        }
        return;
      }
      const bool product = finishing_factors(divisor, factor, W);
      for (int64_t c = 0; c < C; ++c) {
        acc_t* row = out + ((n * C + c) * H + y) * W;
        if (product)
          for (int64_t x = 0; x < W; ++x) row[x] *= factor[x];
        else
          for (int64_t x = 0; x < W; ++x) row[x] = finished(row[x], divisor[x], factor[x]);
      }
      return;
    }
    const acc_t* M = maximum + (n * H + y) * W;
    const acc_t R = shortcut->shift[n];
    for (int64_t x = 0; x < W; ++x) {
      const acc_t exponent = R - M[x];
      scale[x] = kStableSpread<acc_t> < exponent ? kStableSpread<acc_t> : exponent;  // NaN kept
    }
    exp_inplace(scale, W);
    // D, then the result's factor: the scale, over D' when dividing (one division per target).
    // One simple loop each, so that they vectorise.
    for (int64_t x = 0; x < W; ++x) D[x] *= scale[x];
    if (divides) {
      acc_t* __restrict factor = scale;
      for (int64_t x = 0; x < W; ++x) divisor[x] = safe_normaliser(D[x], normalisation);
      for (int64_t x = 0; x < W; ++x) factor[x] /= divisor[x];
    }
    for (int64_t c = 0; c < C; ++c) {
      acc_t* row = out + ((n * C + c) * H + y) * W;
      for (int64_t x = 0; x < W; ++x) row[x] *= scale[x];
    }
  }

  // Rows [lo, hi) of image n.
  void rows(int64_t n, int64_t lo, int64_t hi) const {
    std::vector<acc_t> scratch(2 * W);
    for (int64_t y = lo; y < hi; ++y) row(n, y, scratch.data());
  }
};

// plane[c][x] = (or +=) lanes[x][c] for the first Planes lanes of W targets: one pass, which
// vectorises (the lanes split with shuffles).
template <int Planes, bool Add, typename acc_t>
void unpack_row(const acc_t* __restrict lanes, acc_t* __restrict p0, acc_t* __restrict p1, acc_t* __restrict p2,
                acc_t* __restrict p3, int64_t W) {
  static_assert(Planes >= 1 && Planes <= kPacked, "1 to 4 planes");
  for (int64_t x = 0; x < W; ++x) {
    const acc_t* lane = lanes + x * kPacked;
    const acc_t a0 = lane[0], a1 = lane[1], a2 = lane[2], a3 = lane[3];
    p0[x] = Add ? p0[x] + a0 : a0;
    if (Planes > 1) p1[x] = Add ? p1[x] + a1 : a1;
    if (Planes > 2) p2[x] = Add ? p2[x] + a2 : a2;
    if (Planes > 3) p3[x] = Add ? p3[x] + a3 : a3;
  }
}

// unpack_row of CC channels and D (plane CC) for a final row, divided as Finish::row divides
// up to three channels (out / D', D kept; no stable rescaling): one pass over the row instead
// of two.
template <int CC, bool Add, int Normalisation, typename acc_t>
void unpack_row_divided(const acc_t* __restrict lanes, acc_t* __restrict p0, acc_t* __restrict p1,
                        acc_t* __restrict p2, acc_t* __restrict D, int64_t W) {
  static_assert(CC >= 1 && CC < kPacked, "1 to 3 channels");
  for (int64_t x = 0; x < W; ++x) {
    const acc_t* lane = lanes + x * kPacked;
    const acc_t d = Add ? D[x] + lane[CC] : lane[CC];
    D[x] = d;
    const acc_t divisor = safe_normaliser(d, Normalisation);
    p0[x] = (Add ? p0[x] + lane[0] : lane[0]) / divisor;
    if (CC > 1) p1[x] = (Add ? p1[x] + lane[1] : lane[1]) / divisor;
    if (CC > 2) p2[x] = (Add ? p2[x] + lane[2] : lane[2]) / divisor;
  }
}

// Rows [from, to) of a packed band's scratch (which starts at row band.lo) moved into the NCHW
// outputs (out, norm contiguous; norm null for sum): added where adds(y) (a band of phase 0 wrote
// the row before), else stored (the first band to write it). A row for which final(y) holds (no
// band of a later phase reaches it) is finished at once, while in cache, and then given to
// cast(n, y, first channel, count, planes, stride). With `straight` (CC x W values, when the
// result is a 16-bit one and nothing rescales the band's rows), a final row no band adds to goes
// through it to the result: its planes in out are never written.
template <int CC, typename acc_t, typename Adds, typename Final, typename Cast>
void flush_rows(const Band& band, const Adds& adds, int64_t from, int64_t to, const acc_t* scratch, acc_t* out,
                acc_t* norm, int64_t H, int64_t W, const Finish<acc_t>& finish, const Final& final, const Cast& cast,
                acc_t* straight) {
  std::vector<acc_t> finishing(finish.needed() ? 2 * W : 0);
  for (int64_t y = from; y < to; ++y) {
    const acc_t* lanes = scratch + (y - band.lo) * W * kPacked;
    acc_t* plane[kPacked] = {};
    for (int c = 0; c < CC; ++c) plane[c] = out + ((band.n * CC + c) * H + y) * W;
    acc_t* D = norm ? norm + (band.n * H + y) * W : nullptr;
    plane[CC] = D;
    const bool last = final(y);
    const bool divided = last && finish.divides && !finish.scales(band.n);  // then D is not null
    const bool through = straight && last && !adds(y);
    if (through)
      for (int c = 0; c < CC; ++c) plane[c] = straight + c * W;
    auto unpack = [&](auto add) {
      constexpr bool Add = decltype(add)::value;
      auto divide = [&](auto code) {
        unpack_row_divided<CC, Add, decltype(code)::value>(lanes, plane[0], plane[1], plane[2], D, W);
      };
      if (divided)
        with_normalisation(finish.normalisation, divide);
      else if (D)
        unpack_row<CC + 1, Add>(lanes, plane[0], plane[1], plane[2], plane[3], W);
      else
        unpack_row<CC, Add>(lanes, plane[0], plane[1], plane[2], plane[3], W);
    };
    if (adds(y))
      unpack(std::true_type());
    else
      unpack(std::false_type());
    if (last && !divided) finish.row(band.n, y, finishing.data());  // nothing to do when `through`
    if (last) cast(band.n, y, 0, CC, through ? straight : nullptr, W);
  }
}

// The blocked scatter, for kPacked channels and more: the channels in blocks of L lanes (4, 8
// or 16; 16 floats are a cache line), one block at a time over a band. For a block, a band adds
// into a scratch of the rows it reaches, pixel-major with the block's L lanes per target, one
// L-lane read-modify-write per kept tap (instead of L scalar ones into L planes), and moves each
// row into the block's NCHW planes (divided when final) once no later part of the band reaches
// it, while in cache. The rows a block works on are L / C of what all channels would need, so
// they stay in cache; the taps are computed again per block. The first block also adds the
// normaliser, straight into its plane. Every target receives its contributions in the order
// scatter_band adds them: the same sums, bitwise.
constexpr int64_t kBlockedBytes = int64_t(64) << 20;
// Bands of at most this many source pixels (each row counted in whole chunks: a tall, narrow
// band takes a chunk per row), in more than one block, fill their tap chunks once for every block
// (about 25 bytes a pixel, 41 for stable; larger bands fill them per block).
constexpr int64_t kKeptTapPixels = int64_t(1) << 16;

inline int64_t chunks_per_row(int64_t W) { return (W + kChunk - 1) / kChunk; }

// The lanes of the block of channels starting at `c0` of C: 16 while more than 8 remain, else 8
// or 4.
inline int block_lanes(int64_t C, int64_t c0) {
  const int64_t remaining = C - c0;
  return remaining > 8 ? 16 : remaining > 4 ? 8 : 4;
}

template <typename acc_t>
bool blocks_fit(const Band& band, int64_t C, int64_t W) {
  return C >= kPacked && (band.hi - band.lo) * W * 16 * static_cast<int64_t>(sizeof(acc_t)) <= kBlockedBytes;
}

// A chunk's pixels added into a block's `scratch` (first target: the image's flat index row0),
// lanes v of pixel i as plane[tap k] += b[k] * v, in_pixel_order; with `norm` (the normaliser's
// plane of the image), also norm[tap k] += b[k] * w (w null: 1), as scatter_band adds them.
// Stable (stable soft without its shortcut, max): the tap weights s[k] of fill_stable instead of
// w, as plane[tap k] += b[k] * (v * s[k]) and norm[tap k] += b[k] * s[k].
template <int L, bool Stable, typename acc_t>
void scatter_block(const TapChunk<acc_t>& chunk, const acc_t* __restrict values, const acc_t* __restrict w,
                   int64_t count, int64_t row0, int64_t W, acc_t* __restrict scratch, acc_t* __restrict norm) {
  const int64_t offset[4] = {0, 1, W, W + 1};
  in_pixel_order(count, [&](int64_t i) {
    const unsigned keep = chunk.keep[i];
    if (!keep) return;
    const acc_t b[4] = {chunk.weight[0][i], chunk.weight[1][i], chunk.weight[2][i], chunk.weight[3][i]};
    const acc_t s[4] = {Stable ? chunk.stable[0][i] : acc_t(1), Stable ? chunk.stable[1][i] : acc_t(1),
                        Stable ? chunk.stable[2][i] : acc_t(1), Stable ? chunk.stable[3][i] : acc_t(1)};
    acc_t* target = scratch + (chunk.corner[i] - row0) * L;
    const acc_t* lanes = values + i * L;
#if defined(SOFTSPLAT_VECTOR_EXTENSION)
    using Lanes = typename Vector<acc_t, L>::type;
    Lanes v;
    load_lanes(v, lanes);
    auto add = [&](acc_t* at, int k) {
      Lanes sum;
      load_lanes(sum, at);
      if (Stable)
        sum += b[k] * (v * s[k]);
      else
        sum += b[k] * v;
      store_lanes(at, sum);
    };
    if (keep == TapChunk<acc_t>::kAll) {
      add(target, 0);
      add(target + L, 1);
      add(target + W * L, 2);
      add(target + (W + 1) * L, 3);
    } else {
      for (int k = 0; k < 4; ++k)
        if (keep >> k & 1) add(target + offset[k] * L, k);
    }
#else
    for (int k = 0; k < 4; ++k) {
      if (!(keep >> k & 1)) continue;
      acc_t* tap = target + offset[k] * L;
      for (int j = 0; j < L; ++j) tap[j] += Stable ? b[k] * (lanes[j] * s[k]) : b[k] * lanes[j];
    }
#endif
    if (norm) {
      const acc_t weight = w ? w[i] : acc_t(1);
      for (int k = 0; k < 4; ++k)
        if (keep >> k & 1) norm[chunk.corner[i] + offset[k]] += b[k] * (Stable ? s[k] : weight);
    }
  });
}

// One band's contributions of channels [c0, c0 + count) (count <= L) on the blocked layout,
// written into out [N, C, H, W] (added to a row where adds(y), else stored); with `norm`, the
// normaliser's too (added into norm). `last(y)`: whether row y is final once this band is done
// with it (then divided, when `divides`, and given to cast(n, y, c0, count, planes, stride) when
// `casts`: rows that nothing rescales after; with `straight` (L x W values, when the result is a
// 16-bit one and `casts`), such a row that no band adds to goes through it to the result, and its
// planes in out are never written).
// Stable: weights per tap (stable soft without its shortcut, max), as scatter_band<_, true>.
// scratch.weights: src.row_weights of the band's source rows, W per row from band.y_begin (made
// once for all of a band's blocks); `taps`: their filled chunks likewise (chunks_per_row per
// row), or null (then filled here).
template <int L, bool Stable, typename scalar_t, typename acc_t, typename Adds, typename Last, typename Cast>
void splat_block(const Band& band, const Adds& adds, const std::vector<Band>& parts, const scalar_t* in, const View4& in_view,
                 const Sources<acc_t>& src, int64_t C, int64_t c0, int64_t count, acc_t* out, acc_t* norm,
                 const acc_t* divisor_plane, int normalisation, Scratch<acc_t>& scratch,
                 const TapChunk<acc_t>* taps, const Last& last, const Cast& cast, bool casts, acc_t* straight) {
  const int64_t W = src.W, H = src.H, n = band.n;
  const bool weighted = src.kind != SUM;
  acc_t* rows = scratch.rows(band, W, L);
  std::vector<acc_t> values(kChunk * L), divisor(W), factor(W);
  std::vector<float> wide(kNarrow<scalar_t> ? kChunk * L : 0);  // a 16-bit input's block, widened
  auto chunk = taps ? nullptr : std::make_unique<TapChunk<acc_t>>();
  acc_t* norm_n = norm ? norm + n * H * W : nullptr;
  auto plane = [&](int64_t y) { return [=](int64_t c) { return out + ((n * C + c0 + c) * H + y) * W; }; };
  int64_t flushed = band.lo;  // rows [band.lo, flushed) are in the outputs
  for (int64_t k = band.first; k < band.last; ++k) {
    const Band& part = parts[k];
    if (!part.empty()) {
      scratch.zero(part.lo, part.hi);
      for (int64_t y = part.y_begin; y < part.y_end; ++y) {
        const acc_t* w = scratch.weights.data() + (y - band.y_begin) * W;
        const scalar_t* in_row = in + in_view.at(n, c0, y, 0);
        for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
          const int64_t chunk_count = std::min(kChunk, W - x_begin);
          const TapChunk<acc_t>* filled = chunk.get();
          if (taps) {
            filled = taps + (y - band.y_begin) * chunks_per_row(W) + x_begin / kChunk;
          } else {
            fill_chunk(*chunk, src, Stable, n, y, x_begin, chunk_count, w + x_begin);
          }
          const acc_t* chunk_w = weighted && !Stable ? w + x_begin : nullptr;
          if constexpr (kNarrow<scalar_t>) {
            const View4 wide_view = widen_block(in_row + x_begin * in_view.x, in_view, count, chunk_count, wide.data());
            pack_block<L>(wide.data(), wide_view, chunk_w, count, values.data(), L, chunk_count);
          } else {
            pack_block<L>(in_row + x_begin * in_view.x, in_view, chunk_w, count, values.data(), L, chunk_count);
          }
          scatter_block<L, Stable>(*filled, values.data(), chunk_w, chunk_count, band.lo * W, W, rows, norm_n);
        }
      }
    }
    int64_t limit = band.hi;  // rows below the first that a later part reaches are done
    for (int64_t later = k + 1; later < band.last; ++later)
      if (!parts[later].empty()) limit = std::min(limit, parts[later].lo);
    if (limit <= flushed) continue;
    scratch.zero(flushed, limit);  // rows no part reached
    for (int64_t y = flushed; y < limit; ++y) {
      bool finishes = divisor_plane && last(y), product = false;
      if (finishes) {
        const acc_t* D = divisor_plane + (n * H + y) * W;
        with_normalisation(normalisation, [&](auto code) {
          for (int64_t x = 0; x < W; ++x) divisor[x] = safe_normaliser(D[x], decltype(code)::value);
        });
        product = finishing_factors(divisor.data(), factor.data(), W);
      }
      // Rows with a target that does not finish by the product: moved, then finished here.
      const acc_t* times = product ? factor.data() : nullptr;
      const acc_t* lanes = rows + (y - band.lo) * W * L;
      auto finish_planes = [&](const auto& target_plane) {
        if (finishes && !product)
          for (int64_t c = 0; c < count; ++c) {
            acc_t* target = target_plane(c);
            for (int64_t x = 0; x < W; ++x) target[x] = finished(target[x], divisor[x], factor[x]);
          }
      };
      if (straight && last(y) && !adds(y)) {
        auto through = [straight, W](int64_t c) { return straight + c * W; };
        unpack_block_row<false, true>(lanes, L, through, count, times, W);
        finish_planes(through);
        cast(n, y, c0, count, straight, W);
        continue;
      }
      if (adds(y))
        unpack_block_row<true, true>(lanes, L, plane(y), count, times, W);
      else
        unpack_block_row<false, true>(lanes, L, plane(y), count, times, W);
      finish_planes(plane(y));
      if (casts && last(y)) cast(n, y, c0, count, nullptr, W);
    }
    flushed = limit;
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void forward_kernel(const Tensor& input, const Sources<acc_t>& src, int normalisation, Tensor& out,
                    Tensor& normaliser, scalar_t* result, const Schedule* planned,
                    std::unique_ptr<StableShortcut<acc_t>> shortcut) {
  const int64_t N = input.size(0), C = input.size(1), H = src.H, W = src.W;
  const scalar_t* in = ptr<scalar_t>(input);
  const View4 in_view(input);
  acc_t* out_data = ptr<acc_t>(out);
  acc_t* norm_data = src.kind != SUM ? ptr<acc_t>(normaliser) : nullptr;
  if (src.kind == STABLE && !shortcut) shortcut = std::make_unique<StableShortcut<acc_t>>(src, N);
  // The images with the shortcut splat soft weights exp(m - R).
  Sources<acc_t> shifted = src;
  shifted.kind = SOFT;
  shifted.shift = shortcut ? shortcut->shift.data() : nullptr;
  auto sources = [&](int64_t n) -> const Sources<acc_t>& { return shortcut && shortcut->taken[n] ? shifted : src; };
  const Finish<acc_t> finish{out_data, norm_data, C, H, W, normalisation, src.kind != SUM && normalisation != RAW,
                             src.maximum, shortcut.get()};
  const Schedule schedule = planned ? *planned : plan(src, N);
  // No separate pass zeroes the outputs: the first band to write a row (of phase 0, else of
  // phase 1) stores it, or zeroes it just before adding into it, while in cache; a band of
  // phase 1 adds into the rows a band of phase 0 wrote. Rows no band reaches are zeroed first.
  // Likewise a band's rows that no phase-1 band reaches after it are final once it is done with
  // them (a phase-1 band's all, as phase 0 is done and no other phase-1 band writes them): it
  // finishes them at once. Rows no band reaches are finished after the phases.
  const std::vector<char> zeroed = schedule.reached(0, N, H), reached_later = schedule.reached(1, N, H);
  std::vector<char> finished(static_cast<size_t>(N * H), 0);  // each row set by one band at most
  // Whether row y, which a band of phase p has just done, is final now (marked so): then
  // finished, and its planes rounded into `result`.
  auto finishes = [&](int p, int64_t n, int64_t y) {
    if (p == 0 && reached_later[n * H + y]) return false;
    finished[n * H + y] = 1;
    return true;
  };
  // Channels [c0, c0 + count) of a final row of image n rounded into `result` (a 16-bit input's
  // own dtype, when asked), while in cache: no pass of its own. From `planes` (channel c0's row,
  // the next channel's `stride` values on) where a scatter kept them aside, else from out.
  auto cast = [&](int64_t n, int64_t y, int64_t c0, int64_t count, const acc_t* planes, int64_t stride) {
    if constexpr (kNarrow<scalar_t>) {
      if (!result) return;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t at = ((n * C + c0 + c) * H + y) * W;
        narrow(planes ? planes + c * stride : out_data + at, result + at, W);
      }
    }
  };
  const bool narrows = kNarrow<scalar_t> && result;
  const int64_t planes = C + (norm_data ? 1 : 0);
  auto zero_rows = [&](int64_t n, int64_t lo, int64_t hi) {
    for (int64_t p = 0; p < planes; ++p) {
      acc_t* rows = p < C ? out_data + ((n * C + p) * H + lo) * W : norm_data + (n * H + lo) * W;
      std::fill(rows, rows + (hi - lo) * W, acc_t(0));
    }
  };
  torch::stable::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index)
      if (!zeroed[index] && !reached_later[index]) zero_rows(index / H, index % H, index % H + 1);
  });
  auto scatter = [&](auto channels) {
    constexpr int CC = decltype(channels)::value;
    schedule.template run<Scratch<acc_t>>([&](const Band& band, int p, Scratch<acc_t>& scratch) {
      if (band.empty()) return;  // none of its pixels lands
      const Sources<acc_t>& band_src = sources(band.n);
      const bool per_tap = weighs_per_tap(band_src.kind);  // stable and max
      // Whether a band of phase 0 wrote row y before this band (then added to).
      auto adds = [&](int64_t y) { return p == 1 && zeroed[band.n * H + y]; };
      if constexpr (CC > 0) {  // packs() needs at most three channels
        if (packs<acc_t>(band, C, W)) {
          acc_t* rows = scratch.rows(band, W);
          auto final = [&](int64_t y) { return finishes(p, band.n, y); };
          int64_t flushed = band.lo;  // rows [band.lo, flushed) are in the outputs
          for (int64_t k = band.first; k < band.last; ++k) {
            const Band& part = schedule.parts[k];
            if (!part.empty()) {
              scratch.zero(part.lo, part.hi);
              if (per_tap)
                scatter_band_packed<CC, true>(band, part, in, in_view, band_src, rows);
              else
                scatter_band_packed<CC, false>(band, part, in, in_view, band_src, rows);
            }
            int64_t limit = band.hi;  // rows below the first that a later part reaches are done
            for (int64_t later = k + 1; later < band.last; ++later)
              if (!schedule.parts[later].empty()) limit = std::min(limit, schedule.parts[later].lo);
            if (limit <= flushed) continue;
            scratch.zero(flushed, limit);  // rows no part reached
            flush_rows<CC>(band, adds, flushed, limit, rows, out_data, norm_data, H, W, finish, final, cast,
                           narrows && !finish.scales(band.n) ? scratch.straight_rows(CC * W) : nullptr);
            flushed = limit;
          }
          return;
        }
      } else if (blocks_fit<acc_t>(band, C, W)) {  // blocks_fit() needs four channels or more
        // The normaliser first (zeroed where this band is the first to write a row), as the first
        // block adds into it; rows are divided as each block moves them out, unless the stable
        // shortcut rescales them after.
        if (norm_data)
          for (int64_t y = band.lo; y < band.hi; ++y)
            if (!adds(y)) std::fill(norm_data + (band.n * H + y) * W, norm_data + (band.n * H + y + 1) * W, acc_t(0));
        const bool divides = finish.divides && !finish.scales(band.n);
        const bool casts = !finish.scales(band.n);  // else each row once rescaled, below
        acc_t* straight = narrows && casts ? scratch.straight_rows(16 * W) : nullptr;
        auto last = [&](int64_t y) { return p == 1 || !reached_later[band.n * H + y]; };
        // The source rows' weights once, for every block (exp of the metric for soft).
        scratch.weights.resize(static_cast<size_t>((band.y_end - band.y_begin) * W));
        for (int64_t y = band.y_begin; y < band.y_end; ++y)
          band_src.row_weights(band.n, y, scratch.weights.data() + (y - band.y_begin) * W);
        // With more than one block, the taps of its (non-empty) parts' rows likewise.
        TapChunk<acc_t>* taps = nullptr;
        if (C > 16 && (band.y_end - band.y_begin) * chunks_per_row(W) * kChunk <= kKeptTapPixels) {
          taps = scratch.chunks((band.y_end - band.y_begin) * chunks_per_row(W));
          for (int64_t k = band.first; k < band.last; ++k) {
            const Band& part = schedule.parts[k];
            if (part.empty()) continue;
            for (int64_t y = part.y_begin; y < part.y_end; ++y)
              for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk)
                fill_chunk(taps[(y - band.y_begin) * chunks_per_row(W) + x_begin / kChunk], band_src, per_tap, band.n, y,
                           x_begin, std::min(kChunk, W - x_begin), scratch.weights.data() + (y - band.y_begin) * W + x_begin);
          }
        }
        for (int64_t c0 = 0, lanes = 0; c0 < C; c0 += lanes) {
          lanes = block_lanes(C, c0);
          const int64_t count = std::min<int64_t>(lanes, C - c0);
          acc_t* norm = c0 == 0 ? norm_data : nullptr;
          const acc_t* divisor = divides ? norm_data : nullptr;
          auto block = [&](auto stable) {
            constexpr bool Stable = decltype(stable)::value;
            switch (lanes) {
              case 4: splat_block<4, Stable>(band, adds, schedule.parts, in, in_view, band_src, C, c0, count, out_data, norm, divisor, normalisation, scratch, taps, last, cast, casts, straight); break;
              case 8: splat_block<8, Stable>(band, adds, schedule.parts, in, in_view, band_src, C, c0, count, out_data, norm, divisor, normalisation, scratch, taps, last, cast, casts, straight); break;
              default: splat_block<16, Stable>(band, adds, schedule.parts, in, in_view, band_src, C, c0, count, out_data, norm, divisor, normalisation, scratch, taps, last, cast, casts, straight);
            }
          };
          if (per_tap)
            block(std::true_type());
          else
            block(std::false_type());
        }
        std::vector<acc_t> finishing(finish.needed() ? 2 * W : 0);
        for (int64_t y = band.lo; y < band.hi; ++y)
          if (finishes(p, band.n, y) && !casts) {
            finish.row(band.n, y, finishing.data());
            cast(band.n, y, 0, C, nullptr, W);
          }
        return;
      }
      for (int64_t y = band.lo; y < band.hi; ++y)
        if (!adds(y)) zero_rows(band.n, y, y + 1);
      if (per_tap)
        scatter_band<CC, true>(band, in, in_view, band_src, C, out_data, norm_data);
      else
        scatter_band<CC, false>(band, in, in_view, band_src, C, out_data, norm_data);
      std::vector<acc_t> finishing(finish.needed() ? 2 * W : 0);
      for (int64_t y = band.lo; y < band.hi; ++y)
        if (finishes(p, band.n, y)) {
          finish.row(band.n, y, finishing.data());
          cast(band.n, y, 0, C, nullptr, W);
        }
    });
  };
  // Up to three channels pack (a compile-time count); more run in channel blocks, whose code
  // is made once (every path of `scatter` is instantiated for each count it is given).
  switch (C) {
    case 1: scatter(std::integral_constant<int, 1>()); break;
    case 2: scatter(std::integral_constant<int, 2>()); break;
    case 3: scatter(std::integral_constant<int, 3>()); break;
    default: scatter(std::integral_constant<int, 0>());
  }
  if (!finish.needed() && !result) return;
  torch::stable::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index)
      if (!finished[index]) {
        finish.rows(index / H, index % H, index % H + 1);
        cast(index / H, index % H, 0, C, nullptr, W);
      }
  });
}

template void forward_kernel<float, float>(const Tensor&, const Sources<float>&, int, Tensor&, Tensor&, float*, const Schedule*, std::unique_ptr<StableShortcut<float>>);
template void forward_kernel<double, double>(const Tensor&, const Sources<double>&, int, Tensor&, Tensor&, double*, const Schedule*, std::unique_ptr<StableShortcut<double>>);
template void forward_kernel<Half, float>(const Tensor&, const Sources<float>&, int, Tensor&, Tensor&, Half*, const Schedule*, std::unique_ptr<StableShortcut<float>>);
template void forward_kernel<BFloat16, float>(const Tensor&, const Sources<float>&, int, Tensor&, Tensor&, BFloat16*, const Schedule*, std::unique_ptr<StableShortcut<float>>);

}  // namespace cpu
}  // namespace softsplat
