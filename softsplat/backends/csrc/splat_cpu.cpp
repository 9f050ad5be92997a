// The cpp backend's CPU kernels and the `softsplat` op library.
//
// Forward: source rows are cut into bands. Each band splats into a private buffer covering only
// the target rows its flows reach, pixel-major (the C weighted channels, then the normaliser, of
// one target pixel side by side), so a tap is one short contiguous update that the compiler
// vectorises, and no two threads ever write the same memory. A second pass adds, for every
// target row, the buffers that cover it in band order, divides and writes NCHW. Band sizes
// depend on the image size and the flow alone, never on the thread count: results are bitwise
// reproducible. Backward: a pass over target pixels prepares gN = grad / D' and gD, then every
// source pixel gathers from its four taps and writes only its own gradients: no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <vector>

#include "schemas.h"
#include "taps.h"

namespace softsplat {
namespace {

// Band buffers may hold at most this many times the image's rows; beyond (flows reaching far),
// neighbouring bands are merged into taller ones, a decision that depends on the data alone.
constexpr int64_t kBufferRowsPerImageRow = 3;

struct View4 {  // element strides of an [N, C, H, W] tensor
  int64_t n, c, y, x;
  explicit View4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), y(t.stride(2)), x(t.stride(3)) {}
  View4() : n(0), c(0), y(0), x(0) {}
  int64_t at(int64_t in, int64_t ic, int64_t iy, int64_t ix) const { return in * n + ic * c + iy * y + ix * x; }
};

template <typename acc_t>
struct Sources {
  const acc_t* flow;
  View4 flow_view;
  const acc_t* metric;  // null for sum and avg
  View4 metric_view;
  int64_t H, W;
  int kind;
  const acc_t* maximum;  // stable: M [N, 1, H, W] contiguous; else null

  bool taps(int64_t n, int64_t y, int64_t x, Taps<acc_t, int64_t>& t) const {
    return make_taps<acc_t, int64_t>(x, y, flow[flow_view.at(n, 0, y, x)],
                                     flow[flow_view.at(n, 1, y, x)], H, W, t);
  }
  acc_t metric_at(int64_t n, int64_t y, int64_t x) const {
    return metric ? metric[metric_view.at(n, 0, y, x)] : acc_t(0);
  }
  // The per-pixel weight; for stable, the metric itself (each tap's weight is tap_weight).
  acc_t weight(int64_t n, int64_t y, int64_t x) const {
    return kind == STABLE ? metric_at(n, y, x) : pixel_weight<acc_t>(kind, metric_at(n, y, x));
  }
  acc_t tap_weight(int64_t n, int64_t ty, int64_t tx, acc_t metric_value) const {
    return stable_weight(metric_value, maximum[(n * H + ty) * W + tx]);
  }
};

struct Band {
  int64_t n, y_begin, y_end;  // source rows [y_begin, y_end) of image n
  int64_t lo, hi;             // target rows its taps may reach: [lo, hi)
  int64_t offset;             // of its buffer [hi - lo][W][K] in the scratch
  int64_t rows() const { return hi - lo; }
};

// Rows floor(y + flow_y) and the one below, over the band's pixels with a finite target row,
// clamped to the image; computed in floating point, so no huge value is converted to an integer.
template <typename acc_t>
void find_reach(const Sources<acc_t>& src, Band& band) {
  acc_t lowest = std::numeric_limits<acc_t>::infinity(), highest = -lowest;
  for (int64_t y = band.y_begin; y < band.y_end; ++y) {
    const acc_t* row = src.flow + src.flow_view.at(band.n, 1, y, 0);
    for (int64_t x = 0; x < src.W; ++x) {
      const acc_t fy = static_cast<acc_t>(y) + row[x * src.flow_view.x];
      if (!is_finite(fy)) continue;
      lowest = std::min(lowest, fy);
      highest = std::max(highest, fy);
    }
  }
  band.lo = band.hi = band.y_begin;
  if (lowest > highest) return;  // no finite target row: an empty buffer
  const acc_t H = static_cast<acc_t>(src.H);
  band.lo = static_cast<int64_t>(std::min(std::max(floor_of(lowest), acc_t(0)), H));
  band.hi = std::max(band.lo, static_cast<int64_t>(std::min(std::max(floor_of(highest) + acc_t(2), acc_t(0)), H)));
}

template <typename acc_t>
std::vector<Band> plan_bands(const Sources<acc_t>& src, int64_t N) {
  // Band height from the image size alone: ~32 bands per image, 8 to 64 rows each.
  const int64_t height = std::min<int64_t>(64, std::max<int64_t>(8, (src.H + 31) / 32));
  std::vector<Band> bands;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y = 0; y < src.H; y += height)
      bands.push_back({n, y, std::min(src.H, y + height), y, y, 0});
  at::parallel_for(0, static_cast<int64_t>(bands.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) find_reach(src, bands[i]);
  });
  auto buffer_rows = [&] {
    int64_t rows = 0;
    for (const auto& b : bands) rows += b.rows();
    return rows;
  };
  while (buffer_rows() > kBufferRowsPerImageRow * N * src.H) {
    std::vector<Band> merged;
    for (size_t i = 0; i < bands.size(); ++i) {
      Band b = bands[i];
      if (i + 1 < bands.size() && bands[i + 1].n == b.n) {
        const Band& next = bands[++i];
        b.y_end = next.y_end;
        if (next.rows()) {
          b.lo = b.rows() ? std::min(b.lo, next.lo) : next.lo;
          b.hi = std::max(b.hi, next.hi);
        }
      }
      merged.push_back(b);
    }
    if (merged.size() == bands.size()) break;  // one band per image: nothing left to merge
    bands.swap(merged);
  }
  return bands;
}

