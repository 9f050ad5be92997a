"""Backend ``cuda-host`` (for tests): the cpp backend's CUDA kernels, compiled by g++ from the
same source through a host shim and run on CPU tensors. It is how a machine without a GPU
executes the CUDA kernel logic under the conformance suite; ``auto`` never picks it.
"""

from __future__ import annotations

import functools

from .extension import OpLibrary, compiler_reason
from .ops import OpsBackend


@functools.cache
def library() -> OpLibrary:
    return OpLibrary("softsplat_cuda_host", ["splat_cuda_host.cpp"])


class CudaHostBackend(OpsBackend):
    name = "cuda-host"
    summary = "test only: the CUDA kernels (splat_kernels.cuh) run on the CPU through a host shim"
    deterministic_on = ()  # atomics in the forward, as on a GPU
    flushes_subnormals_on = ("cpu",)  # the host shim computes what the device does
    test_only = True

    def devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def _unavailable_reason(self) -> str | None:
        return compiler_reason()

    def load_ops(self):
        return library().ops()
