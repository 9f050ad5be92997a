"""The command line, run as users run it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from softsplat import backends
from softsplat.cli import main


def test_info_prints_every_backend() -> None:
    result = subprocess.run([sys.executable, "-m", "softsplat", "info"], capture_output=True, text=True, check=True, env={"COLUMNS": "200", "PATH": ""})
    for name in backends.PRIORITY:
        assert name in result.stdout
    assert "available" in result.stdout and "deterministic" in result.stdout


def test_the_test_suites_host_backends_are_not_softsplats() -> None:
    """cuda-host and cupy-host are registered by the test suite (conftest.py), here; softsplat
    itself, its info and its command line know nothing of them."""
    assert {"cuda-host", "cupy-host"} <= set(backends.names())
    plain = {"COLUMNS": "200", "PATH": ""}
    names = subprocess.run([sys.executable, "-c", "from softsplat import backends; print(*backends.names())"],
                           capture_output=True, text=True, check=True, env=plain).stdout.split()
    assert sorted(names) == sorted(backends.PRIORITY)
    info = subprocess.run([sys.executable, "-m", "softsplat", "info"], capture_output=True, text=True, check=True, env=plain)
    assert "host" not in info.stdout
    refused = subprocess.run([sys.executable, "-m", "softsplat", "demo", "--backend", "cuda-host"], capture_output=True,
                             text=True, env=plain)
    assert refused.returncode == 2 and "--backend" in refused.stderr and "'cuda-host'" in refused.stderr


def test_unknown_command_fails_with_usage() -> None:
    result = subprocess.run([sys.executable, "-m", "softsplat", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr


def test_bench_times_the_deterministic_path_beside_the_atomic_one(capsys, monkeypatch) -> None:
    """--deterministic: a backend with a deterministic path of its own on the device (here the
    test suite's cuda-host, the CUDA kernels on the CPU) gets a row of it and its cost over the
    default path; where none has one, bench says so."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["bench", "--sizes", "16x24", "--modes", "soft,sum", "--repeats", "1", "--backends", "cuda-host",
                 "--deterministic", "--no-onnxruntime"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "│" in line and "cuda-host deterministic" in line]
    assert len(rows) == 2, out
    for mode in ("soft", "sum"):
        assert f"16x24 {mode} cuda-host deterministic: forward" in out and "x the atomic forward's time" in out, out
    assert "collapsing flow 16x24 (every pixel onto 2x2 targets) cuda-host deterministic: forward" in out, out
    assert main(["bench", "--workload", "gmfss", "--frame", "32x64", "--repeats", "1", "--backends", "cuda-host",
                 "--deterministic"]) == 0
    out = capsys.readouterr().out
    assert "cuda-host deterministic ms (x bound)" in out and "the set cuda-host deterministic: forward" in out, out
    assert main(["bench", "--sizes", "16x24", "--repeats", "1", "--backends", "cpp", "--deterministic",
                 "--no-onnxruntime"]) == 0
    assert "no backend timed here has a deterministic path of its own on cpu" in capsys.readouterr().out


