// The band schedule (schedule.h): bands, their reach, the phases and the order of the tasks.
#include "schedule.h"

#include <limits>

namespace softsplat {
namespace cpu {

namespace {

// Rows floor(y + flow_y) and the one below, over the band's pixels whose target row is in
// [-1, H) (no other pixel lands), clamped to the image. Kept per lane, so the loop vectorises.
template <typename acc_t>
void find_reach(const Sources<acc_t>& src, Band& band) {
  constexpr int kLanes = 16;
  const acc_t H = static_cast<acc_t>(src.H);
  acc_t lowest[kLanes], highest[kLanes];
  std::fill(lowest, lowest + kLanes, std::numeric_limits<acc_t>::infinity());
  std::fill(highest, highest + kLanes, -std::numeric_limits<acc_t>::infinity());
  // Selects of values, then min and max: the vectoriser keeps the lanes in registers (a
  // conditional update of lowest[lane] became masked stores, each read back).
  auto update = [&](int lane, acc_t fy) {
    const bool lands = (fy >= acc_t(-1)) & (fy < H);  // false for NaN and infinities
    const acc_t low = lands ? fy : std::numeric_limits<acc_t>::infinity();
    const acc_t high = lands ? fy : -std::numeric_limits<acc_t>::infinity();
    lowest[lane] = low < lowest[lane] ? low : lowest[lane];
    highest[lane] = high > highest[lane] ? high : highest[lane];
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

}  // namespace

// Phase 0's bands in order, each band of phase 1 (in order) inserted `lag` bands after the
// last band of phase 0 it depends on (when there are that many): with `lag` threads, that one
// has usually been done by the time a thread takes the band.
std::vector<Schedule::Task> Schedule::order(int64_t lag) const {
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
std::vector<char> Schedule::reached(int p, int64_t N, int64_t H) const {
  std::vector<char> rows(static_cast<size_t>(N * H), 0);
  for (const Band& band : phase[p])
    if (!band.empty()) std::fill(rows.begin() + band.n * H + band.lo, rows.begin() + band.n * H + band.hi, 1);
  return rows;
}

template <typename acc_t>
std::vector<Band> bands(const Sources<acc_t>& src, int64_t N) {
  const int64_t height = std::min<int64_t>(64, std::max<int64_t>(8, (src.H + 31) / 32));
  std::vector<Band> all;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y = 0; y < src.H; y += height) {
      const int64_t index = static_cast<int64_t>(all.size());
      all.push_back({n, y, std::min(src.H, y + height), y, y, index, index + 1});
    }
  torch::stable::parallel_for(0, static_cast<int64_t>(all.size()), 1, [&](int64_t begin, int64_t end) {
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

template std::vector<Band> bands<float>(const Sources<float>&, int64_t);
template std::vector<Band> bands<double>(const Sources<double>&, int64_t);
template Schedule plan<float>(const Sources<float>&, int64_t);
template Schedule plan<double>(const Sources<double>&, int64_t);

}  // namespace cpu
}  // namespace softsplat
