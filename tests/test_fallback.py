"""`auto` survives a backend that cannot be built: one warning saying why and how to fix it, the
next backend, no second build attempt; a named backend raises with the build error's tail;
`softsplat info` shows the failure and `softsplat build` tries again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import warnings, torch, softsplat
from softsplat import backends
x, f, m = torch.rand(1, 2, 5, 6), torch.randn(1, 2, 5, 6), torch.randn(1, 1, 5, 6)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = softsplat.splat(x, f, m, mode="soft")
    second = softsplat.splat(x, f, m, mode="soft")
print("WARNINGS", len([w for w in caught if "softsplat" in str(w.message)]))
print("MESSAGE", str(caught[0].message).replace("\n", " ") if caught else "")
print("SAME", torch.allclose(first, softsplat.splat(x, f, m, mode="soft", backend="torch")))
print("CHOSEN", softsplat.resolve_backend(x, "soft"))
try:
    softsplat.splat(x, f, m, mode="soft", backend="cpp")
except softsplat.BackendFailedError as error:
    print("NAMED", str(error).replace("\n", " "))
"""


@pytest.fixture
def failing_compiler(tmp_path):
    """A `c++` that fails every call and counts them."""
    calls = tmp_path / "calls"
    compiler = tmp_path / "bad-c++"
    compiler.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'bad-c++: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(0o755)
    environment = {**os.environ, "CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    environment.pop("SOFTSPLAT_BACKEND", None)
    return environment, calls


def run(command, environment) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def test_auto_falls_back_once_and_a_named_backend_raises(failing_compiler) -> None:
    environment, calls = failing_compiler
    result = run([sys.executable, "-c", SCRIPT], environment)
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert out["WARNINGS"] == "1", result.stdout
    assert "'cpp' failed to build or load" in out["MESSAGE"] and "fix: install a working C++ compiler" in out["MESSAGE"]
    assert out["SAME"] == "True" and out["CHOSEN"] != "cpp"
    assert "backend 'cpp' failed to build or load" in out["NAMED"] and "bad-c++" in out["NAMED"], out["NAMED"]
    attempts = calls.read_text().count("x")
    assert attempts >= 1

    # A later process does not build again (the failure is recorded), warns once, and info says
    # so. It asks the compiler who it is (`--version`, for the flags), nothing more.
    result = run([sys.executable, "-c", SCRIPT], environment)
    assert result.returncode == 0 and "WARNINGS 1" in result.stdout, result.stderr[-3000:]
    assert "softsplat: building" not in result.stderr
    assert calls.read_text().count("x") <= attempts + 1
    attempts = calls.read_text().count("x")
    info = run([sys.executable, "-m", "softsplat", "info"], {**environment, "COLUMNS": "400"})
    assert "build failed" in info.stdout and "softsplat build" in info.stdout, info.stdout

    # softsplat build tries again (and fails again with this compiler, saying so).
    build = run([sys.executable, "-m", "softsplat", "build"], environment)
    assert build.returncode == 1 and "cpp: FAILED" in build.stdout
    assert calls.read_text().count("x") > attempts


@pytest.fixture
def a_gpu_that_is_not_there(monkeypatch, tmp_path):
    """torch seeing one GPU of ``capability`` (set by the test) and a CUDA toolkit, on this CPU
    machine; the cpp backend's first-use state reset before and after."""
    import torch
    from torch.utils import cpp_extension

    from softsplat.backends import cpp

    cpp.library().ops()  # the CPU library, built and loaded before anything is faked
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(cpp, "_prebuilt_cpu", lambda level: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))

    def reset():
        cpp._CUDA_FAILURE[0], cpp._CUDA_LOADED[0] = None, False
        for key in [k for k in cpp._LIBRARIES if k.startswith("cuda:")]:
            del cpp._LIBRARIES[key]

    reset()
    yield capability
    reset()


