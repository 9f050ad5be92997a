"""Backend ``cpp``: fused C++ kernels (CPU; CUDA where torch has CUDA and a toolkit), built with
``torch.utils.cpp_extension`` on first use and registered as ``torch.ops.softsplat`` ops.

CPU: bitwise reproducible run to run (see ``csrc/cpu/schedule.h``). CUDA: atomics in the forward,
so not deterministic; the backward is a gather and is.
"""

from __future__ import annotations

import threading

import torch

from . import build_flags
from .extension import OpLibrary, compiler_reason
from .ops import OpsBackend


def _cuda_reason() -> str | None:
    """Why the CUDA kernels are not built into the library here, or None."""
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (CUDA_HOME) to build the CUDA kernels"
    return None


#: The library's device-neutral op definitions and the CPU kernels, one translation unit per
#: concept (compiled in parallel by ninja); paths under ``csrc/``.
CPU_SOURCES = [
    "library.cpp", "cpu/ops.cpp", "cpu/forward.cpp", "cpu/backward.cpp", "cpu/maximum.cpp", "cpu/schedule.cpp",
]


_LIBRARIES: dict[str, OpLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()


def library() -> OpLibrary:
    """The library of the CPU level chosen now (build_flags.chosen_level): one object per level
    and process, even when many threads ask at once (its lock makes the one build)."""
    level = build_flags.chosen_level()
    with _LIBRARIES_LOCK:
        if level not in _LIBRARIES:
            sources = CPU_SOURCES + ([] if _cuda_reason() else ["splat_cuda.cu"])
            _LIBRARIES[level] = OpLibrary("softsplat", sources, cuda_cflags=["-O3", "--fmad=false"], fused_stable=True,
                                          level=level)
        return _LIBRARIES[level]


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
        self.failure = None

    @property
    def summary(self) -> str:
        built, level_error = _library_or_error()
        if level_error is not None:
            return level_error
        cuda = _cuda_reason()
        state = "built" if built.is_built() else "builds on first use"
        supported = ", ".join(build_flags.supported_levels())
        return (f"fused C++ kernels ({state}); CPU level {built.level} (this CPU runs {supported}; "
                f"{build_flags.LEVEL_ENV} chooses); CUDA kernels: " + (f"not built, {cuda}" if cuda else "built"))

    def devices(self) -> tuple[str, ...]:
        return ("cpu",) if _cuda_reason() else ("cpu", "cuda")

    def _unavailable_reason(self) -> str | None:
        return compiler_reason()

    def load_ops(self):
        return library().ops()
