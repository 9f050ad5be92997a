"""The cpp backend's CUDA translation unit compiles with nvcc for sm_80 and sm_90 (compile only:
no GPU here). The kernels' logic is executed on the CPU by the ``cuda-host`` backend under the
conformance suite."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension

from softsplat.backends import build_flags
from softsplat.backends.extension import CSRC

#: The flags the cpp backend builds its CUDA kernels with: no FMA contraction (docs/spec.md),
#: torch's stable ABI only.
CUDA_FLAGS = ["-O3", "--fmad=false", *build_flags.stable_abi_flags()]

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if pathlib.Path("/usr/local/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the CUDA compile check needs a CUDA toolkit")
def test_cuda_translation_unit_compiles_for_sm80_and_sm90(tmp_path) -> None:
    includes = [CSRC, *map(pathlib.Path, cpp_extension.include_paths())]
    command = [
        NVCC, "-std=c++20", *CUDA_FLAGS, "-c", str(CSRC / "splat_cuda.cu"), "-o", str(tmp_path / "splat_cuda.o"),
        "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        *(f"-I{path}" for path in includes),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-5000:]}"
    symbols = subprocess.run(["nm", "-C", str(tmp_path / "splat_cuda.o")], capture_output=True, text=True, check=True).stdout
    for kernel in ("splat_forward_kernel", "splat_normalise_kernel", "splat_backward_prepare_kernel", "splat_backward_kernel"):
        assert kernel in symbols, f"{kernel} was not compiled"


def test_the_cpp_backend_builds_cuda_with_the_checked_flags() -> None:
    from softsplat.backends import cpp

    assert cpp.library().cuda_cflags == CUDA_FLAGS
