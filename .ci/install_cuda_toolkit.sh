#!/usr/bin/env bash
# cibuildwheel's before-all in a manylinux_2_28 container (AlmaLinux 8) for a CUDA wheel: nvcc and
# the CUDA runtime headers of SOFTSPLAT_CUDA_VERSION (e.g. 12-6, 13-0) from NVIDIA's repository.
set -euo pipefail
version="${SOFTSPLAT_CUDA_VERSION:?set SOFTSPLAT_CUDA_VERSION, e.g. 13-0}"
arch="$(uname -m)"
[ "$arch" = aarch64 ] && arch=sbsa
dnf config-manager --add-repo "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${arch}/cuda-rhel8.repo"
dnf install -y "cuda-nvcc-${version}" "cuda-cudart-devel-${version}" "cuda-crt-${version}" 2>/dev/null \
  || dnf install -y "cuda-nvcc-${version}" "cuda-cudart-devel-${version}"
