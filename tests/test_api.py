"""The public API: argument checking, modes, and backend dispatch."""

from __future__ import annotations

import pytest
import torch

import softsplat
from softsplat import BackendNotSupportedError, Mode, backends
from softsplat.backends import torch as oracle


def _tensors(N=1, C=2, H=3, W=4, dtype=torch.float32):
    return torch.randn(N, C, H, W, dtype=dtype), torch.randn(N, 2, H, W, dtype=dtype), torch.randn(N, 1, H, W, dtype=dtype)


# --- one test per class of bad input (docs/spec.md, "Edge cases") -------------------------------

@pytest.mark.parametrize(
    "argument, bad, expected",
    [
        ("input", torch.randn(2, 3, 4), "4-D"),
        ("flow", torch.randn(1, 2, 3, 4, 1), "4-D"),
        ("metric", torch.randn(1, 3, 4), "4-D"),
    ],
)
def test_wrong_rank(argument, bad, expected) -> None:
    input, flow, metric = _tensors()
    arguments = {"input": input, "flow": flow, "metric": metric, argument: bad}
    with pytest.raises(ValueError, match=rf"^{argument}: expected a {expected}.*got 3-D|^{argument}: expected a {expected}.*got 5-D"):
        softsplat.splat(arguments["input"], arguments["flow"], arguments["metric"], mode="soft")


@pytest.mark.parametrize(
    "argument, shape",
    [("flow", (1, 3, 3, 4)), ("flow", (2, 2, 3, 4)), ("flow", (1, 2, 4, 3)), ("metric", (1, 2, 3, 4)), ("metric", (1, 1, 3, 5))],
)
def test_wrong_shape(argument, shape) -> None:
    input, flow, metric = _tensors()
    arguments = {"input": input, "flow": flow, "metric": metric, argument: torch.randn(shape)}
    with pytest.raises(ValueError, match=rf"^{argument}: expected shape .* got \({', '.join(map(str, shape))}\)"):
        softsplat.splat(arguments["input"], arguments["flow"], arguments["metric"], mode="linear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mix needs a second device type (no CUDA here); the meta-device case below covers the check")
def test_device_mix_cuda() -> None:
    input, flow, _ = _tensors()
    with pytest.raises(ValueError, match=r"^flow: expected a tensor on cpu \(the device of input\), got cuda"):
        softsplat.splat(input, flow.cuda(), mode="sum")


@pytest.mark.parametrize("argument", ["flow", "metric"])
def test_device_mix(argument) -> None:
    input, flow, metric = _tensors()
    arguments = {"input": input, "flow": flow, "metric": metric}
    arguments[argument] = arguments[argument].to("meta")
    with pytest.raises(ValueError, match=rf"^{argument}: expected a tensor on cpu \(the device of input\), got meta"):
        softsplat.splat(arguments["input"], arguments["flow"], arguments["metric"], mode="soft")


