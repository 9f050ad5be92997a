"""The ordered forward of the CUDA kernels (docs/spec.md, section 9), executed on the CPU by the
host backends: the host shim runs every launch's blocks and threads in a new order, so the atomic
forward gives other bits from run to run (the check below can fail), while the ordered forward,
taken under ``torch.use_deterministic_algorithms(True)``, gives the same bits every run: exactly
the sum of each target's contributions in the order of their source pixels. A wrong ordered
forward (its slots left in the order the atomics placed them) fails the same check."""

from __future__ import annotations

import contextlib

import pytest
import torch

import softsplat
from softsplat import backends
from softsplat.backends import cupy as cupy_backend
from softsplat.backends.extension import compiler_reason

pytestmark = pytest.mark.skipif(compiler_reason() is not None, reason=f"cannot build here: {compiler_reason()}")

HOST_BACKENDS = ["cuda-host", "cupy-host"]
#: (mode, stable): every kind the forward computes.
MODES = [("sum", False), ("avg", False), ("linear", False), ("soft", False), ("soft", True), ("max", False)]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def converging(shape=(2, 3, 48, 40), seed=0, dtype=torch.float32):
    """Inputs whose pixels crowd onto few targets (every pixel moved to within a few pixels of
    the centre): each such target sums hundreds of terms of mixed signs, whose float sum depends
    on their order."""
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(shape, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    centre = torch.stack([W / 2 - xs, H / 2 - ys]).expand(N, 2, H, W)
    flow = centre + 3 * torch.rand((N, 2, H, W), generator=generator, dtype=torch.float64)
    metric = torch.randn((N, 1, H, W), generator=generator)
    return input.to(dtype), flow.to(dtype), metric.to(dtype)


def results(backend: str, mode: str, stable: bool, tensors, runs: int):
    """``runs`` forwards of ``backend``: (result, normaliser or None) each."""
    input, flow, metric = tensors
    metric = metric if mode in ("linear", "soft", "max") else None
    outputs = []
    for _ in range(runs):
        got = softsplat.splat(input, flow, metric, mode=mode, backend=backend, stable=stable,
                              return_normaliser=mode != "sum")
        outputs.append(got if mode != "sum" else (got, None))
    return outputs


def distinct(outputs) -> int:
    """How many different bit patterns the runs gave (result and normaliser together)."""
    patterns = set()
    for out, normaliser in outputs:
        parts = [out] + ([normaliser] if normaliser is not None else [])
        patterns.add(b"".join(part.contiguous().view(torch.uint8).numpy().tobytes() for part in parts))
    return len(patterns)


def assert_repeatable(outputs) -> None:
    count = distinct(outputs)
    assert count == 1, f"{len(outputs)} runs gave {count} different results"


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_the_atomic_forward_differs_from_run_to_run(backend_name) -> None:
    """What shows that the repeatability check can fail: the same call on the atomic forward,
    its launches in another order each run (the shim's), gives other bits."""
    outputs = results(backend_name, "soft", False, converging(), runs=6)
    with pytest.raises(AssertionError, match="different results"):
        assert_repeatable(outputs)


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
@pytest.mark.parametrize(("mode", "stable"), MODES)
def test_the_ordered_forward_gives_the_same_bits_every_run(backend_name, mode, stable) -> None:
    tensors = converging()
    with deterministic_algorithms():
        outputs = results(backend_name, mode, stable, tensors, runs=12)
    assert_repeatable(outputs)


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_ordered_forward_is_repeatable_in_every_dtype(backend_name, dtype) -> None:
    tensors = converging(shape=(1, 2, 33, 31), dtype=dtype)
    with deterministic_algorithms():
        outputs = results(backend_name, "soft", False, tensors, runs=6)
    assert_repeatable(outputs)


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_the_backward_is_repeatable(backend_name) -> None:
    """The backward is a gather (no atomics): from one forward's saved tensors it gives the same
    bits every time; with the ordered forward before it, the whole gradient is the same every run."""
    tensors = converging(shape=(1, 3, 24, 20))
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = softsplat.splat(*leaves, mode="soft", backend=backend_name)  # the atomic forward
    cotangent = torch.linspace(-1, 1, out.numel()).view_as(out)
    again = [torch.autograd.grad(out, leaves, cotangent, retain_graph=True) for _ in range(4)]
    for other in again[1:]:
        assert all(torch.equal(a, b) for a, b in zip(again[0], other))
    runs = []
    for _ in range(4):
        leaves = [t.clone().requires_grad_() for t in tensors]
        with deterministic_algorithms():
            out = softsplat.splat(*leaves, mode="soft", backend=backend_name)
        runs.append(torch.autograd.grad(out, leaves, cotangent))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def in_source_order(input, flow, metric, mode: str):
    """splat in float32 with each target's terms added one by one in the order of their source
    pixels (n, y, x), each term b * (v * w) and b * w formed as the kernels form them: what the
    ordered forward computes, bit for bit (modes without exp, whose last bits are the platform's)."""
    N, C, H, W = input.shape
    out = torch.zeros((N, C, H, W), dtype=torch.float32)
    normaliser = torch.zeros((N, 1, H, W), dtype=torch.float32)
    one = torch.ones((), dtype=torch.float32)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                fx = torch.tensor(float(x), dtype=torch.float32) + flow[n, 0, y, x]
                fy = torch.tensor(float(y), dtype=torch.float32) + flow[n, 1, y, x]
                if not (-1 <= fx < W and -1 <= fy < H):
                    continue
                x0, y0 = fx.floor(), fy.floor()
                x1, y1 = x0 + one, y0 + one
                weights = ((x1 - fx) * (y1 - fy), (fx - x0) * (y1 - fy), (x1 - fx) * (fy - y0), (fx - x0) * (fy - y0))
                w = metric[n, 0, y, x] if mode == "linear" else one
                for k, b in enumerate(weights):
                    tx, ty = int(x0) + (k & 1), int(y0) + (k >> 1)
                    if 0 <= tx < W and 0 <= ty < H:
                        v = input[n, :, y, x]
                        out[n, :, ty, tx] += b * v if mode == "sum" else b * (v * w)
                        normaliser[n, 0, ty, tx] += b * w
    if mode == "sum":
        return out, None
    return out / (normaliser + torch.tensor(1e-7, dtype=torch.float32)), normaliser


def check_source_order(backend_name, mode, tensors) -> None:
    """The ordered forward's result and D equal, bit for bit, the sums in source pixel order."""
    input, flow, metric = tensors
    expected, expected_normaliser = in_source_order(input, flow, metric, mode)
    with deterministic_algorithms():
        got = results(backend_name, mode, False, (input, flow, metric), runs=1)[0]
    assert torch.equal(got[0], expected)
    if expected_normaliser is not None:
        assert torch.equal(got[1], expected_normaliser)


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "avg", "linear"])
def test_the_ordered_forward_adds_in_source_pixel_order(backend_name, mode) -> None:
    check_source_order(backend_name, mode, converging(shape=(2, 2, 9, 11), seed=3))


