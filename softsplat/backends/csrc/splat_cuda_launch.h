// Torch-level launchers of the CUDA kernels (splat_kernels.cuh): allocation, dtype and index-type
// dispatch, launches. Included by splat_cuda.cu (nvcc, real launches on the current stream of the
// input's device) and by splat_cuda_host.cpp (g++, the host shim). The includer defines
//   SOFTSPLAT_DEVICE_GUARD(tensor)            make tensor's device current for this scope
//   SOFTSPLAT_LAUNCH(kernel, blocks, threads, args...)   launch a kernel (a function pointer)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <limits>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "checks.h"
#include "splat_kernels.cuh"

namespace softsplat {
namespace launch {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // blocks of a launch at most; grid-stride loops cover the rest

inline unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// Largest element offset a kernel forms into `t`, plus one.
inline int64_t extent(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
  return std::max<int64_t>(last + 1, t.numel());
}

// 32-bit indexing is exact when every offset, and every product of sizes the kernels form
// (N*C*H*W at most, the gradient buffer N*H*W*(C+1)), stays below 2^31 - 1, and so does a
// grid-stride index, which steps up to kMaxBlocks * kThreads past the last element.
inline bool fits_int32(std::initializer_list<at::Tensor> tensors, int64_t largest_product) {
  if (largest_product + kMaxBlocks * kThreads >= INT_MAX) return false;
  for (const auto& t : tensors)
    if (extent(t) >= INT_MAX) return false;
  return true;
}

inline at::Tensor splat_maximum(const at::Tensor& flow, const at::Tensor& metric) {
  checks::check_maximum_arguments("splat_maximum", flow, metric);
  SOFTSPLAT_DEVICE_GUARD(flow);
  const int64_t N = flow.size(0), H = flow.size(2), W = flow.size(3);
  at::Tensor maximum = at::full({N, 1, H, W}, -std::numeric_limits<double>::infinity(), flow.options());
  if (N * H * W == 0) return maximum;
  const bool small = fits_int32({flow, metric, maximum}, N * H * W);
  AT_DISPATCH_FLOATING_TYPES(flow.scalar_type(), "splat_maximum_cuda", [&] {
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto kernel = &splat_maximum_kernel<scalar_t, index_t>;
      SOFTSPLAT_LAUNCH(kernel, blocks_for(N * H * W), kThreads,
          flow.data_ptr<scalar_t>(), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
          metric.data_ptr<scalar_t>(), metric.stride(0), metric.stride(2), metric.stride(3),
          (index_t)N, (index_t)H, (index_t)W, maximum.data_ptr<scalar_t>());
    };
    if (small) run(int(0)); else run((long long)0);
  });
  return maximum;
}

inline std::tuple<at::Tensor, at::Tensor> splat_forward(const at::Tensor& input, const at::Tensor& flow,
                                                        const std::optional<at::Tensor>& metric_arg,
                                                        int64_t kind, int64_t normalisation,
                                                        const std::optional<at::Tensor>& maximum_arg) {
  checks::check_arguments("splat_forward", input, flow, metric_arg, kind, normalisation);
  const at::Tensor maximum = checks::checked_maximum("splat_forward", flow, maximum_arg, kind);
  SOFTSPLAT_DEVICE_GUARD(input);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const auto options = input.options().dtype(flow.scalar_type());
  at::Tensor out = at::zeros({N, C, H, W}, options);
  at::Tensor normaliser = kind == SUM ? at::empty({0}, options) : at::zeros({N, 1, H, W}, options);
  const bool with_metric = kind >= LINEAR;
  const at::Tensor metric = with_metric ? *metric_arg : at::Tensor();
  if (N * H * W == 0) return {out, normaliser};
  const bool small = fits_int32({input, flow, metric, out}, N * (C + 1) * H * W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto forward = &splat_forward_kernel<scalar_t, acc_t, index_t>;
      SOFTSPLAT_LAUNCH(forward, blocks_for(N * H * W), kThreads,
          input.data_ptr<scalar_t>(), input.stride(0), input.stride(1), input.stride(2), input.stride(3),
          flow.data_ptr<acc_t>(), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
          with_metric ? metric.data_ptr<acc_t>() : nullptr,
          with_metric ? metric.stride(0) : 0, with_metric ? metric.stride(2) : 0, with_metric ? metric.stride(3) : 0,
          (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind,
          kind == STABLE ? (const acc_t*)maximum.data_ptr<acc_t>() : nullptr,
          out.data_ptr<acc_t>(), kind == SUM ? nullptr : normaliser.data_ptr<acc_t>());
      if (kind != SUM && C > 0) {
        auto normalise = &splat_normalise_kernel<acc_t, index_t>;
        SOFTSPLAT_LAUNCH(normalise, blocks_for(N * C * H * W), kThreads,
            out.data_ptr<acc_t>(), (const acc_t*)normaliser.data_ptr<acc_t>(),
            (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)normalisation);
      }
    };
    if (small) run(int(0)); else run((long long)0);
  });
  return {out, normaliser};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> splat_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_normaliser_arg,
    const at::Tensor& input, const at::Tensor& flow, const std::optional<at::Tensor>& metric_arg,
    const at::Tensor& out_arg, const at::Tensor& normaliser_arg, int64_t kind, int64_t normalisation,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& maximum_arg) {
  checks::check_arguments("splat_backward", input, flow, metric_arg, kind, normalisation);
  const at::Tensor maximum = checks::checked_maximum("splat_backward", flow, maximum_arg, kind);
  const bool with_metric = kind >= LINEAR;
  const bool normalised = kind != SUM;
  const at::Tensor grad_normaliser =
      normalised && grad_normaliser_arg.has_value() && grad_normaliser_arg->defined() ? *grad_normaliser_arg : at::Tensor();
  checks::check_backward_arguments("splat_backward", grad_out, grad_normaliser, input, out_arg, normaliser_arg, kind);
  SOFTSPLAT_DEVICE_GUARD(input);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const at::Tensor out = normalised ? out_arg.contiguous() : at::Tensor();
  const at::Tensor normaliser = normalised ? normaliser_arg.contiguous() : at::Tensor();
  const at::Tensor metric = with_metric ? *metric_arg : at::Tensor();
  const bool want_metric = output_mask[2] && with_metric;
  at::Tensor grad_input = at::empty(output_mask[0] ? input.sizes() : at::IntArrayRef{0}, input.options());
  at::Tensor grad_flow = at::empty(output_mask[1] ? flow.sizes() : at::IntArrayRef{0}, flow.options());
  at::Tensor grad_metric = at::empty(want_metric ? at::IntArrayRef{N, 1, H, W} : at::IntArrayRef{0}, flow.options());
  if (N * H * W == 0 || !(output_mask[0] || output_mask[1] || want_metric)) return {grad_input, grad_flow, grad_metric};
  const int64_t K = C + (normalised ? 1 : 0);
  at::Tensor g = at::empty({N, K, H, W}, flow.options());  // planar: coalesced (splat_kernels.cuh)
  const bool small = fits_int32({input, flow, metric, grad_out, grad_normaliser, out, g}, N * (C + 1) * H * W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "splat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto prepare = &splat_backward_prepare_kernel<acc_t, index_t>;
      SOFTSPLAT_LAUNCH(prepare, blocks_for(N * H * W), kThreads,
          grad_out.data_ptr<acc_t>(), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
          normalised ? (const acc_t*)out.data_ptr<acc_t>() : nullptr,
          normalised ? (const acc_t*)normaliser.data_ptr<acc_t>() : nullptr,
          grad_normaliser.defined() ? (const acc_t*)grad_normaliser.data_ptr<acc_t>() : nullptr,
          grad_normaliser.defined() ? grad_normaliser.stride(0) : 0,
          grad_normaliser.defined() ? grad_normaliser.stride(2) : 0,
          grad_normaliser.defined() ? grad_normaliser.stride(3) : 0,
          (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind, (int)normalisation, g.data_ptr<acc_t>());
      auto backward = &splat_backward_kernel<scalar_t, acc_t, index_t>;
      SOFTSPLAT_LAUNCH(backward, blocks_for(N * H * W), kThreads,
          input.data_ptr<scalar_t>(), input.stride(0), input.stride(1), input.stride(2), input.stride(3),
          flow.data_ptr<acc_t>(), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
          with_metric ? metric.data_ptr<acc_t>() : nullptr,
          with_metric ? metric.stride(0) : 0, with_metric ? metric.stride(2) : 0, with_metric ? metric.stride(3) : 0,
          (const acc_t*)g.data_ptr<acc_t>(), (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind,
          kind == STABLE ? (const acc_t*)maximum.data_ptr<acc_t>() : nullptr,
          output_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
          output_mask[1] ? grad_flow.data_ptr<acc_t>() : nullptr,
          want_metric ? grad_metric.data_ptr<acc_t>() : nullptr);
    };
    if (small) run(int(0)); else run((long long)0);
  });
  return {grad_input, grad_flow, grad_metric};
}

}  // namespace launch
}  // namespace softsplat
