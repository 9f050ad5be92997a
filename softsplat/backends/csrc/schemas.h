// The op schemas, shared by the cpp backend's library (namespace softsplat) and the test suite's
// library that runs the CUDA kernels on the host (conformance/host, namespace softsplat_cuda_host).
//
// splat_forward returns the result in the compute dtype (float32, or float64 for float64 input;
// the Python wrapper casts it to input's dtype), or with `cast` in input's dtype, rounded once as
// that cast rounds (the kernels write it; a result that autograd differentiates is never cast:
// its gradient needs the compute dtype's), and the raw normaliser D [N, 1, H, W]
// (an empty tensor for sum). splat_backward returns the gradients of input, flow and metric,
// an empty tensor for each one output_mask does not ask for. Kinds 4 (stable soft) and 5 (max)
// need `maximum`, the per-target maximum metric M [N, 1, H, W] that splat_maximum computes for
// that kind (-inf where nothing lands; for max over the taps of positive weight only); it
// passes no gradient, and max passes none to metric (its gradient is zeros). The cpp library also defines
// splat_stable_forward (SOFTSPLAT_DEFINE_FUSED_STABLE): both passes of kind 4 in one call,
// (out, normaliser, maximum) as splat_maximum then splat_forward with kind 4 give them;
// implemented by the CPU kernels only. `deterministic` asks splat_forward for the same bits on
// every run: the CUDA kernels then take their ordered forward (cuda/kernels.cuh) instead of
// adding with atomics; the CPU kernels are deterministic either way.
#pragma once

#define SOFTSPLAT_DEFINE_OPS(m)                                                                  \
  m.def("splat_forward(Tensor input, Tensor flow, Tensor? metric, int kind, int normalisation, " \
        "Tensor? maximum=None, bool deterministic=False, bool cast=False) -> (Tensor, Tensor)");  \
  m.def("splat_backward(Tensor grad_out, Tensor? grad_normaliser, Tensor input, Tensor flow, "   \
        "Tensor? metric, Tensor out, Tensor normaliser, int kind, int normalisation, "           \
        "bool[3] output_mask, Tensor? maximum=None) -> (Tensor, Tensor, Tensor)");               \
  m.def("splat_maximum(Tensor flow, Tensor metric, int kind=4) -> Tensor")

#define SOFTSPLAT_DEFINE_FUSED_STABLE(m) \
  m.def("splat_stable_forward(Tensor input, Tensor flow, Tensor metric, int normalisation, bool cast=False) " \
        "-> (Tensor, Tensor, Tensor)")
