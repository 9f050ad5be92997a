"""The Python side shared by every backend whose ops follow ``csrc/schemas.h``: how a call
becomes an op call, and (for ops defined outside Python's torch.library) the fake-tensor shapes
and the autograd formula."""

from __future__ import annotations

import torch

from ..modes import Kind
from .base import Backend, Problem


def per_pixel_strides(tensor: torch.Tensor | None) -> tuple[int, int, int]:
    """The (n, y, x) strides of an ``[N, 1, H, W]`` tensor (metric, grad_normaliser) as kernels
    take them; zeros for an absent one (never read)."""
    return (tensor.stride(0), tensor.stride(2), tensor.stride(3)) if tensor is not None else (0, 0, 0)


def forward_buffers(input: torch.Tensor, flow: torch.Tensor, kind: int,
                    zeroed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``splat_forward``'s outputs, zeroed for kernels that add into them (else left as
    allocated, for kernels that write every element): the result ``[N, C, H, W]`` and the
    normaliser ``[N, 1, H, W]`` (``[0]`` for sum), in flow's dtype (the compute dtype)."""
    N, C, H, W = input.shape
    make = torch.zeros if zeroed else torch.empty
    out = make((N, C, H, W), dtype=flow.dtype, device=input.device)
    normaliser = make((N, 1, H, W) if kind != Kind.SUM else (0,), dtype=flow.dtype, device=input.device)
    return out, normaliser


def forward_lanes(C: int, kind: int) -> int:
    """The GPU forward's accumulator lanes per target (cuda/kernels.cuh, forward_lanes; the
    Triton forward's too): the C channels, the normaliser (but for sum), zeros up to a multiple
    of 4, so that a pixel's adds into one tap are 16-byte quads (one vector atomic each on
    sm_90)."""
    return (C + (1 if kind != Kind.SUM else 0) + 3) // 4 * 4


def cast_result(out: torch.Tensor, input: torch.Tensor, cast: bool) -> torch.Tensor:
    """Where the forward writes its result with ``cast``: a new tensor in a 16-bit input's
    dtype (the kernels' normalising pass rounds into it), else ``out`` itself."""
    return torch.empty_like(out, dtype=input.dtype) if cast and input.dtype != out.dtype else out


def prepared_gradients(input: torch.Tensor, flow: torch.Tensor, kind: int) -> torch.Tensor:
    """The GPU backward's scratch ``g`` ``[N, K, H, W]``: per target, gN of the C channels, then
    gD for the normalised kinds (docs/spec.md, gradients). Planar, so that the threads of
    neighbouring pixels store and gather neighbouring addresses."""
    N, C, H, W = input.shape
    return torch.empty((N, C + (1 if kind != Kind.SUM else 0), H, W), dtype=flow.dtype, device=flow.device)


def gradient_buffers(input, flow, metric, kind: int, output_mask) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The three tensors ``splat_backward`` returns, uninitialised (shape ``[0]`` for a
    gradient ``output_mask`` does not ask for), and whether the metric's is asked for."""
    N, _, H, W = input.shape
    want_metric = bool(output_mask[2]) and metric is not None and kind >= Kind.LINEAR
    buffers = (
        input.new_empty(input.shape if output_mask[0] else (0,)),
        flow.new_empty(flow.shape if output_mask[1] else (0,)),
        flow.new_empty((N, 1, H, W) if want_metric else (0,)),
    )
    return buffers, want_metric


def scatter_maximum(ops, problem: Problem) -> torch.Tensor:
    """``Backend.maximum`` through ``ops.splat_maximum`` (stable's, or max mode's)."""
    dtype = problem.compute_dtype
    kind = Kind.MAX if problem.mode.kind == "max" else Kind.STABLE
    return ops.splat_maximum(problem.flow.detach().to(dtype), problem.metric.detach().to(dtype), int(kind))


#: The op of a namespace that computes stable soft splatting's maximum and forward in one call.
FUSED_STABLE = "splat_stable_forward"

#: What a forward op says when autograd reaches a result it rounded to input's dtype (``cast``).
CAST_HAS_NO_GRADIENT = (
    "cast: a result rounded to input's dtype (cast=True) has no gradient; call the op with "
    "cast=False (its result in the compute dtype, whose gradient the backward needs) to differentiate it"
)


