// The cpp backend's CPU kernels and the `softsplat` op library.
//
// Taps: make_taps (taps.h) runs over chunks of a row's pixels in loops the compiler vectorises,
// filling arrays (TapChunk); exp is Sleef's vectorised one, a row at a time.
// Schedule: source rows are cut into bands (their height from the image size alone) and each band's
// reach, the target rows its taps can land on, is read from the flow. Bands alternate between two
// phases; while two bands of one phase (and image) reach a common row, neighbouring bands are
// merged (at worst into one band per image). The bands then run in parallel, a band of phase 1 once
// the bands of phase 0 whose rows it shares are done: no atomics, no per-thread copies of the
// output. With up to three channels a band accumulates into a scratch of the rows it reaches,
// pixel-major (four lanes per target: the channels and the normaliser), two vector
// read-modify-writes per pixel, and moves each row into the NCHW outputs once no later part of the
// band reaches it; otherwise it adds straight into them. Every target receives the contributions of
// at most one band per phase, each in a fixed pixel order, phase 0 first: the same sums, bitwise,
// whatever the thread count. Phase 0 writes (or zeroes, then adds into) the rows it reaches; a row
// is finished (divided; for stable soft, rescaled first) by the band that writes it last, as soon
// as it is final. The scatter-max of stable splatting runs on the same schedule, one update per
// pixel into a band's scratch of the cells its pixels land in.
// Stable soft: where an image's metrics allow (StableShortcut), the scatter splats plain soft
// weights exp(metric - R), R the image's largest metric, and each final target is multiplied
// by exp(R - M(t)); splat_stable_forward computes M and this in one call, on one plan.
// Backward: per band of source rows, gN = grad / D' and gD of the rows it reaches are prepared
// in a ring of rows of the thread (rows its previous band also reached are kept); every source
// pixel gathers from its four taps and writes only its own gradients: no atomics either.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>  // the vectorised math ATen's own CPU kernels use, shipped with torch
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "schemas.h"
#include "taps.h"

namespace softsplat {
namespace {

struct View4 {  // element strides of an [N, C, H, W] tensor
  int64_t n, c, y, x;
  explicit View4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), y(t.stride(2)), x(t.stride(3)) {}
  View4() : n(0), c(0), y(0), x(0) {}
  int64_t at(int64_t in, int64_t ic, int64_t iy, int64_t ix) const { return in * n + ic * c + iy * y + ix * x; }
};

// exp of a[0..n) in place with Sleef's vectorised exp (1 ulp) where the CPU has AVX2 or AVX-512,
// else std::exp. The tail goes through the same vector function, so every value does.
template <typename T, int Lanes, typename Load, typename Exp, typename Store>
inline void exp_lanes(T* a, int64_t n, Load load, Exp exp, Store store) {
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) store(a + i, exp(load(a + i)));
  if (i == n) return;
  T tail[Lanes] = {};
  std::copy(a + i, a + n, tail);
  store(tail, exp(load(tail)));
  std::copy(tail, tail + (n - i), a + i);
}

inline void exp_inplace(float* a, int64_t n) {
#if defined(__AVX512F__)
  exp_lanes<float, 16>(a, n, [](const float* p) { return _mm512_loadu_ps(p); }, Sleef_expf16_u10,
                       [](float* p, __m512 v) { _mm512_storeu_ps(p, v); });
#elif defined(__AVX2__)
  exp_lanes<float, 8>(a, n, [](const float* p) { return _mm256_loadu_ps(p); }, Sleef_expf8_u10,
                      [](float* p, __m256 v) { _mm256_storeu_ps(p, v); });
#else
  for (int64_t i = 0; i < n; ++i) a[i] = std::exp(a[i]);
#endif
}

inline void exp_inplace(double* a, int64_t n) {
#if defined(__AVX512F__)
  exp_lanes<double, 8>(a, n, [](const double* p) { return _mm512_loadu_pd(p); }, Sleef_expd8_u10,
                       [](double* p, __m512d v) { _mm512_storeu_pd(p, v); });
#elif defined(__AVX2__)
  exp_lanes<double, 4>(a, n, [](const double* p) { return _mm256_loadu_pd(p); }, Sleef_expd4_u10,
                       [](double* p, __m256d v) { _mm256_storeu_pd(p, v); });
#else
  for (int64_t i = 0; i < n; ++i) a[i] = std::exp(a[i]);
#endif
}

// The flow [N, 2, H, W] and metric [N, 1, H, W] (null for sum and avg), both contiguous.
template <typename acc_t>
struct Sources {
  const acc_t* flow;
  const acc_t* metric;
  int64_t H, W;
  int kind;
  const acc_t* maximum;  // stable: M [N, 1, H, W] contiguous; else null
  const acc_t* shift = nullptr;  // soft: w = exp(metric - shift[n]) (StableShortcut), else exp(metric)

  const acc_t* flow_row(int64_t n, int64_t component, int64_t y) const { return flow + ((n * 2 + component) * H + y) * W; }
  const acc_t* metric_row(int64_t n, int64_t y) const { return metric + (n * H + y) * W; }

  // The per-pixel weights w of source row y: pixel_weight (1, metric or exp(metric)), computed
  // a row at a time so that exp vectorises; soft with a shift: exp(metric - shift[n]). Stable:
  // the metric (TapChunk::fill_stable).
  void row_weights(int64_t n, int64_t y, acc_t* w) const {
    if (!metric) {
      std::fill(w, w + W, acc_t(1));
      return;
    }
    const acc_t* m = metric_row(n, y);
    if (kind == SOFT && shift)
      for (int64_t x = 0; x < W; ++x) w[x] = m[x] - shift[n];
    else
      std::copy(m, m + W, w);
    if (kind == SOFT) exp_inplace(w, W);
  }
};

// f(std::integral_constant<int, code>()) for a normalisation code, so that a loop inside f sees
// it as a constant (with it a variable, loops did not vectorise).
template <typename F>
void with_normalisation(int normalisation, const F& f) {
  switch (normalisation) {
    case ADDEPS: f(std::integral_constant<int, ADDEPS>()); break;
    case ZEROEPS: f(std::integral_constant<int, ZEROEPS>()); break;
    case CLIPEPS: f(std::integral_constant<int, CLIPEPS>()); break;
    default: f(std::integral_constant<int, RAW>());
  }
}