// target[0..K) += b * values[0..K): one tap. K is a compile-time constant for the common
// channel counts (KC > 0), so the update is a few vector instructions.
template <int KC, typename acc_t>
inline void add_tap(acc_t* __restrict target, const acc_t* __restrict values, acc_t b, int64_t K) {
  if constexpr (KC > 0) {
    for (int j = 0; j < KC; ++j) target[j] += b * values[j];
  } else {
    for (int64_t j = 0; j < K; ++j) target[j] += b * values[j];
  }
}

template <int KC, typename scalar_t, typename acc_t>
void scatter_band(const Band& band, const scalar_t* in, const View4& in_view, const Sources<acc_t>& src,
                  int64_t C, int64_t K, acc_t* __restrict buffer, acc_t* __restrict values) {
  const bool normalised = src.kind != SUM;
  const int64_t W = src.W, n = band.n;
  std::fill(buffer, buffer + band.rows() * W * K, acc_t(0));
  if (!band.rows()) return;
  Taps<acc_t, int64_t> t;
  for (int64_t y = band.y_begin; y < band.y_end; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      if (!src.taps(n, y, x, t)) continue;
      const acc_t w = src.weight(n, y, x);
      const scalar_t* pixel = in + in_view.at(n, 0, y, x);
      // Taps are pixel (x0, y0) and its right, lower and lower-right neighbours; every kept
      // tap's row lies in [lo, hi) by construction of the band (find_reach).
      acc_t* north = buffer + ((t.y0 - band.lo) * W + t.x0) * K;
      acc_t* south = north + W * K;
      if (src.kind == STABLE) {  // a weight per tap: exp(metric - M(tap))
        acc_t* targets[4] = {north, north + K, south, south + K};
        for (int k = 0; k < 4; ++k) {
          if (!t.keep[k]) continue;
          const acc_t tap_w = src.tap_weight(n, tap_y(t, k), tap_x(t, k), w);
          for (int64_t c = 0; c < C; ++c) values[c] = static_cast<acc_t>(pixel[c * in_view.c]) * tap_w;
          values[C] = tap_w;
          add_tap<KC>(targets[k], values, t.weight[k], K);
        }
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(pixel[c * in_view.c]);
        values[c] = normalised ? v * w : v;  // then b * (v * w): the oracle's order
      }
      if (normalised) values[C] = w;
      if (t.keep[0]) add_tap<KC>(north, values, t.weight[0], K);
      if (t.keep[1]) add_tap<KC>(north + K, values, t.weight[1], K);
      if (t.keep[2]) add_tap<KC>(south, values, t.weight[2], K);
      if (t.keep[3]) add_tap<KC>(south + K, values, t.weight[3], K);
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& input, const Sources<acc_t>& src, int normalisation,
                    at::Tensor& out, at::Tensor& normaliser) {
  const int64_t N = input.size(0), C = input.size(1), H = src.H, W = src.W, HW = H * W;
  const bool normalised = src.kind != SUM;
  const int64_t K = C + (normalised ? 1 : 0);  // values per buffer pixel: C channels, then D
  const scalar_t* in = input.data_ptr<scalar_t>();
  const View4 in_view(input);
  acc_t* out_data = out.data_ptr<acc_t>();
  acc_t* norm_data = normalised ? normaliser.data_ptr<acc_t>() : nullptr;

  std::vector<Band> bands = plan_bands(src, N);
  int64_t size = 0;
  for (auto& b : bands) b.offset = size, size += b.rows() * W * K;
  std::unique_ptr<acc_t[]> scratch(new acc_t[static_cast<size_t>(size)]);  // zeroed per band

  at::parallel_for(0, static_cast<int64_t>(bands.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> values(static_cast<size_t>(K));
    for (int64_t i = begin; i < end; ++i) {
      acc_t* buffer = scratch.get() + bands[i].offset;  // this band's alone
      switch (K) {
        case 1: scatter_band<1>(bands[i], in, in_view, src, C, K, buffer, values.data()); break;
        case 2: scatter_band<2>(bands[i], in, in_view, src, C, K, buffer, values.data()); break;
        case 3: scatter_band<3>(bands[i], in, in_view, src, C, K, buffer, values.data()); break;
        case 4: scatter_band<4>(bands[i], in, in_view, src, C, K, buffer, values.data()); break;
        default: scatter_band<0>(bands[i], in, in_view, src, C, K, buffer, values.data()); break;
      }
    }
  });

  // Image n's bands are contiguous in `bands`, in row order.
  std::vector<int64_t> first(N + 1, static_cast<int64_t>(bands.size()));
  for (int64_t i = static_cast<int64_t>(bands.size()) - 1; i >= 0; --i) first[bands[i].n] = i;
  for (int64_t n = N - 1; n >= 0; --n) first[n] = std::min(first[n], first[n + 1]);

  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(static_cast<size_t>(W * K));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / H, y = index % H;
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t i = first[n]; i < first[n + 1]; ++i) {  // fixed order: bitwise reproducible
        const Band& band = bands[i];
        if (y < band.lo || y >= band.hi) continue;
        const acc_t* part = scratch.get() + band.offset + (y - band.lo) * W * K;
        for (int64_t j = 0; j < W * K; ++j) row[j] += part[j];
      }
      acc_t* out_row = out_data + n * C * HW + y * W;
      for (int64_t x = 0; x < W; ++x) {
        const acc_t* pixel = row.data() + x * K;
        if (!normalised) {
          for (int64_t c = 0; c < C; ++c) out_row[c * HW + x] = pixel[c];
          continue;
        }
        const acc_t divisor = safe_normaliser(pixel[C], normalisation);
        for (int64_t c = 0; c < C; ++c) out_row[c * HW + x] = pixel[c] / divisor;
        norm_data[n * HW + y * W + x] = pixel[C];
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& grad_normaliser,
                     const at::Tensor& input, const Sources<acc_t>& src, const at::Tensor& out,
                     const at::Tensor& normaliser, int normalisation, at::Tensor& grad_input,
                     at::Tensor& grad_flow, at::Tensor& grad_metric) {
  const int64_t N = input.size(0), C = input.size(1), H = src.H, W = src.W;
  const bool normalised = src.kind != SUM;
  const int64_t K = C + (normalised ? 1 : 0);

  // gN (C values) and gD per target pixel, pixel-major for the gathers below.
  std::vector<acc_t> g(static_cast<size_t>(N * H * W * K));
  const acc_t* grad = grad_out.data_ptr<acc_t>();
  const View4 grad_view(grad_out);
  const acc_t* result = normalised ? out.data_ptr<acc_t>() : nullptr;
  const View4 result_view = normalised ? View4(out) : View4();
  const acc_t* norm = normalised ? normaliser.data_ptr<acc_t>() : nullptr;
  const acc_t* grad_norm = grad_normaliser.defined() ? grad_normaliser.data_ptr<acc_t>() : nullptr;
  const View4 grad_norm_view = grad_norm ? View4(grad_normaliser) : View4();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / H, y = index % H;
      for (int64_t x = 0; x < W; ++x) {
        acc_t* pixel = g.data() + ((n * H + y) * W + x) * K;
        if (!normalised) {
          for (int64_t c = 0; c < C; ++c) pixel[c] = grad[grad_view.at(n, c, y, x)];
          continue;
        }
        const acc_t D = norm[(n * H + y) * W + x];
        const acc_t divisor = safe_normaliser(D, normalisation);
        acc_t gD = 0;
        for (int64_t c = 0; c < C; ++c) {
          pixel[c] = grad[grad_view.at(n, c, y, x)] / divisor;
          gD -= pixel[c] * result[result_view.at(n, c, y, x)];
        }
        pixel[C] = normaliser_passes_gradient(D, normalisation) ? gD : acc_t(0);
        if (grad_norm) pixel[C] += grad_norm[grad_norm_view.at(n, 0, y, x)];
      }
    }
  });

  const scalar_t* in = input.data_ptr<scalar_t>();
  const View4 in_view(input);
  scalar_t* gi = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
  acc_t* gf = grad_flow.defined() ? grad_flow.data_ptr<acc_t>() : nullptr;
  acc_t* gm = grad_metric.defined() ? grad_metric.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gathered(static_cast<size_t>(K)), x_values(static_cast<size_t>(C));
    Taps<acc_t, int64_t> t;
    acc_t dx[4], dy[4];
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / H, y = index % H;
      for (int64_t x = 0; x < W; ++x) {
        // Computed for every pixel, landed or not, as autograd does through the oracle: a
        // pixel that lands nowhere gathers zeros, and 0 * inf stays NaN as it does there.
        const acc_t w = src.weight(n, y, x);
        for (int64_t c = 0; c < C; ++c) x_values[c] = static_cast<acc_t>(in[in_view.at(n, c, y, x)]);
        std::fill(gathered.begin(), gathered.end(), acc_t(0));
        acc_t grad_fx = 0, grad_fy = 0;
        if (src.taps(n, y, x, t)) {
          if (gf) tap_derivatives(t, dx, dy);
          for (int k = 0; k < 4; ++k) {
            if (!t.keep[k]) continue;
            const acc_t* pixel = g.data() + ((n * H + tap_y(t, k)) * W + tap_x(t, k)) * K;
            const acc_t b = t.weight[k];
            if (src.kind == STABLE) {  // per-tap weight; gathered[] then already holds it
              const acc_t tap_w = src.tap_weight(n, tap_y(t, k), tap_x(t, k), w);
              for (int64_t c = 0; c < K; ++c) gathered[c] += b * (tap_w * pixel[c]);
              if (gf) {
                acc_t dot = 0;
                for (int64_t c = 0; c < C; ++c) dot += pixel[c] * (x_values[c] * tap_w);
                dot += pixel[C] * tap_w;
                grad_fx += dx[k] * dot;
                grad_fy += dy[k] * dot;
              }
              continue;
            }
            for (int64_t c = 0; c < K; ++c) gathered[c] += b * pixel[c];
            if (gf) {
              acc_t dot = 0;  // d loss / d weight[k]
              for (int64_t c = 0; c < C; ++c) dot += pixel[c] * (normalised ? x_values[c] * w : x_values[c]);
              if (normalised) dot += pixel[C] * w;
              grad_fx += dx[k] * dot;
              grad_fy += dy[k] * dot;
            }
          }
        }
        const bool per_pixel = normalised && src.kind != STABLE;  // w multiplies once, here
        if (gi) {
          for (int64_t c = 0; c < C; ++c)
            gi[((n * C + c) * H + y) * W + x] = static_cast<scalar_t>(per_pixel ? gathered[c] * w : gathered[c]);
        }
        if (gf) {
          gf[((n * 2 + 0) * H + y) * W + x] = grad_fx;
          gf[((n * 2 + 1) * H + y) * W + x] = grad_fy;
        }
        if (gm) {
          acc_t grad_w = 0;
          for (int64_t c = 0; c < C; ++c) grad_w += gathered[c] * x_values[c];
          grad_w += gathered[C];
          // stable: d exp(m - M) / dm is the tap weight, already in gathered[]
          gm[(n * H + y) * W + x] = src.kind == STABLE ? grad_w : grad_w * weight_derivative(src.kind, w);
        }
      }
    }
  });
}

