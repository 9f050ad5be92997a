"""The Triton backend beyond the conformance suite: ahead-of-time compilation for sm_80 and
sm_90, and the torch.library registration (opcheck, fullgraph torch.compile) where it can run."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import softsplat
from softsplat import backends
from softsplat.backends import triton_backend

HERE = pathlib.Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (pip install 'softsplat[triton]')")
needs_gpu = pytest.mark.skipif(
    triton_backend.interpreted() or not torch.cuda.is_available(),
    reason="opcheck and torch.compile trace triton_op with fake tensors, which Triton's interpreter "
    "cannot run: this test runs on a CUDA machine (GPU CI)",
)


@needs_triton
def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "80", "90"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "for sm_80, sm_90" in result.stdout


@needs_triton
def test_triton_is_available_in_the_interpreter_only_on_cpu() -> None:
    backend = backends.get("triton")
    if triton_backend.interpreted():
        assert backend.is_available() and backend.devices() == ("cpu",)
    elif not torch.cuda.is_available():
        assert "no CUDA device" in backend.unavailable_reason


def _tensors(device):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn((2, 3, 5, 7), generator=generator).to(device).requires_grad_(),
        (torch.randn((2, 2, 5, 7), generator=generator) * 3).to(device).requires_grad_(),
        torch.randn((2, 1, 5, 7), generator=generator).to(device).requires_grad_(),
    )


@needs_triton
@needs_gpu
def test_opcheck() -> None:
    backends.get("triton").prepare()
    input, flow, metric = _tensors("cuda")
    for kind, normalisation in ((0, 0), (1, 1), (2, 2), (3, 0)):
        torch.library.opcheck(torch.ops.softsplat_triton.splat_forward.default, (input, flow, metric if kind >= 2 else None, kind, normalisation))


@needs_triton
@needs_gpu
def test_compile_fullgraph() -> None:
    input, flow, metric = _tensors("cuda")

    def warp(input, flow, metric):
        return softsplat.splat(input, flow, metric, mode="soft", backend="triton") * 2

    compiled = torch.compile(warp, fullgraph=True)
    torch.testing.assert_close(compiled(input, flow, metric), warp(input, flow, metric))


def test_every_launch_happens_on_the_inputs_device(monkeypatch) -> None:
    """Triton launches on the current CUDA device and its current stream: each of the backend's
    launches must run inside ``torch.cuda.device(<the input's device>)``. Checked with fake
    cuda:1 tensors (no GPU needed), the device context and the launcher replaced by recorders."""
    import contextlib

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
def test_stable_maximum_lets_every_nan_win() -> None:
    """A NaN metric wins the scatter-max whatever its sign bit (Triton's float atomic max alone
    loses a NaN with the sign bit set to -inf), and -0.0 is a number like +0.0."""
    if not triton_backend.interpreted():
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, as the test session sets it without CUDA)")
    from softsplat.backends import oracle

    backends.get("triton").prepare()
    flow = torch.zeros(1, 2, 3, 4)
    metric = torch.tensor([[-float("nan"), -0.0, 2.0, float("nan")], [1.0, -5.0, -0.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    metric = metric.view(1, 1, 3, 4)
    assert torch.signbit(metric[0, 0, 0, 0])  # the case: a NaN with its sign bit set
    for dtype in (torch.float32, torch.float64):
        got = torch.ops.softsplat_triton.splat_maximum(flow.to(dtype), metric.to(dtype))
        expected = oracle.splat_maximum(metric.to(dtype), flow.to(dtype))
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