// visit(i) for a chunk's pixels i < count in the order the scatters take them: even columns,
// then odd ones. Pixels side by side usually share two targets; visited one after the other,
// each update would wait for the previous one's store. Fixed, so sums stay reproducible. Two
// plain loops: an index computed per pixel cost the packed scatter ~5%.
template <typename Visit>
inline void in_pixel_order(int64_t count, const Visit& visit) {
  for (int64_t first = 0; first < 2; ++first)
    for (int64_t i = first; i < count; i += 2) visit(i);
}

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
    exponent[i] = dropped | (M == minus_infinity) ? minus_infinity : metric[i] - M;
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
    for (int64_t i = 0; i < count; ++i) {
      Taps<acc_t, index_t> t;
      const bool lands = make_taps<acc_t, index_t>(static_cast<index_t>(x_begin + i), static_cast<index_t>(y), flow_x[i],
                                                   flow_y[i], H, W, t);
      corner[i] = static_cast<int64_t>(t.y0) * src.W + t.x0;
      for (int k = 0; k < 4; ++k) weight[k][i] = t.weight[k];
      keep[i] = lands ? static_cast<unsigned char>(t.keep[0] | t.keep[1] << 1 | t.keep[2] << 2 | t.keep[3] << 3) : 0;
      if (Coordinates) {
        x0[i] = t.x0;
        y0[i] = t.y0;
        const TapFactors<acc_t> f = tap_factors(t);
        east[i] = f.east;
        west[i] = f.west;
        south[i] = f.south;
        north[i] = f.north;
      }
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
  void fill_stable(const acc_t* maximum, const acc_t* metric, int64_t W, int64_t count) {
    const int64_t offset[4] = {0, 1, W, W + 1};
    for (int k = 0; k < 4; ++k) {
      stable_exponents(maximum, metric, corner, keep, k, offset[k], stable[k], count);
      exp_inplace(stable[k], count);
    }
  }
};

struct Band {
  int64_t n, y_begin, y_end;  // source rows [y_begin, y_end) of image n
  int64_t lo, hi;             // target rows its taps may reach: [lo, hi), empty if lo == hi
  int64_t first, last;        // its parts, bands()'s bands [first, last) (one unless merged)
  bool empty() const { return hi <= lo; }
};

// Rows floor(y + flow_y) and the one below, over the band's pixels whose target row is in
// [-1, H) (no other pixel lands), clamped to the image. Kept per lane, so the loop vectorises.
template <typename acc_t>
void find_reach(const Sources<acc_t>& src, Band& band) {
  constexpr int kLanes = 16;
  const acc_t H = static_cast<acc_t>(src.H);
  acc_t lowest[kLanes], highest[kLanes];
  std::fill(lowest, lowest + kLanes, std::numeric_limits<acc_t>::infinity());
  std::fill(highest, highest + kLanes, -std::numeric_limits<acc_t>::infinity());
  auto update = [&](int lane, acc_t fy) {
    const bool lands = fy >= acc_t(-1) && fy < H;  // false for NaN and infinities
    lowest[lane] = lands && fy < lowest[lane] ? fy : lowest[lane];
    highest[lane] = lands && fy > highest[lane] ? fy : highest[lane];
  };
  for (int64_t y = band.y_begin; y < band.y_end; ++y) {
    const acc_t* row = src.flow_row(band.n, 1, y);
    const acc_t row_y = static_cast<acc_t>(y);
    int64_t x = 0;
    for (; x + kLanes <= src.W; x += kLanes)
      for (int lane = 0; lane < kLanes; ++lane) update(lane, row_y + row[x + lane]);
    for (; x < src.W; ++x) update(0, row_y + row[x]);
  }
  const acc_t low = *std::min_element(lowest, lowest + kLanes), high = *std::max_element(highest, highest + kLanes);
  band.lo = band.hi = band.y_begin;
  if (low > high) return;  // nothing lands
  band.lo = std::max<int64_t>(0, static_cast<int64_t>(floor_of(low)));
  band.hi = std::min<int64_t>(src.H, static_cast<int64_t>(floor_of(high)) + 2);
}

// Whether two bands of one phase (every other band of one image) reach a common row.
bool phases_overlap(const std::vector<Band>& image) {
  for (size_t parity = 0; parity < 2; ++parity) {
    std::vector<std::pair<int64_t, int64_t>> reach;
    for (size_t i = parity; i < image.size(); i += 2)
      if (!image[i].empty()) reach.emplace_back(image[i].lo, image[i].hi);
    std::sort(reach.begin(), reach.end());
    for (size_t i = 1; i < reach.size(); ++i)
      if (reach[i].first < reach[i - 1].second) return true;  // sorted and so far disjoint
  }
  return false;
}

// Neighbouring bands of one image merged pairwise, their reach the union.
std::vector<Band> merged(const std::vector<Band>& image) {
  std::vector<Band> result;
  for (size_t i = 0; i < image.size(); i += 2) {
    Band b = image[i];
    if (i + 1 < image.size()) {
      const Band& next = image[i + 1];
      b.y_end = next.y_end;
      b.last = next.last;
      if (!next.empty()) {
        b.lo = b.empty() ? next.lo : std::min(b.lo, next.lo);
        b.hi = std::max(b.hi, next.hi);
      }
    }
    result.push_back(b);
  }
  return result;
}

struct Schedule {
  std::vector<Band> phase[2];  // no two bands of a phase write a common target
  std::vector<Band> parts;     // bands()'s bands, which phase[]'s bands are made of