@pytest.mark.parametrize("argument", ["input", "flow", "metric"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_dtype(argument, dtype) -> None:
    input, flow, metric = _tensors()
    arguments = {"input": input, "flow": flow, "metric": metric}
    arguments[argument] = arguments[argument].to(dtype)
    with pytest.raises(TypeError, match=rf"^{argument}: expected a floating tensor .* got {str(dtype)[6:]}"):
        softsplat.splat(arguments["input"], arguments["flow"], arguments["metric"], mode="soft")


@pytest.mark.parametrize("argument", ["input", "flow", "metric"])
def test_not_a_tensor(argument) -> None:
    input, flow, metric = _tensors()
    arguments = {"input": input, "flow": flow, "metric": metric, argument: [[1.0]]}
    with pytest.raises(TypeError, match=rf"^{argument}: expected a torch.Tensor, got list"):
        softsplat.splat(arguments["input"], arguments["flow"], arguments["metric"], mode="soft")


@pytest.mark.parametrize("mode", ["linear", "soft", "soft-zeroeps", "softmax", "max", "max-clipeps"])
def test_metric_missing(mode) -> None:
    input, flow, _ = _tensors()
    with pytest.raises(ValueError, match=r"^metric: mode '\w+-\w+' needs a metric \[N, 1, H, W\], got None"):
        softsplat.splat(input, flow, mode=mode)


@pytest.mark.parametrize("mode", ["sum", "avg", "avg-clipeps", "summation", "average"])
def test_metric_superfluous(mode) -> None:
    input, flow, metric = _tensors()
    with pytest.raises(ValueError, match=r"^metric: mode '[\w-]+' takes no metric \(expected None\), got Tensor of shape \(1, 1, 3, 4\)"):
        softsplat.splat(input, flow, metric, mode=mode)


@pytest.mark.parametrize("mode", ["min", "max-", "soft-fooeps", "sum-addeps", "", "soft-", "-addeps"])
def test_unknown_mode(mode) -> None:
    input, flow, metric = _tensors()
    with pytest.raises(ValueError, match=rf"^mode: .*got {mode!r}"):
        softsplat.splat(input, flow, metric, mode=mode)


def test_mode_of_wrong_type() -> None:
    input, flow, _ = _tensors()
    with pytest.raises(TypeError, match=r"^mode: expected a str or softsplat.Mode, got int"):
        softsplat.splat(input, flow, mode=3)


def test_unknown_backend() -> None:
    input, flow, _ = _tensors()
    with pytest.raises(ValueError, match=r"^backend: expected 'auto' or one of 'torch'.*got 'fast'"):
        softsplat.splat(input, flow, mode="sum", backend="fast")
    with pytest.raises(TypeError, match=r"^backend: expected a str, got NoneType"):
        softsplat.splat(input, flow, mode="sum", backend=None)


def test_unknown_backend_from_environment(monkeypatch) -> None:
    input, flow, _ = _tensors()
    monkeypatch.setenv("SOFTSPLAT_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"^SOFTSPLAT_BACKEND: expected 'auto' or one of .*got 'fast'"):
        softsplat.splat(input, flow, mode="sum")


class _Unavailable(oracle.TorchBackend):
    name = "test-unavailable"

    def _unavailable_reason(self):
        return "needs the moon"


class _GpuOnly(oracle.TorchBackend):
    name = "test-gpu-only"
    deterministic_on = ()

    def devices(self):
        return ("cuda",)


@pytest.fixture
def extra_backends():
    for backend in (_Unavailable(), _GpuOnly()):
        backends.register(backend)
    yield
    for name in ("test-unavailable", "test-gpu-only"):
        backends.unregister(name)


def test_backend_unavailable(extra_backends) -> None:
    input, flow, _ = _tensors()
    with pytest.raises(BackendNotSupportedError, match=r"^backend: 'test-unavailable' cannot compute this call: needs the moon"):
        softsplat.splat(input, flow, mode="sum", backend="test-unavailable")
    with pytest.raises(BackendNotSupportedError, match=r"^backend: 'test-gpu-only' cannot compute this call: runs on cuda, the tensors are on cpu"):
        softsplat.splat(input, flow, mode="sum", backend="test-gpu-only")
    assert issubclass(BackendNotSupportedError, ValueError)


def test_auto_error_lists_every_backends_reasons(extra_backends, monkeypatch) -> None:
    monkeypatch.setattr(backends, "PRIORITY", ("test-unavailable", "test-gpu-only"))
    input, flow, _ = _tensors()
    with pytest.raises(BackendNotSupportedError) as error:
        softsplat.splat(input, flow, mode="sum")
    message = str(error.value)
    assert "test-unavailable: needs the moon" in message
    assert "test-gpu-only: runs on cuda, the tensors are on cpu" in message


def test_named_backend_never_falls_back(extra_backends, monkeypatch) -> None:
    monkeypatch.setenv("SOFTSPLAT_BACKEND", "test-unavailable")
    input, flow, _ = _tensors()
    with pytest.raises(BackendNotSupportedError, match="^SOFTSPLAT_BACKEND: 'test-unavailable' cannot"):
        softsplat.splat(input, flow, mode="sum")


def test_environment_overrides_auto_only(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(oracle.TorchBackend, "run", lambda self, problem: calls.append(self.name) or (problem.input, None))
    monkeypatch.setenv("SOFTSPLAT_BACKEND", "torch")
    input, flow, _ = _tensors()
    softsplat.splat(input, flow, mode="sum")
    assert calls == ["torch"]


def test_deterministic_mode(extra_backends, monkeypatch) -> None:
    """auto passes over a non-deterministic backend; naming one raises RuntimeError."""
    monkeypatch.setattr(_GpuOnly, "devices", lambda self: ("cpu",))
    monkeypatch.setattr(backends, "PRIORITY", ("test-gpu-only", "torch"))
    input, flow, _ = _tensors()
    call = softsplat.api.validate(input, flow, None, "sum").signature
    assert backends.select(call, "auto", deterministic=True).name == "torch"
    assert backends.select(call, "auto", deterministic=False).name == "test-gpu-only"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="backend 'test-gpu-only' is not deterministic on cpu"):
            softsplat.splat(input, flow, mode="sum", backend="test-gpu-only")
        assert softsplat.api._choose("cpu", torch.float32, "sum", "auto", "backend", True) == "torch"
    finally:
        torch.use_deterministic_algorithms(previous)


# --- modes ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, mode",
    [
        ("sum", Mode.SUM), ("summation", Mode.SUM), ("avg", Mode.AVG), ("average", Mode.AVG),
        ("avg-zeroeps", Mode.AVG_ZEROEPS), ("linear", Mode.LINEAR), ("linear-clipeps", Mode.LINEAR_CLIPEPS),
        ("soft", Mode.SOFT), ("softmax", Mode.SOFT), ("softmax-zeroeps", Mode.SOFT_ZEROEPS),
        ("soft-addeps", Mode.SOFT), (Mode.SOFT_CLIPEPS, Mode.SOFT_CLIPEPS),
        ("max", Mode.MAX), ("MAX-zeroeps", Mode.MAX_ZEROEPS), ("max-clipeps", Mode.MAX_CLIPEPS),
    ],
)
def test_mode_parsing(text, mode) -> None:
    assert Mode.parse(text) is mode


def test_mode_properties() -> None:
    assert Mode.SOFT_ZEROEPS.kind == "soft" and Mode.SOFT_ZEROEPS.normalisation == "zeroeps"
    assert Mode.SUM.normalisation is None and not Mode.SUM.needs_metric and Mode.LINEAR.needs_metric
    assert Mode.MAX_ZEROEPS.kind == "max" and Mode.MAX.normalisation == "addeps" and Mode.MAX.needs_metric
    assert Mode.SOFT == "soft-addeps" and str(Mode.AVG) == "avg-addeps"
    assert [m.kind_code for m in (Mode.SUM, Mode.AVG, Mode.LINEAR, Mode.SOFT)] == [0, 1, 2, 3]
    assert [m.normalisation_code for m in (Mode.AVG, Mode.AVG_ZEROEPS, Mode.AVG_CLIPEPS)] == [0, 1, 2]


# --- results -------------------------------------------------------------------------------

def test_drop_in_matches_splat() -> None:
    input, flow, metric = _tensors()
    torch.testing.assert_close(softsplat.softsplat(input, flow, metric, "soft"), softsplat.splat(input, flow, metric, mode="soft"))
    torch.testing.assert_close(softsplat.softsplat(input, flow, None, "avg"), softsplat.splat(input, flow, mode="avg"))


@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0)])
@pytest.mark.parametrize("mode", ["sum", "avg", "soft"])
def test_zero_size_gives_empty_result(shape, mode) -> None:
    input, flow, metric = _tensors(*shape)
    out = softsplat.splat(input, flow, metric if mode == "soft" else None, mode=mode)
    assert out.shape == shape and out.dtype == input.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_dtype_and_device(dtype) -> None:
    input, flow, metric = _tensors(dtype=dtype)
    out = softsplat.splat(input, flow.float(), metric.double(), mode="soft")
    assert out.dtype == dtype and out.device == input.device


