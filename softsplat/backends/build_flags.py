"""Compiler flags and CPU instruction-set levels of the compiled CPU kernels.

The CPU kernels are built once per instruction-set level (one library per level: a library
never mixes code of two levels, so no inline function compiled for AVX-512 can be picked by the
linker for a call on a CPU without it), and the level is chosen at load time: the highest the
CPU supports (as torch detects it), or the one ``SOFTSPLAT_CPU_LEVEL`` names. Results agree
across levels within the conformance tolerances, not bitwise (the vector paths sum in other
orders).

Flags are chosen per compiler (GCC, clang, Apple clang, MSVC) and architecture (x86-64,
aarch64): no x86 flag reaches a compiler for another architecture. Importing this module runs
no compiler; ``compiler_kind`` runs ``$CXX --version`` once.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess

#: The library's device-neutral op definitions and the CPU kernels, one translation unit per
#: concept (compiled in parallel by ninja); paths under ``csrc/``. The same list builds on first
#: use (cpp.py) and into a wheel (setup.py).
CPU_SOURCES = [
    "library.cpp", "cpu/ops.cpp", "cpu/forward.cpp", "cpu/backward.cpp", "cpu/maximum.cpp", "cpu/schedule.cpp",
]

#: Names a level for the environment variable and ``softsplat info``.
LEVEL_ENV = "SOFTSPLAT_CPU_LEVEL"

#: The levels of each architecture, lowest first.
LEVELS = {"x86_64": ("baseline", "avx2", "avx512"), "aarch64": ("baseline",)}


def architecture(machine: str | None = None) -> str:
    """``x86_64`` or ``aarch64`` (other architectures build the baseline as ``other``)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    return "other"


@functools.cache
def _torch_capability() -> str:
    """torch's CPU capability, fixed for the process (every call asks for the level)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def supported_levels(capability: str | None = None, machine: str | None = None) -> tuple[str, ...]:
    """The levels this CPU runs, lowest first, from torch's own detection
    (``torch.backends.cpu.get_cpu_capability()``: ``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    arch = architecture(machine)
    if arch != "x86_64":
        return ("baseline",)
    if capability is None:
        capability = _torch_capability()
    capability = capability.upper()
    if "AVX512" in capability:
        return LEVELS["x86_64"]
    if "AVX2" in capability:
        return LEVELS["x86_64"][:2]
    return ("baseline",)


def chosen_level(environment=None, capability: str | None = None, machine: str | None = None) -> str:
    """The level to load: ``SOFTSPLAT_CPU_LEVEL`` when set (one this CPU supports), else the
    highest supported one."""
    environment = os.environ if environment is None else environment
    supported = supported_levels(capability, machine)
    wanted = environment.get(LEVEL_ENV, "").strip().lower()
    if not wanted:
        return supported[-1]
    known = LEVELS.get(architecture(machine), ("baseline",))
    if wanted not in known:
        raise ValueError(f"{LEVEL_ENV}: expected one of {', '.join(known)}, got {wanted!r}")
    if wanted not in supported:
        raise ValueError(f"{LEVEL_ENV}: this CPU runs {', '.join(supported)}; {wanted!r} would stop at an illegal instruction")
    return wanted


@functools.cache
def compiler_kind(compiler: str | None = None) -> str:
    """``gcc``, ``clang``, ``apple-clang`` or ``msvc``, from the compiler's own banner."""
    compiler = compiler or os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
    if os.path.basename(compiler).lower() in ("cl", "cl.exe"):
        return "msvc"
    try:
        banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "gcc"  # the build reports the real problem
    if "Apple clang" in banner:
        return "apple-clang"
    if "clang" in banner:
        return "clang"
    return "gcc"


def cpu_flags(level: str, kind: str, arch: str) -> tuple[list[str], list[str]]:
    """``(compile flags, link flags)`` of the CPU kernels at ``level`` for a compiler of
    ``kind`` targeting ``arch``. Every compiler: full optimisation, no contraction of a product
    and a sum into one rounding (the oracle rounds twice), and torch's stable ABI only
    (``stable_abi_flags``). No OpenMP: the kernels run in parallel through torch's own thread
    pool (``torch::stable::parallel_for``), so no compiler needs an OpenMP runtime."""
    abi = stable_abi_flags(kind)
    if kind == "msvc":
        arch_flags = {"baseline": [], "avx2": ["/arch:AVX2"], "avx512": ["/arch:AVX512"]}[level] if arch == "x86_64" else []
        return ["/O2", "/fp:precise", *arch_flags, *abi], []
    # -fno-trapping-math lets loops with floor() and compares vectorise (no result changes).
    flags = ["-O3", "-fno-trapping-math", "-ffp-contract=off"]
    if arch == "x86_64":
        flags += {
            "baseline": ["-march=x86-64", "-mtune=generic"],
            "avx2": ["-march=x86-64-v3", "-mtune=generic"],
            "avx512": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
        }[level]
    elif arch == "aarch64" and kind != "apple-clang":
        flags += ["-march=armv8-a"]  # NEON is part of the baseline
    return flags + abi, []


#: nvcc's flags for the CUDA kernels: no contraction into FMAs (docs/spec.md, "Floating point").
CUDA_FLAGS = ["-O3", "--fmad=false"]


def cuda_architectures(cuda_version: str) -> list[str]:
    """The GPU architectures a wheel's CUDA kernels are built for by the nvcc of ``cuda_version``
    ("12.6"), oldest first; the newest is also shipped as PTX. Each list is what that nvcc
    knows: 12.6 stops at sm_90 (sm_100/sm_120 came with 12.8), 12.8 still builds Volta, CUDA 13
    dropped Maxwell, Pascal and Volta and added sm_110."""
    major, minor = (int(part) for part in cuda_version.split(".")[:2])
    if major < 12 or (major == 12 and minor < 8):
        return ["60", "70", "75", "80", "86", "89", "90"]
    if major == 12:
        return ["70", "75", "80", "86", "89", "90", "100", "120"]
    return ["75", "80", "86", "89", "90", "100", "110", "120"]


#: The oldest torch release the compiled libraries serve: the headers they include are limited
#: to its stable ABI (``TORCH_TARGET_VERSION``; including anything else fails to compile), and
#: torch keeps that ABI in every later release. 2.10 is the first whose stable ABI has what the
#: kernels need: ``parallel_for`` and ``get_num_threads``, ``new_empty``/``new_zeros`` with a
#: dtype, and list arguments (``bool[3]``).
OLDEST_TORCH = (2, 10)


def stable_abi_flags(kind: str = "gcc") -> list[str]:
    """The define that limits torch's headers to ``OLDEST_TORCH``'s stable ABI."""
    major, minor = OLDEST_TORCH
    define = f"TORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000"
    return [("/D" if kind == "msvc" else "-D") + define]