  // work(band, p, state) for every band, each band of phase 1 after the bands of phase 0 it
  // depends on (those of its image whose reach meets its own), the others in any order: the
  // bands are listed so that a band of phase 1 comes soon after the last of them (order()),
  // and each thread takes the next band not yet taken, waiting, for a band of phase 1, until
  // those are done. So a phase-1 band adds into rows phase 0 has recently written, likely still
  // in cache, and no barrier separates the phases. Nothing a band computes depends on its thread
  // or on when it runs. `state`, a State of the thread, is reused across its bands (a scratch
  // is allocated once per call and thread).
  template <typename State, typename Work>
  void run(const Work& work) const {
    std::vector<State> states(static_cast<size_t>(at::get_num_threads()));
    const std::vector<Task> tasks = order(static_cast<int64_t>(states.size()));
    const int64_t count = static_cast<int64_t>(tasks.size());
    // Per band of phase 0, whether it is done (value-initialised: false).
    std::vector<std::atomic<bool>> done(phase[0].size());
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};  // a band threw: the others stop (none waits forever)
    at::parallel_for(0, std::min<int64_t>(count, static_cast<int64_t>(states.size())), 1, [&](int64_t, int64_t) {
      // A thread number past the intra-op pool's (inside someone else's parallel region)
      // takes a State of its own.
      const size_t thread = static_cast<size_t>(at::get_thread_num());
      State own;
      State& state = thread < states.size() ? states[thread] : own;
      for (int64_t i = next++; i < count && !failed.load(std::memory_order_relaxed); i = next++) {
        const Task& task = tasks[static_cast<size_t>(i)];
        // The bands it waits for are of phase 0, listed earlier, so already taken by threads
        // that never wait (phase-0 bands do not): no deadlock, with any number of threads.
        for (const int64_t d : task.after)
          while (!done[d].load(std::memory_order_acquire)) {
            if (failed.load(std::memory_order_relaxed)) return;
            std::this_thread::yield();
          }
        try {
          work(phase[task.p][task.index], task.p, state);
        } catch (...) {
          failed.store(true);
          throw;  // at::parallel_for rethrows it
        }
        if (task.p == 0) done[task.index].store(true, std::memory_order_release);
      }
    });
  }

  struct Task {
    int p;
    int64_t index;               // in phase[p]
    std::vector<int64_t> after;  // phase 1: the bands of phase 0 it waits for
  };

  // Phase 0's bands in order, each band of phase 1 (in order) inserted `lag` bands after the
  // last band of phase 0 it depends on (when there are that many): with `lag` threads, that one
  // has usually been done by the time a thread takes the band.
  std::vector<Task> order(int64_t lag) const {
    const std::vector<Band>& first = phase[0];
    std::vector<Task> later;
    size_t image_begin = 0;  // the first of phase 0's bands of band.n (bands are in image order)
    for (size_t j = 0; j < phase[1].size(); ++j) {
      const Band& band = phase[1][j];
      while (image_begin < first.size() && first[image_begin].n < band.n) ++image_begin;
      Task task{1, static_cast<int64_t>(j), {}};
      for (size_t i = image_begin; i < first.size() && first[i].n == band.n; ++i)
        if (!band.empty() && !first[i].empty() && first[i].lo < band.hi && band.lo < first[i].hi)
          task.after.push_back(static_cast<int64_t>(i));
      later.push_back(std::move(task));
    }
    std::vector<Task> tasks;
    size_t j = 0;
    auto ready = [&](int64_t listed) {  // phase 0's bands [0, listed) are listed
      return j < later.size() && (later[j].after.empty() || later[j].after.back() + lag < listed);
    };
    for (size_t i = 0; i < first.size(); ++i) {
      while (ready(static_cast<int64_t>(i))) tasks.push_back(std::move(later[j++]));
      tasks.push_back({0, static_cast<int64_t>(i), {}});
    }
    while (j < later.size()) tasks.push_back(std::move(later[j++]));
    return tasks;
  }

  // Per row of the N images, whether a band of phase p reaches it.
  std::vector<char> reached(int p, int64_t N, int64_t H) const {
    std::vector<char> rows(static_cast<size_t>(N * H), 0);
    for (const Band& band : phase[p])
      if (!band.empty()) std::fill(rows.begin() + band.n * H + band.lo, rows.begin() + band.n * H + band.hi, 1);
    return rows;
  }
};

// The images' rows cut into bands, ~32 per image of 8 to 64 rows each (a function of the image
// size alone), with their reach.
template <typename acc_t>
std::vector<Band> bands(const Sources<acc_t>& src, int64_t N) {
  const int64_t height = std::min<int64_t>(64, std::max<int64_t>(8, (src.H + 31) / 32));
  std::vector<Band> all;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y = 0; y < src.H; y += height) {
      const int64_t index = static_cast<int64_t>(all.size());
      all.push_back({n, y, std::min(src.H, y + height), y, y, index, index + 1});
    }
  at::parallel_for(0, static_cast<int64_t>(all.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) find_reach(src, all[i]);
  });
  return all;
}