def test_avg_variants_all_average() -> None:
    """Unlike the reference, avg-zeroeps/avg-clipeps keep every channel and average."""
    input, flow, _ = _tensors()
    zero_flow = torch.zeros_like(flow)
    for mode in ("avg-zeroeps", "avg-clipeps"):
        torch.testing.assert_close(softsplat.splat(input, zero_flow, mode=mode), input)


# --- normaliser output and joint splatting ---------------------------------------------------

def test_return_normaliser_is_the_coverage() -> None:
    input, flow, metric = _tensors()
    out, normaliser = softsplat.splat(input, torch.zeros_like(flow), metric, mode="soft", return_normaliser=True)
    torch.testing.assert_close(normaliser, metric.exp())  # zero flow: each pixel covers itself
    assert normaliser.shape == (1, 1, 3, 4) and normaliser.dtype == torch.float32
    holes = softsplat.splat(input, torch.full_like(flow, 100.0), mode="avg", return_normaliser=True)[1]
    assert torch.equal(holes, torch.zeros_like(holes))


def test_return_normaliser_errors() -> None:
    input, flow, _ = _tensors()
    with pytest.raises(ValueError, match=r"^return_normaliser: mode 'sum' has no normaliser"):
        softsplat.splat(input, flow, mode="sum", return_normaliser=True)
    with pytest.raises(TypeError, match=r"^return_normaliser: expected a bool, got int"):
        softsplat.splat(input, flow, mode="avg", return_normaliser=1)


