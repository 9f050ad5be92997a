"""The host shim computes what the device computes: float32 atomic adds flush subnormal
operands and results to zero (GPUs' RED.E.ADD.F32.FTZ), and the shim, like the device build,
contracts nothing into FMAs. The contract for the difference this makes is in docs/spec.md
("Floating point"); conformance/compare.py's ``flushed`` marks what it leaves open."""

from __future__ import annotations

import pytest
import torch

import softsplat
from conformance import host
from conformance.compare import compare, flushed
from conformance.strategies import Case
from conformance.test_against_oracle import check_case
from softsplat import Mode, backends
from softsplat.backends.extension import compiler_reason

pytestmark = pytest.mark.skipif(compiler_reason() is not None, reason=f"cannot build here: {compiler_reason()}")


def _deep_metric_case(dtype=torch.float32) -> Case:
    """soft-zeroeps where every pixel's weight exp(-88) ~ 6e-39 is subnormal in float32."""
    x = torch.arange(1.0, 1 + 2 * 5 * 6, dtype=dtype).view(1, 2, 5, 6)
    flow = torch.full((1, 2, 5, 6), 0.25, dtype=dtype)
    metric = torch.full((1, 1, 5, 6), -88.0, dtype=dtype)
    metric[..., :, 3:] = 0.0  # the right half is normal: there the backends must agree
    return Case(x, flow, metric, Mode("soft-zeroeps"), (True, True, True), False)


def test_float32_atomics_flush_subnormals_as_the_device() -> None:
    case = _deep_metric_case()
    device_like = softsplat.splat(*case.tensors(), mode=case.mode, backend="cuda-host")
    cpu = softsplat.splat(*case.tensors(), mode=case.mode, backend="cpp")
    targets, _ = flushed(case)
    assert targets[..., :, :3].any() and not targets[..., :, 4:].any()
    left = targets.expand_as(cpu)
    # D flushed to 0 (zeroeps then divides by 1): out is the bare sum of v * w, ~1e-37.
    assert (device_like[left].abs() < 1e-30).all()
    assert (cpu[left] >= 1).all()  # the CPU keeps the subnormal D: out ~ input there
    torch.testing.assert_close(device_like[~left], cpu[~left])
    # float64 atomics keep subnormals: the shim agrees with the CPU.
    case64 = _deep_metric_case(torch.float64)
    torch.testing.assert_close(softsplat.splat(*case64.tensors(), mode=case64.mode, backend="cuda-host"),
                               softsplat.splat(*case64.tensors(), mode=case64.mode, backend="cpp"))


def test_the_conformance_contract_leaves_exactly_the_flushed_targets_open() -> None:
    case = _deep_metric_case()
    check_case(backends.get("cuda-host"), case, torch.Generator().manual_seed(0))  # passes under the contract
    got = softsplat.splat(*case.tensors(), mode=case.mode, backend="cuda-host")
    reference = softsplat.splat(*(t.double() for t in case.tensors()), mode=case.mode, backend="torch")
    with pytest.raises(AssertionError, match="elements off"):  # without it, the flushed targets fail
        compare("output", got, reference, reference, reference.abs(), torch.float32)


def test_the_shim_is_built_without_contraction_as_the_device_code() -> None:
    from softsplat.backends import build_flags

    assert "-ffp-contract=off" in host.library().cflags and "--fmad=false" in build_flags.CUDA_FLAGS


