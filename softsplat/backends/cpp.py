"""Backend ``cpp``: fused C++ kernels (CPU; CUDA where torch has CUDA and a toolkit), registered as
``torch.ops.softsplat`` ops: a wheel's prebuilt libraries where they can be used (prebuilt.py),
else built with ``torch.utils.cpp_extension`` on first use. ``SOFTSPLAT_PREBUILT=0`` builds even
where a wheel's libraries could be used.

CPU: bitwise reproducible run to run (see ``csrc/cpu/schedule.h``). CUDA: atomics in the forward,
so not deterministic, but under ``torch.use_deterministic_algorithms(True)`` the ordered forward
(``cuda/kernels.cuh``) is; the backward is a gather and is deterministic either way.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import torch

from . import build_flags, prebuilt
from .extension import OpLibrary, compiler_reason
from .ops import OpsBackend

#: Set to 0 to build the kernels on first use even where prebuilt libraries could be used.
PREBUILT_ENV = "SOFTSPLAT_PREBUILT"


def _prebuilt_refused() -> bool:
    """Whether SOFTSPLAT_PREBUILT=0 asks for the first-use build."""
    return os.environ.get(PREBUILT_ENV, "").strip() == "0"


def _prebuilt_cpu(level: str):
    """The wheel's library of ``level`` when it is to be used, else None."""
    return None if _prebuilt_refused() else _prebuilt_cpu_library(level)


# Decided once per process: every call asks (devices()), and the decision hashes the sources.
@functools.cache
def _prebuilt_cpu_library(level: str):
    return prebuilt.cpu_library(level, torch.__version__)


@functools.cache
def _prebuilt_cuda():
    """The wheel's CUDA library, unless it has no code for a visible GPU (then not loaded: the
    cpp backend leaves CUDA to the next backend, and info says why)."""
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return prebuilt.cuda_library(torch.version.cuda, capabilities=capabilities)


def _cuda_reason() -> str | None:
    """Why the cpp backend has no CUDA kernels here, or None."""
    if _prebuilt_cpu(build_flags.chosen_level()) is not None:
        path, what = _prebuilt_cuda()
        if path is None:
            return f"{what} ({PREBUILT_ENV}=0 builds them here instead, with a CUDA toolkit)"
        return None if torch.cuda.is_available() else "torch has no CUDA device"
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (CUDA_HOME) to build the CUDA kernels"
    failure = _CUDA_FAILURE[0]
    if failure is None and not _CUDA_LOADED[0]:
        built = cuda_library()
        failure = None if built.is_built() else built.earlier_failure()
    if failure is not None:
        last = failure.strip().splitlines()[-1] if failure.strip() else "failed"
        return f"the CUDA kernels failed to build ({last}); the CPU kernels work; `softsplat build` tries again"
    return None


CPU_SOURCES = build_flags.CPU_SOURCES


_LIBRARIES: dict[str, OpLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()
#: This process's failure to build or load the first-use CUDA library, or None.
_CUDA_FAILURE: list[str | None] = [None]
#: Whether this process has loaded it.
_CUDA_LOADED = [False]


def library() -> OpLibrary:
    """The library of the CPU level chosen now (build_flags.chosen_level): one object per level
    and process, even when many threads ask at once (its lock makes the one build). A wheel's
    prebuilt libraries hold the CUDA kernels too; a first-use build makes them a library of
    their own (cuda_library), so that a failing CUDA build leaves the CPU kernels working."""
    level = build_flags.chosen_level()
    with _LIBRARIES_LOCK:
        if level not in _LIBRARIES:
            cpu = _prebuilt_cpu(level)
            cuda, _ = _prebuilt_cuda()
            # The CUDA library loads wherever torch is a CUDA build of its major, with or without a GPU.
            libraries = None if cpu is None else [cpu] + ([cuda] if cuda is not None else [])
            _LIBRARIES[level] = OpLibrary("softsplat", CPU_SOURCES, fused_stable=True, level=level, prebuilt=libraries)
        return _LIBRARIES[level]


def gpu_architectures() -> list[str]:
    """The compute capabilities of the visible GPUs ("90"), each once: what a first-use build
    compiles the CUDA kernels for, and part of its cache key (an H100's build never serves an
    A100 through a shared cache)."""
    return sorted({f"{major}{minor}" for major, minor in
                   (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))})


def cuda_library() -> OpLibrary:
    """The first-use build of the CUDA kernels, for the visible GPUs' architectures (nvcc's
    -gencode flags, which are in the library's name): loaded after the CPU library, whose ops
    it implements for CUDA."""
    architectures = gpu_architectures() if torch.cuda.is_available() else []
    key = "cuda:" + ",".join(architectures)
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in architectures]
            _LIBRARIES[key] = OpLibrary("softsplat", ["cuda/ops.cu"], cuda_cflags=build_flags.CUDA_FLAGS + gencode,
                                        cuda_only=True)
        return _LIBRARIES[key]


