"""asv benchmarks of softsplat.splat: backend x mode x size x dtype x pass; and the workload of
frame interpolation (``Workload``: GMFSS's splats of a 1080p frame, C = 3 to 192, forward under
inference_mode, batch 1), each call and over the bound, as ``softsplat bench --workload`` shows.

Times are synchronised with the device. Unavailable backends, dtypes a backend does not declare,
combinations too slow to time on the device, and measurements that do not apply (CUDA memory on
a CPU-only machine) raise NotImplementedError in setup, which asv reports as skipped.
SOFTSPLAT_ASV_TINY=1 replaces every size by 16x24 (the test suite runs each parameter set once
that way, without timing). SOFTSPLAT_ASV_SUBSET=1 keeps one size (256x448) and one dtype
(float32): the run a contributor makes before a pull request.
"""

from __future__ import annotations

import os

import torch

import softsplat
from softsplat import backends, bench

BACKENDS = list(backends.names())
MODES = ["sum", "soft"]
SUBSET = bool(os.environ.get("SOFTSPLAT_ASV_SUBSET"))
SIZES = ["256x448"] if SUBSET else ["256x448", "1080x1920", "2160x3840"]
DTYPES = ["float32"] if SUBSET else ["float32", "float16"]
PASSES = ["forward", "forward+backward"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _size(name: str) -> tuple[int, int]:
    return (16, 24) if os.environ.get("SOFTSPLAT_ASV_TINY") else bench.parse_size(name)


def _check(backend_name: str, mode: str, size: str, dtype_name: str) -> torch.dtype:
    backend = backends.get(backend_name)
    dtype = getattr(torch, dtype_name)
    reasons = backend.not_supported_reasons(backends.Signature(DEVICE, dtype, softsplat.Mode.parse(mode)))
    if reasons:
        raise NotImplementedError("; ".join(reasons))
    if backend_name == "triton" and DEVICE == "cpu":
        raise NotImplementedError("triton runs in its interpreter on CPU: times mean nothing")
    if backend_name == "torch" and DEVICE == "cpu" and size == "2160x3840" and not os.environ.get("SOFTSPLAT_ASV_TINY"):
        raise NotImplementedError("the oracle at 4K on CPU takes minutes per sample")
    return dtype


class _Call:
    """Setup shared by the benchmarks: the inputs and the timed function of one parameter set."""

    number = 1
    repeat = (2, 5, 30.0)
    warmup_time = 0.0
    timeout = 600

    def _prepare(self, backend, mode, size, dtype, pass_):
        dtype = _check(backend, mode, size, dtype)
        self.size = _size(size)
        self.tensors = bench.inputs(self.size, dtype=dtype, device=DEVICE)
        forward, forward_backward = bench.passes(bench.splat_call(backend), self.tensors, mode)
        self.function = forward if pass_ == "forward" else forward_backward
        self.function()  # warm-up: builds and caches what the backend needs
        self.mode, self.dtype = mode, dtype


class Splat(_Call):
    """Time and peak (host) memory of one call."""

    params = [BACKENDS, MODES, SIZES, DTYPES, PASSES]
    param_names = ["backend", "mode", "size", "dtype", "pass"]

    def setup(self, backend, mode, size, dtype, pass_):
        self._prepare(backend, mode, size, dtype, pass_)

    def time_splat(self, *params):
        self.function()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def peakmem_splat(self, *params):
        self.function()


class Bandwidth(_Call):
    """Fraction of the machine's copy bandwidth the forward achieves (1.0 = at the bound)."""

    params = [BACKENDS, MODES, SIZES, DTYPES]
    param_names = ["backend", "mode", "size", "dtype"]

    def setup(self, backend, mode, size, dtype):
        self._prepare(backend, mode, size, dtype, "forward")

    def track_bandwidth_fraction(self, *params):
        seconds = bench.timed(self.function, DEVICE, repeats=3)
        return bench.forward_bytes(self.size, dtype=self.dtype, mode=self.mode) / seconds / bench.copy_bandwidth(DEVICE)

    track_bandwidth_fraction.unit = "fraction"


class CudaMemory(_Call):
    """Peak bytes allocated on the GPU by one call (peakmem_splat covers the host)."""

    params = [BACKENDS, MODES, SIZES, DTYPES, PASSES]
    param_names = ["backend", "mode", "size", "dtype", "pass"]

    def setup(self, backend, mode, size, dtype, pass_):
        if DEVICE != "cuda":
            raise NotImplementedError("CUDA memory is tracked on CUDA devices only")
        self._prepare(backend, mode, size, dtype, pass_)

    def track_peak_cuda_memory(self, *params):
        torch.cuda.reset_peak_memory_stats()
        self.function()
        return torch.cuda.max_memory_allocated()

    track_peak_cuda_memory.unit = "bytes"


class Workload:
    """GMFSS's soft splats for one 1080p frame (bench.GMFSS): each call's time and its time over
    the memory bound, forward under ``torch.inference_mode()``, float32, batch 1. The whole set
    is twice the sum of the four calls."""

    params = [BACKENDS, [f"C={channels} at 1/{divisor}" for _, channels, divisor in bench.GMFSS]]
    param_names = ["backend", "call"]
    number = 1
    repeat = (2, 5, 30.0)
    warmup_time = 0.0
    timeout = 600

    def setup(self, backend, call):
        _check(backend, "soft", "1080x1920", "float32")
        if backend == "torch" and DEVICE == "cpu" and not os.environ.get("SOFTSPLAT_ASV_TINY"):
            raise NotImplementedError("the oracle takes seconds per feature splat on CPU: softsplat bench --workload shows it")
        _, channels, divisor = next(c for c in bench.GMFSS if f"C={c[1]} at 1/{c[2]}" == call)
        frame = _size("1080x1920")
        self.size = (max(1, frame[0] // divisor), max(1, frame[1] // divisor))
        self.channels = channels
        tensors = bench.inputs(self.size, channels=channels, device=DEVICE)
        splat = bench.splat_call(backend)

        def forward():
            with torch.inference_mode():
                splat(*tensors, "soft")

        self.function = forward
        self.function()  # warm-up

    def time_call(self, backend, call):
        self.function()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def track_times_the_bound(self, backend, call):
        seconds = bench.timed(self.function, DEVICE, repeats=3)
        return seconds / (bench.forward_bytes(self.size, channels=self.channels) / bench.copy_bandwidth(DEVICE))

    track_times_the_bound.unit = "times the bound"