def casts(problem: Problem) -> bool:
    """Whether the forward op writes the result in input's dtype itself (``cast``): a 16-bit
    input whose result autograd will not differentiate (the backward reads the result in the
    compute dtype), and not splat_many's numerator."""
    if problem.raw or problem.input.dtype == problem.compute_dtype:
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in (problem.input, problem.flow, problem.metric))


def run_forward(ops, problem: Problem, fused_stable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Backend.run`` through ``ops`` (``torch.ops.<namespace>``, the ops of schemas.h).

    ``flow`` and ``metric`` are read in the compute dtype (a no-op when they already are);
    the op returns the compute dtype, cast here so that autograd casts gradients back, or the
    input's own dtype where nothing is differentiated (``casts``: the kernels write it, no cast
    pass after); ``problem.deterministic`` asks the op for its ordered forward (the CUDA kernels'). For
    stable soft splatting, the scatter-max pass runs first unless a (joint) maximum is given;
    with ``fused_stable`` (the backend implements ``splat_stable_forward`` on the input's device)
    that one call does both. Max splatting takes its maximum the same way (``splat_maximum``
    with kind MAX), then ``splat_forward`` with kind MAX.
    """
    dtype = problem.compute_dtype
    flow = problem.flow.to(dtype)
    metric = None if problem.metric is None else problem.metric.to(dtype)
    cast = casts(problem)
    if problem.stable and problem.maximum is None and fused_stable:
        out, normaliser, _ = ops.splat_stable_forward(problem.input, flow, metric, int(problem.normalisation_code), cast)
        return (out if problem.raw else out.to(problem.input.dtype)), normaliser
    maximum = None
    if problem.per_tap:
        given = problem.maximum
        maximum = (given if given is not None else scatter_maximum(ops, problem)).to(dtype)
    out, normaliser = ops.splat_forward(
        problem.input, flow, metric, int(problem.kind_code), int(problem.normalisation_code), maximum,
        problem.deterministic, cast,
    )
    normaliser = None if problem.mode.kind == "sum" else normaliser
    return (out if problem.raw else out.to(problem.input.dtype)), normaliser


class OpsBackend(Backend):
    """A backend whose work is the ops of schemas.h in one ``torch.ops`` namespace."""

    _ops = None  # set by prepare(), which dispatch calls before run()
    #: Device types on which the ops implement ``splat_stable_forward`` (run_forward uses it).
    fused_stable_on: tuple[str, ...] = ()

    def load_ops(self):
        """``torch.ops.<namespace>``, defined (built, loaded, registered) if need be."""
        raise NotImplementedError

    def prepare(self) -> None:
        self._ops = self.load_ops()

    def maximum(self, problem: Problem) -> torch.Tensor:
        if self._ops is None:
            self.prepare()
        return scatter_maximum(self._ops, problem)

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._ops is None:  # only when called without dispatch; dispatch prepares first
            self.prepare()
        return run_forward(self._ops, problem, problem.input.device.type in self.fused_stable_on)


def autograd_formula(backward_op):
    """``(backward, setup_context)`` for ``register_autograd`` of a ``splat_forward`` op whose
    gradients ``backward_op`` (the matching ``splat_backward``) computes."""

    def setup_context(ctx, inputs, output):
        input, flow, metric, kind, normalisation, *rest = inputs
        maximum = rest[0] if rest else None
        out, normaliser = output
        save(ctx, kind, normalisation, (input, flow, metric, out, normaliser, maximum), out.dtype != flow.dtype)

    def backward(ctx, grad_out, grad_normaliser):  # none for kind, normalisation, maximum, deterministic, cast
        return gradients(ctx, backward_op, grad_out, grad_normaliser) + (None, None, None, None, None)

    return backward, setup_context


def fused_stable_autograd_formula(backward_op):
    """``(backward, setup_context)`` for ``splat_stable_forward`` (input, flow, metric,
    normalisation) -> (out, normaliser, maximum): splat_forward's with kind 4 and the maximum
    it computed, which passes no gradient."""

    def setup_context(ctx, inputs, output):
        input, flow, metric, normalisation, *_ = inputs
        out, normaliser, maximum = output
        ctx.mark_non_differentiable(maximum)
        save(ctx, Kind.STABLE, normalisation, (input, flow, metric, out, normaliser, maximum), out.dtype != flow.dtype)

    def backward(ctx, grad_out, grad_normaliser, grad_maximum):  # none for normalisation, cast
        return gradients(ctx, backward_op, grad_out, grad_normaliser) + (None, None)

    return backward, setup_context


def save(ctx, kind: int, normalisation: int, tensors, cast: bool) -> None:
    """What ``gradients`` needs: the mode codes and (input, flow, metric, out, normaliser,
    maximum); ``cast``: whether the result is in input's dtype (which has no gradient)."""
    ctx.kind, ctx.normalisation, ctx.cast = int(kind), int(normalisation), cast
    ctx.save_for_backward(*tensors)
    # An output the loss does not use gets None, not a materialised tensor of zeros (the
    # normaliser's, usually: a full [N, 1, H, W] fill per backward).
    ctx.set_materialize_grads(False)


def gradients(ctx, backward_op, grad_out, grad_normaliser) -> tuple:
    """The gradients of (input, flow, metric) through ``backward_op``, None where not needed."""
    if ctx.cast:
        raise ValueError(CAST_HAS_NO_GRADIENT)
    input, flow, metric, out, normaliser, maximum = ctx.saved_tensors
    mask = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        metric is not None and ctx.needs_input_grad[2],
    ]
    if ctx.kind == Kind.SUM:  # no normaliser
        grad_normaliser = None
    if grad_out is None:
        # Only the normaliser is used: its gradient alone, as that of a splat of no
        # channels (not a zero cotangent on the result, whose NaNs would leak through
        # 0 * NaN where the result overflows); the input's gradient is absent.
        if grad_normaliser is None:
            return (None,) * 3
        mask[0] = False
        input, out = input[:, :0], out[:, :0]
        grad_out = out
    grads = backward_op(
        grad_out, grad_normaliser, input, flow, metric, out, normaliser,
        ctx.kind, ctx.normalisation, mask, maximum,
    )
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


def register_python_side(namespace: str, fused_stable: bool = False) -> None:
    """Shapes for fake tensors (torch.compile, opcheck) and the autograd formula of the ops
    (with ``fused_stable``, of ``splat_stable_forward`` too)."""
    forward_name, backward_name = f"{namespace}::splat_forward", f"{namespace}::splat_backward"
    backward_op = getattr(torch.ops, namespace).splat_backward

    @torch.library.register_fake(f"{namespace}::splat_maximum")
    def _(flow, metric, kind=Kind.STABLE):
        return flow.new_empty((flow.shape[0], 1, *flow.shape[2:]))

    @torch.library.register_fake(forward_name)
    def _(input, flow, metric, kind, normalisation, maximum=None, deterministic=False, cast=False):
        out = flow.new_empty(input.shape, dtype=input.dtype if cast else flow.dtype)
        normaliser = flow.new_empty((input.shape[0], 1, *input.shape[2:]) if kind != Kind.SUM else (0,))
        return out, normaliser

    @torch.library.register_fake(backward_name)
    def _(grad_out, grad_normaliser, input, flow, metric, out, normaliser, kind, normalisation, output_mask, maximum=None):
        return gradient_buffers(input, flow, metric, kind, output_mask)[0]

    backward, setup_context = autograd_formula(backward_op)
    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    if not fused_stable:
        return
    fused_name = f"{namespace}::{FUSED_STABLE}"

    @torch.library.register_fake(fused_name)
    def _(input, flow, metric, normalisation, cast=False):
        per_target = (input.shape[0], 1, *input.shape[2:])
        out = flow.new_empty(input.shape, dtype=input.dtype if cast else flow.dtype)
        return out, flow.new_empty(per_target), flow.new_empty(per_target)

    backward, setup_context = fused_stable_autograd_formula(backward_op)
    torch.library.register_autograd(fused_name, backward, setup_context=setup_context)


#: What the TorchScript-based ONNX exporter says at a softsplat op (softsplat.onnx exports with
#: the dynamo-based one).
LEGACY_MESSAGE = (
    "softsplat: the TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) cannot "
    "export {op}; export with torch.onnx.export(model, args, dynamo=True, "
    "custom_translation_table=softsplat.onnx.translations())"
)


def refuse_legacy_export(namespace: str, op_names) -> None:
    """Make the TorchScript-based exporter stop at a softsplat op with a message that names the
    way that works, instead of 'unrecognized namespace'."""
    from torch.onnx import register_custom_op_symbolic

    for name in op_names:
        qualified = f"{namespace}::{name}"

        def refuse(g, *args, _op=qualified):
            raise torch.onnx.errors.OnnxExporterError(LEGACY_MESSAGE.format(op=_op))

        register_custom_op_symbolic(qualified, refuse, 9)
