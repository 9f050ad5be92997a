"""The host shim computes what the device computes: float32 atomic adds flush subnormal
operands and results to zero (GPUs' RED.E.ADD.F32.FTZ), and the shim, like the device build,
contracts nothing into FMAs. The contract for the difference this makes is in docs/spec.md
("Floating point"); conformance/compare.py's ``flushed`` marks what it leaves open."""

from __future__ import annotations

import pytest
import torch

import softsplat
from conformance.compare import compare, flushed
from conformance.strategies import Case
from conformance.test_against_oracle import check_case
from softsplat import Mode, backends
from softsplat.backends import cuda_host
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

    assert "-ffp-contract=off" in cuda_host.library().cflags and "--fmad=false" in build_flags.CUDA_FLAGS
