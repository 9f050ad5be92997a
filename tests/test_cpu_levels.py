"""The CPU kernels at every instruction-set level and with every toolchain: the level chosen at
load time (SOFTSPLAT_CPU_LEVEL overrides), flags chosen per compiler and architecture, the
conformance suite at every x86-64 level this CPU runs, and warning-free compiles for aarch64
(cross compiler) and with clang++."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from softsplat.backends import build_flags, cpp
from softsplat.backends.extension import CSRC


@pytest.mark.parametrize("kind", ["gcc", "clang", "apple-clang", "msvc"])
def test_no_x86_flag_reaches_an_aarch64_compiler(kind, monkeypatch) -> None:
    flags, _ = build_flags.cpu_flags("baseline", kind, "aarch64")
    assert not [f for f in flags if f.startswith(("-march=x86", "-mprefer", "-mavx", "/arch"))], flags


@pytest.mark.parametrize("level, expected", [("baseline", "-march=x86-64"), ("avx2", "-march=x86-64-v3"),
                                             ("avx512", "-march=x86-64-v4")])
def test_x86_levels_name_their_instruction_sets(level, expected) -> None:
    for kind in ("gcc", "clang"):
        flags, link = build_flags.cpu_flags(level, kind, "x86_64")
        assert expected in flags and "-ffp-contract=off" in flags and link == []
        assert "-DTORCH_TARGET_VERSION=0x020a000000000000" in flags  # torch 2.10's stable ABI only
        assert "-march=native" not in flags  # a build serves every CPU of its level
    msvc, _ = build_flags.cpu_flags(level, "msvc", "x86_64")
    assert all(f.startswith("/") for f in msvc) and ("/arch:AVX2" in msvc) == (level == "avx2")


@pytest.mark.parametrize("kind", ["gcc", "clang", "apple-clang", "msvc"])
def test_no_compiler_needs_an_openmp_runtime(kind) -> None:
    """The kernels run on torch's thread pool through the stable parallel_for: no OpenMP flag
    or library, so Apple clang needs no libomp and a wheel bundles no OpenMP runtime."""
    flags, link = build_flags.cpu_flags("baseline", kind, "x86_64" if kind == "msvc" else "aarch64")
    assert not [f for f in flags + link if "openmp" in f.lower() or "omp" in f.lower()], (flags, link)


def test_the_level_is_the_highest_supported_unless_the_environment_names_one() -> None:
    assert build_flags.chosen_level({}, "AVX512", "x86_64") == "avx512"
    assert build_flags.chosen_level({}, "AVX2", "x86_64") == "avx2"
    assert build_flags.chosen_level({}, "DEFAULT", "x86_64") == "baseline"
    assert build_flags.chosen_level({}, "SVE256", "aarch64") == "baseline"
    assert build_flags.chosen_level({build_flags.LEVEL_ENV: "avx2"}, "AVX512", "x86_64") == "avx2"
    with pytest.raises(ValueError, match="SOFTSPLAT_CPU_LEVEL: this CPU runs baseline, avx2; 'avx512' would stop"):
        build_flags.chosen_level({build_flags.LEVEL_ENV: "avx512"}, "AVX2", "x86_64")
    with pytest.raises(ValueError, match="SOFTSPLAT_CPU_LEVEL: expected one of baseline, avx2, avx512, got 'sse9'"):
        build_flags.chosen_level({build_flags.LEVEL_ENV: "sse9"}, "AVX512", "x86_64")


OTHER_LEVELS = [level for level in build_flags.supported_levels() if level != build_flags.chosen_level()]


@pytest.mark.skipif(cpp.compiler_reason() is not None, reason=f"cannot build here: {cpp.compiler_reason()}")
@pytest.mark.parametrize("level", OTHER_LEVELS or [pytest.param("none", marks=pytest.mark.skip(reason="this CPU runs one level"))])
def test_conformance_at_every_level(level) -> None:
    """The default level runs in the main suite; the others here, each forced by the variable
    (conformance/ for the cpp backend, in a process of its own)."""
    environment = {**os.environ, build_flags.LEVEL_ENV: level}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "conformance", "--backend", "cpp",
               "--ignore=conformance/test_onnx.py", "--ignore=conformance/meta", "--ignore=conformance/test_oracle_transcription.py"]
    script = "from softsplat.backends import cpp; print(cpp.library().level)"
    assert subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True).stdout.strip() == level
    result = subprocess.run(command, cwd=CSRC.parents[2], env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]


def _compile(compiler: str, kind: str, arch: str, level: str, source: str, tmp_path) -> str:
    from torch.utils import cpp_extension

    flags, _ = build_flags.cpu_flags(level, kind, arch)
    includes = [a for path in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]] for a in ("-isystem", path)]
    output = tmp_path / f"{compiler}-{level}-{source.replace('/', '-')}.o"
    command = [compiler, "-std=c++20", "-fPIC", "-Wall", "-Wextra", "-Werror", *flags, "-I", str(CSRC), *includes,
               "-c", str(CSRC / source), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return "" if result.returncode == 0 else f"{' '.join(command[:1] + flags)} {source}:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("compiler, kind, arch, levels", [
    ("aarch64-linux-gnu-g++", "gcc", "aarch64", ("baseline",)),
    ("clang++", "clang", "x86_64", ("baseline", "avx2", "avx512")),
])
def test_cpu_kernels_compile_warning_free(compiler, kind, arch, levels, tmp_path) -> None:
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed (apt-get install g++-aarch64-linux-gnu clang; .ci/run does)")
    jobs = [(level, source) for level in levels for source in cpp.CPU_SOURCES]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        errors = [e for e in pool.map(lambda job: _compile(compiler, kind, arch, *job, tmp_path), jobs) if e]
    assert not errors, "\n".join(errors)