def test_bench_bounds_count_the_bytes_a_fused_pass_moves() -> None:
    """Per pixel, soft float32 with C = 3: the forward reads 3 channels, 2 flows and the metric
    and writes 3 channels and the normaliser (40 bytes); the backward reads the gradient, the
    input, flow, metric, the result and the normaliser and writes the three gradients (76)."""
    from softsplat import bench

    assert bench.forward_bytes((2, 5), channels=3) == 10 * 40
    assert bench.backward_bytes((2, 5), channels=3) == 10 * (12 + 12 + 8 + 4 + 12 + 4 + 12 + 8 + 4)
    # sum: no metric, no normaliser, nothing saved to read; float16 input and gradients in 2 bytes
    assert bench.backward_bytes((2, 5), channels=64, mode="sum", dtype=torch.float16) == 10 * (128 + 128 + 8 + 128 + 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_naive_port_runs_16_bit_inputs_at_frame_sizes(dtype) -> None:
    """`softsplat bench --dtype float16` times the naive port too: its pixel indices pass 2048
    (and float16's largest value) at every frame size, so they are computed in float32."""
    from softsplat import bench

    input, flow, metric = bench.inputs((256, 448), channels=3)
    out = bench.naive_port(input.to(dtype), flow.to(dtype), metric.to(dtype))
    expected = bench.naive_port(input.to(dtype).float(), flow.to(dtype).float(), metric.to(dtype).float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_bench_shows_forward_and_backward_over_their_bound(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["bench", "--sizes", "16x24", "--modes", "soft", "--repeats", "1", "--backends", "cpp",
                 "--no-onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "fwd+bwd / its bound" in out, out
    row = next(line for line in out.splitlines() if "│" in line and " cpp " in line)
    assert row.rstrip(" │").endswith("x"), row


def test_bench_deterministic_times_only_ordered_forwards() -> None:
    """--deterministic adds rows for backends with an ordered forward of their own on the device
    (cpp and cupy on CUDA), not for the torch backend, whose deterministic mode on CUDA is torch's
    deterministic index_add_."""
    from softsplat import backends, bench

    class Console:
        def print(self, *args) -> None:
            pass

    runnable = [backends.get(name) for name in ("torch", "cpp", "cupy", "triton")]
    names = [name for name, _ in bench.deterministic_contenders(runnable, "cuda", Console())]
    assert names == ["cpp deterministic", "cupy deterministic"]


@pytest.mark.parametrize(
    "environ, libc, device, says",
    [
        ({}, "glibc", "cpu", "fresh pages the system zeroes"),
        ({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}, "glibc", "cpu", "kept once freed"),
        # without the trim threshold, glibc gives the top of its heap back: fresh pages again
        ({"MALLOC_MMAP_MAX_": "0"}, "glibc", "cpu", "fresh pages the system zeroes"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, "glibc", "cpu", "tcmalloc preloaded"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "glibc", "cpu", "libjemalloc.so.2) provides"),
        ({}, "", "cpu", None),  # not glibc: nothing known to say
        ({}, "glibc", "cuda", None),
    ],
)
def test_bench_says_how_outputs_get_their_memory(environ, libc, device, says) -> None:
    """The CPU times count the system's zeroing of fresh output pages where glibc's malloc gives
    large blocks back (a third of the workload's time): bench says which case it ran in."""
    from softsplat.bench import allocator_note

    note = allocator_note(device, environ, libc)
    assert (note is None) if says is None else (says in note), note


def test_bench_prints_the_memory_line(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    # read by bench, not by this running process's malloc
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert main(["bench", "--workload", "gmfss", "--frame", "16x32", "--repeats", "1", "--backends", "cpp"]) == 0
    out = capsys.readouterr().out
    import platform

    assert ("kept once freed" in out) == (platform.libc_ver()[0] == "glibc"), out


@pytest.mark.parametrize(
    "argv, option, given",
    [
        (["demo", "--backend", "nope"], "--backend", "'nope'"),
        (["bench", "--modes", "softmax-foo"], "--modes", "'softmax-foo'"),
        (["bench", "--modes", "avg+stable"], "--modes", "'avg+stable'"),
        (["demo", "--times", "0,abc"], "--times", "'abc'"),
        (["demo", "--flow", "PNG"], "--flow", "PIEH"),
        (["demo", "--flow", "missing.flo"], "--flow", "'missing.flo'"),
        (["demo", "--one", "missing.png", "--two", "missing.png"], "--one", "'missing.png'"),
        (["bench", "--sizes", "256by448"], "--sizes", "'256by448'"),
        (["bench", "--backends", "cpp,nope"], "--backends", "'nope'"),
        (["bench", "--repeats", "0"], "--repeats", "'0'"),
        (["bench", "--channels", "-4"], "--channels", "'-4'"),
        (["bench", "--workload", "rife"], "--workload", "'rife'"),
        (["bench", "--frame", "1080"], "--frame", "'1080'"),
    ],
)
def test_a_command_line_mistake_is_one_line_naming_the_option(argv, option, given, tmp_path, capsys) -> None:
    if "PNG" in argv:  # a PNG passed as the flow
        png = tmp_path / "frame.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        argv = [str(png) if a == "PNG" else a for a in argv]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert option in error and given in error and "expected" in error, error


def test_help_names_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in ("info", "build", "demo", "bench"))
    assert "Imports only downward" not in out


def test_info_shows_install_hints_verbatim(capsys, monkeypatch) -> None:
    import softsplat.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend.importlib.util, "find_spec", lambda name: None)
    backend = triton_backend.TritonBackend()
    monkeypatch.setattr("softsplat.backends.all_backends", lambda: [backend])
    monkeypatch.setenv("COLUMNS", "400")  # one line per row
    assert main(["info"]) == 0
    assert "pip install 'softsplat[triton]'" in capsys.readouterr().out


def test_bench_times_a_workloads_calls_and_its_set(capsys, monkeypatch) -> None:
    """--workload gmfss: each of GMFSS's four splat shapes (C = 3 to 192) and the set of eight,
    per backend beside the naive port, with the memory bound."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["bench", "--workload", "gmfss", "--frame", "64x128", "--repeats", "1", "--backends", "cpp"]) == 0
    out = capsys.readouterr().out
    for channels, size in (("3", "32x64"), ("64", "32x64"), ("128", "16x32"), ("192", "8x16")):
        assert any(channels in line and size in line for line in out.splitlines()), out
    assert "the set (2 x each)" in out and "cpp ms (x bound)" in out and "naive port ms" in out
    assert "cpp: the set at" in out and "bound" in out


@pytest.mark.parametrize(
    "argv, option, given",
    [
        (["demo", "--height", "0"], "--height", "'0'"),
        (["demo", "--width", "-5"], "--width", "'-5'"),
        (["demo", "--t", "nan"], "--t", "'nan'"),
        (["demo", "--t", "1.5"], "--t", "'1.5'"),
        (["demo", "--alpha", "-1"], "--alpha", "'-1'"),
        (["demo", "--times", "0,nan"], "--times", "'nan'"),
        (["demo", "--out", "no-such-dir/x.png"], "--out", "'no-such-dir/x.png'"),
        (["demo", "--gif", "no-such-dir/x.gif"], "--gif", "'no-such-dir/x.gif'"),
        (["demo", "--one", "README.md", "--two", "README.md"], "--one", "'README.md'"),
        (["export-onnx", "--mode", "soft", "--out", "no-such-dir/x.onnx"], "--out", "'no-such-dir/x.onnx'"),
        (["export-onnx", "--mode", "avg", "--stable"], "--stable", "--mode avg"),
        (["export-onnx", "--mode", "sum", "--normaliser"], "--normaliser", "--mode sum"),
        (["bench", "--device", "gpu"], "--device", "'gpu'"),
        (["bench", "--device", "cuda:7"], "--device", "'cuda:7'"),
        (["demo", "--backend", "cupy"], "--backend", "'cupy'"),
    ],
)
def test_every_mistake_is_one_line_exit_2_before_any_work(argv, option, given, tmp_path) -> None:
    """As a user runs them: one line on stderr naming the option, what was expected and what was
    given, exit code 2, nothing written, no traceback."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "softsplat", *argv], capture_output=True, text=True, cwd=root,
                            env={**__import__("os").environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert option in error and given in error and "expected" in error, error
    assert result.stdout == ""


def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(monkeypatch, capsys) -> None:
    def broken():
        raise RuntimeError("something no option explains\nsecond line")

    monkeypatch.setattr("softsplat.backends.all_backends", broken)
    assert main(["info"]) == 1
    error = capsys.readouterr().err
    assert error.strip() == ("softsplat info: error: RuntimeError: something no option explains second line "
                             "(--debug shows the traceback)")
    with pytest.raises(RuntimeError, match="something no option explains"):
        main(["--debug", "info"])


def test_a_missing_dependency_is_one_line_naming_the_extra(monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["demo", "--out", "x.png"]) == 1
    assert capsys.readouterr().err.strip() == ("softsplat demo: error: demo needs matplotlib (the figure): "
                                               "pip install 'softsplat[demo]' (--debug shows the traceback)")


def test_bench_says_why_onnxruntime_is_skipped(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["bench", "--sizes", "16x24", "--dtype", "float64", "--repeats", "1", "--backends", "cpp"]) == 0
    assert "skipped onnxruntime" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has an MPS device")
def test_bench_on_mps_without_one_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--device", "mps"])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--device" in error and "has no MPS device here, got 'mps'" in error