def test_splat_many_of_one_source_is_splat() -> None:
    input, flow, metric = _tensors()
    for mode in ("sum", "avg-zeroeps", "soft"):
        m = metric if mode == "soft" else None
        torch.testing.assert_close(softsplat.splat_many([(input, flow, m)], mode=mode), softsplat.splat(input, flow, m, mode=mode))


def test_splat_many_normalises_jointly() -> None:
    """Two sources landing on the same pixels: a joint average, not an average of averages."""
    input = torch.ones(1, 1, 2, 2)
    zero = torch.zeros(1, 2, 2, 2)
    out, normaliser = softsplat.splat_many([(input, zero, None), (3 * input, zero, None)], mode="avg", return_normaliser=True)
    torch.testing.assert_close(out, torch.full_like(input, 2.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(normaliser, torch.full_like(input, 2.0))


def test_splat_many_sums_the_sources_in_place_of_stacking_them() -> None:
    """K sources: K - 1 additions of the numerators (and of the normalisers), in source order,
    and no stacked copy of all of them; the result is the left-to-right sum."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    sources = [_tensors() for _ in range(3)]
    with Calls() as calls:
        out, normaliser = softsplat.splat_many(sources, mode="soft-zeroeps", backend="cpp", return_normaliser=True)
    assert not {"stack", "cat", "sum"} & set(calls.names), calls.names
    assert calls.names.count("add") == 2 * (len(sources) - 1), calls.names  # zeroeps adds no eps
    D = [softsplat.splat(*source, mode="soft-zeroeps", backend="cpp", return_normaliser=True)[1] for source in sources]
    assert torch.equal(normaliser, (D[0] + D[1]) + D[2])


def test_splat_many_errors() -> None:
    input, flow, metric = _tensors()
    with pytest.raises(ValueError, match=r"^sources: expected a non-empty list"):
        softsplat.splat_many([], mode="avg")
    with pytest.raises(ValueError, match=r"^sources\[1\]: expected \(input, flow, metric\), got Tensor"):
        softsplat.splat_many([(input, flow, None), input], mode="avg")
    with pytest.raises(ValueError, match=r"^sources\[1\]: expected input of shape \(1, 2, 3, 4\)"):
        softsplat.splat_many([(input, flow, None), (input[:, :1], flow, None)], mode="avg")
    with pytest.raises(ValueError, match=r"^metric: mode 'soft-addeps' needs a metric"):
        softsplat.splat_many([(input, flow, metric), (input, flow, None)], mode="soft")


def test_auto_serves_devices_without_float64_through_the_torch_backend() -> None:
    """Apple's GPUs (MPS) have no float64 and none of the compiled backends: auto takes the
    torch backend there (float32 compute, docs/spec.md section 5); a float64 call is refused with
    that reason. Checked on the registry's declarations (no MPS device needed)."""
    from softsplat.backends import BackendNotSupportedError, Signature

    for device_type in ("mps", "xpu"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backends.select(Signature(device_type, dtype, Mode.parse("soft")), "auto").name == "torch"
    with pytest.raises(BackendNotSupportedError, match="MPS has no float64"):
        backends.select(Signature("mps", torch.float64, Mode.parse("soft")), "auto")


def test_the_modules_are_splat_and_splat_many() -> None:
    """softsplat.Splat and softsplat.SplatMany: nn.Modules that call splat / splat_many (what
    the ONNX exporter's standalone models are), checked where they are built."""
    generator = torch.Generator().manual_seed(3)
    x, f, m = torch.rand(1, 3, 6, 7, generator=generator), torch.randn(1, 2, 6, 7, generator=generator), torch.randn(1, 1, 6, 7, generator=generator)
    assert torch.equal(softsplat.Splat("soft", backend="torch")(x, f, m), softsplat.splat(x, f, m, mode="soft", backend="torch"))
    out, normaliser = softsplat.Splat("avg", return_normaliser=True, backend="torch")(x, f)
    assert normaliser.shape == (1, 1, 6, 7)
    joint = softsplat.SplatMany("avg", sources=2, backend="torch")(x, f, x.flip(3), -f)
    assert torch.equal(joint, softsplat.splat_many([(x, f, None), (x.flip(3), -f, None)], mode="avg", backend="torch"))
    with pytest.raises(ValueError, match="mode"):
        softsplat.Splat("bogus")
    with pytest.raises(ValueError, match=r"^sources: expected a positive number of sources, got 0"):
        softsplat.SplatMany("avg", sources=0)
    with pytest.raises(ValueError, match=r"^tensors: expected 4 \(2 sources of 2\), got 2"):
        softsplat.SplatMany("avg", sources=2)(x, f)
