"""Backend ``cupy``: the cpp backend's CUDA kernels (``csrc/cuda/kernels.cuh``, one source of
truth) compiled by NVRTC (``compile_program``), loaded and launched through CuPy on torch's
tensors in place.

Unlike the reference implementation: one compilation per (device, dtype), never per shape
(sizes and strides are kernel arguments); launches go to the input's device and to torch's
current stream on it (no state keyed on the first device used); tensors are handed over as raw
pointers, without copies. Autograd through ``torch.library.custom_op`` ops with the shared fake
and autograd registration. CuPy is imported on first use only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import threading

import torch

from ..modes import Kind, Normalisation
from .extension import CSRC
from .ops import (
    OpsBackend,
    cast_result,
    forward_buffers,
    forward_lanes,
    gradient_buffers,
    per_pixel_strides,
    prepared_gradients,
    register_python_side,
)

#: What the backend hands to NVRTC: the shared kernel header and its fp16/bf16 types (the
#: headers are read from csrc/ at each compile, once per process, device and dtype).
KERNEL_SOURCE = '#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include "cuda/kernels.cuh"\n'
SCALAR_TYPES = {
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.float32: "float",
    torch.float64: "double",
}
INT32_MAX = 2**31 - 1
THREADS = 256
MAX_BLOCKS = 1 << 20  # blocks of a launch at most; grid-stride loops cover the rest
CHANNEL_BLOCK = 8  # channels a thread of splat_gather_kernel sums (kSplatChannelBlock)
NORMALISE_CHANNELS = 8  # channels a thread of splat_finish_kernel writes (kNormaliseChannels)
FORWARD_LANES = 16  # accumulator lanes a thread of splat_forward_kernel adds (kForwardLanes)


def kernel_names(dtype: torch.dtype) -> dict[tuple[str, str], str]:
    """NVRTC name expressions of every kernel instantiation for input ``dtype``, by
    (kernel, index type)."""
    scalar = SCALAR_TYPES[dtype]
    acc = "double" if dtype == torch.float64 else "float"
    names = {}
    for index in ("int", "long long"):
        names["forward", index] = f"softsplat::splat_forward_kernel<{scalar}, {acc}, {index}>"
        names["finish", index] = f"softsplat::splat_finish_kernel<{acc}, {acc}, {index}>"
        if scalar != acc:  # into input's 16-bit dtype
            names["finish_cast", index] = f"softsplat::splat_finish_kernel<{scalar}, {acc}, {index}>"
            names["cast", index] = f"softsplat::splat_normalise_kernel<{scalar}, {acc}, {index}>"  # the ordered one's
        names["maximum", index] = f"softsplat::splat_maximum_kernel<{acc}, {index}>"
        # the ordered forward (deterministic)
        names["key", index] = f"softsplat::splat_key_kernel<{acc}, {index}>"
        names["ends", index] = f"softsplat::splat_ends_kernel<{index}>"
        names["weigh", index] = f"softsplat::splat_weigh_kernel<{acc}, {index}>"
        names["gather", index] = f"softsplat::splat_gather_kernel<{scalar}, {acc}, {index}>"
        names["prepare", index] = f"softsplat::splat_backward_prepare_kernel<{acc}, {index}>"
        names["backward", index] = f"softsplat::splat_backward_kernel<{scalar}, {acc}, {index}>"
    return names


#: Where the CUDA runtime's pip wheels put cuda_fp16.h, under the ``nvidia`` namespace package:
#: CUDA 12's nvidia-cuda-runtime-cu12 and CUDA 13's nvidia-cuda-runtime (one ``cu13`` tree).
WHEEL_INCLUDES = {12: ("cuda_runtime", "include"), 13: ("cu13", "include")}


def cuda_include(major: int | None = None) -> str | None:
    """A directory with cuda_fp16.h: a CUDA runtime wheel's (the one for CUDA ``major``, else
    the NVRTC's own major first, then any), or CUDA_PATH's / CUDA_HOME's toolkit."""
    if major is None:
        major = nvrtc_major()
    order = sorted(WHEEL_INCLUDES, key=lambda m: m != major)
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for wheel in order:
        for root in roots:
            candidate = pathlib.Path(root).joinpath(*WHEEL_INCLUDES[wheel])
            if (candidate / "cuda_fp16.h").exists():
                return str(candidate)
    for variable in ("CUDA_PATH", "CUDA_HOME"):
        candidate = pathlib.Path(os.environ.get(variable, "/nonexistent")) / "include"
        if (candidate / "cuda_fp16.h").exists():
            return str(candidate)
    return None