def _unstable_sort(keys, sorted_keys, order) -> None:
    """A sort that leaves equal keys in a random order: the taps of each target in some order
    other than their source pixels'."""
    shuffle = torch.randperm(keys.numel())
    values, indices = torch.sort(keys[shuffle], stable=True)
    sorted_keys.copy_(values)
    order.copy_(shuffle[indices])


def test_a_wrong_ordered_forward_fails_the_check(monkeypatch) -> None:
    """The meta-test: the cupy backend's ordered forward on the host with an unstable sort (each
    target's slots in an order that is not their source pixels') is not repeatable."""
    with deterministic_algorithms():
        correct = results("cupy-host", "soft", False, converging(), runs=1)
        monkeypatch.setattr(cupy_backend, "sort_keys", _unstable_sort)
        outputs = results("cupy-host", "soft", False, converging(), runs=6)
    with pytest.raises(AssertionError, match="different results"):
        assert_repeatable(outputs)
    torch.testing.assert_close(outputs[0][0], correct[0][0])  # right up to the order of the sums


def test_the_host_backends_and_the_cuda_backends_declare_the_ordered_forward() -> None:
    """Under torch.use_deterministic_algorithms(True) the GPU backends with an ordered forward
    stay eligible on CUDA (auto keeps to the GPU); triton has none."""
    for name in ("cpp", "cupy"):
        backend = backends.get(name)
        assert backend.is_deterministic("cuda") and not backend.is_deterministic("cuda", asked=False), name
    assert not backends.get("triton").is_deterministic("cuda")
    for name in HOST_BACKENDS:
        assert backends.get(name).is_deterministic("cpu") and not backends.get(name).is_deterministic("cpu", asked=False)