def _load_cuda() -> None:
    """Build (or find built) and load the first-use CUDA library; a failure is remembered, here
    and on disk, and takes only CUDA out of the backend's devices."""
    if _CUDA_LOADED[0] or _cuda_reason() is not None or _prebuilt_cpu(build_flags.chosen_level()) is not None:
        return  # loaded, not to be built here, or a wheel's (loaded with the CPU library)
    try:
        cuda_library().ops()
        _CUDA_LOADED[0] = True
    except Exception as error:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        _CUDA_FAILURE[0] = "\n".join(lines[-12:]) or type(error).__name__
        warnings.warn("softsplat: the cpp backend's CUDA kernels failed to build or load; its CPU kernels work, "
                      "CUDA calls go to the next backend ('auto'). `softsplat build` tries again:\n    "
                      + "\n    ".join(lines[-12:]), RuntimeWarning, stacklevel=3)


def _library_or_error() -> tuple[OpLibrary | None, str | None]:
    """``(library(), None)``, or ``(None, why)`` when SOFTSPLAT_CPU_LEVEL names a level this CPU
    cannot run (what ``info`` shows; ``prepare`` raises it)."""
    try:
        return library(), None
    except ValueError as error:
        return None, str(error)


class CppBackend(OpsBackend):
    name = "cpp"
    deterministic_on = ("cpu",)
    deterministic_when_asked_on = ("cuda",)  # the ordered forward of cuda/kernels.cuh
    ordered_forward_on = ("cuda",)
    flushes_subnormals_on = ("cuda",)
    fused_stable_on = ("cpu",)
    fix_hint = (
        "install a working C++ compiler (g++ or clang++, or set CXX to one) and ninja, then run "
        "`softsplat build`, which tries again and prints the compiler's output"
    )

    def known_failure(self) -> str | None:
        built, level_error = _library_or_error()
        if level_error is not None:
            return level_error
        earlier = built.earlier_failure()
        if self.failure is None and earlier is not None:
            return "an earlier build failed: " + earlier.strip().splitlines()[-1] + "; `softsplat build` tries again"
        return self.failure

    def forget_failure(self) -> None:
        built, _ = _library_or_error()
        if built is not None:  # else nothing was built; prepare() raises the level's error
            built.forget_failure()
        if torch.cuda.is_available():
            cuda_library().forget_failure()
        _CUDA_FAILURE[0] = None
        _CUDA_LOADED[0] = False
        self.failure = None

    @property
    def summary(self) -> str:
        built, level_error = _library_or_error()
        if level_error is not None:
            return level_error
        cuda = _cuda_reason()
        if built.prebuilt is not None:
            oldest = ".".join(map(str, build_flags.OLDEST_TORCH))
            state = f"prebuilt, torch >= {oldest} stable ABI"
            path, cuda_state = _prebuilt_cuda()
            if path is not None and not torch.cuda.is_available():
                cuda_state += " (unused: torch has no CUDA device)"
        else:
            state = "built" if built.is_built() else "builds on first use"
            if cuda:
                cuda_state = f"not built, {cuda}"
            else:
                targets = ", ".join(f"sm_{a}" for a in gpu_architectures())
                cuda_state = f"built for {targets}" if cuda_library().is_built() else f"build on first use, for {targets}"
            found = prebuilt.manifest()
            if found is not None:  # a wheel's libraries that cannot be used here: say why
                why = prebuilt.unusable_reason(found, torch.__version__) or (
                    f"{PREBUILT_ENV}=0" if _prebuilt_refused()
                    else f"none for CPU level {built.level}")
                state += f"; the wheel's prebuilt libraries are not used: {why}"
        supported = ", ".join(build_flags.supported_levels())
        return (f"fused C++ kernels ({state}); CPU level {built.level} (this CPU runs {supported}; "
                f"{build_flags.LEVEL_ENV} chooses); CUDA kernels: {cuda_state}")

    def devices(self) -> tuple[str, ...]:
        return ("cpu",) if _cuda_reason() else ("cpu", "cuda")

    def runs_on(self, device_type: str) -> bool:
        # Every call asks: a CPU call need not ask about CUDA.
        return device_type == "cpu" or device_type in self.devices()

    def _unavailable_reason(self) -> str | None:
        built, _ = _library_or_error()
        if built is not None and built.prebuilt is not None:
            return None  # nothing to compile
        return compiler_reason()

    def load_ops(self):
        ops = library().ops()
        _load_cuda()
        return ops
