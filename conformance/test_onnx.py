"""Export to ONNX (``softsplat.onnx``): models calling ``splat``/``splat_many`` exported with
``torch.onnx.export(dynamo=True)``, checked by ``onnx.checker`` and run by ONNX Runtime on the
CPU, against the oracle with the conformance tolerances, on drawn cases (integer, half-integer,
NaN/inf and far out-of-image flows, 1x1 and odd sizes, float32 and float16). One exported file
per mode serves every drawn shape (batch, channels, height and width are dynamic)."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import softsplat
from softsplat import Mode
from softsplat.backends import torch as oracle
from softsplat.modes import compute_dtype

from .compare import compare
from .strategies import cases

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the onnx extra is not installed (pip install -e '.[onnx]')",
)


def checked(program):
    """The ONNX model of an exported program, checked, and an ONNX Runtime session of it."""
    import onnx
    import onnxruntime

    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto, onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@functools.cache
def exported(mode: Mode, stable: bool, dtype: torch.dtype, normaliser: bool = False):
    return checked(softsplat.onnx.standalone(mode.value, stable=stable, return_normaliser=normaliser, dtype=dtype))


def run(session, arguments) -> list[torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (a.detach().contiguous().numpy() for a in arguments if a is not None)))
    return [torch.from_numpy(value) for value in session.run(None, feeds)]


def check(what: str, got: torch.Tensor, x, flow, metric, mode: Mode, stable: bool, index: int = 0) -> None:
    """``got`` (the output ``index``: result, or normaliser) against the oracle."""
    dtype = compute_dtype(x.dtype)

    def oracle_output(values, cast):
        f = cast(flow)
        m = None if metric is None else cast(metric)
        out, normaliser = oracle.splat_with_normaliser(cast(values), f, m, mode, stable=stable)
        return out if index == 0 else normaliser

    reference = oracle_output(x, lambda t: t.double())
    same = oracle_output(x, lambda t: t.to(dtype) if t.dtype != x.dtype else t)
    scale = oracle_output(x.abs(), lambda t: t.double()).nan_to_num(posinf=0.0)
    compare(what, got, reference, same, scale, dtype)


@settings(max_examples=30)
@given(data=st.data())
def test_exported_splat_matches_the_oracle(data) -> None:
    case = data.draw(cases(dtypes=(torch.float32, torch.float16)), label="case")
    assume(case.input.numel() > 0 and case.input.shape[1] > 0)
    normaliser = case.mode.normalisation is not None and data.draw(st.booleans(), label="return_normaliser")
    x = case.input.contiguous()
    flow = case.flow.float().contiguous()
    metric = None if case.metric is None else case.metric.float().contiguous()
    _, session = exported(case.mode, case.stable, x.dtype, normaliser)
    outputs = run(session, (x, flow, metric))
    check("onnx result", outputs[0], x, flow, metric, case.mode, case.stable)
    if normaliser:
        check("onnx normaliser", outputs[1], x, flow, metric, case.mode, case.stable, index=1)


@pytest.mark.parametrize("mode, stable", [("sum", False), ("avg", False), ("linear-zeroeps", False), ("soft", False), ("soft-clipeps", True),
                                          ("max", False)])
def test_exported_splat_many_matches_a_joint_oracle(mode, stable) -> None:
    from .test_normaliser_and_many import joint_oracle

    mode = Mode.parse(mode)
    _, session = checked(softsplat.onnx.standalone(mode.value, stable=stable, sources=2))
    generator = torch.Generator().manual_seed(1)
    N, C, H, W = 1, 2, 6, 9
    arguments = []
    for _ in range(2):
        flow = torch.randn(N, 2, H, W, generator=generator) * 3
        flow[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), 1e30])
        arguments += [torch.rand(N, C, H, W, generator=generator), flow,
                      torch.randn(N, 1, H, W, generator=generator) if mode.needs_metric else None]
    got = run(session, arguments)[0]
    sources = [tuple(arguments[i:i + 3]) for i in (0, 3)]
    reference = joint_oracle([tuple(None if t is None else t.double() for t in s) for s in sources], mode, stable)
    same = joint_oracle(sources, mode, stable)
    scale = joint_oracle([(s[0].double().abs(), s[1].double(), None if s[2] is None else s[2].double()) for s in sources],
                         mode, stable).nan_to_num(posinf=0.0)
    compare("onnx splat_many", got, reference, same, scale, torch.float32)


@pytest.mark.parametrize("mode, stable, scatters", [("sum", False, {"add": 1}), ("soft", False, {"add": 1}),
                                                    ("avg-zeroeps", False, {"add": 1}), ("soft", True, {"add": 1, "max": 1}),
                                                    ("max-zeroeps", False, {"add": 1, "max": 1})])
def test_exported_graph_is_standard_onnx_with_one_scatter_add(mode, stable, scatters) -> None:
    proto, _ = exported(Mode.parse(mode), stable, torch.float32)
    domains = {node.domain for node in proto.graph.node} | {
        node.domain for function in proto.functions for node in function.node
    }
    assert domains <= {"", "ai.onnx"}, f"non-standard domains {domains}"
    assert not proto.functions, [f.name for f in proto.functions]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {softsplat.onnx.OPSET}
    reductions = {}
    for node in proto.graph.node:
        if node.op_type in ("ScatterElements", "ScatterND"):
            reduction = next(a.s.decode() for a in node.attribute if a.name == "reduction")
            reductions[reduction] = reductions.get(reduction, 0) + 1
    assert reductions == scatters


def test_one_exported_file_runs_at_two_sizes(tmp_path) -> None:
    import onnxruntime

    path = tmp_path / "soft.onnx"
    path.write_bytes(exported(Mode.SOFT, False, torch.float32)[0].SerializeToString())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for N, C, H, W in ((1, 3, 17, 31), (3, 1, 40, 24)):
        x, flow = torch.rand(N, C, H, W, generator=generator), torch.randn(N, 2, H, W, generator=generator) * 4
        metric = torch.randn(N, 1, H, W, generator=generator)
        check(f"onnx at {H}x{W}", run(session, (x, flow, metric))[0], x, flow, metric, Mode.SOFT, False)