def test_a_grid_stride_index_past_2_31_stays_exact() -> None:
    """The normalise launch of a forward of input [1, C, 1, 128] with C * 128 = 2^31 - 2^27 (every
    tensor below 2^31 elements), run on the host with the index type the cupy backend's launch
    picks for it (its own check, of tensors of that shape expanded from one element: no memory).
    The first block's threads step by the grid (2^20 blocks x 256 threads = 2^28) to
    t + 7 * 2^28 < total; one more step passes 2^31 - 1, where a 32-bit index wraps (the host
    build wraps as the device does) and the loop runs on at negative indices."""
    import ctypes

    from softsplat.backends import cupy as cupy_backend

    W, total = 128, 2**31 - 2**27
    C = total // W
    one = torch.zeros(1, 1, 1, 1)
    input, out = one.expand(1, C, 1, W), one.expand(1, C, 1, W)
    flow, metric = torch.zeros(1, 2, 1, W), torch.zeros(1, 1, 1, W)
    index = "int" if cupy_backend._fits_int32((input, flow, metric, out), (C + 1) * W) else "long long"
    blocks, threads = cupy_backend.blocks_for(total), cupy_backend.THREADS
    assert blocks * threads == 2**28
    library = host.kernel_library()
    library.ops()  # built and loaded once
    function = ctypes.CDLL(str(library.library_path())).softsplat_host_loop_probe
    function.restype = ctypes.c_longlong
    smallest, largest = ctypes.c_longlong(), ctypes.c_longlong()
    expected = sum(len(range(t, total, blocks * threads)) for t in range(threads))
    visits = function(ctypes.c_int(index == "long long"), ctypes.c_longlong(total), ctypes.c_uint(blocks),
                      ctypes.c_uint(threads), ctypes.c_uint(0), ctypes.c_uint(1), ctypes.c_longlong(2 * expected),
                      ctypes.byref(smallest), ctypes.byref(largest))
    assert (visits, smallest.value, largest.value) == (expected, 0, threads - 1 + 7 * 2**28), index


@pytest.mark.parametrize("backend_name", ["cuda-host", "cupy-host"])
def test_the_cuda_scatter_max_lets_every_nan_win(backend_name) -> None:
    """The CUDA kernels' scatter-max (integer atomics on the bits, as Triton's): a NaN metric wins
    whatever its sign bit, -0.0 is a number like +0.0, negatives order inversely; the same maxima
    as the oracle's, bitwise, in float32 and float64."""
    from softsplat.backends import torch as oracle

    backend = backends.get(backend_name)
    backend.prepare()
    flow = torch.zeros(1, 2, 3, 4)
    flow[0, 0, 1, :] = 1.0  # row 1 lands one to the right: targets with two metrics
    flow[0, 1, 2, :] = -1.0  # row 2 lands on row 1
    metric = torch.tensor([[-float("nan"), -0.0, 2.0, float("nan")], [1.0, -5.0, -0.0, -3.0], [-7.0, -2.0, 0.5, -1e-40]])
    metric = metric.view(1, 1, 3, 4)
    for dtype in (torch.float32, torch.float64):
        got = backend._ops.splat_maximum(flow.to(dtype), metric.to(dtype))
        expected = oracle.splat_maximum(metric.to(dtype), flow.to(dtype))
        assert torch.equal(got.isnan(), expected.isnan()), (got, expected)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()), (got, expected)


