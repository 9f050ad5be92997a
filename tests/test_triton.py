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