template <typename acc_t>
Sources<acc_t> sources(const at::Tensor& flow, const at::Tensor& metric, int64_t kind, const at::Tensor& maximum) {
  const bool with_metric = metric.defined() && kind >= LINEAR;
  return {flow.data_ptr<acc_t>(), View4(flow), with_metric ? metric.data_ptr<acc_t>() : nullptr,
          with_metric ? View4(metric) : View4(), flow.size(2), flow.size(3), static_cast<int>(kind),
          kind == STABLE ? maximum.data_ptr<acc_t>() : nullptr};
}

// M of stable splatting: per target, the maximum metric over the pixels with a kept tap on it
// (-inf where none). Max is exact and order-free, so racing threads still agree bitwise;
// compare-and-swap makes each update atomic.
template <typename acc_t>
void maximum_kernel(const Sources<acc_t>& src, int64_t N, acc_t* maximum) {
  const int64_t H = src.H, W = src.W;
  std::fill(maximum, maximum + N * H * W, -std::numeric_limits<acc_t>::infinity());
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    Taps<acc_t, int64_t> t;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / H, y = index % H;
      for (int64_t x = 0; x < W; ++x) {
        if (!src.taps(n, y, x, t)) continue;
        const acc_t value = src.metric_at(n, y, x);
        for (int k = 0; k < 4; ++k) {
          if (!t.keep[k]) continue;
          std::atomic_ref<acc_t> target(maximum[(n * H + tap_y(t, k)) * W + tap_x(t, k)]);
          acc_t current = target.load(std::memory_order_relaxed);
          while (replaces_maximum(current, value) &&
                 !target.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
          }
        }
      }
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
    maximum_kernel<scalar_t>(sources<scalar_t>(flow, metric, LINEAR, at::Tensor()), flow.size(0), maximum.data_ptr<scalar_t>());
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
  at::Tensor out = at::empty({N, C, H, W}, options);
  at::Tensor normaliser = kind == SUM ? at::empty({0}, options) : at::empty({N, 1, H, W}, options);
  const at::Tensor metric_tensor = metric.has_value() ? *metric : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(input, sources<acc_t>(flow, metric_tensor, kind, maximum),
                                    static_cast<int>(normalisation), out, normaliser);
  });
  return {out, normaliser};
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
  const at::Tensor metric_tensor = metric.has_value() ? *metric : at::Tensor();
  if (gi.defined() || gf.defined() || gm.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(grad_out, gn, input, sources<acc_t>(flow, metric_tensor, kind, maximum), out,
                                       normaliser, static_cast<int>(normalisation), gi, gf, gm);
    });
  }
  return {grad_input, grad_flow, grad_metric};
}

}  // namespace
}  // namespace softsplat

TORCH_LIBRARY(softsplat, m) { SOFTSPLAT_DEFINE_OPS(m); }

TORCH_LIBRARY_IMPL(softsplat, CPU, m) {
  m.impl("splat_forward", &softsplat::splat_forward_cpu);
  m.impl("splat_backward", &softsplat::splat_backward_cpu);
  m.impl("splat_maximum", &softsplat::splat_maximum_cpu);
}