def test_auto_on_cuda_in_deterministic_mode_takes_cpp(monkeypatch) -> None:
    """As dispatch sees a CUDA call: cpp is first and deterministic when asked, so auto keeps it."""
    from softsplat.backends import cpp

    monkeypatch.setattr(cpp.CppBackend, "devices", lambda self: ("cpu", "cuda"))
    call = backends.Signature("cuda", torch.float32, softsplat.Mode.parse("soft"))
    assert backends._choose(call, "auto", "backend", True).name == "cpp"
    assert backends._choose(call, "cpp", "backend", True).name == "cpp"  # named: no RuntimeError


def test_triton_refuses_the_deterministic_flag() -> None:
    triton = backends.get("triton")
    if not triton.is_available() or "cpu" not in triton.devices():
        pytest.skip(f"triton does not run on cpu here: {triton.unavailable_reason or triton.devices()}")
    triton.prepare()
    input, flow, metric = converging(shape=(1, 1, 4, 4))
    with pytest.raises(ValueError, match="deterministic: the triton kernels"):
        torch.ops.softsplat_triton.splat_forward(input, flow, metric, 3, 0, None, True)


def test_the_shim_seeds_each_launch_afresh() -> None:
    """A sum of many float32 terms into one target through atomics: the shim's launches give
    more than one result over a few runs, each launch in its own order."""
    input = torch.randn((1, 1, 64, 64), generator=torch.Generator().manual_seed(1)) * 1e3
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    flow = torch.stack([5.0 - xs, 7.0 - ys])[None]  # every pixel onto (5, 7) exactly
    sums = {float(softsplat.splat(input, flow, mode="sum", backend="cuda-host")[0, 0, 7, 5]) for _ in range(8)}
    assert len(sums) > 1, sums


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_the_ordered_forward_keeps_subnormals(backend_name) -> None:
    """Its float32 sums are plain adds, not the device's flushing atomics: where every weight is
    subnormal (exp(-88)) it agrees with the CPU kernels, unlike the atomic forward (so the
    conformance check leaves no targets open for it)."""
    from conformance.strategies import Case

    x = torch.arange(1.0, 1 + 2 * 5 * 6).view(1, 2, 5, 6)
    metric = torch.full((1, 1, 5, 6), -88.0)  # exp(-88) ~ 6e-39: subnormal in float32
    metric[..., :, 3:] = 0.0
    case = Case(x, torch.full((1, 2, 5, 6), 0.25), metric, softsplat.Mode.parse("soft-zeroeps"), (True, True, True), False)
    cpu = softsplat.splat(*case.tensors(), mode=case.mode, backend="cpp")
    atomic = softsplat.splat(*case.tensors(), mode=case.mode, backend=backend_name)
    with deterministic_algorithms():
        ordered = softsplat.splat(*case.tensors(), mode=case.mode, backend=backend_name, return_normaliser=True)
    assert not torch.allclose(atomic, cpu)  # the atomic forward flushed the left half's D to 0
    torch.testing.assert_close(ordered[0], cpu)
    assert (ordered[1][..., :3] > 0).all()  # subnormal, kept


