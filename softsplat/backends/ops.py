"""The Python side shared by every backend whose ops follow ``csrc/schemas.h``: how a call
becomes an op call, and (for ops defined outside Python's torch.library) the fake-tensor shapes
and the autograd formula."""

from __future__ import annotations

import torch

from .base import Problem


def run_forward(forward_op, problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Backend.run`` through ``forward_op`` (schema of ``splat_forward``).

    ``flow`` and ``metric`` are read in the compute dtype (a no-op when they already are);
    the op returns the compute dtype, cast here so that autograd casts gradients back.
    """
    dtype = problem.compute_dtype
    metric = None if problem.metric is None else problem.metric.to(dtype)
    out, normaliser = forward_op(
        problem.input, problem.flow.to(dtype), metric, problem.mode.kind_code, problem.normalisation_code
    )
    normaliser = None if problem.mode.kind == "sum" else normaliser
    return (out if problem.raw else out.to(problem.input.dtype)), normaliser


def register_python_side(namespace: str) -> None:
    """Shapes for fake tensors (torch.compile, opcheck) and the autograd formula of the ops."""
    forward_name, backward_name = f"{namespace}::splat_forward", f"{namespace}::splat_backward"
    backward_op = getattr(torch.ops, namespace).splat_backward

    @torch.library.register_fake(forward_name)
    def _(input, flow, metric, kind, normalisation):
        out = flow.new_empty((input.shape[0], input.shape[1], *input.shape[2:]))
        normaliser = flow.new_empty((input.shape[0], 1, *input.shape[2:]) if kind else (0,))
        return out, normaliser

    @torch.library.register_fake(backward_name)
    def _(grad_out, grad_normaliser, input, flow, metric, out, normaliser, kind, normalisation, output_mask):
        wants_metric = output_mask[2] and metric is not None and kind >= 2
        return (
            input.new_empty(input.shape if output_mask[0] else (0,)),
            flow.new_empty(flow.shape if output_mask[1] else (0,)),
            flow.new_empty((flow.shape[0], 1, *flow.shape[2:]) if wants_metric else (0,)),
        )

    def setup_context(ctx, inputs, output):
        input, flow, metric, kind, normalisation = inputs
        out, normaliser = output
        ctx.kind, ctx.normalisation = kind, normalisation
        ctx.save_for_backward(input, flow, metric, out, normaliser)

    def backward(ctx, grad_out, grad_normaliser):
        input, flow, metric, out, normaliser = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            metric is not None and ctx.needs_input_grad[2],
        ]
        if ctx.kind == 0:  # sum has no normaliser
            grad_normaliser = None
        grads = backward_op(
            grad_out, grad_normaliser, input, flow, metric, out, normaliser,
            ctx.kind, ctx.normalisation, mask,
        )
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None, None)

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
