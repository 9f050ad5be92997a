"""The Triton backend beyond the conformance suite: ahead-of-time compilation for sm_80 and
sm_90, and the torch.library registration (opcheck, fullgraph torch.compile) where it can run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import softsplat
from softsplat import backends
from softsplat.backends import triton as triton_backend

HERE = pathlib.Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (pip install 'softsplat[triton]')")
needs_gpu = pytest.mark.skipif(
    triton_backend.interpreted() or not torch.cuda.is_available(),
    reason="reads the kernels Triton compiled for a CUDA device: runs on a CUDA machine (GPU CI)",
)
#: Where the Triton kernels run here: compiled on a CUDA device, else in Triton's interpreter.
DEVICE = "cpu" if triton_backend.interpreted() or not torch.cuda.is_available() else "cuda"
#: Batch 1 (inference), and every other size 1 Inductor makes a constant: C, H, W, and so
#: strides of 1 in every position.
SHAPES = [(2, 3, 5, 7), (1, 3, 5, 7), (1, 1, 1, 1), (1, 2, 1, 6), (1, 4, 6, 1), (1, 64, 3, 4)]


@needs_triton
def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # About 1,400 specialisations, a process per core: with Triton's cache empty (a fresh CI
    # machine) about 8 minutes on 2 cores; the limit only stops a hang.
    shards = str(min(os.cpu_count() or 2, 8))
    result = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "--shards", shards, "80", "90"],
                            capture_output=True, text=True, env=env, timeout=2400)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "for sm_80, sm_90" in result.stdout


@needs_triton
def test_triton_is_available_in_the_interpreter_only_on_cpu() -> None:
    backend = backends.get("triton")
    if triton_backend.interpreted():
        assert backend.is_available() and backend.devices() == ("cpu",)
    elif not torch.cuda.is_available():
        assert "no CUDA device" in backend.unavailable_reason


def _tensors(device, shape=(2, 3, 5, 7)):
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn((N, C, H, W), generator=generator).to(device).requires_grad_(),
        (torch.randn((N, 2, H, W), generator=generator) * 3).to(device).requires_grad_(),
        torch.randn((N, 1, H, W), generator=generator).to(device).requires_grad_(),
    )


@needs_triton
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_opcheck(shape) -> None:
    backends.get("triton").prepare()
    input, flow, metric = _tensors(DEVICE, shape)
    for kind, normalisation in ((0, 0), (1, 1), (2, 2), (3, 0)):
        torch.library.opcheck(torch.ops.softsplat_triton.splat_forward.default, (input, flow, metric if kind >= 2 else None, kind, normalisation))


def _warp(input, flow, metric):
    return softsplat.splat(input, flow, metric, mode="soft", backend="triton") * 2


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compile_fullgraph_matches_eager(shape) -> None:
    """torch.compile(fullgraph=True) at batch 1 and at the other sizes of 1 that Inductor turns
    into constants: the same output and gradients as eager, bitwise."""
    torch._dynamo.reset()
    compiled = torch.compile(_warp, fullgraph=True)
    results = []
    for function in (compiled, _warp):
        tensors = _tensors(DEVICE, shape)
        out = function(*tensors)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), *(t.grad for t in tensors)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_triton
def test_compiled_graphs_call_the_ops_opaquely() -> None:
    """The ops are opaque to torch.compile: its graph calls softsplat_triton's ops and never
    the kernels, which Inductor would compile with options of its own (FMA contraction,
    flushing libdevice, sizes of 1 as constants): see triton_backend._ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    backends.get("triton").prepare()
    tensors = [t.detach() for t in _tensors(DEVICE, (1, 3, 5, 7))]
    graph = make_fx(_warp, tracing_mode="fake")(*tensors).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert "softsplat_triton.splat_forward.default" in targets, targets
    assert not [t for t in targets if "triton_kernel_wrapper" in t], targets


@needs_triton
@needs_gpu
def test_compiled_launches_keep_the_launch_options() -> None:
    """Every kernel Triton compiled while torch.compile ran the ops at batch 1 (read from the
    kernels' caches): no FMA contraction, nothing flushing subnormals outside the atomics, as
    tests/triton_aot.py reads them ahead of time."""
    sys.path.insert(0, str(HERE))
    import triton_aot

    from softsplat.backends import triton_kernels as k

    for shape in SHAPES[1:3]:
        torch._dynamo.reset()
        out = torch.compile(_warp, fullgraph=True)(*_tensors("cuda", shape))
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    problems, read = [], 0
    for kernel in (k._splat_max_kernel, k._splat_fwd_kernel, k._splat_finish_kernel, k._splat_bwd_prepare_kernel,
                   k._splat_bwd_kernel):
        for caches in kernel.device_caches.values():
            for binary in caches[0].values():
                read += 1
                kind = triton_aot.constexprs_of(kernel, binary.src.constants).get("KIND")
                problems += triton_aot.read(binary, f"{kernel.__name__} (compiled)", kernel.__name__, kind,
                                            binary.metadata.enable_fp_fusion)
    assert read >= 4, f"{read} compiled kernels found in Triton's caches"
    assert problems == [], problems