def _constant_flow_case(channels: int, H: int = 6, W: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every pixel moved by (0.25, 0.25): the last column and row keep two taps, the corner one,
    the rest four, so (2W - 1)(2H - 1) kept taps in all."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(1, channels, H, W, generator=generator)
    flow = torch.full((1, 2, H, W), 0.25)
    metric = torch.randn(1, 1, H, W, generator=generator)
    return input, flow, metric, (2 * W - 1) * (2 * H - 1)


def _quads(channels: int, normalised: bool) -> int:
    """The 16-byte quads of the atomic forward's accumulator per target: the channels, then
    the normaliser's lane, rounded up to four lanes (cuda/kernels.cuh, forward_lanes)."""
    return -(-(channels + normalised) // 4)


@pytest.mark.parametrize("backend_name", ["cuda-host", "cupy-host"])
@pytest.mark.parametrize("channels", [3, 64])
@pytest.mark.parametrize(
    "mode, stable, launches, normalised, maxima",
    [
        # soft: the scatter (C channels and the normaliser per kept tap), then the result's pass
        ("soft-addeps", False, 2, True, 0),
        ("sum", False, 2, False, 0),  # no normaliser; the pass writes the planes, undivided
        # stable: the scatter-max first (one reduction per kept tap), then as soft
        ("soft-addeps", True, 3, True, 1),
    ],
)
def test_what_the_gpu_forward_issues_per_call(backend_name, channels, mode, stable, launches, normalised, maxima) -> None:
    """The GPU forward's work, counted where its code runs on the CPU (shim.h's work counter, as
    sm_90 issues it): one vector atomic add per kept tap and quad of four lanes (the channels and
    the normaliser side by side: one per kept tap for an image, 17 for C = 64), one reduction per
    kept tap for stable's maximum, and the launches per call. docs/performance.md states these
    counts."""
    input, flow, metric, kept = _constant_flow_case(channels)
    with host.WorkCounter(backend_name) as counted:
        softsplat.splat(input, flow, None if mode == "sum" else metric, mode=mode, stable=stable, backend=backend_name)
    assert (counted.launches, counted.adds, counted.maxima) == (launches, kept * _quads(channels, normalised),
                                                                 kept * maxima)


@pytest.mark.parametrize("backend_name", ["cuda-host", "cupy-host"])
@pytest.mark.parametrize("channels", [3, 16, 17, 192])
@pytest.mark.parametrize("mode, normalised", [("soft-addeps", True), ("sum", False)])
def test_a_gpu_forward_thread_adds_one_block_of_lanes(backend_name, channels, mode, normalised) -> None:
    """A thread of the GPU forward takes one pixel and a block of at most 16 lanes (four
    quads): its four taps times those quads, so that an image of few pixels and many channels
    (C = 192 at 135x240) is spread over 13 threads per pixel, not one thread looping over 192
    channels."""
    input, flow, metric, kept = _constant_flow_case(channels)
    with host.WorkCounter(backend_name) as counted:
        softsplat.splat(input, flow, None if mode == "sum" else metric, mode=mode, backend=backend_name)
    quads = _quads(channels, normalised)
    assert counted.busiest == 4 * min(quads, 4)
    assert counted.adds == kept * quads


@pytest.mark.parametrize("backend_name", ["cuda-host", "cupy-host"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode, launches", [("soft-addeps", 2), ("sum", 2)])
def test_a_16_bit_result_takes_no_pass_of_its_own(backend_name, dtype, mode, launches) -> None:
    """In inference, the pass after the scatter writes a 16-bit input's result in its own dtype:
    soft's division writes it (two launches, as for float32, and no cast after), sum's numerator
    takes that one pass to be rounded (instead of torch's cast)."""
    input, flow, metric, _ = _constant_flow_case(64)
    with torch.inference_mode(), host.WorkCounter(backend_name) as counted:
        out = softsplat.splat(input.to(dtype), flow, None if mode == "sum" else metric, mode=mode, backend=backend_name)
    assert out.dtype == dtype and counted.launches == launches
    expected = softsplat.splat(input.to(dtype), flow, None if mode == "sum" else metric, mode=mode, backend="torch")
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend_name", ["cuda-host", "cupy-host"])
def test_the_gpu_backward_issues_no_atomics(backend_name) -> None:
    """The backward gathers: it prepares the targets' gradients and each source pixel reads its
    taps (two launches, no atomic operation: deterministic as it is)."""
    input, flow, metric, _ = _constant_flow_case(64)
    tensors = [t.requires_grad_() for t in (input, flow, metric)]
    out = softsplat.splat(*tensors, mode="soft-addeps", backend=backend_name)
    with host.WorkCounter(backend_name) as counted:
        out.backward(torch.randn_like(out))
    assert (counted.launches, counted.adds, counted.maxima) == (2, 0, 0)
