// Torch-level launchers of the CUDA kernels (kernels.cuh): allocation, dtype and index-type
// dispatch, launches. Included by ops.cu (nvcc, real launches on the current stream of the
// input's device) and by the test suite's conformance/host/cuda_host.cpp (g++, the host shim).
// The includer defines
//   SOFTSPLAT_DEVICE_GUARD(tensor)            make tensor's device current for this scope
//   SOFTSPLAT_LAUNCH(kernel, blocks, threads, args...)   launch a kernel (a function pointer)
#pragma once

#include <algorithm>
#include <array>
#include <climits>
#include <limits>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../tensor.h"
#include "kernels.cuh"

namespace softsplat {
namespace launch {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // blocks of a launch at most; grid-stride loops cover the rest

inline unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// Largest element offset a kernel forms into `t`, plus one.
inline int64_t extent(const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
  return std::max<int64_t>(last + 1, t.numel());
}

// 32-bit indexing is exact when every offset, and every product of sizes the kernels form
// (N*C*H*W at most, the gradient buffer N*H*W*(C+1)), stays below 2^31 - 1, and so does a
// grid-stride index, which steps up to kMaxBlocks * kThreads past the last element.
inline bool fits_int32(std::initializer_list<Tensor> tensors, int64_t largest_product) {
  if (largest_product + kMaxBlocks * kThreads >= INT_MAX) return false;
  for (const auto& t : tensors)
    if (extent(t) >= INT_MAX) return false;
  return true;
}

inline Tensor splat_maximum(const Tensor& flow, const Tensor& metric, int64_t kind) {
  checks::check_maximum_arguments("splat_maximum", flow, metric, kind);
  SOFTSPLAT_DEVICE_GUARD(flow);
  const int64_t N = flow.size(0), H = flow.size(2), W = flow.size(3);
  Tensor maximum = full({N, 1, H, W}, -std::numeric_limits<double>::infinity(), flow.scalar_type(), flow);
  if (N * H * W == 0) return maximum;
  const bool small = fits_int32({flow, metric, maximum}, N * H * W);
  dispatch_floating<false>(flow.scalar_type(), "splat_maximum: flow", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto kernel = &splat_maximum_kernel<scalar_t, index_t>;
      SOFTSPLAT_LAUNCH(kernel, blocks_for(N * H * W), kThreads,
          ptr<scalar_t>(flow), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
          ptr<scalar_t>(metric), metric.stride(0), metric.stride(2), metric.stride(3),
          (index_t)N, (index_t)H, (index_t)W, (int)kind, ptr<scalar_t>(maximum));
    };
    if (small) run(int(0)); else run((long long)0);
  });
  return maximum;
}

// An op of torch's called through the stable ABI's dispatcher, its arguments and then its
// results on `stack`.
template <size_t size>
void call_op(const char* name, const char* overload, std::array<StableIValue, size>& stack) {
#if TORCH_FEATURE_VERSION >= TORCH_VERSION_2_10_0
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
#else
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_call_dispatcher(name, overload, stack.data()));
#endif
}