template <typename acc_t>
Schedule plan(const Sources<acc_t>& src, int64_t N) {
  Schedule schedule;
  schedule.parts = bands(src, N);
  const std::vector<Band>& all = schedule.parts;
  for (int64_t n = 0; n < N; ++n) {
    std::vector<Band> image;
    for (const Band& b : all)
      if (b.n == n) image.push_back(b);
    while (image.size() > 1 && phases_overlap(image)) image = merged(image);
    for (size_t i = 0; i < image.size(); ++i) schedule.phase[i % 2].push_back(image[i]);
  }
  return schedule;
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
      chunk->fill(src, n, y, x_begin, count);
      if (Stable) chunk->fill_stable(src.maximum + n * HW, w.data() + x_begin, W, count);
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
constexpr int kPacked = 4;  // lanes per target
constexpr int64_t kPackedBytes = int64_t(16) << 20;

// GCC's vector extension: Lanes values of T, with element-wise arithmetic.
template <typename T, int Lanes>
struct Vector {
  typedef T type __attribute__((vector_size(Lanes * sizeof(T))));
};

// Whether C channels (and the normaliser) take the packed layout, kPacked lanes per target: the
// forward's scratch and the backward's prepared rows.
constexpr bool packed_layout(int64_t C) { return C >= 1 && C < kPacked; }

template <typename acc_t>
bool packs(const Band& band, int64_t C, int64_t W) {
  return packed_layout(C) && (band.hi - band.lo) * W * kPacked * static_cast<int64_t>(sizeof(acc_t)) <= kPackedBytes;
}

// A thread's scratch, rows [band.lo, band.hi) of the band it runs: a row is zeroed when a part
// first reaches it (or a flush needs it), not before, so that it is in cache when it is used.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> data;
  int64_t first = 0, W = 0;  // the band's first row; the row width
  int64_t lo = 0, hi = 0;    // rows zeroed so far: [lo, hi), empty after rows()

  acc_t* rows(const Band& band, int64_t width) {
    const size_t size = static_cast<size_t>((band.hi - band.lo) * width * kPacked);
    if (data.size() < size) data.resize(size);
    first = lo = hi = band.lo;
    W = width;
    return data.data();
  }
  // Rows [from, to) zeroed unless they are; the zeroed rows stay one interval (rows between it
  // and [from, to) are zeroed too).
  void zero(int64_t from, int64_t to) {
    if (from >= to) return;
    auto clear = [&](int64_t a, int64_t b) {
      if (a < b) std::fill(data.data() + (a - first) * W * kPacked, data.data() + (b - first) * W * kPacked, acc_t(0));
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
  for (; x < count; ++x)
    for (int c = 0; c < kPacked; ++c) target[x * kPacked + c] = plane[c][x];
}

// The lanes of `count` pixels of a row, from `pixel` (its first channel): x * w per channel, w
// (null for sum: 1 and lane CC 0), zeros; stable: x and 1. float NCHW with AVX-512: 16 pixels
// at a time through store_interleaved; otherwise, and for the remainder, one pixel at a time.
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
  if (view.x == 1)
    pack(1, view.c);  // NCHW
  else
    pack(view.x, view.c);  // channels_last and others
}

// A chunk's pixels added into `scratch`, whose first target is the image's flat index row0 (a
// band's first row times W): the lanes v of a pixel (values), times b[k] (and s[k] when stable)
// on tap k, as plane[tap k] += b[k] * (v * s[k]), the oracle's order, as in scatter_band. Pixels
// in_pixel_order. A pixel whose four taps are kept takes two read-modify-writes of two targets
// (a row's taps are neighbours); with AVX2 (float, not stable) written out, with the constants
// in registers.
template <bool Stable, typename acc_t>
void scatter_chunk(const TapChunk<acc_t>& chunk, const acc_t* __restrict values, const acc_t* __restrict tap_weights,
                   int64_t count, int64_t row0, int64_t W, acc_t* __restrict scratch) {
  using Pair = typename Vector<acc_t, 2 * kPacked>::type;  // the lanes of two targets
  using Lanes = typename Vector<acc_t, kPacked>::type;
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
      const Pair v2 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 0, 1, 2, 3);
      auto add = [&](int row, Pair weight) {
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
      return;
    }
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
  // Per pixel, its four taps' weights side by side (one load where all four are kept).
  std::vector<acc_t> tap_weights(kChunk * kPacked);
  const acc_t* const weight_planes[kPacked] = {chunk->weight[0], chunk->weight[1], chunk->weight[2], chunk->weight[3]};
  for (int64_t y = part.y_begin; y < part.y_end; ++y) {
    src.row_weights(n, y, w.data());
    const scalar_t* in_row = in + in_view.at(n, 0, y, 0);
    for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
      const int64_t count = std::min(kChunk, W - x_begin);
      chunk->fill(src, n, y, x_begin, count);
      if (Stable) chunk->fill_stable(src.maximum + n * src.H * W, w.data() + x_begin, W, count);
      pack_values<CC, Stable>(in_row + x_begin * in_view.x, in_view, weighted ? w.data() + x_begin : nullptr,
                              values.data(), count);
      interleave(weight_planes, tap_weights.data(), count);
      scatter_chunk<Stable>(*chunk, values.data(), tap_weights.data(), count, band.lo * W, W, scratch);
    }
  }
}

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
    at::parallel_for(0, N * src.H, 16, [&](int64_t begin, int64_t end) {
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

// What happens to a row of the outputs once its sums are final (out, norm contiguous): images
// with the stable shortcut have them multiplied by exp(min(R - M, kStableSpread)) (NaN kept);
// then, when `divides`, out /= D'.
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
      for (int64_t c = 0; c < C; ++c) {
        acc_t* row = out + ((n * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) row[x] /= divisor[x];
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

// unpack_row of CC channels and D (plane CC) for a final row, divided as Finish::row divides it
// (out / D', D kept; no stable rescaling): one pass over the row instead of two.
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
// outputs (out, norm contiguous; norm null for sum). Phase 0 stores (no other band has written
// these rows), phase 1 adds. A row for which final(y) holds (no band of a later phase reaches
// it) is finished at once, while in cache.
template <int CC, typename acc_t, typename Final>
void flush_rows(const Band& band, int p, int64_t from, int64_t to, const acc_t* scratch, acc_t* out, acc_t* norm,
                int64_t H, int64_t W, const Finish<acc_t>& finish, const Final& final) {
  std::vector<acc_t> finishing(finish.needed() ? 2 * W : 0);
  for (int64_t y = from; y < to; ++y) {
    const acc_t* lanes = scratch + (y - band.lo) * W * kPacked;
    acc_t* plane[kPacked] = {};
    for (int c = 0; c < CC; ++c) plane[c] = out + ((band.n * CC + c) * H + y) * W;
    acc_t* D = norm ? norm + (band.n * H + y) * W : nullptr;
    plane[CC] = D;
    const bool last = final(y);
    const bool divided = last && finish.divides && !finish.scales(band.n);  // then D is not null
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
    if (p == 0)
      unpack(std::false_type());
    else
      unpack(std::true_type());
    if (last && !divided) finish.row(band.n, y, finishing.data());
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& input, const Sources<acc_t>& src, int normalisation, at::Tensor& out,
                    at::Tensor& normaliser, const Schedule* planned = nullptr,
                    std::unique_ptr<StableShortcut<acc_t>> shortcut = nullptr) {
  const int64_t N = input.size(0), C = input.size(1), H = src.H, W = src.W;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const View4 in_view(input);
  acc_t* out_data = out.data_ptr<acc_t>();
  acc_t* norm_data = src.kind != SUM ? normaliser.data_ptr<acc_t>() : nullptr;
  if (src.kind == STABLE && !shortcut) shortcut = std::make_unique<StableShortcut<acc_t>>(src, N);
  // The images with the shortcut splat soft weights exp(m - R).
  Sources<acc_t> shifted = src;
  shifted.kind = SOFT;
  shifted.shift = shortcut ? shortcut->shift.data() : nullptr;
  auto sources = [&](int64_t n) -> const Sources<acc_t>& { return shortcut && shortcut->taken[n] ? shifted : src; };
  const Finish<acc_t> finish{out_data, norm_data, C, H, W, normalisation, src.kind != SUM && normalisation != RAW,
                             src.maximum, shortcut.get()};
  const Schedule schedule = planned ? *planned : plan(src, N);
  // No separate pass zeroes the outputs: a phase-0 band zeroes the rows it reaches (no other
  // band has written them yet) just before adding into them, while they are in cache; rows no
  // phase-0 band reaches are zeroed first. Likewise a band's rows that no phase-1 band reaches
  // after it are final once it is done with them (a phase-1 band's all, as phase 0 is done and
  // no other phase-1 band writes them): it finishes them at once. Rows no band reaches are
  // finished after the phases.
  const std::vector<char> zeroed = schedule.reached(0, N, H), reached_later = schedule.reached(1, N, H);
  std::vector<char> finished(static_cast<size_t>(N * H), 0);  // each row set by one band at most
  // Whether row y, which a band of phase p has just done, is to be finished now (marked so).
  auto finishes = [&](int p, int64_t n, int64_t y) {
    if (p == 0 && reached_later[n * H + y]) return false;
    finished[n * H + y] = 1;
    return finish.needed();
  };
  const int64_t planes = C + (norm_data ? 1 : 0);
  auto zero_rows = [&](int64_t n, int64_t lo, int64_t hi) {
    for (int64_t p = 0; p < planes; ++p) {
      acc_t* rows = p < C ? out_data + ((n * C + p) * H + lo) * W : norm_data + (n * H + lo) * W;
      std::fill(rows, rows + (hi - lo) * W, acc_t(0));
    }
  };
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index)
      if (!zeroed[index]) zero_rows(index / H, index % H, index % H + 1);
  });
  auto scatter = [&](auto channels) {
    constexpr int CC = decltype(channels)::value;
    schedule.template run<Scratch<acc_t>>([&](const Band& band, int p, Scratch<acc_t>& scratch) {
      if (band.empty()) return;  // none of its pixels lands
      const Sources<acc_t>& band_src = sources(band.n);
      const bool per_tap = band_src.kind == STABLE;
      if (CC > 0 && packs<acc_t>(band, C, W)) {
        acc_t* rows = scratch.rows(band, W);
        constexpr int packed = packed_layout(CC) ? CC : 1;  // C when packs() holds
        auto final = [&](int64_t y) { return finishes(p, band.n, y); };
        int64_t flushed = band.lo;  // rows [band.lo, flushed) are in the outputs
        for (int64_t k = band.first; k < band.last; ++k) {
          const Band& part = schedule.parts[k];
          if (!part.empty()) {
            scratch.zero(part.lo, part.hi);
            if (per_tap)
              scatter_band_packed<packed, true>(band, part, in, in_view, band_src, rows);
            else
              scatter_band_packed<packed, false>(band, part, in, in_view, band_src, rows);
          }
          int64_t limit = band.hi;  // rows below the first that a later part reaches are done
          for (int64_t later = k + 1; later < band.last; ++later)
            if (!schedule.parts[later].empty()) limit = std::min(limit, schedule.parts[later].lo);
          if (limit <= flushed) continue;
          scratch.zero(flushed, limit);  // rows no part reached
          flush_rows<packed>(band, p, flushed, limit, rows, out_data, norm_data, H, W, finish, final);
          flushed = limit;
        }
        return;
      }
      if (p == 0) zero_rows(band.n, band.lo, band.hi);
      if (per_tap)
        scatter_band<CC, true>(band, in, in_view, band_src, C, out_data, norm_data);
      else
        scatter_band<CC, false>(band, in, in_view, band_src, C, out_data, norm_data);
      std::vector<acc_t> finishing(finish.needed() ? 2 * W : 0);
      for (int64_t y = band.lo; y < band.hi; ++y)
        if (finishes(p, band.n, y)) finish.row(band.n, y, finishing.data());
    });
  };
  switch (C) {
    case 1: scatter(std::integral_constant<int, 1>()); break;
    case 2: scatter(std::integral_constant<int, 2>()); break;
    case 3: scatter(std::integral_constant<int, 3>()); break;
    case 4: scatter(std::integral_constant<int, 4>()); break;
    default: scatter(std::integral_constant<int, 0>());
  }
  if (!finish.needed()) return;
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index)
      if (!finished[index]) finish.rows(index / H, index % H, index % H + 1);
  });
}

