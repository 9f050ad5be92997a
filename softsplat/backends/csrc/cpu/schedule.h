// The band schedule of the CPU kernels. Source rows are cut into bands and each band's reach,
// the target rows its taps can land on, is read from the flow. Bands alternate between two
// phases; while two bands of one phase (and image) reach a common row, neighbouring bands are
// merged (at worst into one band per image). The bands then run in parallel, a band of phase 1
// once the bands of phase 0 whose rows it shares are done: no atomics, no per-thread copies of
// the output, and every target receives the contributions of at most one band per phase, phase
// 0 first, so sums do not depend on the thread count.
#pragma once

#include "../tensor.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"

namespace softsplat {
namespace cpu {

struct Band {
  int64_t n, y_begin, y_end;  // source rows [y_begin, y_end) of image n
  int64_t lo, hi;             // target rows its taps may reach: [lo, hi), empty if lo == hi
  int64_t first, last;        // its parts, bands()'s bands [first, last) (one unless merged)
  bool empty() const { return hi <= lo; }
};

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
    std::vector<State> states(static_cast<size_t>(torch::stable::get_num_threads()));
    const std::vector<Task> tasks = order(static_cast<int64_t>(states.size()));
    const int64_t count = static_cast<int64_t>(tasks.size());
    // Per band of phase 0, whether it is done (value-initialised: false).
    std::vector<std::atomic<bool>> done(phase[0].size());
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};  // a band threw: the others stop (none waits forever)
    const int64_t workers = std::min<int64_t>(count, static_cast<int64_t>(states.size()));
    torch::stable::parallel_for(0, workers, 1, [&](int64_t begin, int64_t) {
      // Each call of this body is given a range of its own of [0, workers), so `begin` names a
      // State no other call uses (a call runs on one thread; the pool never splits a range).
      State& state = states[static_cast<size_t>(begin)];
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
          throw;  // parallel_for rethrows it
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
  // last band of phase 0 it depends on (when there are that many).
  std::vector<Task> order(int64_t lag) const;

  // Per row of the N images, whether a band of phase p reaches it.
  std::vector<char> reached(int p, int64_t N, int64_t H) const;
};

// The images' rows cut into bands, ~32 per image of 8 to 64 rows each (a function of the image
// size alone), with their reach (the target rows their taps can land on, read from the flow).
template <typename acc_t>
std::vector<Band> bands(const Sources<acc_t>& src, int64_t N);

// The bands of bands() in two phases: neighbouring bands merged while two bands of one phase
// (and image) reach a common row.
template <typename acc_t>
Schedule plan(const Sources<acc_t>& src, int64_t N);

}  // namespace cpu
}  // namespace softsplat