def nvrtc_major() -> int | None:
    """The major version of the NVRTC CuPy loads, or None where none loads."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        return int(nvrtc.getVersion()[0])
    except Exception:  # no CuPy, or no libnvrtc: any of several errors
        return None


def nvrtc_options(include: str | None = None) -> tuple[str, ...]:
    """NVRTC's options: C++17, csrc/ and the CUDA headers on the include path, no FMA
    contraction and no flushing of subnormals (docs/spec.md, floating point)."""
    include = include or cuda_include()
    return ("-std=c++17", "--fmad=false", "-ftz=false", f"-I{CSRC}") + ((f"-I{include}",) if include else ())


def compile_program(dtype: torch.dtype, arch: int, ptx: bool = False) -> tuple[bytes, dict[str, str]]:
    """Every kernel for input ``dtype`` compiled by NVRTC for compute capability ``arch`` (90):
    a cubin (PTX for the newest architecture this NVRTC knows when it does not know ``arch``, or
    when ``ptx``) and each kernel's lowered name by its name expression. NVRTC is called
    directly: ``cupy.RawModule``'s compile appends ``-ftz=true`` to every program (a later
    option cannot undo it), so every float32 instruction, floor included, would flush
    subnormals."""
    from cupy_backends.cuda.libs import nvrtc

    known = tuple(nvrtc.getSupportedArchs())
    machine = arch in known and not ptx
    target = f"--gpu-architecture={'sm' if machine else 'compute'}_{arch if arch in known else max(known)}"
    names = list(kernel_names(dtype).values())
    program = nvrtc.createProgram(KERNEL_SOURCE, "softsplat_kernels.cu", (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, (*nvrtc_options(), target))
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC could not compile the kernels ({target}): {error}\n"
                               f"{nvrtc.getProgramLog(program)}") from None
        binary = nvrtc.getCUBIN(program) if machine else nvrtc.getPTX(program)
        return binary, {name: nvrtc.getLoweredName(program, name) for name in names}
    finally:
        nvrtc.destroyProgram(program)


class Program:
    """The kernels of one (device, dtype), loaded into the current device's context."""

    def __init__(self, binary: bytes, lowered: dict[str, str]):
        import cupy

        self.module = cupy.cuda.function.Module()
        self.module.load(binary)
        self.lowered = lowered

    def get_function(self, name_expression: str):
        return self.module.get_function(self.lowered[name_expression])


def load_program(device_index: int, dtype: torch.dtype) -> Program:
    """Compile and load the kernels for the device's compute capability (inside its context)."""
    import cupy

    return Program(*compile_program(dtype, int(cupy.cuda.Device(device_index).compute_capability)))


_modules: dict[tuple[int, torch.dtype], object] = {}
_modules_lock = threading.Lock()


def module_for(device_index: int, dtype: torch.dtype):
    """The compiled module of every kernel for ``dtype`` on device ``device_index``: built once
    per (device, dtype) and cached. Its key holds no size: shapes never recompile."""
    key = (device_index, dtype)
    with _modules_lock:
        if key not in _modules:
            _modules[key] = load_program(device_index, dtype)
        return _modules[key]


def _fits_int32(tensors, largest_product: int) -> bool:
    """As cuda/launch.h: 32-bit indexing only when every product of sizes the kernels
    form (plus the grid-stride step), every element count and every element offset stays below
    2^31 - 1."""
    # A grid-stride index steps up to the grid's size past the last element: it must fit too.
    if largest_product + MAX_BLOCKS * THREADS >= INT32_MAX:
        return False
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
        if max(extent, t.numel()) >= INT32_MAX:
            return False
    return True


