// The cpp backend's CPU implementation of the ops of schemas.h (and of splat_stable_forward):
// argument checks (checks.h), allocation, dtype dispatch, then the kernels of kernels.h.
#include <memory>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../tensor.h"
#include "kernels.h"

namespace softsplat {
namespace cpu {
namespace {

// The result in input's dtype that `cast` asks for, where that is not the compute dtype of
// `out` (16-bit inputs); else undefined (out is the result).
Tensor narrowed(const Tensor& out, const Tensor& input, bool cast) {
  if (!cast || input.scalar_type() == out.scalar_type()) return Tensor();
  Tensor result = empty(out.sizes(), input.scalar_type(), input);
  advise_huge_pages(result);
  return result;
}

Tensor splat_maximum_cpu(const Tensor& flow, const Tensor& metric, int64_t kind) {
  checks::check_maximum_arguments("softsplat::splat_maximum", flow, metric, kind);
  Tensor maximum = empty({flow.size(0), 1, flow.size(2), flow.size(3)}, flow.scalar_type(), flow);
  dispatch_floating<false>(flow.scalar_type(), "softsplat::splat_maximum: flow", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    // Named, so that the contiguous copies (if any) outlive the kernel that reads them.
    const Tensor flow_tensor = as_contiguous(flow), metric_tensor = as_contiguous(metric);
    const Sources<scalar_t> src = sources<scalar_t>(flow_tensor, metric_tensor, LINEAR, Tensor());
    maximum_kernel<scalar_t>(src, flow.size(0), ptr<scalar_t>(maximum), plan(src, flow.size(0)), nullptr, kind == MAX);
  });
  return maximum;
}

// `cast`: the result in input's dtype (a 16-bit input's rows rounded as they are final; out
// in the compute dtype is then scratch), else in the compute dtype.
std::tuple<Tensor, Tensor> splat_forward_cpu(const Tensor& input, const Tensor& flow,
                                                     const std::optional<Tensor>& metric,
                                                     int64_t kind, int64_t normalisation,
                                                     const std::optional<Tensor>& maximum_arg,
                                                     bool /*deterministic: always, whatever the thread count*/,
                                                     bool cast) {
  checks::check_arguments("softsplat::splat_forward", input, flow, metric, kind, normalisation);
  const Tensor maximum = checks::checked_maximum("softsplat::splat_forward", flow, maximum_arg, kind);
  const ScalarType compute = flow.scalar_type();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  Tensor out = empty({N, C, H, W}, compute, input);  // the kernel zeroes both
  Tensor normaliser = kind == SUM ? empty({0}, compute, input) : empty({N, 1, H, W}, compute, input);
  advise_huge_pages(out);
  advise_huge_pages(normaliser);
  const Tensor metric_tensor = metric.has_value() && metric->defined() ? as_contiguous(*metric) : Tensor();
  const Tensor flow_tensor = as_contiguous(flow);
  Tensor result = narrowed(out, input, cast);
  dispatch_floating<true>(input.scalar_type(), "softsplat::splat_forward: input", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(input, sources<acc_t>(flow_tensor, metric_tensor, kind, maximum),
                                    static_cast<int>(normalisation), out, normaliser,
                                    result.defined() ? ptr<scalar_t>(result) : nullptr);
  });
  return {result.defined() ? result : out, normaliser};
}

// Stable soft splatting in one call: splat_maximum's M and splat_forward's (out, D) with kind
// STABLE, sharing the band plan, and the metric's ranges measured while the scatter-max reads
// the rows (no pass of their own). Returns (out, D, M); M is what splat_backward takes.
std::tuple<Tensor, Tensor, Tensor> splat_stable_forward_cpu(const Tensor& input, const Tensor& flow,
                                                                        const Tensor& metric, int64_t normalisation,
                                                                        bool cast) {
  checks::check_arguments("softsplat::splat_stable_forward", input, flow, metric, STABLE, normalisation);
  const ScalarType compute = flow.scalar_type();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  Tensor maximum = empty({N, 1, H, W}, compute, input);
  Tensor out = empty({N, C, H, W}, compute, input);  // the kernel zeroes both
  Tensor normaliser = empty({N, 1, H, W}, compute, input);
  advise_huge_pages(out);
  advise_huge_pages(normaliser);
  const Tensor metric_tensor = as_contiguous(metric);
  const Tensor flow_tensor = as_contiguous(flow);
  Tensor result = narrowed(out, input, cast);
  dispatch_floating<true>(input.scalar_type(), "softsplat::splat_stable_forward: input", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = acc_type<scalar_t>;
    const Sources<acc_t> src = sources<acc_t>(flow_tensor, metric_tensor, STABLE, maximum);
    const Schedule schedule = plan(src, N);
    MetricRanges<acc_t> ranges(N * H, W);
    maximum_kernel<acc_t>(src, N, ptr<acc_t>(maximum), schedule, &ranges);
    forward_kernel<scalar_t, acc_t>(input, src, static_cast<int>(normalisation), out, normaliser,
                                    result.defined() ? ptr<scalar_t>(result) : nullptr, &schedule,
                                    std::make_unique<StableShortcut<acc_t>>(ranges, N, H));
  });
  return {result.defined() ? result : out, normaliser, maximum};
}

