"""Backend ``triton``: fused Triton kernels (``triton_kernels.py``) as ``torch.library.custom_op``
ops with fake tensors and an autograd formula, so ``torch.compile(fullgraph=True)`` traces them
as single opaque calls (see ``_ops``). Triton is imported on first use only.

On CUDA devices it runs the compiled kernels. With ``TRITON_INTERPRET=1`` set before Triton is
imported, it runs them in Triton's interpreter on CPU tensors instead (how the test suite checks
it without a GPU), opcheck and torch.compile included.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from ..modes import Kind, Normalisation
from .ops import (
    OpsBackend,
    forward_lanes,
    gradient_buffers,
    per_pixel_strides,
    prepared_gradients,
    register_python_side,
)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block() -> int:
    """Pixels per program. Large in the interpreter: each program costs milliseconds there,
    whatever its size."""
    return 4096 if interpreted() else 256


def _acc(dtype: torch.dtype):
    from . import triton_kernels as k

    return k.tl.float64 if dtype == torch.float64 else k.tl.float32


#: Every launch: no contraction of a product and a sum into one FMA (docs/spec.md, floating point).
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def _on(device: torch.device):
    """The launch context of ``device``: Triton launches on the current CUDA device and its
    current stream, so the input's device is made current (a no-op on the CPU, in the
    interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(count: int, block: int | None = None) -> tuple[int]:
    """Programs of ``block`` (default ``_block()``) elements covering ``count``."""
    block = block or _block()
    return ((count + block - 1) // block,)


#: Accumulator lanes a program of the forward adds at once (its second grid axis takes the
#: blocks), and channels a program of the finishing pass writes at once.
FORWARD_CHANNELS = 16
#: Programs along the forward's second grid axis at most (CUDA's limit for it): a program then
#: takes every CHANNEL_PROGRAMS-th block.
CHANNEL_PROGRAMS = 65535


def _forward_block(channels: int, dtype: torch.dtype) -> int:
    """Pixels per forward program: its [pixels, lanes] tile at most 1024 values (512 in
    float64), so that a thread's share of the tile, its pointers and taps stay in registers
    (larger tiles spill, read from the SASS by tests/triton_aot.py)."""
    if interpreted():
        return _block()
    tile = 512 if dtype == torch.float64 else 1024
    return max(16, min(_block(), tile // channels))


def _channel_block(channels: int) -> int:
    """The forward's lanes (and the finishing pass's channels) per program: the count's power
    of two up to FORWARD_CHANNELS (a tile's side is a power of two; padding lanes are masked
    off)."""
    return min(FORWARD_CHANNELS, 1 << (max(channels, 1) - 1).bit_length())


def splat_maximum(flow: torch.Tensor, metric: torch.Tensor, kind: int = int(Kind.STABLE)) -> torch.Tensor:
    from torch.library import wrap_triton

    from . import triton_kernels as k

    N, _, H, W = flow.shape
    maximum = torch.full((N, 1, H, W), float("-inf"), dtype=flow.dtype, device=flow.device)
    if N * H * W == 0:
        return maximum
    with _on(flow.device):
        wrap_triton(k._splat_max_kernel)[_grid(N * H * W)](
            flow, *flow.stride(), metric, *per_pixel_strides(metric), maximum, N, H, W,
            KIND=kind, ACC=_acc(flow.dtype), BLOCK=_block(), **LAUNCH_OPTIONS,
        )
    return maximum


def splat_forward(
    input: torch.Tensor, flow: torch.Tensor, metric: torch.Tensor | None, kind: int, normalisation: int,
    maximum: torch.Tensor | None = None, deterministic: bool = False, cast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    from . import triton_kernels as k

    if deterministic:  # never asked by dispatch: the backend does not declare it (docs/spec.md, determinism)
        raise ValueError("deterministic: the triton kernels add with atomics and have no ordered forward "
                         "(expected False), got True; the cpp and cupy backends have one on CUDA")
    N, C, H, W = input.shape
    # The forward adds into a zeroed accumulator of `lanes` values per target; the finishing
    # pass writes the result (divided, in a 16-bit input's dtype with `cast`) and D from it.
    lanes = forward_lanes(C, kind)
    accumulator = torch.zeros((N, H, W, lanes), dtype=flow.dtype, device=input.device)
    result = torch.empty((N, C, H, W), dtype=input.dtype if cast else flow.dtype, device=input.device)
    normalised = kind != Kind.SUM
    normaliser = torch.empty((N, 1, H, W) if normalised else (0,), dtype=flow.dtype, device=input.device)
    pixels = N * H * W
    if pixels == 0:
        return result, normaliser
    metric_arg = metric if metric is not None else flow  # never read below Kind.LINEAR
    maximum_arg = maximum.contiguous() if kind in (Kind.STABLE, Kind.MAX) else flow  # read only then
    with _on(input.device):
        channels = _channel_block(lanes)
        block = _forward_block(channels, flow.dtype)
        blocks = min(CHANNEL_PROGRAMS, max(1, -(-lanes // channels)))
        wrap_triton(k._splat_fwd_kernel)[_grid(pixels, block) + (blocks,)](
            input, *input.stride(), flow, *flow.stride(), metric_arg, *per_pixel_strides(metric),
            maximum_arg, accumulator, N, C, H, W, lanes,
            KIND=kind, ACC=_acc(flow.dtype), BLOCK=block, CHANNELS=channels, **LAUNCH_OPTIONS,
        )
        divides = normalised and normalisation != Normalisation.RAW  # raw: the numerator as it is
        channels = _channel_block(C)
        block = _forward_block(channels, flow.dtype)
        blocks = min(CHANNEL_PROGRAMS, max(1, -(-C // channels)))
        wrap_triton(k._splat_finish_kernel)[_grid(pixels, block) + (blocks,)](
            accumulator, result, normaliser if normalised else accumulator, N, C, H, W, lanes, NORM=normalisation,
            DIVIDE=divides, HAS_NORM=normalised, BLOCK=block, CHANNELS=channels, **LAUNCH_OPTIONS,
        )
    return result, normaliser


def splat_backward(
    grad_out: torch.Tensor, grad_normaliser: torch.Tensor | None, input: torch.Tensor, flow: torch.Tensor,
    metric: torch.Tensor | None, out: torch.Tensor, normaliser: torch.Tensor, kind: int, normalisation: int,
    output_mask: list[bool], maximum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    from . import triton_kernels as k

    N, C, H, W = input.shape
    (grad_input, grad_flow, grad_metric), want_metric = gradient_buffers(input, flow, metric, kind, output_mask)
    pixels = N * H * W
    if pixels == 0 or not (output_mask[0] or output_mask[1] or want_metric):
        return grad_input, grad_flow, grad_metric
    normalised = kind != Kind.SUM
    g = prepared_gradients(input, flow, kind)
    has_gnorm = grad_normaliser is not None and normalised
    out = out.contiguous()
    with _on(input.device):
        wrap_triton(k._splat_bwd_prepare_kernel)[_grid(pixels)](
            grad_out, *grad_out.stride(), out, normaliser.contiguous() if normalised else out,
            grad_normaliser if has_gnorm else g, *per_pixel_strides(grad_normaliser if has_gnorm else None), g,
            N, C, H, W, KIND=kind, NORM=normalisation, HAS_GNORM=has_gnorm, ACC=_acc(flow.dtype), BLOCK=_block(),
            **LAUNCH_OPTIONS,
        )
        wrap_triton(k._splat_bwd_kernel)[_grid(pixels)](
            input, *input.stride(), flow, *flow.stride(), metric if metric is not None else flow,
            *per_pixel_strides(metric), g, maximum.contiguous() if kind in (Kind.STABLE, Kind.MAX) else g,
            grad_input if output_mask[0] else g, grad_flow if output_mask[1] else g,
            grad_metric if want_metric else g, N, C, H, W,
            KIND=kind, WANT_INPUT=bool(output_mask[0]), WANT_FLOW=bool(output_mask[1]),
            WANT_METRIC=want_metric, ACC=_acc(flow.dtype), BLOCK=_block(), **LAUNCH_OPTIONS,
        )
    return grad_input, grad_flow, grad_metric


@functools.cache
def _ops():
    """Define the ``softsplat_triton`` ops (once): the functions above as ``custom_op``s, opaque
    to torch.compile. Inductor compiles a kernel it sees through (``triton_op``) with options of
    its own: it drops LAUNCH_OPTIONS (so FMAs are contracted and libdevice flushes subnormals,
    against docs/spec.md) and turns every integer argument equal to 1 into a constant. Opaque,
    each launch goes through Triton's own launcher with LAUNCH_OPTIONS, compiled or not."""
    for name, impl in (("splat_forward", splat_forward), ("splat_backward", splat_backward),
                       ("splat_maximum", splat_maximum)):
        torch.library.custom_op(f"softsplat_triton::{name}", impl, mutates_args=())
    register_python_side("softsplat_triton")
    return torch.ops.softsplat_triton


class TritonBackend(OpsBackend):
    name = "triton"
    summary = "fused Triton kernels (custom_op), atomics in the forward, gather backward"
    deterministic_on = ()
    flushes_subnormals_on = ("cuda",)  # compiled; the interpreter keeps subnormals

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