def test_the_first_use_cuda_build_is_keyed_by_the_gpus_architecture(a_gpu_that_is_not_there) -> None:
    """A shared build cache must not serve an H100's build to an A100: the library's name (its
    cache key) and its nvcc flags follow the visible GPUs' architectures."""
    from softsplat.backends import cpp

    h100 = cpp.cuda_library()
    assert "-gencode=arch=compute_90,code=sm_90" in h100.cuda_cflags
    a_gpu_that_is_not_there[0] = (8, 0)
    a100 = cpp.cuda_library()
    assert "-gencode=arch=compute_80,code=sm_80" in a100.cuda_cflags and "compute_90" not in " ".join(a100.cuda_cflags)
    assert a100.name() != h100.name() and a100.build_directory() != h100.build_directory()
    assert cpp.library().name() != h100.name() and not any(s.suffix == ".cu" for s in cpp.library().sources)


def test_a_failing_cuda_build_leaves_the_cpu_kernels_working(a_gpu_that_is_not_there, monkeypatch) -> None:
    """The CUDA kernels are a library of their own: when their build fails, one warning says
    so, the cpp backend keeps CPU (and computes there), offers CUDA no more (auto moves on),
    and says why; the failure is remembered on disk like any build's."""
    import torch

    import softsplat
    from softsplat.backends import cpp, extension

    def fail(self):
        raise RuntimeError("nvcc fatal   : Unsupported gpu architecture 'compute_90' (test)")

    monkeypatch.setattr(extension.OpLibrary, "_build", fail)
    with pytest.warns(RuntimeWarning, match="CUDA kernels failed to build or load; its CPU kernels work"):
        cpp._load_cuda()
    reason = cpp._cuda_reason()
    assert "the CUDA kernels failed to build" in reason and "Unsupported gpu architecture" in reason
    assert cpp.CppBackend().devices() == ("cpu",)
    assert "build-failed" in " ".join(p.name for p in cpp.cuda_library().build_directory().iterdir())
    x, f = torch.rand(1, 3, 4, 5), torch.randn(1, 2, 4, 5)
    assert torch.allclose(softsplat.splat(x, f, mode="avg", backend="cpp"), softsplat.splat(x, f, mode="avg", backend="torch"))
    cpp._CUDA_FAILURE[0] = None  # a later process: the failure recorded on disk is enough
    assert "the CUDA kernels failed to build" in cpp._cuda_reason()


def test_a_backend_that_loses_a_device_while_preparing_is_passed_over() -> None:
    """select asks again after preparing: a named backend that no longer offers the call's
    device raises BackendFailedError saying why, instead of running without kernels there."""
    import torch

    from softsplat import Mode, backends
    from softsplat.backends.base import Backend, BackendFailedError, Signature

    class Shrinking(Backend):
        name = "shrinking-test"
        offered = ("cpu", "cuda")

        def devices(self):
            return self.offered

        def prepare(self):
            self.offered = ("cpu",)

        def run(self, problem):
            raise AssertionError("never run")

    backends.register(Shrinking())
    try:
        with pytest.raises(BackendFailedError, match="cannot compute this call after all: runs on cpu"):
            backends.select(Signature("cuda", torch.float32, Mode.parse("sum")), "shrinking-test")
    finally:
        backends.unregister("shrinking-test")


def test_no_compiler_is_one_warning_with_the_slowdown_and_the_way_out(tmp_path) -> None:
    """Without a C++ compiler (not a broken one: none), 'auto' moves CPU calls to the oracle:
    one warning per process saying so, how much slower it is, and how to get cpp."""
    script = (
        "import warnings, torch, softsplat\n"
        "x, f = torch.rand(1, 2, 5, 6), torch.randn(1, 2, 5, 6)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        softsplat.splat(x, f, mode='avg')\n"
        "messages = [str(w.message) for w in caught if 'softsplat' in str(w.message)]\n"
        "print(len(messages), softsplat.resolve_backend(x, 'avg'))\n"
        "print(messages[0] if messages else '')\n"
    )
    environment = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
                   "TRITON_INTERPRET": "0"}  # as a user has it: Triton not in the interpreter
    environment.pop("SOFTSPLAT_BACKEND", None)
    result = run([sys.executable, "-c", script], environment)
    assert result.returncode == 0, result.stderr[-3000:]
    count, message = result.stdout.splitlines()[0], result.stdout.splitlines()[1]
    assert count == "1 torch", result.stdout
    assert "(backend 'cpp') cannot be used here: no C++ compiler" in message and "times slower than cpp" in message
    assert "wheel" in message and "softsplat build" in message
