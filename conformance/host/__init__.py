"""Backends that run the GPU code on the CPU, so that a machine without a GPU executes it under
the test suite. They are no part of softsplat: the test suite's conftest.py registers them
(``register``), ``auto`` never picks them, and neither they nor their sources are in the wheel.

``cuda-host``: the cpp backend's CUDA kernels and their C++ launchers (softsplat's
csrc/cuda/launch.h), compiled by g++ from the same source through a host shim (shim.h) and run
on CPU tensors (cuda_host.cpp).

``cupy-host``: the cupy backend's own Python side (softsplat/backends/cupy.py: buffers,
index type, the kernel arguments it converts, their order and types, the grid) with each launch
handed to the same kernels compiled for the host (cupy_host.cpp) instead of to CuPy: the
arguments reach the kernels as CUDA's launch API passes them, so a swapped or mistyped argument
computes something else here as it would on a GPU.

Both libraries are built on first use, as the cpp backend's are (softsplat's OpLibrary), from
the sources here and softsplat's headers.
"""

from __future__ import annotations

import ctypes
import pathlib
import threading

import torch

from softsplat import backends
from softsplat.backends import cupy as cupy_backend
from softsplat.backends.extension import CSRC, OpLibrary, compiler_reason
from softsplat.backends.ops import OpsBackend

#: The host libraries' own sources (shim.h, cuda_host.cpp, cupy_host.cpp).
HERE = pathlib.Path(__file__).resolve().parent

#: The device's integer arithmetic wraps on overflow (PTX add.s32): so does the host build's,
#: rather than being undefined (which lets g++ compute a loop's trip count as if it never wrapped).
HOST_FLAGS = ["-fwrapv"]

_LOCK = threading.RLock()
_LIBRARIES: dict[str, object] = {}  # "ops", "kernels", "launch": each made once, under the lock


def library() -> OpLibrary:
    """The cuda-host op library (one object per process, whichever thread asks first)."""
    with _LOCK:
        if "ops" not in _LIBRARIES:
            _LIBRARIES["ops"] = OpLibrary("softsplat_cuda_host", ["cuda_host.cpp"], cflags=HOST_FLAGS, root=HERE,
                                          includes=(CSRC,))
        return _LIBRARIES["ops"]


class KernelLibrary(OpLibrary):
    """cupy_host.cpp: plain C entry points, no ops (loaded, then opened with ctypes)."""

    def _register(self) -> None:
        pass

    def launcher(self):
        self.ops()  # builds and loads it once
        function = ctypes.CDLL(str(self.library_path())).softsplat_host_launch
        function.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        function.restype = ctypes.c_int
        return function


def kernel_library() -> KernelLibrary:
    with _LOCK:
        if "kernels" not in _LIBRARIES:
            _LIBRARIES["kernels"] = KernelLibrary("softsplat_cupy_host", ["cupy_host.cpp"], cflags=HOST_FLAGS, root=HERE,
                                                  includes=(CSRC,))
        return _LIBRARIES["kernels"]


#: numpy scalar type of a converted argument -> the ctypes type holding the same bytes.
_CTYPES = {"uint64": ctypes.c_uint64, "int64": ctypes.c_int64, "int32": ctypes.c_int32}


def host_launch(device: torch.device, dtype: torch.dtype, kernel: str, index: str, total: int, *args) -> None:
    """The cupy backend's launch, made on the CPU: the same converted arguments, as pointers to
    their values (cuLaunchKernel's kernelParams), to the kernel of the same name expression."""
    values = [_CTYPES[value.dtype.name](value.item()) for value in cupy_backend.kernel_arguments(index, args)]
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
    name = cupy_backend.kernel_names(dtype)[kernel, index]
    if _launcher()(name.encode(), cupy_backend.blocks_for(total), cupy_backend.THREADS, pointers) != 0:
        raise RuntimeError(f"cupy-host: no host kernel named {name!r}")


def _launcher():
    with _LOCK:
        if "launch" not in _LIBRARIES:
            _LIBRARIES["launch"] = kernel_library().launcher()
        return _LIBRARIES["launch"]


class _HostBackend(OpsBackend):
    """GPU code run on CPU tensors: atomics (not deterministic) with the device's arithmetic, and
    the ordered forward under ``torch.use_deterministic_algorithms(True)``, as on a GPU."""

    deterministic_on = ()  # atomics in the forward, as on a GPU
    deterministic_when_asked_on = ("cpu",)  # the ordered forward
    ordered_forward_on = ("cpu",)
    flushes_subnormals_on = ("cpu",)  # the host shim computes what the device does

    def devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def _unavailable_reason(self) -> str | None:
        return compiler_reason()


class CudaHostBackend(_HostBackend):
    name = "cuda-host"
    summary = "test suite: the CUDA kernels (cuda/kernels.cuh) run on the CPU through a host shim"

    def load_ops(self):
        return library().ops()


class CupyHostBackend(_HostBackend):
    name = "cupy-host"
    summary = "test suite: the cupy backend's launches made on the CPU, to the same kernels compiled for the host"

    def load_ops(self):
        _launcher()  # builds the kernels now, not inside the first op call
        return cupy_backend.define_ops("softsplat_cupy_host", "cpu", host_launch)


def _shim_function(name: str, symbol: str):
    """shim.h's C function `symbol` in backend ``name``'s host library (built and loaded once)."""
    built = library() if name == "cuda-host" else kernel_library()
    built.ops()
    function = getattr(ctypes.CDLL(str(built.library_path())), symbol)
    function.restype = None
    return function


class ThreadProbe:
    """The longest and the total run of one GPU thread (ns) of the launches made inside a
    ``with`` block by backend ``name``'s host library (shim.h's thread probe)."""

    def __init__(self, name: str) -> None:
        self._probe = _shim_function(name, "softsplat_host_thread_probe")
        self.longest = self.total = 0

    def _read(self, on: bool) -> tuple[int, int]:
        longest, total = ctypes.c_longlong(), ctypes.c_longlong()
        self._probe(ctypes.c_int(on), ctypes.byref(longest), ctypes.byref(total))
        return longest.value, total.value

    def __enter__(self) -> ThreadProbe:
        self._read(True)
        return self

    def __exit__(self, *exc) -> None:
        self.longest, self.total = self._read(False)


class WorkCounter:
    """The launches, atomic adds and atomic maxima/minima that the kernels of backend ``name``'s
    host library issue inside a ``with`` block, and the most atomic adds one GPU thread issued
    (``busiest``; shim.h's work counter): what the device code does per call and per thread,
    counted where it runs on the CPU."""

    def __init__(self, name: str) -> None:
        self._counts = _shim_function(name, "softsplat_host_work_counts")
        self.launches = self.adds = self.maxima = self.busiest = 0

    def _read(self, on: bool) -> tuple[int, int, int, int]:
        values = [ctypes.c_longlong() for _ in range(4)]
        self._counts(ctypes.c_int(on), *(ctypes.byref(v) for v in values))
        return tuple(v.value for v in values)

    def __enter__(self) -> WorkCounter:
        self._read(True)
        return self

    def __exit__(self, *exc) -> None:
        self.launches, self.adds, self.maxima, self.busiest = self._read(False)


#: The backends this package adds, by name.
BACKENDS = (CudaHostBackend, CupyHostBackend)


def register() -> None:
    """Add the host backends to softsplat's registry (the test suite's conftest.py does, once)."""
    for backend in BACKENDS:
        if backend.name not in backends.names():
            backends.register(backend())