@pytest.mark.parametrize(("mode", "stable"), MODES)
def test_the_ordered_forward_with_64_bit_indices_has_the_same_bits(monkeypatch, mode, stable) -> None:
    """The 64-bit kernels of the ordered forward (taken where 4 * N * H * W or an offset passes
    2^31 - 1), run by cupy-host on small tensors: the same order, so the same bits."""
    tensors = converging(shape=(2, 3, 21, 19))
    with deterministic_algorithms():
        narrow = results("cupy-host", mode, stable, tensors, runs=1)
        monkeypatch.setattr(cupy_backend, "_fits_int32", lambda tensors, largest_product: False)
        wide = results("cupy-host", mode, stable, tensors, runs=1)
    assert all(torch.equal(a, b) for a, b in zip(narrow[0], wide[0]) if a is not None)


def collapsing(size: int = 256, channels: int = 3):
    """A collapsing flow: every pixel of a size x size image moved onto the 2 x 2 targets around
    (10.5, 20.5), so each of the four sums size * size contributions. Positive values: each
    result is a weighted mean, without cancellation."""
    generator = torch.Generator().manual_seed(5)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    flow = torch.stack([10.5 - xs, 20.5 - ys])[None]
    return (torch.rand((1, channels, size, size), generator=generator), flow,
            torch.randn((1, 1, size, size), generator=generator))


#: CPU time one GPU thread of the ordered forward may take per contribution to the most crowded
#: target: one pass over a target's slots takes a few ns a slot on the host; a thread that sorts
#: them (k log k, dependent loads) or recomputes every pixel's taps takes tens.
NS_PER_SLOT = 20
PROBED_RUNS = 5


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_a_collapsing_flow_spreads_the_work_over_threads(backend_name) -> None:
    """The ordered forward of a collapsing flow (256 x 256 pixels onto four targets): no GPU
    thread does much more than one pass over the crowded target's 65536 slots (the shim's thread
    probe times each thread; a GPU takes at least its longest thread's time), it finishes
    within seconds on the host and it meets the oracle."""
    import time

    from conformance import host
    from conformance.compare import compare

    input, flow, metric = collapsing()
    heaviest = input.shape[2] * input.shape[3]
    probe = host.ThreadProbe(backend_name)
    with deterministic_algorithms():
        start = time.perf_counter()
        out, normaliser = softsplat.splat(input, flow, metric, mode="soft", backend=backend_name,
                                          return_normaliser=True)
        took = time.perf_counter() - start
        # The least of a few runs: other work on the machine only adds to a thread's CPU time
        # (caches, a sibling hardware thread); a thread that does too much does it every run.
        runs = []
        for _ in range(PROBED_RUNS):
            with probe:
                softsplat.splat(input, flow, metric, mode="soft", backend=backend_name)
            runs.append((probe.longest, probe.total))
    longest, total = min(runs)
    assert took < 5, f"{took:.1f} s"
    assert longest < NS_PER_SLOT * heaviest, (
        f"one thread ran {longest / 1e6:.2f} ms (of {total / 1e6:.1f} ms in all threads), the least of "
        f"{PROBED_RUNS} runs: {longest / heaviest:.0f} ns per slot of the crowded target")
    reference, reference_normaliser = softsplat.splat(*(t.double() for t in (input, flow, metric)), mode="soft",
                                                      backend="torch", return_normaliser=True)
    float32, float32_normaliser = softsplat.splat(input, flow, metric, mode="soft", backend="torch",
                                                  return_normaliser=True)
    assert (normaliser[0, 0, 20:22, 10:12] > 0).all() and (normaliser.count_nonzero() == 4)
    compare("output", out, reference, float32, reference.abs(), torch.float32)
    compare("normaliser", normaliser, reference_normaliser, float32_normaliser, reference_normaliser.abs(),
            torch.float32)


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_the_ordered_forward_allocates_once_besides_its_results(backend_name) -> None:
    """In deterministic mode torch fills every new buffer (torch.utils.deterministic.
    fill_uninitialized_memory), a write of its own: the ordered forward allocates its result,
    its normaliser and one scratch buffer, none of them zeroed (it writes every element), and
    hands its sort that scratch (torch's sort allocates only inside itself)."""
    from torch.profiler import ProfilerActivity, profile

    input, flow, metric = converging(shape=(1, 3, 12, 10))
    with deterministic_algorithms():
        softsplat.splat(input, flow, metric, mode="soft", backend=backend_name)  # built, loaded
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            softsplat.splat(input, flow, metric, mode="soft", backend=backend_name)
    names = [event.name for event in trace.events()]
    assert "aten::sort" in names, names
    before_sort = names[:names.index("aten::sort")]
    assert before_sort.count("aten::empty") == 3 and "aten::zero_" not in before_sort, before_sort


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "linear"])
def test_the_channel_blocks_of_the_gather_keep_the_source_order(backend_name, mode) -> None:
    """19 channels: two full blocks of the gather and a block of 3, each channel summed in
    source pixel order, bit for bit, and D written once."""
    check_source_order(backend_name, mode, converging(shape=(1, 19, 7, 9), seed=4))


