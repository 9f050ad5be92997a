"""Prebuilt libraries (a wheel's, backends/prebuilt.py): which ones are used when, that they need
no compiler, and that the compiled code depends on torch's stable ABI only (one library serves
every torch from build_flags.OLDEST_TORCH on). The whole wheel (setup.py, auditwheel, a fresh
environment without a compiler, every CPU level, a second torch release) is checked by
``nox -s wheel`` and ``nox -s wheel_test``."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from softsplat.backends import build_flags, cpp, prebuilt
from softsplat.backends.extension import compiler_reason


def _manifest(directory: pathlib.Path, **changes) -> dict:
    found = {
        "oldest_torch": list(build_flags.OLDEST_TORCH), "built_with_torch": "2.13.0", "architecture": "x86_64",
        "sources": prebuilt.sources_digest(), "cpu": {"baseline": "softsplat_cpu_baseline.so"},
        "cuda": {"cuda": "13.0", "architectures": ["sm_75", "sm_120", "compute_120"], "library": "softsplat_cuda.so"},
    }
    found.update(changes)
    directory.mkdir(exist_ok=True)
    (directory / prebuilt.MANIFEST).write_text(json.dumps(found))
    for name in [*found["cpu"].values(), found["cuda"]["library"]]:
        (directory / name).write_bytes(b"")
    return found


def test_the_prebuilt_libraries_are_used_only_when_they_match(tmp_path) -> None:
    _manifest(tmp_path)
    assert prebuilt.cpu_library("baseline", "2.13.0", tmp_path) == tmp_path / "softsplat_cpu_baseline.so"
    assert prebuilt.cpu_library("baseline", "2.14.1+cu130", tmp_path) is not None
    assert prebuilt.cpu_library("avx2", "2.13.0", tmp_path) is None  # a level the wheel lacks
    assert "need torch >= 2.10" in prebuilt.unusable_reason(prebuilt.manifest(tmp_path), "2.9.1", tmp_path)
    assert prebuilt.cpu_library("baseline", "2.9.1", tmp_path) is None
    assert "no prebuilt libraries" in prebuilt.unusable_reason(prebuilt.manifest(tmp_path / "none"), "2.13.0", tmp_path)
    _manifest(tmp_path, sources="another checkout's")
    assert "other sources" in prebuilt.unusable_reason(prebuilt.manifest(tmp_path), "2.13.0", tmp_path)
    assert prebuilt.cpu_library("baseline", "2.13.0", tmp_path) is None


def test_the_cuda_library_needs_a_cuda_torch_of_its_major(tmp_path) -> None:
    _manifest(tmp_path)
    path, what = prebuilt.cuda_library("13.0", tmp_path)
    assert path == tmp_path / "softsplat_cuda.so" and what == "prebuilt for sm_75, sm_120, compute_120"
    assert prebuilt.cuda_library("12.6", tmp_path) == (None, "built for CUDA 13.0, this torch is a CUDA 12.6 build")
    path, what = prebuilt.cuda_library(None, tmp_path)
    assert path is None and "CPU build" in what


@pytest.mark.parametrize("capability, runs", [
    ((7, 5), True), ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((10, 0), True),
    ((12, 0), True), ((12, 1), True), ((7, 0), False), ((6, 0), False), ((11, 0), False), ((10, 3), True),
])
def test_a_fatbin_runs_where_it_has_machine_code_or_ptx(capability, runs) -> None:
    """sm_80 machine code runs on any 8.x at or above it; PTX on any capability at or above its
    own; nothing else: a CUDA 13 wheel has no code for a V100 (7.0) or a P100 (6.0)."""
    architectures = [f"sm_{a}" for a in ("75", "80", "90", "100", "120")] + ["compute_120"]
    assert prebuilt.runs_on(architectures, capability) is runs


def test_the_cuda_library_is_not_loaded_for_a_gpu_it_has_no_code_for(tmp_path, monkeypatch) -> None:
    """A wheel's CUDA kernels on a GPU its fatbin does not cover would fail with "no kernel
    image is available": the library is not loaded, the cpp backend leaves CUDA to the next
    backend, and info says why."""
    _manifest(tmp_path)
    path, what = prebuilt.cuda_library("13.0", tmp_path, capabilities=[(7, 0)])
    assert path is None and what == "prebuilt for sm_75, sm_120, compute_120, which has no code for this GPU (sm_70)"
    assert prebuilt.cuda_library("13.0", tmp_path, capabilities=[(7, 5), (12, 0)])[0] is not None
    assert prebuilt.cuda_library("13.0", tmp_path, capabilities=[(9, 0)])[0] is None  # sm_75 does not run on 9.0
    monkeypatch.setattr(prebuilt, "DIRECTORY", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "_prebuilt_cpu", lambda level: tmp_path / "softsplat_cpu_baseline.so")
    cpp._prebuilt_cuda.cache_clear()
    try:
        assert "no code for this GPU (sm_70)" in cpp._cuda_reason()
        assert cpp.CppBackend().devices() == ("cpu",)
    finally:
        cpp._prebuilt_cuda.cache_clear()


@pytest.mark.parametrize("version, first, last", [("12.6", "60", "90"), ("12.8", "70", "120"), ("13.0", "75", "120")])
def test_each_cuda_version_builds_the_architectures_its_nvcc_knows(version, first, last) -> None:
    architectures = build_flags.cuda_architectures(version)
    assert architectures[0] == first and architectures[-1] == last
    if version == "12.6":
        assert not {"100", "110", "120"} & set(architectures)  # nvcc 12.6 does not know them


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (a CUDA toolkit)")
def test_the_installed_nvcc_knows_every_architecture_of_its_version() -> None:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"release (\d+\.\d+)", out).group(1)
    known = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    missing = [a for a in build_flags.cuda_architectures(version) if f"sm_{a}" not in known]
    assert missing == [], f"nvcc {version} does not know {missing}"


def test_the_sources_digest_sees_every_source_and_header(tmp_path) -> None:
    root = tmp_path / "csrc"
    shutil.copytree(prebuilt.CSRC, root)
    before = prebuilt.sources_digest(root)
    with open(root / "taps.h", "a") as header:
        header.write("\n")
    assert prebuilt.sources_digest(root) != before


def _built_library() -> pathlib.Path:
    library = cpp.library()
    if library.prebuilt is not None:
        return library.prebuilt[0]
    library.ops()  # builds it once (shared with the rest of the suite)
    return library.library_path()


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is needed to read the library's symbols")
@pytest.mark.skipif(compiler_reason() is not None and cpp.library().prebuilt is None, reason=f"cannot build here: {compiler_reason()}")
def test_the_compiled_library_uses_torchs_stable_abi_only() -> None:
    """No symbol of torch's C++ API (c10::, at::, torch:: outside the header-only stable API):
    those change between releases; the stable C functions do not."""
    result = subprocess.run(["nm", "-D", "-C", "--undefined-only", str(_built_library())], capture_output=True, text=True,
                            check=True)
    symbols = [line.split(None, 1)[-1].strip() for line in result.stdout.splitlines() if line.strip()]
    foreign = [s for s in symbols if re.search(r"\b(c10|at|torch|caffe2)::", s)]
    assert not foreign, f"symbols of torch's C++ API: {foreign[:10]}"
    assert any(s.startswith("aoti_torch_") for s in symbols)  # what it uses instead


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is needed to read the library's symbols")
@pytest.mark.skipif(compiler_reason() is not None and cpp.library().prebuilt is None, reason=f"cannot build here: {compiler_reason()}")
def test_the_forwards_channel_blocks_are_compiled_once_per_width_weighting_and_dtype() -> None:
    """The blocked forward (splat_block) exists once per block width (4, 8, 16), weighting (per
    pixel, per tap) and input dtype: at most 24 functions. Compiled again for each compile-time
    channel count of the forward's dispatch it made 119, and forward.cpp took four times as long
    to compile (the library is built at first use and again per CPU level and sanitizer run)."""
    result = subprocess.run(["nm", "-C", "--defined-only", str(_built_library())], capture_output=True, text=True,
                            check=True)
    blocks = {line.split(None, 2)[-1] for line in result.stdout.splitlines() if "::splat_block<" in line}
    assert 0 < len(blocks) <= 3 * 2 * 4, f"{len(blocks)} splat_block functions: {sorted(blocks)[:3]}"


LOAD = """
import pathlib, shutil, sys, torch
from softsplat.backends import prebuilt
prebuilt.DIRECTORY = pathlib.Path(sys.argv[1])
import softsplat
from softsplat import backends
x, flow, metric = torch.randn(1, 3, 9, 11), torch.randn(1, 2, 9, 11) * 3, torch.randn(1, 1, 9, 11)
ours = softsplat.splat(x, flow, metric, mode="soft", backend="cpp")
oracle = softsplat.splat(x, flow, metric, mode="soft", backend="torch")
torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-5)
print(backends.get("cpp").summary)
print([shutil.which(c) for c in ("c++", "g++", "cc")])
"""


@pytest.mark.skipif(compiler_reason() is not None and cpp.library().prebuilt is None, reason=f"cannot build here: {compiler_reason()}")
def test_a_wheel_layout_is_used_without_a_compiler(tmp_path) -> None:
    """A library laid out as a wheel has it (manifest and all) is loaded in a process that can
    reach no compiler, and nothing is built."""
    level = build_flags.chosen_level()
    directory = tmp_path / "_prebuilt"
    # CUDA kernels for a CUDA major no torch has: never loaded, only named.
    found = _manifest(directory, cpu={level: f"softsplat_cpu_{level}.so"},
                      cuda={"cuda": "99.0", "architectures": ["sm_80"], "library": "softsplat_cuda.so"})
    shutil.copy(_built_library(), directory / found["cpu"][level])
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    environment = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    environment.update(PATH=str(pathlib.Path(sys.executable).parent), TORCH_EXTENSIONS_DIR=str(extensions))
    result = subprocess.run([sys.executable, "-c", LOAD, str(directory)], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary, compilers = result.stdout.strip().splitlines()[-2:]
    assert "prebuilt, torch >= 2.10 stable ABI" in summary and f"CPU level {level}" in summary
    assert compilers == "[None, None, None]"
    assert not list(extensions.rglob("*")), "something was built"
    assert "CPU build" in summary if torch.version.cuda is None else "built for CUDA 99.0" in summary


def test_info_says_why_a_wheels_libraries_are_not_used(tmp_path, monkeypatch) -> None:
    """A wheel's libraries built from other sources (or for a torch too old) are not used, and
    the cpp row of ``softsplat info`` says so instead of silently building."""
    _manifest(tmp_path, sources="another checkout's")
    monkeypatch.setattr(prebuilt, "DIRECTORY", tmp_path)
    summary = cpp.CppBackend().summary
    assert "the wheel's prebuilt libraries are not used: the prebuilt libraries were built from other sources" in summary
