// The argument checks of the ops of schemas.h, shared by every compiled implementation (the CPU
// kernels, the CUDA launchers and the host shim's library). softsplat.splat validates what users
// pass (docs/spec.md, "Errors"); these guard direct calls of torch.ops.<namespace>.*. Each
// message names the op, the argument, what was expected and what was given.
#pragma once

#include <optional>

#include "taps.h"
#include "tensor.h"

namespace softsplat {
namespace checks {

// The dtype the kernels compute in for `input`: float64 for float64, else float32.
inline ScalarType compute_dtype(const Tensor& input) {
  return input.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// `t` is [N, channels, H, W] with `like`'s N, H and W (like: a 4-D tensor), of `dtype`, on
// `like`'s device.
inline void check_per_pixel(const char* op, const char* name, const Tensor& t, int64_t channels,
                            const Tensor& like, ScalarType dtype) {
  STD_TORCH_CHECK(t.defined(), op, ": ", name, ": expected a tensor [N, ", channels, ", H, W], got None");
  STD_TORCH_CHECK(t.dim() == 4 && t.size(0) == like.size(0) && t.size(1) == channels && t.size(2) == like.size(2) &&
                  t.size(3) == like.size(3),
              op, ": ", name, ": expected shape [N, ", channels, ", H, W] = [", like.size(0), ", ", channels, ", ",
              like.size(2), ", ", like.size(3), "], got ", shape(t));
  STD_TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, ": expected ", torch::headeronly::toString(dtype),
                  " (the compute dtype), got ", torch::headeronly::toString(t.scalar_type()));
  STD_TORCH_CHECK(same_device(t, like), op, ": ", name, ": expected a tensor on ", device_name(like), ", got ",
                  device_name(t));
}

// input [N, C, H, W] floating; flow [N, 2, H, W] and (kinds >= LINEAR) metric [N, 1, H, W] in
// the compute dtype on input's device; kind and normalisation codes in range.
inline void check_arguments(const char* op, const Tensor& input, const Tensor& flow,
                            const std::optional<Tensor>& metric, int64_t kind, int64_t normalisation) {
  STD_TORCH_CHECK(input.dim() == 4, op, ": input: expected a 4-D tensor [N, C, H, W], got shape ", shape(input));
  STD_TORCH_CHECK(kind >= SUM && kind <= MAX, op, ": kind: expected ", int(SUM), "..", int(MAX), ", got ", kind);
  STD_TORCH_CHECK(normalisation >= ADDEPS && normalisation <= RAW, op, ": normalisation: expected ", int(ADDEPS), "..",
              int(RAW), ", got ", normalisation);
  check_per_pixel(op, "flow", flow, 2, input, compute_dtype(input));
  if (kind >= LINEAR) check_per_pixel(op, "metric", metric.value_or(Tensor()), 1, input, compute_dtype(input));
}

// The stable and max kinds' maximum [N, 1, H, W] (contiguous); an undefined tensor for the other
// kinds.
inline Tensor checked_maximum(const char* op, const Tensor& flow, const std::optional<Tensor>& maximum,
                                  int64_t kind) {
  if (!weighs_per_tap(static_cast<int>(kind))) return Tensor();
  check_per_pixel(op, "maximum", maximum.value_or(Tensor()), 1, flow, flow.scalar_type());
  return as_contiguous(*maximum);
}

// splat_maximum: flow [N, 2, H, W] float32 or float64, metric [N, 1, H, W] of flow's dtype,
// kind STABLE or MAX.
inline void check_maximum_arguments(const char* op, const Tensor& flow, const Tensor& metric, int64_t kind) {
  STD_TORCH_CHECK(kind == STABLE || kind == MAX, op, ": kind: expected ", int(STABLE), " (stable) or ", int(MAX),
                  " (max), got ", kind);
  STD_TORCH_CHECK(flow.dim() == 4 && flow.size(1) == 2, op, ": flow: expected a 4-D tensor [N, 2, H, W], got shape ",
                  shape(flow));
  STD_TORCH_CHECK(flow.scalar_type() == ScalarType::Float || flow.scalar_type() == ScalarType::Double, op,
              ": flow: expected float32 or float64, got ", torch::headeronly::toString(flow.scalar_type()));
  check_per_pixel(op, "metric", metric, 1, flow, flow.scalar_type());
}

// splat_backward's own arguments beyond check_arguments': grad_out [N, C, H, W]; for the
// normalised kinds out [N, C, H, W], normaliser [N, 1, H, W] and, when given,
// grad_normaliser [N, 1, H, W]; all in the compute dtype on input's device.
inline void check_backward_arguments(const char* op, const Tensor& grad_out,
                                     const Tensor& grad_normaliser, const Tensor& input,
                                     const Tensor& out, const Tensor& normaliser, int64_t kind) {
  const ScalarType compute = compute_dtype(input);
  check_per_pixel(op, "grad_out", grad_out, input.size(1), input, compute);
  if (kind == SUM) return;
  check_per_pixel(op, "out", out, input.size(1), input, compute);
  check_per_pixel(op, "normaliser", normaliser, 1, input, compute);
  if (grad_normaliser.defined()) check_per_pixel(op, "grad_normaliser", grad_normaliser, 1, input, compute);
}

}  // namespace checks
}  // namespace softsplat