std::tuple<Tensor, Tensor, Tensor> splat_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_normaliser,
    const Tensor& input, const Tensor& flow, const std::optional<Tensor>& metric,
    const Tensor& out, const Tensor& normaliser, int64_t kind, int64_t normalisation,
    std::vector<bool> output_mask, const std::optional<Tensor>& maximum_arg) {
  constexpr const char* op = "softsplat::splat_backward";
  checks::check_arguments(op, input, flow, metric, kind, normalisation);
  const Tensor maximum = checks::checked_maximum(op, flow, maximum_arg, kind);
  STD_TORCH_CHECK(output_mask.size() == 3, op, ": output_mask: expected 3 booleans, got ", output_mask.size());
  Tensor gn = grad_normaliser.has_value() && kind != SUM ? *grad_normaliser : Tensor();
  checks::check_backward_arguments(op, grad_out, gn, input, out, normaliser, kind);
  const int64_t N = input.size(0), H = input.size(2), W = input.size(3);
  const bool want_metric = output_mask[2] && kind >= LINEAR;
  const ScalarType compute = flow.scalar_type();
  Tensor grad_input = output_mask[0] ? empty(input.sizes(), input.scalar_type(), input) : empty({0}, input.scalar_type(), input);
  Tensor grad_flow = output_mask[1] ? empty(flow.sizes(), compute, input) : empty({0}, compute, input);
  Tensor grad_metric = want_metric ? empty({N, 1, H, W}, compute, input) : empty({0}, compute, input);
  for (const Tensor* grad : {&grad_input, &grad_flow, &grad_metric}) advise_huge_pages(*grad);
  Tensor gi = output_mask[0] ? grad_input : Tensor();
  Tensor gf = output_mask[1] ? grad_flow : Tensor();
  Tensor gm = want_metric ? grad_metric : Tensor();
  const Tensor metric_tensor = metric.has_value() && metric->defined() ? as_contiguous(*metric) : Tensor();
  const Tensor flow_tensor = as_contiguous(flow);
  if (gi.defined() || gf.defined() || gm.defined()) {
    dispatch_floating<true>(input.scalar_type(), "softsplat::splat_backward: input", [&](auto scalar) {
      using scalar_t = decltype(scalar);
      using acc_t = acc_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(grad_out, gn, input, sources<acc_t>(flow_tensor, metric_tensor, kind, maximum), out,
                                       normaliser, static_cast<int>(normalisation), gi, gf, gm);
    });
  }
  return {grad_input, grad_flow, grad_metric};
}


}  // namespace
}  // namespace cpu
}  // namespace softsplat

STABLE_TORCH_LIBRARY_IMPL(softsplat, CPU, m) {
  m.impl("splat_forward", TORCH_BOX(&softsplat::cpu::splat_forward_cpu));
  m.impl("splat_backward", TORCH_BOX(&softsplat::cpu::splat_backward_cpu));
  m.impl("splat_maximum", TORCH_BOX(&softsplat::cpu::splat_maximum_cpu));
  m.impl("splat_stable_forward", TORCH_BOX(&softsplat::cpu::splat_stable_forward_cpu));
}
