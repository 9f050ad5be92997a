"""The cpp backend's registration: opcheck on every op, torch.compile without graph breaks,
determinism, the build, and dispatch preferring it on CPU."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

import softsplat
from softsplat import Mode, backends, bench
from softsplat.backends import cpp


@pytest.fixture(scope="module")
def ops():
    reason = backends.get("cpp").unavailable_reason
    if reason:
        pytest.skip(f"cpp backend unavailable here: {reason}")
    return cpp.library().ops()


def _tensors(dtype=torch.float32, shape=(2, 3, 5, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    return (
        torch.randn(shape, generator=generator).to(dtype),
        (torch.randn((N, 2, H, W), generator=generator) * 3).to(torch.float64 if dtype == torch.float64 else torch.float32),
        torch.randn((N, 1, H, W), generator=generator).to(torch.float64 if dtype == torch.float64 else torch.float32),
    )


@pytest.mark.parametrize("mode", list(Mode), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_opcheck_forward(ops, mode, dtype) -> None:
    input, flow, metric = _tensors(dtype)
    args = (input.requires_grad_(), flow.requires_grad_(), metric.requires_grad_() if mode.needs_metric else None,
            mode.kind_code, mode.normalisation_code)
    if mode.kind == "max":  # its maximum, as splat_maximum computes it for kind 5
        args += (ops.splat_maximum(flow.detach(), metric.detach(), 5),)
    torch.library.opcheck(ops.splat_forward.default, args)


@pytest.mark.parametrize("mode", [Mode.SUM, Mode.AVG, Mode.SOFT_CLIPEPS, Mode.LINEAR_ZEROEPS], ids=str)
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, False]])
def test_opcheck_backward(ops, mode, mask) -> None:
    input, flow, metric = _tensors()
    metric = metric if mode.needs_metric else None
    out, normaliser = ops.splat_forward(input, flow, metric, mode.kind_code, mode.normalisation_code)
    grad_normaliser = None if mode == Mode.SUM else torch.randn_like(normaliser)
    args = (torch.randn_like(out), grad_normaliser, input, flow, metric, out, normaliser,
            mode.kind_code, mode.normalisation_code, mask)
    torch.library.opcheck(ops.splat_backward.default, args)


def test_opcheck_maximum(ops) -> None:
    _, flow, metric = _tensors()
    torch.library.opcheck(ops.splat_maximum.default, (flow, metric))
    torch.library.opcheck(ops.splat_maximum.default, (flow, metric, 5))
    with pytest.raises(RuntimeError, match=r"splat_maximum: kind: expected 4 \(stable\) or 5 \(max\), got 3"):
        ops.splat_maximum(flow, metric, 3)


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [False, False, True]])
def test_opcheck_max_backward(ops, mask) -> None:
    """Max splatting's backward; the metric's gradient is zeros."""
    input, flow, metric = _tensors()
    flow = flow.round()  # integer targets: taps of weight 0, left out of M
    maximum = ops.splat_maximum(flow, metric, 5)
    out, normaliser = ops.splat_forward(input, flow, metric, 5, 1, maximum)
    args = (torch.randn_like(out), torch.randn_like(normaliser), input, flow, metric, out, normaliser, 5, 1, mask, maximum)
    torch.library.opcheck(ops.splat_backward.default, args)
    grad_metric = ops.splat_backward(*args)[2]
    assert not mask[2] or torch.equal(grad_metric, torch.zeros_like(metric)), grad_metric


@pytest.mark.parametrize("normalisation", [0, 1, 2, 3], ids=["addeps", "zeroeps", "clipeps", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_opcheck_stable(ops, normalisation, dtype) -> None:
    """Stable soft splatting, both ways the cpp backend runs it: splat_forward given the maximum
    (splat_many's joint one) and the fused splat_stable_forward (which computes it)."""
    input, flow, metric = _tensors(dtype)
    maximum = ops.splat_maximum(flow, metric)
    leaves = (input.requires_grad_(), flow.requires_grad_(), metric.requires_grad_())
    torch.library.opcheck(ops.splat_forward.default, (*leaves, 4, normalisation, maximum))
    torch.library.opcheck(ops.splat_stable_forward.default, (*leaves, normalisation))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_opcheck_cast(ops, dtype) -> None:
    """The result in input's dtype (``cast``), as the kernels write it for 16-bit inputs: the
    fake tensors' dtype included (torch.compile plans with them)."""
    input, flow, metric = _tensors(dtype)
    for normalisation in (0, 3):
        out, _ = ops.splat_forward(input, flow, metric, 3, normalisation, None, False, True)
        assert out.dtype == dtype
        torch.library.opcheck(ops.splat_forward.default, (input, flow, metric, 3, normalisation, None, False, True))
        torch.library.opcheck(ops.splat_stable_forward.default, (input, flow, metric, normalisation, True))
    assert ops.splat_stable_forward(input, flow, metric, 0, True)[0].dtype == dtype


def test_a_cast_result_refuses_a_gradient(ops) -> None:
    input, flow, metric = _tensors(torch.float16)
    out, _ = ops.splat_forward(input.requires_grad_(), flow, metric, 3, 0, None, False, True)
    with pytest.raises(ValueError, match=r"cast: a result rounded to input's dtype \(cast=True\) has no gradient"):
        out.float().sum().backward()


def test_the_kernels_write_16_bit_results_where_nothing_is_differentiated() -> None:
    """``run_forward`` asks the op for the result in input's dtype (``cast``) exactly where
    autograd will not differentiate it: a 16-bit input, not splat_many's numerator, and no
    gradient recorded (inference or no_grad mode, or no argument requiring one)."""
    from softsplat.backends import ops as ops_module
    from softsplat.backends.base import Problem

    asked = []

    class Recorder:
        def splat_forward(self, input, flow, metric, kind, normalisation, maximum, deterministic, cast):
            asked.append(cast)
            N, C, H, W = input.shape
            return torch.zeros(N, C, H, W, dtype=input.dtype if cast else flow.dtype), torch.zeros(N, 1, H, W)

    def cast_asked(dtype, requires_grad=False, raw=False):
        input, flow, metric = _tensors(dtype)
        problem = Problem(input.requires_grad_(requires_grad), flow, metric, Mode.SOFT, raw=raw)
        out, _ = ops_module.run_forward(Recorder(), problem)
        assert out.dtype == (flow.dtype if raw else dtype)
        return asked.pop()

    assert cast_asked(torch.float16) and cast_asked(torch.bfloat16)
    assert not cast_asked(torch.float16, requires_grad=True)
    assert not cast_asked(torch.float16, raw=True)
    assert not cast_asked(torch.float32) and not cast_asked(torch.float64)
    with torch.no_grad():
        assert cast_asked(torch.float16, requires_grad=True)
    with torch.inference_mode():
        assert cast_asked(torch.bfloat16)


def test_fused_stable_equals_the_two_ops(ops) -> None:
    """splat_stable_forward returns what splat_maximum then splat_forward (kind 4) return, and
    what splat(stable=True) uses on CPU."""
    input, flow, metric = _tensors(shape=(2, 3, 40, 37))
    maximum = ops.splat_maximum(flow, metric)
    out, normaliser = ops.splat_forward(input, flow, metric, 4, 0, maximum)
    fused = ops.splat_stable_forward(input, flow, metric, 0)
    assert torch.equal(fused[2], maximum)
    torch.testing.assert_close(fused[0], out, rtol=0, atol=0)
    torch.testing.assert_close(fused[1], normaliser, rtol=0, atol=0)
    torch.testing.assert_close(softsplat.splat(input, flow, metric, mode="soft", backend="cpp", stable=True), out)


@pytest.mark.parametrize("stable", [False, True], ids=["soft", "stable"])
def test_compile_fullgraph(ops, stable) -> None:
    input, flow, metric = (t.requires_grad_() for t in _tensors())

    def warp(input, flow, metric):
        return softsplat.splat(input, flow, metric, mode="soft", backend="cpp", stable=stable) * 2

    torch._dynamo.reset()
    compiled = torch.compile(warp, fullgraph=True, backend="aot_eager")
    out = compiled(input, flow, metric)
    grads = torch.autograd.grad(out.sum(), (input, flow, metric))
    expected = warp(input, flow, metric)
    expected_grads = torch.autograd.grad(expected.sum(), (input, flow, metric))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_in_inference_mode_returns_the_16_bit_result(ops, dtype) -> None:
    """Under torch.compile in inference mode (how models deploy) the op writes the 16-bit result
    itself: the same bits as eager, in input's dtype."""
    input, flow, metric = _tensors(dtype, shape=(1, 64, 9, 40))

    def warp(input, flow, metric):
        return softsplat.splat(input, flow, metric, mode="soft", backend="cpp")

    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(warp, fullgraph=True, backend="aot_eager")(input, flow, metric)
        expected = warp(input, flow, metric)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_auto_prefers_cpp_on_cpu(ops) -> None:
    call = softsplat.api.validate(*_tensors(), "soft").signature
    assert backends.select(call, "auto").name == "cpp"
    assert backends.select(call, "auto", deterministic=True).name == "cpp"  # deterministic on CPU


@pytest.mark.parametrize("flow_kind", ["spread", "smooth"])
@pytest.mark.parametrize("channels", [3, 4])  # the packed scatter (up to 3 channels) and the other
@pytest.mark.parametrize("mode", ["sum", "soft", "max"])
def test_bitwise_reproducible(ops, mode, channels, flow_kind) -> None:
    """Same inputs, same bits: forward and every gradient, whatever the thread count (5: more
    threads than this machine's cores, bands of phase 1 waiting for those of phase 0)."""
    if flow_kind == "spread":  # targets spread over many bands' rows: bands merged
        input, flow, metric = _tensors(shape=(2, channels, 150, 97), seed=3)
        flow = flow * 10
    else:  # optical-flow-like: several bands per phase, those of phase 1 waiting for neighbours
        input, flow, metric = bench.inputs((150, 97), channels=channels, batch=2, seed=3)
    metric = metric if mode != "sum" else None
    results = []
    for threads in (1, 2, 5, 1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = [t.clone().requires_grad_() for t in (input, flow) + ((metric,) if metric is not None else ())]
            out = softsplat.splat(*leaves[:2], leaves[2] if metric is not None else None, mode=mode, backend="cpp")
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            results.append((out, *grads))
        finally:
            torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_build_command_and_message() -> None:
    """`softsplat build` builds (or finds) the library in this environment's cache, saying so in
    one line naming it when it builds, and a second run finds it. (The cache the other tests use:
    the build from a fresh cache, and its one line, is test_reliability's first call from 8
    threads.)"""
    directory = pathlib.Path(cpp.library().build_directory())
    first = subprocess.run([sys.executable, "-m", "softsplat", "build"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    building = [line for line in first.stderr.splitlines() if line.startswith("softsplat: building")]
    assert len(building) <= 1 and all(str(directory.parent) in line for line in building), first.stderr
    second = subprocess.run([sys.executable, "-m", "softsplat", "build"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "softsplat: building" not in second.stderr
    assert "cpp: ready" in second.stdout


def test_import_does_not_compile(tmp_path) -> None:
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "PATH": __import__("os").environ["PATH"]}
    code = "import softsplat, softsplat.backends.cpp; print(softsplat.backends.get('cpp').is_available())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "building" not in result.stderr
    assert not any(tmp_path.iterdir()), "importing created build files"


def test_a_tall_narrow_band_keeps_its_taps_within_bounds() -> None:
    """17 channels (two blocks) over one band of 30,000 rows of one pixel (flows that reach the
    whole image merge every band into one): a band keeps its taps for its blocks only up to a
    bounded size (a chunk of taps kept per row of it: 293 MB more), so the call's peak memory
    stays near its tensors' few MB."""
    code = (
        "import resource, torch, softsplat\n"
        "H = 30000\n"
        "x = torch.rand(1, 17, H, 1)\n"
        "flow = torch.zeros(1, 2, H, 1)\n"
        "flow[0, 1, 0::2, 0], flow[0, 1, 1::2, 0] = H / 2, -H / 2  # every band reaches far up and down\n"
        "softsplat.splat(x[:, :, :64], flow[:, :, :64], None, mode='avg', backend='cpp')  # built, loaded\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "softsplat.splat(x, flow, None, mode='avg', backend='cpp')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    grown = int(result.stdout.split()[-1])  # KiB
    assert grown < 64 * 1024, f"the call's peak memory grew by {grown / 1024:.0f} MB"


def _thp_mode() -> str | None:
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address`` (/proc/self/smaps), in bytes."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not given on request here "
                    "(/sys/kernel/mm/transparent_hugepage/enabled is not [madvise])")
def test_large_outputs_are_written_on_huge_pages() -> None:
    """A fresh output of megabytes is advised onto 2 MB pages before the kernel writes it: its
    first touch faults once per 2 MB, not once per 4 KB (a third of a 64-channel splat's time
    here). The forward's result and the backward's gradients."""
    generator = torch.Generator().manual_seed(0)
    input = torch.rand(1, 16, 256, 512, generator=generator).requires_grad_()  # 8 MB
    flow = torch.randn(1, 2, 256, 512, generator=generator).requires_grad_()
    out = softsplat.splat(input, flow, mode="avg", backend="cpp")
    assert _huge_bytes_at(out.data_ptr() + out.numel() * 2) >= 2 << 20  # the middle of the result
    (grad_input,) = torch.autograd.grad(out, [input], torch.ones_like(out))
    assert _huge_bytes_at(grad_input.data_ptr() + grad_input.numel() * 2) >= 2 << 20
