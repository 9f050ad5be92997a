// The scatter-max of stable soft splatting (M, each target's largest metric) on the band
// schedule of the forward.
#include "../tensor.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "tap_chunk.h"

namespace softsplat {
namespace cpu {

namespace {

// The cell (x0, y0) each of pixels [x_begin, x_begin + count) of row y lands in, as an index
// (y0 + 1) * (W + 1) + x0 + 1 of the (H + 1) x (W + 1) cells; -1 where it lands nowhere.
// make_taps's x0 and y0, in a loop that vectorises. With `shape` (max splatting), which of its
// taps have a positive weight: bit 0 set where the east taps have weight 0 (fx == x0), bit 1
// where the south taps have (fy == y0); the north-west tap's weight is always positive.
template <typename acc_t>
void landing_cells(const Sources<acc_t>& src, int64_t n, int64_t y, int64_t x_begin, int64_t count,
                   int64_t* __restrict cell, unsigned char* __restrict shape = nullptr) {
  const acc_t* __restrict flow_x = src.flow_row(n, 0, y) + x_begin;
  const acc_t* __restrict flow_y = src.flow_row(n, 1, y) + x_begin;
  for (int64_t i = 0; i < count; ++i) {
    Taps<acc_t, int64_t> t;
    const bool lands = make_taps<acc_t, int64_t>(x_begin + i, y, flow_x[i], flow_y[i], src.H, src.W, t);
    cell[i] = ((t.y0 + 1) * (src.W + 1) + t.x0 + 2) * static_cast<int64_t>(lands) - 1;  // no select: vectorises
    if (shape) shape[i] = static_cast<unsigned char>((t.weight[1] > acc_t(0) ? 0 : 1) | (t.weight[2] > acc_t(0) ? 0 : 2));
  }
}

}  // namespace

// M of stable splatting: per target, the maximum metric over the pixels with a kept tap on it
// (-inf where none). A pixel's taps are the corners of the cell it lands in, cell (x0, y0), and
// every pixel landing in a cell that has an in-image target as a corner keeps that tap. So, on
// the forward's schedule, a band scatter-maxes each of its pixels once into a scratch of the
// cells it can land in (rows y0 from lo - 1 to hi - 1, x0 from -1), then each target of its
// reach takes the maximum of its four cells: phase 0 stores it, phase 1 takes the maximum with
// what is there. Rows no phase-0 band reaches are -inf. Max is exact: no order to keep.
// `ranges` (optional): the bands also measure their metric rows for StableShortcut.
// `covering` (max splatting): only taps of positive weight count. A pixel's taps of weight 0
// are its east ones where fx == x0 and its south ones where fy == y0, so the pixels of a cell
// fall into four shapes (all four taps; the west column; the north row; the north-west tap
// alone), each scatter-maxed into a scratch of its own; a target then takes the maximum over
// the cells of each shape that reach it with a tap of positive weight.
template <typename acc_t>
void maximum_kernel(const Sources<acc_t>& src, int64_t N, acc_t* maximum, const Schedule& schedule,
                    MetricRanges<acc_t>* ranges, bool covering) {
  const int64_t H = src.H, W = src.W, CW = W + 1;
  constexpr acc_t minus_infinity = -std::numeric_limits<acc_t>::infinity();
  const std::vector<char> stored = schedule.reached(0, N, H);
  torch::stable::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index)
      if (!stored[index]) std::fill(maximum + index * W, maximum + (index + 1) * W, minus_infinity);
  });
  struct Cells {
    std::vector<acc_t> data;
    std::vector<int64_t> cell = std::vector<int64_t>(kChunk);  // of each pixel of a chunk, -1: none
    std::vector<unsigned char> shape = std::vector<unsigned char>(kChunk);  // covering: landing_cells' shape
  };
  const int64_t shapes = covering ? 4 : 1;
  schedule.template run<Cells>([&](const Band& band, int p, Cells& scratch) {
    if (band.empty()) {  // none of its pixels lands; its rows' metrics are still measured
      for (int64_t y = band.y_begin; ranges && y < band.y_end; ++y) ranges->measure(band.n * H + y, src.metric_row(band.n, y));
      return;
    }
    const int64_t n = band.n, first = band.lo * CW;  // landing_cells' index of cell (-1, lo - 1)
    const int64_t size = (band.hi - band.lo + 1) * CW;  // of one shape's cells
    scratch.data.assign(static_cast<size_t>(shapes * size), minus_infinity);
    acc_t* cells = scratch.data.data();
    int64_t* cell = scratch.cell.data();
    unsigned char* shape = covering ? scratch.shape.data() : nullptr;
    for (int64_t y = band.y_begin; y < band.y_end; ++y) {
      const acc_t* metric = src.metric_row(n, y);
      if (ranges) ranges->measure(n * H + y, metric);
      for (int64_t x_begin = 0; x_begin < W; x_begin += kChunk) {
        const int64_t count = std::min(kChunk, W - x_begin);
        landing_cells(src, n, y, x_begin, count, cell, shape);
        in_pixel_order(count, [&](int64_t i) {
          if (cell[i] < 0) return;
          acc_t& current = cells[(shape ? shape[i] * size : 0) + cell[i] - first];
          current = scalar_maximum_of(current, metric[x_begin + i]);
        });
      }
    }
    for (int64_t y = band.lo; y < band.hi; ++y) {
      // Target (x, y) is the south-east corner of cell (x - 1, y - 1), at (x, y) in the scratch.
      const acc_t* north = cells + (y - band.lo) * CW;
      const acc_t* south = north + CW;
      acc_t* row = maximum + (n * H + y) * W;
      if (covering) {
        // Shape 1 (west column) reaches (x, y) from cells (x, y - 1) and (x, y); shape 2 (north
        // row) from (x - 1, y) and (x, y); shape 3 (north-west tap) from (x, y).
        const acc_t* column_north = north + size;
        const acc_t* column_south = south + size;
        const acc_t* row_south = south + 2 * size;
        const acc_t* point = south + 3 * size;
        for (int64_t x = 0; x < W; ++x) {
          acc_t value = maximum_of(maximum_of(maximum_of(north[x], north[x + 1]), south[x]), south[x + 1]);
          value = maximum_of(value, maximum_of(column_north[x + 1], column_south[x + 1]));
          value = maximum_of(value, maximum_of(maximum_of(row_south[x], row_south[x + 1]), point[x + 1]));
          row[x] = p == 0 ? value : maximum_of(row[x], value);
        }
        continue;
      }
      if (p == 0)
        for (int64_t x = 0; x < W; ++x)
          row[x] = maximum_of(maximum_of(maximum_of(north[x], north[x + 1]), south[x]), south[x + 1]);
      else
        for (int64_t x = 0; x < W; ++x)
          row[x] = maximum_of(row[x], maximum_of(maximum_of(maximum_of(north[x], north[x + 1]), south[x]), south[x + 1]));
    }
  });
}

template void maximum_kernel<float>(const Sources<float>&, int64_t, float*, const Schedule&, MetricRanges<float>*, bool);
template void maximum_kernel<double>(const Sources<double>&, int64_t, double*, const Schedule&, MetricRanges<double>*, bool);

}  // namespace cpu
}  // namespace softsplat
