"""Determinism, distributed training, concurrency, memory, autocast and index-width limits."""

from __future__ import annotations

import os
import pathlib
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

import softsplat
from softsplat import backends
from softsplat.backends import cupy as cupy_backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _inputs(seed=0, shape=(2, 3, 40, 56)):
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    # a strong, rough flow: many source pixels collide on the same targets
    return (torch.randn(shape, generator=generator), torch.randn((N, 2, H, W), generator=generator) * 6,
            torch.randn((N, 1, H, W), generator=generator) * 3)


def _forward_and_grads(backend, inputs, mode="soft"):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = softsplat.splat(*leaves, mode=mode, backend=backend)
    return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_auto_is_bitwise_reproducible_in_deterministic_mode(deterministic) -> None:
    first, second = _forward_and_grads("auto", _inputs()), _forward_and_grads("auto", _inputs())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_naming_a_nondeterministic_backend_raises_in_deterministic_mode(deterministic) -> None:
    triton = backends.get("triton")  # atomics, and no ordered forward
    if not triton.is_available() or "cpu" not in triton.devices():
        pytest.skip(f"triton does not run on cpu here: {triton.unavailable_reason or triton.devices()}")
    with pytest.raises(RuntimeError, match="backend 'triton' is not deterministic on cpu.*use_deterministic_algorithms"):
        softsplat.splat(*_inputs(), mode="soft", backend="triton")


