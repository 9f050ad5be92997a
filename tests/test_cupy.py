"""The CuPy backend without a GPU: the exact source it hands to NVRTC compiles for compute_75 to
compute_120 with no warning, with CUDA 12's and CUDA 13's NVRTC and headers, and nothing in it
flushes subnormals but exp's own code; compiled programs are cached per (device, dtype),
never per shape; the ops are defined with their fake and autograd registrations; `softsplat
info` reports why it cannot run here. The kernel logic itself runs on the CPU as `cuda-host`."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

from softsplat import backends
from softsplat.backends import cupy as cupy_backend

needs_cupy = pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed (pip install 'softsplat[cupy]')")

#: Each CUDA major's NVRTC and runtime headers as their pip wheels lay them out (the test extra
#: installs both): the library, relative to the ``nvidia`` namespace package.
NVRTC_WHEELS = {12: ("cuda_nvrtc", "lib", "libnvrtc.so.12"), 13: ("cu13", "lib", "libnvrtc.so.13")}


def _wheel_file(parts) -> pathlib.Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(root).joinpath(*parts)
        if candidate.exists():
            return candidate
    return None


def nvrtc_compile(library: pathlib.Path, source: str, options, names) -> tuple[str, str, dict[str, str]]:
    """(PTX, log, lowered names) of ``source`` compiled by the NVRTC ``library`` (NVRTC's C API
    through ctypes: CuPy binds one NVRTC per process, whichever it finds first)."""
    nvrtc = ctypes.CDLL(str(library))
    program = ctypes.c_void_p()

    def check(status, what):
        if status != 0:
            raise RuntimeError(f"{what}: NVRTC status {status}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"softsplat_kernels.cu", 0, None, None), "create")
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(program, name.encode()), "name expression")
        encoded = [o.encode() for o in options]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "log size")
        log = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetProgramLog(program, log), "log")
        if status != 0:
            raise RuntimeError(f"NVRTC {library.name} failed ({status}):\n{log.value.decode()}")
        check(nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)), "PTX size")
        ptx = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetPTX(program, ptx), "PTX")
        lowered = {}
        for name in names:
            pointer = ctypes.c_char_p()
            check(nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(pointer)), "lowered name")
            lowered[name] = pointer.value.decode()
        return ptx.value.decode(), log.value.decode(), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.mark.parametrize("major", sorted(NVRTC_WHEELS))
@pytest.mark.parametrize("architecture", ["compute_75", "compute_90", "compute_120"])
def test_kernel_source_compiles_with_each_cuda_majors_nvrtc_and_headers(major, architecture) -> None:
    """CUDA 12 and 13 lay their pip wheels out differently (cuda_fp16.h under
    nvidia/cuda_runtime/include, or nvidia/cu13/include): cuda_include finds each major's
    headers, and that major's NVRTC compiles the backend's source with them, warning-free,
    every kernel instantiation present, nothing that flushes subnormals but exp's own."""
    library = _wheel_file(NVRTC_WHEELS[major])
    include = cupy_backend.cuda_include(major)
    if library is None:
        pytest.skip(f"the CUDA {major} NVRTC wheel is not installed (the test extra installs it)")
    assert include is not None and pathlib.Path(include, "cuda_fp16.h").exists()
    assert pathlib.Path(include).parts[-2:] == {12: ("cuda_runtime", "include"), 13: ("cu13", "include")}[major]
    names = sorted({name for dtype in cupy_backend.SCALAR_TYPES for name in cupy_backend.kernel_names(dtype).values()})
    options = (*cupy_backend.nvrtc_options(include), f"--gpu-architecture={architecture}")
    ptx, log, lowered = nvrtc_compile(library, cupy_backend.KERNEL_SOURCE, options, names)
    assert "warning" not in log.lower(), f"NVRTC {major} warnings:\n{log}"
    assert ptx.count(".entry ") == len(names) and all(lowered[name].startswith("_Z") for name in names)
    assert flushing_instructions(ptx) == []