// The backward's gN = grad / D' and gD (SPEC.md), pixel-major: K values per target pixel (the
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
  int64_t K;  // values per target in g: C (+ 1 for gD), or kPacked (zero-padded) below that

  int64_t pitch() const { return (W + 2) * K; }

  void rows(int64_t n, int64_t lo, int64_t hi, acc_t* g) const {
    // Each row as planes first (the channels' gN, then gD, then zeros), in loops that vectorise,
    // then interleaved into g.
    const int64_t used = C + (norm ? 1 : 0);
    std::vector<acc_t> divisor(W), planes(std::max(used, K) * W, acc_t(0));
    auto plane = [&](int64_t c) { return planes.data() + c * W; };
    for (int64_t y = lo; y < hi; ++y) {
      const acc_t* D = norm ? norm + (n * H + y) * W : nullptr;
      if (D)
        for (int64_t x = 0; x < W; ++x) divisor[x] = safe_normaliser(D[x], normalisation);
      acc_t* sum = D ? plane(C) : nullptr;
      if (D) std::fill(sum, sum + W, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        // A broadcast gradient (stride 0, as sum().backward() gives) and a contiguous one each
        // have their loop.
        const acc_t* gc = grad + grad_view.at(n, c, y, 0);
        const int64_t step = grad_view.x;
        acc_t* channel = plane(c);
        const acc_t one = acc_t(1);
        const acc_t* by = D ? divisor.data() : nullptr;
        if (step == 0)
          for (int64_t x = 0; x < W; ++x) channel[x] = gc[0] / (by ? by[x] : one);
        else if (step == 1)
          for (int64_t x = 0; x < W; ++x) channel[x] = gc[x] / (by ? by[x] : one);
        else
          for (int64_t x = 0; x < W; ++x) channel[x] = gc[x * step] / (by ? by[x] : one);
        if (!D) continue;
        const acc_t* r = result + result_view.at(n, c, y, 0);
        if (result_view.x == 1)
          for (int64_t x = 0; x < W; ++x) sum[x] -= channel[x] * r[x];
        else
          for (int64_t x = 0; x < W; ++x) sum[x] -= channel[x] * r[x * result_view.x];
      }
      if (D) {
        const acc_t* extra = grad_norm ? grad_norm + grad_norm_view.at(n, 0, y, 0) : nullptr;
        // gD is 0 where D' does not pass D's gradient; the normalisation a compile-time
        // constant, so that the loop vectorises (with it a variable, it did not).
        auto pass = [&](auto code) {
          constexpr int kNormalisation = decltype(code)::value;
          for (int64_t x = 0; x < W; ++x) sum[x] = normaliser_passes_gradient(D[x], kNormalisation) ? sum[x] : acc_t(0);
        };
        with_normalisation(normalisation, pass);
        if (extra)
          for (int64_t x = 0; x < W; ++x) sum[x] += extra[x * grad_norm_view.x];
      }
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
#endif
    const int64_t H = src.H, W = src.W, HW = H * W, channels = CC > 0 ? CC : C;
    constexpr bool normalised = Normalised;  // sum is not
    const int64_t K = channels + (normalised ? 1 : 0);  // values used per target
    const int64_t stride = packed_layout(channels) ? kPacked : K;  // Prepare's layout
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
        if (Stable) chunk->fill_stable(src.maximum + n * HW, w.data() + x_begin, W, count);
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
            // stable: d exp(m - M) / dm is the tap weight, already in gathered[]
            gm[(n * H + y) * W + x] = Stable ? grad_w : grad_w * weight_derivative(src.kind, w[x]);
          }
        }
      }
    }
  }
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
        if (Stable) chunk->fill_stable(src.maximum + n * HW, wx, W, count);
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
            target[i] = Stable ? grad_w : grad_w * weight_derivative(src.kind, wx[i]);
          }
        }
      }
    }
  }
