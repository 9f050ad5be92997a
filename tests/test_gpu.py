"""What only a GPU shows, for every GPU backend (cpp's CUDA kernels, triton, cupy): CUDA-graph
capture and replay, a side stream, tensors on a device other than the current one, torch.compile
at batch 1 and other sizes of 1, and a tensor of more than 2^31 elements. Each test compares with
the same call made plainly (or with the oracle). Skipped without a CUDA device; ``.ci/gpu`` runs
them with ``--require-gpu``, which turns such a skip into a failure."""

from __future__ import annotations

import pytest
import torch

import softsplat
from softsplat import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU CI: .ci/gpu)")

GPU_BACKENDS = ["cpp", "triton", "cupy"]
#: Two runs of a GPU forward add the same terms with atomics in another order: their results
#: differ in the last bits (float32: a few units of 1.2e-7 on values of about 1).
RUN_TO_RUN = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(params=GPU_BACKENDS)
def backend(request) -> str:
    candidate = backends.get(request.param)
    if "cuda" not in candidate.devices() or not candidate.is_available():
        pytest.fail(f"{request.param} cannot run on this CUDA machine: {candidate.unavailable_reason}")
    return request.param


def _tensors(shape=(1, 3, 17, 23), device="cuda", seed=0, requires_grad=False):
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn((N, C, H, W), generator=generator),
        torch.randn((N, 2, H, W), generator=generator) * 3,
        torch.randn((N, 1, H, W), generator=generator),
    )
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


def _splat(backend, input, flow, metric, mode="soft"):
    return softsplat.splat(input, flow, metric if mode in ("soft", "linear") else None, mode=mode, backend=backend)


def test_cuda_graph_capture_and_replay(backend) -> None:
    """Captured once (after a warm-up on a side stream, as CUDA graphs require), replayed on new
    values copied into the captured inputs: the same results as plain calls."""
    static = _tensors()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _splat(backend, *static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _splat(backend, *static)
    for seed in (1, 2):
        fresh = _tensors(seed=seed)
        for target, values in zip(static, fresh):
            target.copy_(values)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, _splat(backend, *fresh), **RUN_TO_RUN)


def test_a_side_stream(backend) -> None:
    """Inputs made on a side stream and splatted there, without synchronising with the default
    stream: the launches must go to the current (side) stream."""
    expected = _splat(backend, *_tensors(seed=3))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tensors = _tensors(seed=3)
        for _ in range(3):  # queued work the default stream knows nothing of
            out = _splat(backend, *tensors)
        result = out.clone()
    stream.synchronize()
    torch.testing.assert_close(result, expected, **RUN_TO_RUN)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_other_than_the_current_one(backend) -> None:
    expected = _splat(backend, *_tensors(seed=4)).cpu()
    with torch.cuda.device(0):
        result = _splat(backend, *_tensors(seed=4, device="cuda:1"))
    assert result.device == torch.device("cuda:1")
    torch.testing.assert_close(result.cpu(), expected, **RUN_TO_RUN)


@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (1, 1, 1, 1), (1, 2, 1, 9), (1, 4, 9, 1), (1, 64, 12, 16)], ids=str)
def test_compile_fullgraph_at_batch_1(backend, shape) -> None:
    """torch.compile(fullgraph=True) where Inductor makes sizes of 1 constants: the same output
    and gradients as eager, up to the order in which the forward's atomics add (run to run, the
    GPU kernels' sums differ in their last bits; the backward is a gather)."""
    def warp(input, flow, metric):
        return _splat(backend, input, flow, metric) * 2

    torch._dynamo.reset()
    compiled = torch.compile(warp, fullgraph=True)
    results = []
    for function in (compiled, warp):
        tensors = _tensors(shape, requires_grad=True)
        out = function(*tensors)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), *(t.grad for t in tensors)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **RUN_TO_RUN)


def test_more_than_2_to_the_31_elements(backend) -> None:
    """An input of 2 x 32768 x 32769 float32 values (2^31 + 2^16 elements): 64-bit indexing.
    Zero flow but for the last pixel of each row's last block, sum mode: the result is the input
    with those pixels moved one to the left."""
    N, C, H, W = 1, 2, 32768, 32769
    needed = 4 * 4 * N * C * H * W  # input, flow, result, expectation
    free, _ = torch.cuda.mem_get_info()
    if free < needed * 1.2:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free device memory, {free / 2**30:.0f} GiB free")
    input = torch.arange(W, device="cuda", dtype=torch.float32).expand(N, C, H, W).contiguous()
    flow = torch.zeros((N, 2, H, W), device="cuda")
    flow[:, 0, -3:, -1] = -1.0  # the last pixel of the last three rows moves one left
    out = softsplat.splat(input, flow, mode="sum", backend=backend)
    del flow
    expected = input
    expected[:, :, -3:, -2] += expected[:, :, -3:, -1]
    expected[:, :, -3:, -1] = 0
    assert torch.equal(out[:, :, -4:], expected[:, :, -4:]) and torch.equal(out[:, :, :64], expected[:, :, :64])
    assert torch.equal(out, expected)


