"""Installs what building or testing a wheel needs into the current environment (cibuildwheel's
before-build and before-test run it; every platform, no shell syntax): the torch named by
SOFTSPLAT_TORCH (default torch==2.13.0) from SOFTSPLAT_TORCH_INDEX (default: PyTorch's CPU
index; a CUDA variant names its CUDA index), and with ``--build`` setuptools, wheel and ninja.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main() -> int:
    torch = os.environ.get("SOFTSPLAT_TORCH", "torch==2.13.0")
    index = os.environ.get("SOFTSPLAT_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
    pip = [sys.executable, "-m", "pip", "install"]
    subprocess.run([*pip, torch, "--index-url", index, "--extra-index-url", "https://pypi.org/simple"], check=True)
    if "--build" in sys.argv[1:]:
        subprocess.run([*pip, "setuptools>=68", "wheel", "ninja", "numpy"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