#endif
};

// Backward: per band of source rows, gN and gD of the target rows it reaches are prepared in a
// ring of rows of the thread (kept for its next band, which reaches most of them too), then the
// band's pixels gather from it. Where flows reach so far that the bands' rows would add up to
// more than twice the image, each image is prepared once, whole, and gathered from.
template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& grad_normaliser,
                     const at::Tensor& input, const Sources<acc_t>& src, const at::Tensor& out,
                     const at::Tensor& normaliser, int normalisation, at::Tensor& grad_input,
                     at::Tensor& grad_flow, at::Tensor& grad_metric) {
  const int64_t N = input.size(0), C = input.size(1), H = src.H, W = src.W;
  const bool normalised = src.kind != SUM;
  const int64_t K = packed_layout(C) ? kPacked : C + (normalised ? 1 : 0);  // Prepare's layout
  const Prepare<acc_t> prepare{grad_out.data_ptr<acc_t>(), View4(grad_out),
                               normalised ? out.data_ptr<acc_t>() : nullptr, normalised ? View4(out) : View4(),
                               normalised ? normaliser.data_ptr<acc_t>() : nullptr,
                               grad_normaliser.defined() ? grad_normaliser.data_ptr<acc_t>() : nullptr,
                               grad_normaliser.defined() ? View4(grad_normaliser) : View4(),
                               normalisation, C, H, W, K};
  const Gather<scalar_t, acc_t> gather{input.data_ptr<scalar_t>(), View4(input), src, C,
                                       grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr,
                                       grad_flow.defined() ? grad_flow.data_ptr<acc_t>() : nullptr,
                                       grad_metric.defined() ? grad_metric.data_ptr<acc_t>() : nullptr};
  auto run = [&](auto channels) {
    constexpr int CC = decltype(channels)::value;
    auto rows = [&](int64_t n, int64_t y_begin, int64_t y_end, const acc_t* const* row, int64_t lo) {
      if (src.kind == STABLE)
        gather.template rows<CC, true, true>(n, y_begin, y_end, row, lo);
      else if (normalised)
        gather.template rows<CC, false, true>(n, y_begin, y_end, row, lo);
      else
        gather.template rows<CC, false, false>(n, y_begin, y_end, row, lo);
    };
    const std::vector<Band> all = bands(src, N);
    int64_t reach = 0;
    for (const Band& band : all) reach += band.hi - band.lo;
    if (reach <= 2 * N * H) {
      at::parallel_for(0, static_cast<int64_t>(all.size()), 1, [&](int64_t begin, int64_t end) {
        // The thread's bands are neighbours, and so are their reaches: the rows a band shares
        // with the previous one stay prepared, in a ring of rows (row r in slot r % capacity).
        int64_t capacity = 1;
        for (int64_t i = begin; i < end; ++i) capacity = std::max(capacity, all[i].hi - all[i].lo);
        // Zeros: the padding of each row (Prepare), and a row for the taps above and below the
        // image, which only the AVX-512 gather reads.
        const int64_t pitch = prepare.pitch();
        std::vector<acc_t> ring(static_cast<size_t>((capacity + 1) * pitch), acc_t(0));
        const acc_t* zeros = ring.data() + capacity * pitch + K;
        auto slot = [&](int64_t r) { return ring.data() + (r % capacity) * pitch; };
        int64_t held_n = -1, held_lo = 0, held_hi = 0;  // rows [held_lo, held_hi) of image held_n
        std::vector<const acc_t*> row;
        for (int64_t i = begin; i < end; ++i) {
          const Band& band = all[i];
          if (band.n != held_n || band.lo < held_lo || band.lo >= held_hi) held_hi = band.lo;  // none reusable
          held_n = band.n;
          held_lo = band.lo;
          for (int64_t r = held_hi; r < band.hi;) {  // prepare the missing rows, a run of slots at a time
            const int64_t run = std::min(band.hi - r, capacity - r % capacity);
            prepare.rows(band.n, r, r + run, slot(r));
            r += run;
          }
          held_hi = std::max(held_hi, band.hi);
          row.assign(static_cast<size_t>(band.hi - band.lo + 2), zeros);
          for (int64_t r = band.lo; r < band.hi; ++r) row[r - band.lo + 1] = slot(r) + K;
          rows(band.n, band.y_begin, band.y_end, row.data(), band.lo);
        }
      });
      return;
    }
    const int64_t pitch = prepare.pitch();
    std::vector<acc_t> g(static_cast<size_t>((H + 1) * pitch), acc_t(0));  // as the ring: zeros beside
    std::vector<const acc_t*> row(H + 2, g.data() + H * pitch + K);
    for (int64_t r = 0; r < H; ++r) row[r + 1] = g.data() + r * pitch + K;
    for (int64_t n = 0; n < N; ++n) {
      at::parallel_for(0, H, 16, [&](int64_t begin, int64_t end) { prepare.rows(n, begin, end, g.data() + begin * pitch); });
      at::parallel_for(0, H, 4, [&](int64_t begin, int64_t end) { rows(n, begin, end, row.data(), 0); });
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

// flow and metric must be contiguous (the ops' contiguous() copies, normally no-ops).
template <typename acc_t>
Sources<acc_t> sources(const at::Tensor& flow, const at::Tensor& metric, int64_t kind, const at::Tensor& maximum) {
  const bool with_metric = metric.defined() && kind >= LINEAR;
  return {flow.data_ptr<acc_t>(), with_metric ? metric.data_ptr<acc_t>() : nullptr, flow.size(2), flow.size(3),
          static_cast<int>(kind), kind == STABLE ? maximum.data_ptr<acc_t>() : nullptr};
}

// max(current, value) as replaces_maximum takes it, NaN winning: current < value ? value :
// current keeps a NaN current, then a NaN value is taken. Two selects, which loops vectorise
// (std::max's reference and a branch on NaN did not: with random metrics the 2 x 2 pass of
// maximum_kernel lost ~9 ms to mispredictions at 1080p, one thread).
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

// The cell (x0, y0) each of pixels [x_begin, x_begin + count) of row y lands in, as an index
// (y0 + 1) * (W + 1) + x0 + 1 of the (H + 1) x (W + 1) cells; -1 where it lands nowhere.
// make_taps's x0 and y0, in a loop that vectorises.
template <typename acc_t>
void landing_cells(const Sources<acc_t>& src, int64_t n, int64_t y, int64_t x_begin, int64_t count,
                   int64_t* __restrict cell) {
  const acc_t* __restrict flow_x = src.flow_row(n, 0, y) + x_begin;
  const acc_t* __restrict flow_y = src.flow_row(n, 1, y) + x_begin;
  for (int64_t i = 0; i < count; ++i) {
    Taps<acc_t, int64_t> t;
    const bool lands = make_taps<acc_t, int64_t>(x_begin + i, y, flow_x[i], flow_y[i], src.H, src.W, t);
    cell[i] = ((t.y0 + 1) * (src.W + 1) + t.x0 + 2) * static_cast<int64_t>(lands) - 1;  // no select: vectorises
  }
}

// M of stable splatting: per target, the maximum metric over the pixels with a kept tap on it
// (-inf where none). A pixel's taps are the corners of the cell it lands in, cell (x0, y0), and
// every pixel landing in a cell that has an in-image target as a corner keeps that tap. So, on
// the forward's schedule, a band scatter-maxes each of its pixels once into a scratch of the
// cells it can land in (rows y0 from lo - 1 to hi - 1, x0 from -1), then each target of its
// reach takes the maximum of its four cells: phase 0 stores it, phase 1 takes the maximum with
// what is there. Rows no phase-0 band reaches are -inf. Max is exact: no order to keep.
// `ranges` (optional): the bands also measure their metric rows for StableShortcut.
template <typename acc_t>
void maximum_kernel(const Sources<acc_t>& src, int64_t N, acc_t* maximum, const Schedule& schedule,
                    MetricRanges<acc_t>* ranges = nullptr) {
  const int64_t H = src.H, W = src.W, CW = W + 1;
  constexpr acc_t minus_infinity = -std::numeric_limits<acc_t>::infinity();
  const std::vector<char> stored = schedule.reached(0, N, H);
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index)
      if (!stored[index]) std::fill(maximum + index * W, maximum + (index + 1) * W, minus_infinity);
  });
  struct Cells {
    std::vector<acc_t> data;
    std::vector<int64_t> cell = std::vector<int64_t>(kChunk);  // of each pixel of a chunk, -1: none
  };
  schedule.template run<Cells>([&](const Band& band, int p, Cells& scratch) {
    if (band.empty()) {  // none of its pixels lands; its rows' metrics are still measured
      for (int64_t y = band.y_begin; ranges && y < band.y_end; ++y) ranges->measure(band.n * H + y, src.metric_row(band.n, y));
      return;
    }
    const int64_t n = band.n, first = band.lo * CW;  // landing_cells' index of cell (-1, lo - 1)
    scratch.data.assign(static_cast<size_t>((band.hi - band.lo + 1) * CW), minus_infinity);
    acc_t* cells = scratch.data.data();
    int64_t* cell = scratch.cell.data();
    for (int64_t y = band.y_begin; y < band.y_end; ++y) {
      const acc_t* metric = src.metric_row(n, y);
      if (ranges) ranges->measure(n * H + y, metric);
      for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
        const int64_t count = std::min(kChunk, W - x_begin);
        landing_cells(src, n, y, x_begin, count, cell);
        in_pixel_order(count, [&](int64_t i) {
          if (cell[i] < 0) return;
          acc_t& current = cells[cell[i] - first];
          current = scalar_maximum_of(current, metric[x_begin + i]);
        });
      }
    }
    for (int64_t y = band.lo; y < band.hi; ++y) {
      // Target (x, y) is the south-east corner of cell (x - 1, y - 1), at (x, y) in the scratch.
      const acc_t* north = cells + (y - band.lo) * CW;
      const acc_t* south = north + CW;
      acc_t* row = maximum + (n * H + y) * W;
      if (p == 0)
        for (int64_t x = 0; x < W; ++x)
          row[x] = maximum_of(maximum_of(maximum_of(north[x], north[x + 1]), south[x]), south[x + 1]);
      else
        for (int64_t x = 0; x < W; ++x)
          row[x] = maximum_of(row[x], maximum_of(maximum_of(maximum_of(north[x], north[x + 1]), south[x]), south[x + 1]));
    }
  });
}

