// The cpp backend's CPU implementation of the ops of schemas.h (and of splat_stable_forward):
// argument checks (checks.h), allocation, dtype dispatch, then the kernels of kernels.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace softsplat {
namespace cpu {
namespace {

at::Tensor splat_maximum_cpu(const at::Tensor& flow, const at::Tensor& metric) {
  checks::check_maximum_arguments("softsplat::splat_maximum", flow, metric);
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
  checks::check_arguments("softsplat::splat_forward", input, flow, metric, kind, normalisation);
  const at::Tensor maximum = checks::checked_maximum("softsplat::splat_forward", flow, maximum_arg, kind);
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
  checks::check_arguments("softsplat::splat_stable_forward", input, flow, metric, STABLE, normalisation);
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
  constexpr const char* op = "softsplat::splat_backward";
  checks::check_arguments(op, input, flow, metric, kind, normalisation);
  const at::Tensor maximum = checks::checked_maximum(op, flow, maximum_arg, kind);
  at::Tensor gn = grad_normaliser.has_value() && kind != SUM ? *grad_normaliser : at::Tensor();
  checks::check_backward_arguments(op, grad_out, gn, input, out, normaliser, kind);
  const int64_t N = input.size(0), H = input.size(2), W = input.size(3);
  const bool want_metric = output_mask[2] && kind >= LINEAR;
  at::Tensor grad_input = at::empty(output_mask[0] ? input.sizes() : at::IntArrayRef{0}, input.options());
  at::Tensor grad_flow = at::empty(output_mask[1] ? flow.sizes() : at::IntArrayRef{0}, flow.options());
  at::Tensor grad_metric = at::empty(want_metric ? at::IntArrayRef{N, 1, H, W} : at::IntArrayRef{0}, flow.options());
  at::Tensor gi = output_mask[0] ? grad_input : at::Tensor();
  at::Tensor gf = output_mask[1] ? grad_flow : at::Tensor();
  at::Tensor gm = want_metric ? grad_metric : at::Tensor();
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
}  // namespace cpu
}  // namespace softsplat

TORCH_LIBRARY_IMPL(softsplat, CPU, m) {
  m.impl("splat_forward", &softsplat::cpu::splat_forward_cpu);
  m.impl("splat_backward", &softsplat::cpu::splat_backward_cpu);
  m.impl("splat_maximum", &softsplat::cpu::splat_maximum_cpu);
  m.impl("splat_stable_forward", &softsplat::cpu::splat_stable_forward_cpu);
}
