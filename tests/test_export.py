"""Deployment paths: torch.export (AOTInductor, ExecuTorch), the legacy ONNX exporter's refusal,
and `softsplat export-onnx`. The ONNX translation itself is checked in conformance/test_onnx.py."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

import softsplat
from softsplat.cli import main


def inputs(seed: int, N=2, C=3, H=6, W=9):
    generator = torch.Generator().manual_seed(seed)
    flow = torch.randn(N, 2, H, W, generator=generator) * 3
    flow[0, 0, 0, :2] = torch.tensor([float("nan"), 1e30])
    return torch.rand(N, C, H, W, generator=generator), flow, torch.randn(N, 1, H, W, generator=generator)


@pytest.mark.parametrize("mode, stable", [("sum", False), ("avg", False), ("soft", False), ("soft-zeroeps", True), ("max", False)])
def test_torch_export_of_splat_reproduces_eager(mode, stable) -> None:
    model = softsplat.Splat(mode, stable, return_normaliser=mode != "sum")
    arguments = inputs(0) if softsplat.Mode.parse(mode).needs_metric else inputs(0)[:2]
    program = torch.export.export(model, arguments, dynamic_shapes=softsplat.onnx.dynamic_shapes(arguments))
    other = inputs(1, N=1, C=2, H=11, W=4)[: len(arguments)]  # another size: the shapes are dynamic
    for case in (arguments, other):
        got, expected = program.module()(*case), model(*case)
        for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
            assert torch.equal(g.isnan(), e.isnan()) and torch.equal(g.nan_to_num(), e.nan_to_num())


def test_torch_export_of_splat_many_reproduces_eager() -> None:
    model = softsplat.SplatMany("soft", sources=2, stable=True)
    arguments = inputs(2) + inputs(3)
    program = torch.export.export(model, arguments)
    assert torch.equal(program.module()(*arguments).nan_to_num(), model(*arguments).nan_to_num())


def test_legacy_onnx_exporter_names_the_way_that_works() -> None:
    model = softsplat.Splat("soft")
    with pytest.raises(Exception, match=r"dynamo=False.*dynamo=True, custom_translation_table=softsplat.onnx.translations\(\)"):
        torch.onnx.export(model, inputs(0), io.BytesIO(), dynamo=False)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="the onnx extra is not installed (pip install -e '.[onnx]')")
def test_export_onnx_command_writes_a_model_that_runs(tmp_path, capsys) -> None:
    import onnxruntime

    path = tmp_path / "avg.onnx"
    assert main(["export-onnx", "--mode", "avg", "--normaliser", "--out", str(path)]) == 0
    assert "inputs input, flow" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, flow, _ = inputs(4)
    result, normaliser = session.run(None, {"input": x.numpy(), "flow": flow.numpy()})
    expected, expected_normaliser = softsplat.splat(x, flow, mode="avg", return_normaliser=True, backend="torch")
    assert torch.allclose(torch.from_numpy(result), expected, atol=1e-5)
    assert torch.allclose(torch.from_numpy(normaliser), expected_normaliser, atol=1e-5)
