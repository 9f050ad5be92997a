"""The cpp backend's CUDA translation unit compiles with nvcc for sm_80 and sm_90 (compile only:
no GPU here). The kernels' logic is executed on the CPU by the ``cuda-host`` backend under the
conformance suite."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension

from softsplat.backends import build_flags
from softsplat.backends.extension import CSRC

#: The flags the cpp backend builds its CUDA kernels with: no FMA contraction (docs/spec.md),
#: torch's stable ABI only.
CUDA_FLAGS = ["-O3", "--fmad=false", *build_flags.stable_abi_flags()]

#: cuobjdump, as Triton ships it (no CUDA toolkit needed).
CUOBJDUMP = pathlib.Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump" \
    if importlib.util.find_spec("triton") else None

#: The ordered (deterministic) forward's kernels.
ORDERED_KERNELS = ("splat_key_kernel", "splat_ends_kernel", "splat_weigh_kernel", "splat_gather_kernel")

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if pathlib.Path("/usr/local/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the CUDA compile check needs a CUDA toolkit")
@pytest.mark.skipif(CUOBJDUMP is None, reason="Triton (which ships cuobjdump) is not installed: the test extra installs it")
def test_cuda_translation_unit_compiles_for_sm80_and_sm90(tmp_path) -> None:
    includes = [CSRC, *map(pathlib.Path, cpp_extension.include_paths())]
    command = [
        NVCC, "-std=c++20", *CUDA_FLAGS, "-c", str(CSRC / "cuda" / "ops.cu"), "-o", str(tmp_path / "splat_cuda.o"),
        "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        *(f"-I{path}" for path in includes),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-5000:]}"
    symbols = subprocess.run(["nm", "-C", str(tmp_path / "splat_cuda.o")], capture_output=True, text=True, check=True).stdout
    for kernel in ("splat_forward_kernel", "splat_finish_kernel", "splat_normalise_kernel", "splat_backward_prepare_kernel",
                   "splat_backward_kernel", *ORDERED_KERNELS):
        assert kernel in symbols, f"{kernel} was not compiled"
    # No kernel spills to local memory (the SASS's resource usage, by cuobjdump: Triton's own):
    # spilled registers live in the thread's stack frame (STACK; -maxrregcount=16 makes 23 of
    # the 28 kernels of an architecture spill there) or in LOCAL.
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(tmp_path / "splat_cuda.o")], capture_output=True,
                           text=True, check=True).stdout
    kernels = [line for line in usage.splitlines() if "LOCAL:" in line]
    # Per architecture: forward, backward and gather for 4 dtypes; finish and normalise each
    # into the 2 accumulation types and the 2 16-bit dtypes; prepare, maximum, key and weigh for
    # 2 accumulation types; ends once; each with 32- and 64-bit indices.
    assert len(kernels) == 2 * 2 * (3 * 4 + 2 * 4 + 4 * 2 + 1), usage[:2000]
    spilled = [line for line in kernels if "LOCAL:0 " not in line or "STACK:0 " not in line]
    assert not spilled, spilled[:3]
    # The forward's float adds (docs/performance.md): on sm_90 every one a vector reduction of
    # four lanes (REDG.E.ADD.F32x4), none a scalar one; sm_80 has none, and takes four scalar
    # ones; float64 stays scalar on both.
    sass = subprocess.run([CUOBJDUMP, "-sass", str(tmp_path / "splat_cuda.o")], capture_output=True, text=True,
                          check=True).stdout
    reductions = forward_reductions(sass)
    for arch, vector in (("sm_90", True), ("sm_80", False)):
        for accumulation in ("float", "double"):
            found = reductions[arch, accumulation]
            assert found, (arch, accumulation, "no forward kernel's float adds found")
            wide = vector and accumulation == "float"
            expected = {"F32x4"} if wide else {"F32"} if accumulation == "float" else {"F64"}
            assert set(found) == expected, (arch, accumulation, found)


def forward_reductions(sass: str) -> dict[tuple[str, str], dict[str, int]]:
    """The float add reductions and atomics (RED/REDG/ATOM .ADD, by width: F32, F32x4, F64,
    ...) in the SASS of the forward kernels, by architecture and accumulation type (float for
    the float and 16-bit inputs, double for double), counted over the kernels' code."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    arch = function = None
    for line in sass.splitlines():
        if match := re.search(r"code for (sm_\d+)", line):
            arch = match.group(1)
        elif match := re.search(r"Function : (\S+)", line):
            function = match.group(1)
        elif function and "splat_forward_kernel" in function:
            op = re.search(r"\b(?:RED|REDG|ATOM|ATOMG)\.E\.ADD\.(F\d+(?:x\d+)?)", line)
            if op:
                # _ZN9softsplat20splat_forward_kernelI<scalar><acc><index>E: the accumulation
                # type is d for double, else f
                accumulation = "double" if "kernelIdd" in function else "float"
                counts = found.setdefault((arch, accumulation), {})
                counts[op.group(1)] = counts.get(op.group(1), 0) + 1
    return found


def test_the_cpp_backend_builds_cuda_with_the_checked_flags() -> None:
    from softsplat.backends import cpp

    flags = cpp.cuda_library().cuda_cflags
    assert [flag for flag in flags if not flag.startswith("-gencode=")] == CUDA_FLAGS