at::Tensor checked_maximum(const at::Tensor& flow, const std::optional<at::Tensor>& maximum, int64_t kind) {
  if (kind != STABLE) return at::Tensor();
  TORCH_CHECK(maximum.has_value() && maximum->defined(), "softsplat: stable splatting needs the maximum");
  TORCH_CHECK(maximum->scalar_type() == flow.scalar_type() && maximum->dim() == 4 && maximum->size(0) == flow.size(0) &&
              maximum->size(1) == 1 && maximum->size(2) == flow.size(2) && maximum->size(3) == flow.size(3),
              "softsplat: maximum must be [N, 1, H, W] in the compute dtype");
  return maximum->contiguous();
}

void check_arguments(const at::Tensor& input, const at::Tensor& flow,
                     const std::optional<at::Tensor>& metric, int64_t kind, int64_t normalisation) {
  // api.py validates user input; these checks guard direct calls of the op.
  TORCH_CHECK(input.dim() == 4 && flow.dim() == 4, "softsplat: input and flow must be 4-D");
  TORCH_CHECK(kind >= SUM && kind <= STABLE, "softsplat: kind must be 0..4, got ", kind);
  TORCH_CHECK(normalisation >= ADDEPS && normalisation <= RAW, "softsplat: normalisation must be 0..3");
  const auto compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(flow.scalar_type() == compute, "softsplat: flow must be in the compute dtype ", compute);
  TORCH_CHECK(flow.size(0) == input.size(0) && flow.size(1) == 2 && flow.size(2) == input.size(2) &&
              flow.size(3) == input.size(3), "softsplat: flow must be [N, 2, H, W]");
  if (kind >= LINEAR) {
    TORCH_CHECK(metric.has_value() && metric->defined(), "softsplat: this mode needs a metric");
    TORCH_CHECK(metric->scalar_type() == compute, "softsplat: metric must be in the compute dtype");
    TORCH_CHECK(metric->dim() == 4 && metric->size(0) == input.size(0) && metric->size(1) == 1 &&
                metric->size(2) == input.size(2) && metric->size(3) == input.size(3),
                "softsplat: metric must be [N, 1, H, W]");
  }
}

