"""Backend ``triton``: fused Triton kernels (``triton_kernels.py``) registered with
``torch.library.triton_op`` and ``wrap_triton``, so ``torch.compile(fullgraph=True)`` sees
through them, with an autograd formula. Triton is imported on first use only.

On CUDA devices it runs the compiled kernels. With ``TRITON_INTERPRET=1`` set before Triton is
imported, it runs them in Triton's interpreter on CPU tensors instead (how the test suite checks
it without a GPU); ``opcheck`` and ``torch.compile`` need a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .ops import OpsBackend, autograd_formula, gradient_buffers


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _ops():
    """Define the ``softsplat_triton`` ops (once)."""
    import triton
    from torch.library import triton_op, wrap_triton

    from . import triton_kernels as k

    # Large blocks in the interpreter: each program costs milliseconds there, whatever its size.
    block = 4096 if interpreted() else 256

    def acc(dtype):
        return k.tl.float64 if dtype == torch.float64 else k.tl.float32

    def metric_strides(metric):
        return (metric.stride(0), metric.stride(2), metric.stride(3)) if metric is not None else (0, 0, 0)

    @triton_op("softsplat_triton::splat_maximum", mutates_args=())
    def splat_maximum(flow: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        N, _, H, W = flow.shape
        maximum = torch.full((N, 1, H, W), float("-inf"), dtype=flow.dtype, device=flow.device)
        if N * H * W:
            wrap_triton(k._splat_max_kernel)[(triton.cdiv(N * H * W, block),)](
                flow, *flow.stride(), metric, *metric_strides(metric), maximum, N, H, W,
                ACC=acc(flow.dtype), BLOCK=block,
            )
        return maximum

    @triton_op("softsplat_triton::splat_forward", mutates_args=())
    def splat_forward(
        input: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor | None, kind: int, normalisation: int,
        maximum: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = input.shape
        out = torch.zeros((N, C, H, W), dtype=flow.dtype, device=input.device)
        normaliser = torch.zeros((N, 1, H, W) if kind else (0,), dtype=flow.dtype, device=input.device)
        pixels = N * H * W
        if pixels == 0:
            return out, normaliser
        metric_arg = metric if metric is not None else flow  # never read when kind < 2
        maximum_arg = maximum.contiguous() if kind == k.STABLE else out  # only read when stable
        wrap_triton(k._splat_fwd_kernel)[(triton.cdiv(pixels, block),)](
            input, *input.stride(), flow, *flow.stride(), metric_arg, *metric_strides(metric),
            maximum_arg, out, normaliser if kind else out, N, C, H, W,
            KIND=kind, ACC=acc(flow.dtype), BLOCK=block,
        )
        if kind and C:
            wrap_triton(k._splat_normalise_kernel)[(triton.cdiv(pixels * C, block),)](
                out, normaliser, N, C, H, W, NORM=normalisation, BLOCK=block,
            )
        return out, normaliser

    @triton_op("softsplat_triton::splat_backward", mutates_args=())
    def splat_backward(
        grad_out: torch.Tensor, grad_normaliser: torch.Tensor | None, input: torch.Tensor, flow: torch.Tensor,
        metric: torch.Tensor | None, out: torch.Tensor, normaliser: torch.Tensor, kind: int, normalisation: int,
        output_mask: list[bool], maximum: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, C, H, W = input.shape
        (grad_input, grad_flow, grad_metric), want_metric = gradient_buffers(input, flow, metric, kind, output_mask)
        pixels = N * H * W
        if pixels == 0 or not (output_mask[0] or output_mask[1] or want_metric):
            return grad_input, grad_flow, grad_metric
        g = torch.empty((N, H, W, C + (1 if kind else 0)), dtype=flow.dtype, device=flow.device)
        has_gnorm = grad_normaliser is not None and kind != 0
        gnorm = grad_normaliser if has_gnorm else g
        grid = (triton.cdiv(pixels, block),)
        out = out.contiguous()
        wrap_triton(k._splat_bwd_prepare_kernel)[grid](
            grad_out, *grad_out.stride(), out, normaliser.contiguous() if kind else out,
            gnorm, *(metric_strides(gnorm) if has_gnorm else (0, 0, 0)), g, N, C, H, W,
            KIND=kind, NORM=normalisation, HAS_GNORM=has_gnorm, ACC=acc(flow.dtype), BLOCK=block,
        )
        metric_arg = metric if metric is not None else flow
        wrap_triton(k._splat_bwd_kernel)[grid](
            input, *input.stride(), flow, *flow.stride(), metric_arg, *metric_strides(metric), g,
            maximum.contiguous() if kind == k.STABLE else g,
            grad_input if output_mask[0] else g, grad_flow if output_mask[1] else g,
            grad_metric if want_metric else g, N, C, H, W,
            KIND=kind, WANT_INPUT=bool(output_mask[0]), WANT_FLOW=bool(output_mask[1]),
            WANT_METRIC=want_metric, ACC=acc(flow.dtype), BLOCK=block,
        )
        return grad_input, grad_flow, grad_metric

    backward, setup_context = autograd_formula(splat_backward)
    splat_forward.register_autograd(backward, setup_context=setup_context)
    return torch.ops.softsplat_triton


class TritonBackend(OpsBackend):
    name = "triton"
    summary = "fused Triton kernels (triton_op), atomics in the forward, gather backward"
    deterministic_on = ()

    def devices(self) -> tuple[str, ...]:
        return ("cpu",) if interpreted() else ("cuda",)

    def _unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install 'softsplat[triton]')"
        if not interpreted() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on CPU)"
        return None

    def load_ops(self):
        return _ops()