def test_every_launch_happens_on_the_inputs_device(monkeypatch) -> None:
    """Triton launches on the current CUDA device and its current stream: each of the backend's
    launches must run inside ``torch.cuda.device(<the input's device>)``. Checked with fake
    cuda:1 tensors (no GPU needed), the device context and the launcher replaced by recorders."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    current, launches = [None], []

    @contextlib.contextmanager
    def device(which):
        previous, current[0] = current[0], torch.device(which)
        yield
        current[0] = previous

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel.__name__, current[0]))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.library, "wrap_triton", Recorder)
    with FakeTensorMode():
        input = torch.empty(1, 2, 4, 5, device="cuda:1")
        flow, metric = torch.empty(1, 2, 4, 5, device="cuda:1"), torch.empty(1, 1, 4, 5, device="cuda:1")
        maximum = triton_backend.splat_maximum(flow, metric)
        out, normaliser = triton_backend.splat_forward(input, flow, metric, 4, 0, maximum)
        triton_backend.splat_backward(out, None, input, flow, metric, out, normaliser, 4, 0, [True, True, True], maximum)
    assert {name for name, _ in launches} >= {"_splat_max_kernel", "_splat_fwd_kernel", "_splat_bwd_kernel"}
    assert all(where == torch.device("cuda:1") for _, where in launches), launches


@needs_triton
@pytest.mark.parametrize("channels, per_program, programs",
                         [(0, 4, 1), (1, 4, 1), (3, 4, 1), (9, 16, 1), (16, 16, 2), (17, 16, 2), (192, 16, 13)])
def test_a_forward_program_takes_one_block_of_lanes(monkeypatch, channels, per_program, programs) -> None:
    """The forward's grid has a second axis over blocks of at most 16 accumulator lanes (the
    channels and soft's normaliser, rounded up to quads of four; the lane count's power of two
    below 16), so an image of few pixels and many channels (C = 192 at 135x240) runs 13
    programs per block of pixels, not one program looping over 192 channels; every lane is in
    one block. Read from the launch, with fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel.__name__, grid, kwargs))

    monkeypatch.setattr(torch.library, "wrap_triton", Recorder)
    monkeypatch.setattr(torch.cuda, "device", lambda which: contextlib.nullcontext())
    N, H, W = 1, 135, 240
    with FakeTensorMode():
        input = torch.empty(N, channels, H, W, device="cuda")
        flow, metric = torch.empty(N, 2, H, W, device="cuda"), torch.empty(N, 1, H, W, device="cuda")
        triton_backend.splat_forward(input, flow, metric, 3, 0)
    (grid, options), = [(grid, kwargs) for name, grid, kwargs in launches if name == "_splat_fwd_kernel"]
    assert options["CHANNELS"] == per_program
    assert grid == (-(-N * H * W // options["BLOCK"]), programs)


@needs_triton
def test_a_forward_program_takes_every_block_its_axis_gives_it(monkeypatch) -> None:
    """Where the accumulator has more blocks of 16 lanes than the grid's second axis takes
    (65,535), each program takes every 65,535th block (the forward's and the finishing pass's):
    checked in the interpreter with that axis cut to 3 programs, C = 64 and 100 (5 and 7
    blocks of lanes, 4 and 7 of channels), against the oracle."""
    if not triton_backend.interpreted():
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, as the test session sets it without CUDA)")
    monkeypatch.setattr(triton_backend, "CHANNEL_PROGRAMS", 3)
    generator = torch.Generator().manual_seed(0)
    for channels in (64, 100):
        input = torch.randn(2, channels, 5, 6, generator=generator)
        flow = torch.randn(2, 2, 5, 6, generator=generator) * 2
        metric = torch.randn(2, 1, 5, 6, generator=generator)
        got = softsplat.splat(input, flow, metric, mode="soft", backend="triton")
        expected = softsplat.splat(input, flow, metric, mode="soft", backend="torch")
        torch.testing.assert_close(got, expected)


@needs_triton
def test_stable_maximum_lets_every_nan_win() -> None:
    """A NaN metric wins the scatter-max whatever its sign bit (Triton's float atomic max alone
    loses a NaN with the sign bit set to -inf), and -0.0 is a number like +0.0."""
    if not triton_backend.interpreted():
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, as the test session sets it without CUDA)")
    from softsplat.backends import torch as oracle

    backends.get("triton").prepare()
    flow = torch.zeros(1, 2, 3, 4)
    metric = torch.tensor([[-float("nan"), -0.0, 2.0, float("nan")], [1.0, -5.0, -0.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    metric = metric.view(1, 1, 3, 4)
    assert torch.signbit(metric[0, 0, 0, 0])  # the case: a NaN with its sign bit set
    for dtype in (torch.float32, torch.float64):
        got = torch.ops.softsplat_triton.splat_maximum(flow.to(dtype), metric.to(dtype))
        expected = oracle.splat_maximum(metric.to(dtype), flow.to(dtype))
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