def _host_ops(backend_name: str):
    backend = backends.get(backend_name)
    backend.prepare()
    return backend._ops


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "soft", "max"])
def test_opcheck_of_the_ordered_forward(backend_name, mode) -> None:
    """torch.library.opcheck of splat_forward with deterministic=True: schema, fake tensors,
    autograd registration and dispatch of the ordered forward's op."""
    parsed = softsplat.Mode.parse(mode)
    ops = _host_ops(backend_name)
    input, flow, metric = converging(shape=(2, 3, 9, 7), seed=6)
    metric = metric if parsed.needs_metric else None
    maximum = ops.splat_maximum(flow, metric, parsed.kind_code) if mode == "max" else None
    args = (input.requires_grad_(), flow.requires_grad_(), metric, parsed.kind_code, parsed.normalisation_code,
            maximum, True)
    torch.library.opcheck(ops.splat_forward.default, args)


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_compile_fullgraph_in_deterministic_mode_gives_the_eager_bits(backend_name) -> None:
    """torch.compile(fullgraph=True) traced in deterministic mode calls the ordered forward: the
    bits of eager deterministic calls, output and gradients."""
    tensors = converging(shape=(1, 3, 16, 12), seed=7)

    def warp(input, flow, metric):
        return softsplat.splat(input, flow, metric, mode="soft", stable=True, backend=backend_name) * 2

    torch._dynamo.reset()
    compiled = torch.compile(warp, fullgraph=True, backend="aot_eager")
    runs = []
    with deterministic_algorithms():
        for function in (compiled, warp, compiled):
            leaves = [t.clone().requires_grad_() for t in tensors]
            out = function(*leaves)
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            runs.append((out.detach(), *(leaf.grad for leaf in leaves)))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_torch_export_keeps_the_ordered_forward(backend_name) -> None:
    """A program exported in deterministic mode keeps the ordered forward (docs/spec.md section 9):
    run outside the mode, it gives the eager deterministic bits on every run."""
    input, flow, metric = converging(shape=(1, 3, 16, 12), seed=8)
    model = softsplat.Splat("soft", backend=backend_name, return_normaliser=True)
    with deterministic_algorithms():
        program = torch.export.export(model, (input, flow, metric))
        expected = model(input, flow, metric)
    runs = [program.module()(input, flow, metric) for _ in range(4)]
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(run, expected))


@pytest.mark.parametrize("backend_name", HOST_BACKENDS)
def test_the_ordered_forward_over_many_targets_adds_in_source_pixel_order(backend_name) -> None:
    """131 x 129 targets (more than the 128^2 + 1 a two-level scan covered, more than a
    launch's 256 threads many times over), scattered by a random flow: still the sum in source
    pixel order, bit for bit."""
    generator = torch.Generator().manual_seed(9)
    input = torch.randn((1, 1, 131, 129), generator=generator)
    flow = torch.randn((1, 2, 131, 129), generator=generator) * 2
    metric = torch.randn((1, 1, 131, 129), generator=generator)
    expected, expected_normaliser = in_source_order(input, flow, metric, "linear")
    with deterministic_algorithms():
        got = results(backend_name, "linear", False, (input, flow, metric), runs=1)[0]
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected_normaliser)