// `count` elements of `dtype` (of `element` bytes each) carved from the byte buffer `bytes` at
// byte `at`, which moves on past them (rounded up to 16 bytes, so every part stays aligned).
inline Tensor carve(const Tensor& bytes, int64_t& at, int64_t count, ScalarType dtype, int64_t element) {
  Tensor whole = bytes;  // narrow takes a mutable reference
  Tensor part = torch::stable::narrow(whole, 0, at, count * element);
  at += (count * element + 15) / 16 * 16;
  std::array<StableIValue, 2> stack{torch::stable::detail::from(part), torch::stable::detail::from(dtype)};
  call_op("aten::view", "dtype", stack);  // the same bytes, as dtype
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// keys sorted into `sorted`, stably (equal keys keep their order), and into `order` the index
// of each: torch's sort (deterministic: a stable sort's result is unique).
inline void stable_sort(const Tensor& keys, Tensor& sorted, Tensor& order) {
  std::array<StableIValue, 6> stack{
      torch::stable::detail::from(keys), torch::stable::detail::from(std::optional<bool>(true)),
      torch::stable::detail::from(int64_t(-1)), torch::stable::detail::from(false),
      torch::stable::detail::from(sorted), torch::stable::detail::from(order)};
  call_op("aten::sort", "values_stable", stack);
  // the results are sorted and order again: their new handles released
  (void)torch::stable::detail::to<Tensor>(stack[0]);
  (void)torch::stable::detail::to<Tensor>(stack[1]);
}

// Bytes of scratch the ordered forward takes for `pixels` source pixels: per tap (four per
// pixel) its key (then its offset), its sorted key, its int64 sort index, b and (but for sum) w;
// per target its end. One buffer, so that one allocation (and, in torch's deterministic mode,
// one fill of it) serves the call.
inline int64_t ordered_scratch_bytes(int64_t pixels, int64_t index_size, int64_t acc_size, bool with_weight) {
  auto aligned = [](int64_t bytes) { return (bytes + 15) / 16 * 16; };
  const int64_t taps = 4 * pixels;
  return 2 * aligned(taps * index_size) + aligned(taps * 8) + aligned(pixels * index_size) +
         (with_weight ? 2 : 1) * aligned(taps * acc_size);
}

// The ordered forward (kernels.cuh): every target sums its contributions in the order of their
// source pixels, the same bits on every run, every step parallel over taps, targets or
// (target, channel block).
template <typename scalar_t, typename acc_t, typename index_t>
void ordered_forward(const Tensor& input, const Tensor& flow, const Tensor& metric, const Tensor& maximum,
                     int64_t kind, int64_t normalisation, Tensor& out, Tensor& normaliser) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t pixels = N * H * W, taps = 4 * pixels;
  const ScalarType index_dtype = sizeof(index_t) == 4 ? ScalarType::Int : ScalarType::Long;
  const ScalarType compute = flow.scalar_type();
  const bool with_metric = kind >= LINEAR, with_weight = kind != SUM;
  const Tensor scratch =
      empty({ordered_scratch_bytes(pixels, sizeof(index_t), sizeof(acc_t), with_weight)}, ScalarType::Byte, input);
  int64_t at = 0;
  Tensor keys = carve(scratch, at, taps, index_dtype, sizeof(index_t));  // then each slot's offset
  Tensor sorted = carve(scratch, at, taps, index_dtype, sizeof(index_t));
  Tensor order = carve(scratch, at, taps, ScalarType::Long, 8);
  Tensor ends = carve(scratch, at, pixels, index_dtype, sizeof(index_t));
  Tensor bilinear = carve(scratch, at, taps, compute, sizeof(acc_t));
  Tensor weight = with_weight ? carve(scratch, at, taps, compute, sizeof(acc_t)) : Tensor();
  auto key = &splat_key_kernel<acc_t, index_t>;
  SOFTSPLAT_LAUNCH(key, blocks_for(pixels), kThreads,
      ptr<acc_t>(flow), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
      (index_t)N, (index_t)H, (index_t)W, ptr<index_t>(keys));
  stable_sort(keys, sorted, order);
  auto find_ends = &splat_ends_kernel<index_t>;
  SOFTSPLAT_LAUNCH(find_ends, blocks_for(pixels), kThreads, (const index_t*)ptr<index_t>(sorted), (index_t)taps,
                   (index_t)pixels, ptr<index_t>(ends));
  auto weigh = &splat_weigh_kernel<acc_t, index_t>;
  SOFTSPLAT_LAUNCH(weigh, blocks_for(taps), kThreads,
      input.stride(0), input.stride(2), input.stride(3),
      ptr<acc_t>(flow), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
      with_metric ? ptr<acc_t>(metric) : nullptr,
      with_metric ? metric.stride(0) : 0, with_metric ? metric.stride(2) : 0, with_metric ? metric.stride(3) : 0,
      (index_t)N, (index_t)H, (index_t)W, (int)kind,
      weighs_per_tap((int)kind) ? (const acc_t*)ptr<acc_t>(maximum) : nullptr,
      (const long long*)ptr<int64_t>(order), (const index_t*)ptr<index_t>(ends), ptr<index_t>(keys),
      ptr<acc_t>(bilinear), with_weight ? ptr<acc_t>(weight) : nullptr);
  const int64_t blocks = C > 0 ? (C + kSplatChannelBlock - 1) / kSplatChannelBlock : 1;
  auto gather = &splat_gather_kernel<scalar_t, acc_t, index_t>;
  SOFTSPLAT_LAUNCH(gather, blocks_for(N * blocks * H * W), kThreads,
      ptr<scalar_t>(input), input.stride(1), (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind,
      (int)normalisation, (const index_t*)ptr<index_t>(ends), (const index_t*)ptr<index_t>(keys),
      (const acc_t*)ptr<acc_t>(bilinear), with_weight ? (const acc_t*)ptr<acc_t>(weight) : nullptr,
      kind == SUM ? nullptr : ptr<acc_t>(normaliser), ptr<acc_t>(out));
}

// `deterministic`: the ordered forward (docs/spec.md, determinism) instead of the atomic one.
// `cast`: the result in input's dtype, written by the normalising pass (16-bit inputs: their
// sums are then scratch in the compute dtype).
inline std::tuple<Tensor, Tensor> splat_forward(const Tensor& input, const Tensor& flow,
                                                        const std::optional<Tensor>& metric_arg,
                                                        int64_t kind, int64_t normalisation,
                                                        const std::optional<Tensor>& maximum_arg,
                                                        bool deterministic, bool cast) {
  checks::check_arguments("splat_forward", input, flow, metric_arg, kind, normalisation);
  const Tensor maximum = checks::checked_maximum("splat_forward", flow, maximum_arg, kind);
  SOFTSPLAT_DEVICE_GUARD(input);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const ScalarType compute = flow.scalar_type();
  const bool narrow = cast && input.scalar_type() != compute;
  const bool with_metric = kind >= LINEAR;
  const Tensor metric = with_metric ? *metric_arg : Tensor();
  // The atomic forward adds into a zeroed accumulator of `lanes` values per target
  // (kernels.cuh) and writes the result and D from it in one pass; the ordered one writes out
  // and D itself (a 16-bit result rounded from out after).
  const int64_t lanes = forward_lanes(C, static_cast<int>(kind));
  Tensor sums = deterministic ? Tensor() : zeros({N, H, W, lanes}, compute, input);
  Tensor out = deterministic || !narrow ? empty({N, C, H, W}, compute, input) : Tensor();
  Tensor normaliser = kind == SUM ? empty({0}, compute, input) : empty({N, 1, H, W}, compute, input);
  Tensor result = narrow ? empty({N, C, H, W}, input.scalar_type(), input) : out;
  if (N * H * W == 0) return {result, normaliser};
  // The ordered forward also numbers four taps per pixel in index_t.
  const bool small = fits_int32({input, flow, metric, out, sums},
                                std::max(N * std::max(C + 1, lanes) * H * W, deterministic ? 4 * N * H * W : 0));
  dispatch_floating<true>(input.scalar_type(), "splat_forward: input", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = acc_type<scalar_t>;
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (deterministic) {  // the gather divides; a 16-bit result is rounded after
        ordered_forward<scalar_t, acc_t, index_t>(input, flow, metric, maximum, kind, normalisation, out, normaliser);
        if (!narrow || C == 0) return;
        const int64_t blocks = (C + kNormaliseChannels - 1) / kNormaliseChannels;
        auto round = &splat_normalise_kernel<scalar_t, acc_t, index_t>;
        SOFTSPLAT_LAUNCH(round, blocks_for(N * blocks * H * W), kThreads,
            (const acc_t*)ptr<acc_t>(out), (const acc_t*)nullptr, ptr<scalar_t>(result),
            (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)normalisation);
        return;
      }
      auto forward = &splat_forward_kernel<scalar_t, acc_t, index_t>;
      const int64_t blocks = (lanes + kForwardLanes - 1) / kForwardLanes;
      SOFTSPLAT_LAUNCH(forward, blocks_for(N * blocks * H * W), kThreads,
          ptr<scalar_t>(input), input.stride(0), input.stride(1), input.stride(2), input.stride(3),
          ptr<acc_t>(flow), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
          with_metric ? ptr<acc_t>(metric) : nullptr,
          with_metric ? metric.stride(0) : 0, with_metric ? metric.stride(2) : 0, with_metric ? metric.stride(3) : 0,
          (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind,
          weighs_per_tap((int)kind) ? (const acc_t*)ptr<acc_t>(maximum) : nullptr, ptr<acc_t>(sums));
      // The result and D in one pass; raw: the numerator as it is.
      const bool divides = kind != SUM && normalisation != RAW;
      const int64_t finish_blocks = C > 0 ? (C + kNormaliseChannels - 1) / kNormaliseChannels : 1;
      auto launch = [&](auto* target) {
        using out_t = std::remove_pointer_t<decltype(target)>;
        auto finish = &splat_finish_kernel<out_t, acc_t, index_t>;
        SOFTSPLAT_LAUNCH(finish, blocks_for(N * finish_blocks * H * W), kThreads,
            (const acc_t*)ptr<acc_t>(sums), (index_t)lanes, target, kind == SUM ? nullptr : ptr<acc_t>(normaliser),
            (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)normalisation, (int)divides);
      };
      if (narrow)
        launch(ptr<scalar_t>(result));
      else
        launch(ptr<acc_t>(out));
    };
    if (small) run(int(0)); else run((long long)0);
  });
  return {result, normaliser};
}