at::Tensor splat_maximum_cpu(const at::Tensor& flow, const at::Tensor& metric) {
  TORCH_CHECK(flow.dim() == 4 && flow.size(1) == 2 && metric.dim() == 4 && metric.size(1) == 1 &&
              metric.size(0) == flow.size(0) && metric.size(2) == flow.size(2) && metric.size(3) == flow.size(3) &&
              metric.scalar_type() == flow.scalar_type() && flow.is_floating_point(),
              "softsplat: splat_maximum takes flow [N, 2, H, W] and metric [N, 1, H, W] of one floating dtype");
  at::Tensor maximum = at::empty({flow.size(0), 1, flow.size(2), flow.size(3)}, flow.options());
  AT_DISPATCH_FLOATING_TYPES(flow.scalar_type(), "splat_maximum_cpu", [&] {
    // Named, so that the contiguous copies (if any) outlive the kernel that reads them.
    const at::Tensor flow_tensor = flow.contiguous(), metric_tensor = metric.contiguous();
    const Sources<scalar_t> src = sources<scalar_t>(flow_tensor, metric_tensor, LINEAR, at::Tensor());
    maximum_kernel<scalar_t>(src, flow.size(0), maximum.data_ptr<scalar_t>(), plan(src, flow.size(0)));
  });
  return maximum;
}

std::tuple<at::Tensor, at::Tensor> splat_forward_cpu(const at::Tensor& input, const at::Tensor& flow,
                                                     const std::optional<at::Tensor>& metric,
                                                     int64_t kind, int64_t normalisation,
                                                     const std::optional<at::Tensor>& maximum_arg) {
  check_arguments(input, flow, metric, kind, normalisation);
  const at::Tensor maximum = checked_maximum(flow, maximum_arg, kind);
  const auto compute = flow.scalar_type();
  const auto options = input.options().dtype(compute);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({N, C, H, W}, options);  // the kernel zeroes both
  at::Tensor normaliser = at::empty(kind == SUM ? at::IntArrayRef{0} : at::IntArrayRef{N, 1, H, W}, options);
  const at::Tensor metric_tensor = metric.has_value() && metric->defined() ? metric->contiguous() : at::Tensor();
  const at::Tensor flow_tensor = flow.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(input, sources<acc_t>(flow_tensor, metric_tensor, kind, maximum),
                                    static_cast<int>(normalisation), out, normaliser);
  });
  return {out, normaliser};
}

// Stable soft splatting in one call: splat_maximum's M and splat_forward's (out, D) with kind
// STABLE, sharing the band plan, and the metric's ranges measured while the scatter-max reads
// the rows (no pass of their own). Returns (out, D, M); M is what splat_backward takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> splat_stable_forward_cpu(const at::Tensor& input, const at::Tensor& flow,
                                                                        const at::Tensor& metric, int64_t normalisation) {
  check_arguments(input, flow, metric, STABLE, normalisation);
  const auto options = input.options().dtype(flow.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor maximum = at::empty({N, 1, H, W}, options);
  at::Tensor out = at::empty({N, C, H, W}, options);  // the kernel zeroes both
  at::Tensor normaliser = at::empty({N, 1, H, W}, options);
  const at::Tensor metric_tensor = metric.contiguous();
  const at::Tensor flow_tensor = flow.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_stable_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Sources<acc_t> src = sources<acc_t>(flow_tensor, metric_tensor, STABLE, maximum);
    const Schedule schedule = plan(src, N);
    MetricRanges<acc_t> ranges(N * H, W);
    maximum_kernel<acc_t>(src, N, maximum.data_ptr<acc_t>(), schedule, &ranges);
    forward_kernel<scalar_t, acc_t>(input, src, static_cast<int>(normalisation), out, normaliser, &schedule,
                                    std::make_unique<StableShortcut<acc_t>>(ranges, N, H));
  });
  return {out, normaliser, maximum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> splat_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_normaliser,
    const at::Tensor& input, const at::Tensor& flow, const std::optional<at::Tensor>& metric,
    const at::Tensor& out, const at::Tensor& normaliser, int64_t kind, int64_t normalisation,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& maximum_arg) {
  check_arguments(input, flow, metric, kind, normalisation);
  const at::Tensor maximum = checked_maximum(flow, maximum_arg, kind);
  const auto compute = flow.scalar_type();
  TORCH_CHECK(grad_out.scalar_type() == compute && out.scalar_type() == compute,
              "softsplat: grad_out and out must be in the compute dtype");
  TORCH_CHECK(grad_out.sizes() == input.sizes() && out.sizes() == input.sizes(),
              "softsplat: grad_out and out must be [N, C, H, W]");
  TORCH_CHECK(kind == SUM || normaliser.sizes() == flow.select(1, 0).unsqueeze(1).sizes(),
              "softsplat: normaliser must be [N, 1, H, W]");
  const int64_t N = input.size(0), H = input.size(2), W = input.size(3);
  const bool want_metric = output_mask[2] && kind >= LINEAR;
  at::Tensor grad_input = at::empty(output_mask[0] ? input.sizes() : at::IntArrayRef{0}, input.options());
  at::Tensor grad_flow = at::empty(output_mask[1] ? flow.sizes() : at::IntArrayRef{0}, flow.options());
  at::Tensor grad_metric = at::empty(want_metric ? at::IntArrayRef{N, 1, H, W} : at::IntArrayRef{0}, flow.options());
  at::Tensor gi = output_mask[0] ? grad_input : at::Tensor();
  at::Tensor gf = output_mask[1] ? grad_flow : at::Tensor();
  at::Tensor gm = want_metric ? grad_metric : at::Tensor();
  at::Tensor gn = grad_normaliser.has_value() && kind != SUM ? *grad_normaliser : at::Tensor();
  if (gn.defined())
    TORCH_CHECK(gn.scalar_type() == compute && gn.sizes() == normaliser.sizes(),
                "softsplat: grad_normaliser must be [N, 1, H, W] in the compute dtype");
  const at::Tensor metric_tensor = metric.has_value() && metric->defined() ? metric->contiguous() : at::Tensor();
  const at::Tensor flow_tensor = flow.contiguous();
  if (gi.defined() || gf.defined() || gm.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(grad_out, gn, input, sources<acc_t>(flow_tensor, metric_tensor, kind, maximum), out,
                                       normaliser, static_cast<int>(normalisation), gi, gf, gm);
    });
  }
  return {grad_input, grad_flow, grad_metric};
}

}  // namespace
}  // namespace softsplat

TORCH_LIBRARY(softsplat, m) {
  SOFTSPLAT_DEFINE_OPS(m);
  // The cpp CPU kernels' fused stable soft splatting: (out, normaliser, maximum), as
  // splat_maximum then splat_forward with kind 4 give them. CPU only.
  m.def("splat_stable_forward(Tensor input, Tensor flow, Tensor metric, int normalisation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(softsplat, CPU, m) {
  m.impl("splat_forward", &softsplat::splat_forward_cpu);
  m.impl("splat_backward", &softsplat::splat_backward_cpu);
  m.impl("splat_maximum", &softsplat::splat_maximum_cpu);
  m.impl("splat_stable_forward", &softsplat::splat_stable_forward_cpu);
}