def test_the_torch_backend_is_deterministic_on_cuda_in_deterministic_mode() -> None:
    """docs/spec.md section 9: on CUDA the torch backend gives the same bits on every run under
    torch.use_deterministic_algorithms(True) (and declares only that)."""
    from softsplat import backends as registry

    oracle = registry.get("torch")
    assert oracle.is_deterministic("cuda") and not oracle.is_deterministic("cuda", asked=False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tensors = _tensors((2, 8, 64, 64), seed=7)
        tensors[1] = tensors[1].round()  # many sources on one target: sums in some order
        runs = [_splat("torch", *tensors) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(runs[0], run) for run in runs[1:])


#: The backends with an ordered forward on CUDA (docs/spec.md, section 9).
ORDERED_BACKENDS = ["cpp", "cupy"]


def _converging(shape, seed=0):
    """Every pixel moved to within a few pixels of the centre: targets that sum hundreds of
    terms, whose float sum depends on their order."""
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    flow = torch.stack([W / 2 - xs, H / 2 - ys]).expand(N, 2, H, W) + 3 * torch.rand((N, 2, H, W), generator=generator)
    return [torch.randn(shape, generator=generator), flow, torch.randn((N, 1, H, W), generator=generator)]


def _ordered(name, tensors, mode, stable=False):
    input, flow, metric = tensors
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return softsplat.splat(input, flow, metric if mode in ("linear", "soft", "max") else None, mode=mode,
                               backend=name, stable=stable, return_normaliser=mode != "sum")
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("name", ORDERED_BACKENDS)
@pytest.mark.parametrize(("mode", "stable"), [("sum", False), ("avg", False), ("linear", False), ("soft", False),
                                             ("soft", True), ("max", False)])
def test_the_ordered_forward_gives_the_same_bits_every_run_on_the_gpu(name, mode, stable) -> None:
    """Under torch.use_deterministic_algorithms(True), cpp's and cupy's forward give the same
    bits on every run on the device (the gradients are a gather and do anyway)."""
    candidate = backends.get(name)
    if "cuda" not in candidate.devices() or not candidate.is_available():
        pytest.fail(f"{name} cannot run on this CUDA machine: {candidate.unavailable_reason}")
    tensors = [t.cuda() for t in _converging((2, 8, 270, 480))]
    runs = [_ordered(name, tensors, mode, stable) for _ in range(10)]
    first = runs[0] if mode != "sum" else (runs[0],)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, run if mode != "sum" else (run,))), (name, mode)


def _require_host_shim() -> None:
    """Skips, with the reason, where the host shim (cuda-host) cannot be built here."""
    shim = backends.get("cuda-host")
    if not shim.is_available():
        pytest.skip(f"the host shim (cuda-host) cannot be built here: {shim.unavailable_reason}")
    try:
        shim.prepare_once()
    except backends.BackendFailedError as error:  # its build failed: nothing to compare with
        pytest.skip(f"the host shim (cuda-host) did not build: {error}")


@pytest.mark.parametrize("mode", ["sum", "avg", "linear"])
def test_the_ordered_forward_has_the_host_shims_bits(mode) -> None:
    """Without exp, the ordered forward is IEEE arithmetic in one fixed order: cpp and cupy on the
    GPU give exactly the bits the host shim (cuda-host) gives on the CPU."""
    _require_host_shim()
    tensors = _converging((2, 3, 60, 70), seed=1)
    expected = _ordered("cuda-host", tensors, mode)
    for name in ORDERED_BACKENDS:
        got = _ordered(name, [t.cuda() for t in tensors], mode)
        pairs = zip(got, expected) if mode != "sum" else [(got, expected)]
        assert all(torch.equal(a.cpu(), b) for a, b in pairs), name


@pytest.mark.parametrize("name", ORDERED_BACKENDS)
def test_the_ordered_forward_of_a_collapsing_flow_on_the_gpu(name) -> None:
    """Every pixel of a 1080p frame moved onto the 2 x 2 targets around one point (each of the
    four sums 2 million contributions): the ordered forward spreads its work over threads but
    for one pass over each crowded target's slots per block of channels, so it finishes within
    two seconds, the same bits twice; at 256 x 256, the bits of the host shim."""
    import time

    from softsplat.bench import collapsing_inputs

    candidate = backends.get(name)
    if "cuda" not in candidate.devices() or not candidate.is_available():
        pytest.fail(f"{name} cannot run on this CUDA machine: {candidate.unavailable_reason}")
    _ordered(name, [t.cuda() for t in _converging((1, 3, 8, 8))], "avg")  # built, loaded
    tensors = list(collapsing_inputs((1080, 1920), channels=3, device="cuda"))
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = _ordered(name, tensors, "soft")
    torch.cuda.synchronize()
    took = time.perf_counter() - start
    assert took < 2, f"{name}: {took:.2f} s"
    again = _ordered(name, tensors, "soft")
    assert first[1].count_nonzero() == 4 and first[0].isfinite().all()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    _require_host_shim()
    small = collapsing_inputs((256, 256), channels=3)
    expected = _ordered("cuda-host", small, "avg")
    got = _ordered(name, [t.cuda() for t in small], "avg")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected)), name
