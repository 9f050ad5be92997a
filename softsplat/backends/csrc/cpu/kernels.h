// The CPU kernels' entry points (forward.cpp, backward.cpp, maximum.cpp), explicitly
// instantiated for the input dtypes (float, double, Half, BFloat16) and their compute dtypes.
#pragma once

#include "../tensor.h"

#include <memory>

#include "common.h"
#include "schedule.h"
#include "stable.h"

namespace softsplat {
namespace cpu {

// flow and metric must be contiguous (the ops' contiguous() copies, normally no-ops).
template <typename acc_t>
inline Sources<acc_t> sources(const Tensor& flow, const Tensor& metric, int64_t kind, const Tensor& maximum) {
  const bool with_metric = metric.defined() && kind >= LINEAR;
  return {ptr<acc_t>(flow), with_metric ? ptr<acc_t>(metric) : nullptr, flow.size(2), flow.size(3),
          static_cast<int>(kind), weighs_per_tap(static_cast<int>(kind)) ? ptr<acc_t>(maximum) : nullptr};
}

// The forward (out, normaliser: [N, C, H, W] and [N, 1, H, W] in acc_t, contiguous, written
// whole). `result` (16-bit inputs, or null): the result rounded to scalar_t, [N, C, H, W]
// contiguous, written row by row as rows are final; out is then scratch, and the final rows no
// band adds to go straight to `result` without being written there. `planned`: a schedule
// already made for src (the fused stable forward shares one); `shortcut`: StableShortcut decided
// elsewhere (else decided here for the stable kind).
template <typename scalar_t, typename acc_t>
void forward_kernel(const Tensor& input, const Sources<acc_t>& src, int normalisation, Tensor& out,
                    Tensor& normaliser, scalar_t* result = nullptr, const Schedule* planned = nullptr,
                    std::unique_ptr<StableShortcut<acc_t>> shortcut = nullptr);

// The backward: the gradients asked for (defined tensors) of input, flow and metric.
template <typename scalar_t, typename acc_t>
void backward_kernel(const Tensor& grad_out, const Tensor& grad_normaliser,
                     const Tensor& input, const Sources<acc_t>& src, const Tensor& out,
                     const Tensor& normaliser, int normalisation, Tensor& grad_input,
                     Tensor& grad_flow, Tensor& grad_metric);

// M of stable splatting into `maximum` [N, 1, H, W] (contiguous), on `schedule`; `ranges`
// (optional): the metric rows measured on the way, for StableShortcut. `covering`: M of max
// splatting, over the kept taps of positive weight only (counts_for_maximum).
template <typename acc_t>
void maximum_kernel(const Sources<acc_t>& src, int64_t N, acc_t* maximum, const Schedule& schedule,
                    MetricRanges<acc_t>* ranges = nullptr, bool covering = false);

}  // namespace cpu
}  // namespace softsplat