inline std::tuple<Tensor, Tensor, Tensor> splat_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_normaliser_arg,
    const Tensor& input, const Tensor& flow, const std::optional<Tensor>& metric_arg,
    const Tensor& out_arg, const Tensor& normaliser_arg, int64_t kind, int64_t normalisation,
    std::vector<bool> output_mask, const std::optional<Tensor>& maximum_arg) {
  checks::check_arguments("splat_backward", input, flow, metric_arg, kind, normalisation);
  STD_TORCH_CHECK(output_mask.size() == 3, "splat_backward: output_mask: expected 3 booleans, got ", output_mask.size());
  const Tensor maximum = checks::checked_maximum("splat_backward", flow, maximum_arg, kind);
  const bool with_metric = kind >= LINEAR;
  const bool normalised = kind != SUM;
  const Tensor grad_normaliser =
      normalised && grad_normaliser_arg.has_value() && grad_normaliser_arg->defined() ? *grad_normaliser_arg : Tensor();
  checks::check_backward_arguments("splat_backward", grad_out, grad_normaliser, input, out_arg, normaliser_arg, kind);
  SOFTSPLAT_DEVICE_GUARD(input);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const Tensor out = normalised ? as_contiguous(out_arg) : Tensor();
  const Tensor normaliser = normalised ? as_contiguous(normaliser_arg) : Tensor();
  const Tensor metric = with_metric ? *metric_arg : Tensor();
  const bool want_metric = output_mask[2] && with_metric;
  const ScalarType compute = flow.scalar_type();
  Tensor grad_input = output_mask[0] ? empty(input.sizes(), input.scalar_type(), input) : empty({0}, input.scalar_type(), input);
  Tensor grad_flow = output_mask[1] ? empty(flow.sizes(), compute, input) : empty({0}, compute, input);
  Tensor grad_metric = want_metric ? empty({N, 1, H, W}, compute, input) : empty({0}, compute, input);
  if (N * H * W == 0 || !(output_mask[0] || output_mask[1] || want_metric)) return {grad_input, grad_flow, grad_metric};
  const int64_t K = C + (normalised ? 1 : 0);
  Tensor g = empty({N, K, H, W}, compute, input);  // planar: coalesced (kernels.cuh)
  const bool small = fits_int32({input, flow, metric, grad_out, grad_normaliser, out, g}, N * (C + 1) * H * W);
  dispatch_floating<true>(input.scalar_type(), "splat_backward: input", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = acc_type<scalar_t>;
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto prepare = &splat_backward_prepare_kernel<acc_t, index_t>;
      SOFTSPLAT_LAUNCH(prepare, blocks_for(N * H * W), kThreads,
          ptr<acc_t>(grad_out), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
          normalised ? (const acc_t*)ptr<acc_t>(out) : nullptr,
          normalised ? (const acc_t*)ptr<acc_t>(normaliser) : nullptr,
          (const acc_t*)ptr<acc_t>(grad_normaliser),
          grad_normaliser.defined() ? grad_normaliser.stride(0) : 0,
          grad_normaliser.defined() ? grad_normaliser.stride(2) : 0,
          grad_normaliser.defined() ? grad_normaliser.stride(3) : 0,
          (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind, (int)normalisation, ptr<acc_t>(g));
      auto backward = &splat_backward_kernel<scalar_t, acc_t, index_t>;
      SOFTSPLAT_LAUNCH(backward, blocks_for(N * H * W), kThreads,
          ptr<scalar_t>(input), input.stride(0), input.stride(1), input.stride(2), input.stride(3),
          ptr<acc_t>(flow), flow.stride(0), flow.stride(1), flow.stride(2), flow.stride(3),
          with_metric ? ptr<acc_t>(metric) : nullptr,
          with_metric ? metric.stride(0) : 0, with_metric ? metric.stride(2) : 0, with_metric ? metric.stride(3) : 0,
          (const acc_t*)ptr<acc_t>(g), (index_t)N, (index_t)C, (index_t)H, (index_t)W, (int)kind,
          weighs_per_tap((int)kind) ? (const acc_t*)ptr<acc_t>(maximum) : nullptr,
          output_mask[0] ? ptr<scalar_t>(grad_input) : nullptr,
          output_mask[1] ? ptr<acc_t>(grad_flow) : nullptr,
          want_metric ? ptr<acc_t>(grad_metric) : nullptr);
    };
    if (small) run(int(0)); else run((long long)0);
  });
  return {grad_input, grad_flow, grad_metric};
}

}  // namespace launch
}  // namespace softsplat