@needs_cupy
@pytest.mark.parametrize("architecture", ["compute_75", "compute_80", "compute_90"])
def test_kernel_source_compiles_with_nvrtc(architecture) -> None:
    from cupy_backends.cuda.libs import nvrtc

    names = [name for dtype in cupy_backend.SCALAR_TYPES for name in cupy_backend.kernel_names(dtype).values()]
    program = nvrtc.createProgram(cupy_backend.KERNEL_SOURCE, "softsplat_kernels.cu", (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, (*cupy_backend.nvrtc_options(), f"--gpu-architecture={architecture}"))
        except nvrtc.NVRTCError as error:
            pytest.fail(f"NVRTC failed for {architecture}: {error}\n{nvrtc.getProgramLog(program)}")
        log = nvrtc.getProgramLog(program)
        assert "warning" not in log.lower(), f"NVRTC warnings (treated as errors):\n{log}"
        assert len(nvrtc.getPTX(program)) > 10_000
        for name in names:  # every instantiation the backend launches exists
            assert nvrtc.getLoweredName(program, name).startswith("_Z")
    finally:
        nvrtc.destroyProgram(program)


class _FakeModule:
    """Stands in for cupy_backend.load_program: counts compilations, records launches."""

    built: list = []

    def __init__(self, device_index, dtype):
        _FakeModule.built.append(self)
        self.launches = []

    def get_function(self, name):
        return lambda grid, block, args, stream: self.launches.append((name, grid, block, len(args)))


@needs_cupy
def test_two_shapes_share_one_compiled_program(monkeypatch) -> None:
    import cupy

    monkeypatch.setattr(cupy_backend, "load_program", _FakeModule)
    monkeypatch.setattr(cupy.cuda, "Device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(cupy.cuda, "ExternalStream", lambda handle, device: ("stream", handle, device))
    monkeypatch.setattr(cupy_backend, "_current_stream", lambda index: 1234)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _FakeModule.built = []
    impls = cupy_backend.Impls(cupy_backend.cuda_launch)  # CuPy's launches (faked), of CPU tensors
    for shape in [(1, 3, 8, 10), (2, 3, 17, 5)]:
        N, C, H, W = shape
        input, flow, metric = torch.randn(shape), torch.randn(N, 2, H, W), torch.randn(N, 1, H, W)
        out, normaliser = impls.forward(input, flow, metric, 3, 0)
        assert out.shape == shape and normaliser.shape == (N, 1, H, W)
        impls.backward(torch.ones(shape), None, input, flow, metric, out, normaliser, 3, 0, [True, True, True])
    assert len(_FakeModule.built) == 1, "a new shape compiled a new program"
    assert list(cupy_backend._modules) == [(0, torch.float32)]
    launched = [name for name, *_ in _FakeModule.built[0].launches]
    assert launched == 2 * [
        "softsplat::splat_forward_kernel<float, float, int>", "softsplat::splat_finish_kernel<float, float, int>",
        "softsplat::splat_backward_prepare_kernel<float, int>", "softsplat::splat_backward_kernel<float, float, int>",
    ]
    impls.forward(input.half(), flow, metric, 3, 0)
    assert len(_FakeModule.built) == 2 and (0, torch.float16) in cupy_backend._modules
    # Raw normalisation (splat_many's numerators): the finishing pass writes the planes, undivided.
    _FakeModule.built[0].launches.clear()
    impls.forward(input, flow, metric, 3, 3)
    assert [name for name, *_ in _FakeModule.built[0].launches] == [
        "softsplat::splat_forward_kernel<float, float, int>", "softsplat::splat_finish_kernel<float, float, int>"]


@needs_cupy
def test_ops_are_defined_with_fake_and_autograd() -> None:
    ops = cupy_backend.define_ops()
    assert ops is torch.ops.softsplat_cupy
    input, flow, metric = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (input, flow, metric)]
        out, normaliser = torch.ops.softsplat_cupy.splat_forward(*fakes, 3, 0)
    assert out.shape == (1, 2, 3, 4) and normaliser.shape == (1, 1, 3, 4)


def test_info_shows_cupy_and_its_reason() -> None:
    result = subprocess.run([sys.executable, "-m", "softsplat", "info"], capture_output=True, text=True, check=True, env={"COLUMNS": "250", "PATH": ""})
    line = next(line for line in result.stdout.splitlines() if "│ cupy" in line)
    reason = backends.get("cupy").unavailable_reason
    if reason:
        assert "no" in line and reason.split()[0] in line


def test_a_cupy_of_another_cuda_major_than_torch_is_reported() -> None:
    from softsplat.backends.cupy import cuda_mismatch, installed_cupy_cuda

    reason = cuda_mismatch(12, "13.0")
    assert "CuPy is built for CUDA 12, torch for CUDA 13.0" in reason and "softsplat[cupy13]" in reason
    assert cuda_mismatch(13, "13.0") is None and cuda_mismatch(12, "12.6") is None
    assert cuda_mismatch(12, None) is None  # a CPU torch: nothing to match
    assert cuda_mismatch(None, "13.0") is None  # a source build of CuPy: its CUDA is its own
    assert installed_cupy_cuda() in (None, 12, 13)


@needs_cupy
def test_nvrtc_contracts_no_multiply_add() -> None:
    """The backend compiles with --fmad=false (docs/spec.md, floating point): the backward, whose
    sums of products a compiler would fuse, has fewer FMAs than with contraction allowed (those
    left are the math library's own, in exp)."""
    import re

    from cupy_backends.cuda.libs import nvrtc

    def backward_fmas(options) -> int:
        program = nvrtc.createProgram(cupy_backend.KERNEL_SOURCE, "softsplat_kernels.cu", (), ())
        try:
            for name in cupy_backend.kernel_names(torch.float32).values():
                nvrtc.addNameExpression(program, name)
            nvrtc.compileProgram(program, (*options, "--gpu-architecture=compute_80"))
            ptx = nvrtc.getPTX(program).decode()
        finally:
            nvrtc.destroyProgram(program)
        return sum(entry.count("fma.rn") for entry in re.split(r"\.entry ", ptx) if entry.startswith("_ZN9softsplat21splat_backward_kernel"))

    options = cupy_backend.nvrtc_options()
    assert "--fmad=false" in options
    contracted = backward_fmas([o for o in options if o != "--fmad=false"] + ["--fmad=true"])
    assert backward_fmas(options) < contracted


@needs_cupy
def test_a_launch_runs_on_its_tensors_device_and_torchs_stream_there(monkeypatch) -> None:
    """For a cuda:1 tensor with device 0 current: the launch enters cuda:1 (cupy.cuda.Device(1)),
    compiles for it, and goes to torch's current stream of cuda:1, never of the current device."""
    import cupy

    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(cupy_backend, "load_program", _FakeModule)
    monkeypatch.setattr(cupy.cuda, "Device", device)
    monkeypatch.setattr(cupy.cuda, "ExternalStream", lambda handle, index: ("stream", handle, index))
    monkeypatch.setattr(cupy_backend, "_current_stream", lambda index: 1000 + index)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    streams = []
    monkeypatch.setattr(_FakeModule, "get_function", lambda self, name: lambda grid, block, args, stream: streams.append(stream))
    cupy_backend.cuda_launch(torch.device("cuda", 1), torch.float32, "finish", "int", 10, None, ("index", 4), None, None,
                             ("index", 1), ("index", 1), ("index", 1), ("index", 10), ("int", 0), ("int", 1))
    assert entered == [1] and list(cupy_backend._modules) == [(1, torch.float32)]
    assert streams == [("stream", 1001, 1)]


#: What may flush subnormals in the compiled kernels: exp's own library code (its ex2.approx
#: works on a range-reduced argument, never on a subnormal the kernels hold).
EXP_OWN_FTZ = ("ex2.approx.ftz.f32",)


def flushing_instructions(ptx: str) -> list[str]:
    """PTX instructions that flush float32 subnormals, but exp's own (float atomics flush too,
    with no .ftz in their name: docs/spec.md says so)."""
    return [line.strip() for line in ptx.splitlines() if ".ftz" in line and not line.strip().startswith(EXP_OWN_FTZ)]


@needs_cupy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_compiled_kernels_flush_no_subnormal(dtype) -> None:
    """The backend's own compile (compile_program, as a launch calls it) leaves no instruction
    that flushes subnormals: with CuPy's forced -ftz=true every float32 add, multiply, compare
    and floor flushes, and a pixel with a negative subnormal flow lands in the other cell."""
    ptx, lowered = cupy_backend.compile_program(dtype, 90, ptx=True)
    ptx = ptx.decode()
    assert set(lowered) == set(cupy_backend.kernel_names(dtype).values())
    assert ptx.count(".entry ") == len(lowered) and "ex2.approx" in ptx
    assert flushing_instructions(ptx) == []


@needs_cupy
def test_a_machine_binary_for_known_architectures_and_ptx_past_them() -> None:
    from cupy_backends.cuda.libs import nvrtc

    cubin, _ = cupy_backend.compile_program(torch.float32, 80)
    assert cubin.startswith(b"\x7fELF")
    newest = max(nvrtc.getSupportedArchs())
    ptx, _ = cupy_backend.compile_program(torch.float32, newest + 10)  # a GPU newer than this NVRTC
    assert ptx.decode().lstrip().startswith("//") and f".target sm_{newest}" in ptx.decode()


def test_launch_sizes_match_the_kernels_channel_blocks() -> None:
    """The CuPy launches size their grids by the lanes or channels a thread of the forward, the
    gather and the finishing kernel takes: the constants of kernels.cuh, read from its source."""
    import re

    source = (pathlib.Path(cupy_backend.__file__).parent / "csrc" / "cuda" / "kernels.cuh").read_text()
    for name, value in (("kSplatChannelBlock", cupy_backend.CHANNEL_BLOCK),
                        ("kNormaliseChannels", cupy_backend.NORMALISE_CHANNELS),
                        ("kForwardLanes", cupy_backend.FORWARD_LANES)):
        found = re.search(rf"constexpr int {name} = (\d+);", source)
        assert found and int(found.group(1)) == value, (name, found and found.group(1), value)


@needs_cupy
@pytest.mark.parametrize("arch, adds", [(80, {"atom.global.add.f32"}), (90, {"atom.global.add.v4.f32"})])
def test_nvrtc_takes_the_vector_atomics_on_sm90(arch, adds) -> None:
    """The forward's adds as NVRTC compiles them: on sm_90 every float add a vector of four
    lanes (one reduction per tap and quad, docs/performance.md), on sm_80 scalar ones."""
    import re

    ptx, _ = cupy_backend.compile_program(torch.float32, arch, ptx=True)
    assert set(re.findall(r"\b(?:red|atom)\.global\.add\.[\w.]+", ptx.decode())) == adds