def ordered_scratch(device: torch.device, pixels: int, index_dtype: torch.dtype, compute: torch.dtype,
                    with_weight: bool) -> tuple:
    """The ordered forward's scratch, as cuda/launch.h carves it: one byte buffer (one allocation,
    and in torch's deterministic mode one fill) holding, per tap, its key (then its offset), its
    sorted key, its int64 sort index, b and (but for sum) w, and per target its end."""
    taps = 4 * pixels
    parts = [(taps, index_dtype), (taps, index_dtype), (taps, torch.int64), (pixels, index_dtype), (taps, compute)]
    parts += [(taps, compute)] if with_weight else []
    sizes = [-(-count * dtype.itemsize // 16) * 16 for count, dtype in parts]
    scratch = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    views, at = [], 0
    for (count, dtype), size in zip(parts, sizes):
        views.append(scratch[at:at + count * dtype.itemsize].view(dtype))
        at += size
    return (*views, None) if not with_weight else tuple(views)


def sort_keys(keys: torch.Tensor, sorted_keys: torch.Tensor, order: torch.Tensor) -> None:
    """``keys`` sorted into ``sorted_keys`` stably (equal keys keep their order), the index of
    each into ``order``: deterministic, as a stable sort's result is unique."""
    torch.sort(keys, stable=True, out=(sorted_keys, order))


def _current_stream(device_index: int) -> int:
    """torch's current stream on the device, as a raw handle."""
    return torch.cuda.current_stream(device_index).cuda_stream


def kernel_arguments(index: str, args) -> list:
    """The kernel arguments as the launch passes them (numpy scalars of the kernel's parameter
    types): tensors as raw pointers (zero copy), ``("index", v)`` in the kernel's index type,
    ``("int", v)`` as int, anything else (strides) as long long."""
    import numpy as np

    index_type = np.int32 if index == "int" else np.int64
    converted = []
    for value in args:
        if isinstance(value, torch.Tensor):
            converted.append(np.uint64(value.data_ptr()))
        elif value is None:
            converted.append(np.uint64(0))
        elif isinstance(value, tuple) and value[0] == "index":
            converted.append(index_type(value[1]))
        elif isinstance(value, tuple) and value[0] == "int":
            converted.append(np.int32(value[1]))
        else:
            converted.append(np.int64(value))  # strides: long long
    return converted


def blocks_for(total: int) -> int:
    """The grid of a launch over ``total`` items (grid-stride loops cover the rest)."""
    return max(1, min((total + THREADS - 1) // THREADS, MAX_BLOCKS))


def cuda_launch(device: torch.device, dtype: torch.dtype, kernel: str, index: str, total: int, *args) -> None:
    """Launch ``kernel`` on ``device`` and torch's current stream there."""
    import cupy

    converted = kernel_arguments(index, args)
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(device_index):
        function = module_for(device_index, dtype).get_function(kernel_names(dtype)[kernel, index])
        stream = cupy.cuda.ExternalStream(_current_stream(device_index), device_index)
        function((blocks_for(total),), (THREADS,), tuple(converted), stream=stream)


def _source_arguments(input, flow, metric) -> tuple:
    """The leading kernel arguments of the forward and backward kernels: input, flow and
    metric with their strides."""
    return (input, *input.stride(), flow, *flow.stride(), metric, *per_pixel_strides(metric))


class Impls:
    """The ops' implementations (buffers, index type, kernel arguments, grid), each launch made
    by ``launch(device, dtype, kernel, index, total, *args)``: ``cuda_launch`` for the backend.
    Another launcher gets the very arguments a GPU would (the test suite's conformance/host
    hands them to the kernels compiled for the CPU)."""

    def __init__(self, launch) -> None:
        self.launch = launch

    def maximum(self, flow: torch.Tensor, metric: torch.Tensor, kind: int = int(Kind.STABLE)) -> torch.Tensor:
        N, _, H, W = flow.shape
        maximum = torch.full((N, 1, H, W), float("-inf"), dtype=flow.dtype, device=flow.device)
        if N * H * W == 0:
            return maximum
        index = "int" if _fits_int32((flow, metric, maximum), N * H * W) else "long long"
        dtype = torch.float64 if flow.dtype == torch.float64 else torch.float32
        self.launch(flow.device, dtype, "maximum", index, N * H * W, flow, *flow.stride(), metric,
                    *per_pixel_strides(metric), *(("index", v) for v in (N, H, W)), ("int", kind), maximum)
        return maximum

    def forward(
        self,
        input: torch.Tensor,
        flow: torch.Tensor,
        metric: torch.Tensor | None,
        kind: int,
        normalisation: int,
        maximum: torch.Tensor | None = None,
        deterministic: bool = False,
        cast: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = input.shape
        narrow = cast and input.dtype != flow.dtype
        metric = metric if kind >= Kind.LINEAR else None
        sizes = tuple(("index", v) for v in (N, C, H, W))
        if deterministic:  # the ordered forward writes out and D; a 16-bit result is rounded after
            out, normaliser = forward_buffers(input, flow, kind, zeroed=False)
            result = cast_result(out, input, cast)
            if N * H * W == 0:
                return result, normaliser
            index = "int" if _fits_int32((input, flow, metric, out), max(N * (C + 1) * H * W, 4 * N * H * W)) else "long long"
            self.ordered_forward(input, flow, metric, kind, normalisation, maximum, index, out, normaliser)
            if narrow and C:
                self.launch(input.device, input.dtype, "cast", index, N * -(-C // NORMALISE_CHANNELS) * H * W,
                            out, None, result, *sizes, ("int", normalisation))
            return result, normaliser
        # The atomic forward adds into a zeroed accumulator of `lanes` values per target, then
        # one pass writes the result (divided, rounded) and D from it (cuda/launch.h).
        lanes = forward_lanes(C, kind)
        sums = torch.zeros((N, H, W, lanes), dtype=flow.dtype, device=input.device)
        result = torch.empty((N, C, H, W), dtype=input.dtype if narrow else flow.dtype, device=input.device)
        normaliser = torch.empty((N, 1, H, W) if kind != Kind.SUM else (0,), dtype=flow.dtype, device=input.device)
        if N * H * W == 0:
            return result, normaliser
        index = "int" if _fits_int32((input, flow, metric, result, sums), N * max(C + 1, lanes) * H * W) else "long long"
        self.launch(
            input.device,
            input.dtype,
            "forward",
            index,
            N * -(-lanes // FORWARD_LANES) * H * W,
            *_source_arguments(input, flow, metric),
            *sizes,
            ("int", kind),
            maximum.contiguous() if kind in (Kind.STABLE, Kind.MAX) else None,
            sums,
        )
        divides = kind != Kind.SUM and normalisation != Normalisation.RAW  # raw: the numerator as it is
        self.launch(
            input.device, input.dtype, "finish_cast" if narrow else "finish", index,
            N * max(1, -(-C // NORMALISE_CHANNELS)) * H * W,
            sums, ("index", lanes), result, normaliser if kind != Kind.SUM else None, *sizes,
            ("int", normalisation), ("int", int(divides)),
        )
        return result, normaliser

    def ordered_forward(self, input, flow, metric, kind, normalisation, maximum, index, out, normaliser) -> None:
        """The ordered forward of cuda/kernels.cuh, as cuda/launch.h launches it: every target
        sums its contributions in the order of their source pixels (the same bits on every run),
        every step parallel over taps, targets or (target, channel block)."""
        N, C, H, W = input.shape
        pixels, taps = N * H * W, 4 * N * H * W
        index_dtype = torch.int32 if index == "int" else torch.int64
        keys, sorted_keys, order, ends, bilinear, weight = ordered_scratch(
            input.device, pixels, index_dtype, flow.dtype, kind != Kind.SUM)
        pixel_sizes = tuple(("index", v) for v in (N, H, W))
        launch = functools.partial(self.launch, input.device, input.dtype)
        launch("key", index, pixels, flow, *flow.stride(), *pixel_sizes, keys)
        sort_keys(keys, sorted_keys, order)
        launch("ends", index, pixels, sorted_keys, ("index", taps), ("index", pixels), ends)
        launch("weigh", index, taps, input.stride(0), input.stride(2), input.stride(3), flow, *flow.stride(),
               metric, *per_pixel_strides(metric), *pixel_sizes, ("int", kind),
               maximum.contiguous() if kind in (Kind.STABLE, Kind.MAX) else None, order, ends, keys, bilinear, weight)
        blocks = -(-C // CHANNEL_BLOCK) if C else 1
        launch("gather", index, N * blocks * H * W, input, input.stride(1), *(("index", v) for v in (N, C, H, W)),
               ("int", kind), ("int", normalisation), ends, keys, bilinear, weight,
               normaliser if kind != Kind.SUM else None, out)

    def backward(
        self,
        grad_out: torch.Tensor,
        grad_normaliser: torch.Tensor | None,
        input: torch.Tensor,
        flow: torch.Tensor,
        metric: torch.Tensor | None,
        out: torch.Tensor,
        normaliser: torch.Tensor,
        kind: int,
        normalisation: int,
        output_mask: list[bool],
        maximum: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, C, H, W = input.shape
        (grad_input, grad_flow, grad_metric), want_metric = gradient_buffers(input, flow, metric, kind, output_mask)
        if N * H * W == 0 or not (output_mask[0] or output_mask[1] or want_metric):
            return grad_input, grad_flow, grad_metric
        g = prepared_gradients(input, flow, kind)
        out, normaliser = out.contiguous(), normaliser.contiguous()
        metric = metric if kind >= Kind.LINEAR else None
        normalised = kind != Kind.SUM
        grad_normaliser = grad_normaliser if normalised and grad_normaliser is not None else None
        index = (
            "int"
            if _fits_int32((input, flow, metric, grad_out, grad_normaliser, out, g), N * (C + 1) * H * W)
            else "long long"
        )
        sizes = tuple(("index", v) for v in (N, C, H, W))
        self.launch(
            input.device,
            input.dtype,
            "prepare",
            index,
            N * H * W,
            grad_out,
            *grad_out.stride(),
            out if normalised else None,
            normaliser if normalised else None,
            grad_normaliser,
            *per_pixel_strides(grad_normaliser),
            *sizes,
            ("int", kind),
            ("int", normalisation),
            g,
        )
        self.launch(
            input.device,
            input.dtype,
            "backward",
            index,
            N * H * W,
            *_source_arguments(input, flow, metric),
            g,
            *sizes,
            ("int", kind),
            maximum.contiguous() if kind in (Kind.STABLE, Kind.MAX) else None,
            grad_input if output_mask[0] else None,
            grad_flow if output_mask[1] else None,
            grad_metric if want_metric else None,
        )
        return grad_input, grad_flow, grad_metric


@functools.cache
def define_ops(namespace: str = "softsplat_cupy", device_type: str = "cuda", launch=cuda_launch):
    """Define the ops (once per namespace) and their fake and autograd registrations, their
    launches made by ``launch`` (``Impls``)."""
    impls = Impls(launch)
    for name, impl in (("splat_forward", impls.forward), ("splat_backward", impls.backward), ("splat_maximum", impls.maximum)):
        torch.library.custom_op(f"{namespace}::{name}", impl, mutates_args=(), device_types=device_type)
    register_python_side(namespace)
    return getattr(torch.ops, namespace)


def installed_cupy_cuda() -> int | None:
    """The CUDA major version the installed CuPy wheel is built for (cupy-cuda12x: 12), or None
    (no CuPy, or a source build whose CUDA is whatever it was built against)."""
    import importlib.metadata
    import re

    for distribution in importlib.metadata.distributions():
        match = re.fullmatch(r"cupy-cuda(\d+)x", (distribution.metadata["Name"] or "").lower())
        if match:
            return int(match.group(1))
    return None


def cuda_mismatch(cupy_cuda: int | None, torch_cuda: str | None) -> str | None:
    """Why a CuPy for CUDA ``cupy_cuda`` cannot serve a torch built for ``torch_cuda``, or None."""
    if cupy_cuda is None or not torch_cuda:
        return None
    torch_major = int(torch_cuda.split(".")[0])
    if cupy_cuda == torch_major:
        return None
    return (f"the installed CuPy is built for CUDA {cupy_cuda}, torch for CUDA {torch_cuda}: install the CuPy of "
            f"torch's CUDA (pip uninstall cupy-cuda{cupy_cuda}x; pip install 'softsplat[cupy{torch_major}]')")


def cupy_extra() -> str:
    """The extra that installs the CuPy matching torch's CUDA (cupy13 for a CPU torch)."""
    major = (torch.version.cuda or "13").split(".")[0]
    return f"cupy{major}"


class CupyBackend(OpsBackend):
    name = "cupy"
    summary = "the CUDA kernels of cuda/kernels.cuh compiled by NVRTC, launched through CuPy, per device and dtype"
    deterministic_on = ()  # atomics in the forward
    deterministic_when_asked_on = ("cuda",)  # the ordered forward
    ordered_forward_on = ("cuda",)
    flushes_subnormals_on = ("cuda",)

    def devices(self) -> tuple[str, ...]:
        return ("cuda",)

    def _unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("cupy") is None:
            return f"CuPy is not installed (pip install 'softsplat[{cupy_extra()}]')"
        mismatch = cuda_mismatch(installed_cupy_cuda(), torch.version.cuda)
        if mismatch:
            return mismatch
        major = installed_cupy_cuda() or int((torch.version.cuda or "13").split(".")[0])
        wheels = "nvidia-cuda-nvrtc nvidia-cuda-runtime" if major >= 13 else f"nvidia-cuda-nvrtc-cu{major} nvidia-cuda-runtime-cu{major}"
        try:
            from cupy_backends.cuda.libs import nvrtc

            nvrtc.getVersion()
        except Exception as error:  # a missing libnvrtc shows up as any of several errors
            return f"NVRTC is not usable ({type(error).__name__}: {error}); pip install {wheels}"
        if cuda_include() is None:
            return (f"the CUDA headers NVRTC needs (cuda_fp16.h) are not found: pip install {wheels}, or set "
                    "CUDA_HOME to a CUDA toolkit")
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def load_ops(self):
        return define_ops()