@pytest.mark.parametrize("name", [n for n in backends.names()])
def test_declared_determinism_holds(name) -> None:
    """A backend that declares itself deterministic on CPU gives the same bits every run (under
    torch.use_deterministic_algorithms(True) where it declares it only then: the host backends'
    ordered forward)."""
    backend = backends.get(name)
    if not backend.is_available() or "cpu" not in backend.devices():
        pytest.skip(f"backend {name!r} does not run on cpu here: {backend.unavailable_reason or backend.devices()}")
    if not backend.is_deterministic("cpu"):
        pytest.skip(f"backend {name!r} declares no determinism on cpu: nothing to hold it to")
    asked = not backend.is_deterministic("cpu", asked=False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(asked or previous)
    try:
        runs = [_forward_and_grads(name, _inputs(seed=5)) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


DDP_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    import softsplat

    class Warp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = torch.nn.Conv2d(3, 2, 3, padding=1)
            self.metric = torch.nn.Conv2d(3, 1, 3, padding=1)
        def forward(self, x):
            return softsplat.splat(x, self.flow(x) * 4, self.metric(x), mode="soft")

    def batch():
        return torch.rand(4, 3, 24, 32, generator=torch.Generator().manual_seed(0))

    def train(model, x, steps=3):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            (model(x) - x).square().mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    rank, world = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = Warp()
    if world == 1:
        result = train(model, batch())
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        result = train(ddp, batch()[rank::world].contiguous() if False else batch().chunk(world)[rank])
        dist.destroy_process_group()
    torch.save(result, sys.argv[4])
''')


def test_distributed_data_parallel_matches_one_process(tmp_path) -> None:
    """Two gloo processes, each half of the batch, give the parameters of one process with all
    of it (the loss is a mean, so DDP's averaged gradients are the full-batch gradients)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    single = subprocess.run([sys.executable, str(script), "0", "1", port, str(tmp_path / "single.pt")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), "2", port, str(tmp_path / f"rank{rank}.pt")], stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-3000:]
    expected = torch.load(tmp_path / "single.pt")
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_many_threads_at_the_first_call_build_once(tmp_path) -> None:
    """The very first call, from 8 threads at once in a fresh process with an empty extension
    cache: one build (one line saying so, naming the cache), identical results, no crash."""
    code = textwrap.dedent('''
        import threading, torch, softsplat
        generator = torch.Generator().manual_seed(0)
        x, f, m = torch.randn(2, 3, 30, 40, generator=generator), torch.randn(2, 2, 30, 40, generator=generator) * 4, torch.randn(2, 1, 30, 40, generator=generator)
        results, errors = [None] * 8, []
        def work(i):
            try:
                results[i] = softsplat.splat(x, f, m, mode="soft", backend="cpp")
            except Exception as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        assert not errors, errors
        assert all(torch.equal(r, results[0]) for r in results)
        print("ok")
    ''')
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    building = [line for line in result.stderr.splitlines() if line.startswith("softsplat: building")]
    assert len(building) == 1 and str(tmp_path) in building[0], result.stderr[-3000:]


def test_repeated_calls_do_not_grow_memory() -> None:
    inputs = _inputs(shape=(1, 3, 256, 256))
    for _ in range(5):  # warm-up: allocator pools, the library
        _forward_and_grads("auto", inputs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(60):
        _forward_and_grads("auto", inputs)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 64 * 1024, f"peak resident memory grew by {grown} KiB over 60 calls"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_the_spec_dtypes(dtype) -> None:
    """Under CPU autocast (bfloat16) the result keeps input's dtype and the values computed
    outside autocast: splat has no autocast rule of its own, docs/spec.md's dtype rules apply."""
    input, flow, metric = (t.to(dtype) for t in _inputs(shape=(1, 3, 16, 20)))
    expected = softsplat.splat(input, flow, metric, mode="soft")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = softsplat.splat(input, flow, metric, mode="soft")
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_index_width_helper_past_int32() -> None:
    small = torch.empty(2, 3, 4, 5)
    assert cupy_backend._fits_int32([small], 2 * 4 * 4 * 5)
    assert not cupy_backend._fits_int32([small], 2**31)  # N*(C+1)*H*W past 2^31-1
    # Below 2^31 - 1, but a grid-stride index (up to MAX_BLOCKS * THREADS = 2^28 past the last
    # element) would pass it: 64-bit.
    assert not cupy_backend._fits_int32([small], 2**31 - 2**27)
    assert cupy_backend._fits_int32([small], 2**31 - 2**28 - 2)
    huge = torch.empty(1).expand(2**16, 2**16)  # 2^32 elements, stride 0: no memory
    assert not cupy_backend._fits_int32([huge], 10)  # pixel indices would pass 2^31-1

    class Strided:  # a view whose last element lies past 2^31-1 (no memory behind it)
        shape, numel = (2, 2), staticmethod(lambda: 4)

        @staticmethod
        def stride():
            return (2**31, 1)

    assert not cupy_backend._fits_int32([Strided()], 10)
    assert cupy_backend._fits_int32([torch.empty(1).expand(2**15, 2**15)], 10)  # 2^30 elements


@pytest.mark.slow
def test_more_than_2_to_the_31_elements() -> None:
    """An input of 2^31 + 2^20 elements through a stride-0 expansion (needs ~26 GB for the
    results: run with `pytest -m slow` on a machine with the memory)."""
    C, H, W = 2**11 + 1, 1024, 1024
    input = torch.ones(1, 1, 1, 1).expand(1, C, H, W)
    flow = torch.zeros(1, 2, H, W)
    flow[:, 0] = 0.5
    out = softsplat.splat(input, flow, mode="sum", backend="cpp")
    assert out.shape == (1, C, H, W) and float(out[0, -1, 7, 0]) == 0.5 and float(out[0, -1, 7, 1]) == 1.0


def test_the_torch_backend_declares_cuda_determinism_only_in_deterministic_mode() -> None:
    """docs/spec.md section 9: index_add_ on CUDA adds with atomics unless deterministic
    algorithms are asked for; the torch backend declares exactly that, and info shows it."""
    oracle = backends.get("torch")
    assert oracle.is_deterministic("cpu", asked=False) and oracle.is_deterministic("cuda")
    assert not oracle.is_deterministic("cuda", asked=False)
    result = subprocess.run([sys.executable, "-m", "softsplat", "info"], capture_output=True, text=True, check=True,
                            env={**os.environ, "COLUMNS": "400"})
    row = next(line for line in result.stdout.splitlines() if "│ torch " in line)
    assert "cpu; cuda (deterministic mode)" in row, row
