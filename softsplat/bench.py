"""``softsplat bench``: every available backend side by side, timed in one run on the machine that runs it.

Also the helpers the asv benchmarks (``asv_bench/``) share: inputs, a plain pure-torch port to
compare against, synchronised timing, and the memory-bandwidth bound of the fused forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from . import api, backends
from .modes import EPS, Mode


def parse_size(text: str) -> tuple[int, int]:
    """``"1080x1920"`` -> ``(1080, 1920)`` (height x width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size: expected HEIGHTxWIDTH such as 1080x1920, got {text!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"size: expected positive sizes, got {text!r}")
    return height, width


def inputs(size, channels=3, batch=1, dtype=torch.float32, device="cpu", seed=0):
    """Input, a smooth flow of up to ~10 pixels (as optical flow is) and a metric."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    input = torch.rand((batch, channels, height, width), generator=generator)
    coarse = torch.randn((batch, 2, max(2, height // 64), max(2, width // 64)), generator=generator) * 6
    flow = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    metric = torch.randn((batch, 1, height, width), generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (input, flow, metric))


def naive_port(input, flow, metric, mode: str = "soft") -> torch.Tensor:
    """How ports commonly write it in plain torch: ``index_add_`` of the four taps over
    ``cat([input * exp(metric), exp(metric)])`` (no fused kernel, no eps variants, no stable
    variant: ``soft+stable`` and ``max`` time plain soft). Only for timing comparisons; the oracle, not
    this, is the specification."""
    mode = mode.removesuffix(STABLE_SUFFIX)
    N, _, H, W = input.shape
    if mode == "sum":
        values = input
    else:
        weight = metric.exp() if mode == "soft" else (metric if mode == "linear" else torch.ones_like(metric))
        values = torch.cat([input * weight, weight], 1)
    K = values.shape[1]
    # Coordinates in float32 (float64 for float64 flow): a 16-bit pixel index y * W + x passes
    # 2048 (float16 and bfloat16 integers are exact up to there) and float16's largest value.
    coordinates = torch.float64 if flow.dtype == torch.float64 else torch.float32
    ys, xs = torch.meshgrid(torch.arange(H, device=input.device, dtype=coordinates),
                            torch.arange(W, device=input.device, dtype=coordinates), indexing="ij")
    fx, fy = xs + flow[:, 0].to(coordinates), ys + flow[:, 1].to(coordinates)
    x0, y0 = fx.floor(), fy.floor()
    out = values.new_zeros(N, K, H * W)
    flat = values.reshape(N, K, H * W)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        tx, ty = x0 + dx, y0 + dy
        weight = (1 - (fx - tx).abs()) * (1 - (fy - ty).abs())
        inside = (tx >= 0) & (tx < W) & (ty >= 0) & (ty < H)
        index = (ty.clamp(0, H - 1) * W + tx.clamp(0, W - 1)).long().reshape(N, H * W)
        contribution = flat * (weight * inside).reshape(N, 1, H * W).to(flat.dtype)
        for n in range(N):
            out[n].index_add_(1, index[n], contribution[n])
    out = out.view(N, K, H, W)
    return out if mode == "sum" else out[:, :-1] / (out[:, -1:] + EPS)


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    elif torch.device(device).type == "mps":
        torch.mps.synchronize()


def timed(function, device="cpu", repeats: int = 3, warmups: int = 2) -> float:
    """Median seconds of ``function()`` over ``repeats`` runs after ``warmups`` untimed ones,
    synchronised. Two warm-ups: the first calls of an allocation-heavy function (the naive port
    above) also pay for growing the allocator's heap (page faults), which steady state does not."""
    return timed_together({"function": function}, device, repeats, warmups)["function"]


def timed_together(functions: dict, device="cpu", repeats: int = 3, warmups: int = 2) -> dict:
    """``timed`` for several functions at once, run in turns (one run of each, ``repeats``
    times): a slow or fast spell of a shared machine falls on all of them, so the ratios of the
    medians hold better than those of functions timed one after the other."""
    for _ in range(warmups):
        for function in functions.values():
            function()
    _synchronize(device)
    times = {name: [] for name in functions}
    on_gpu = torch.device(device).type == "cuda"
    for _ in range(repeats):
        for name, function in functions.items():
            if on_gpu:  # the device's own clock: CUDA events around the work on the current stream
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
                continue
            start = time.perf_counter()
            function()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def passes(call, tensors, mode):
    """(forward, forward+backward) closures of ``call(input, flow, metric_or_None, mode)``."""
    metric = tensors[2] if Mode.parse(mode.removesuffix(STABLE_SUFFIX)).needs_metric else None

    def forward():
        with torch.no_grad():
            call(tensors[0], tensors[1], metric, mode)

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (tensors[0], tensors[1])]
        leaves.append(metric.detach().requires_grad_() if metric is not None else None)
        call(*leaves, mode).float().sum().backward()

    return forward, forward_backward


STABLE_SUFFIX = "+stable"


def onnxruntime_call():
    """ONNX Runtime on the CPU running each mode's exported model (``softsplat.onnx.standalone``,
    exported on the first call): forward only."""
    import onnxruntime

    from . import onnx

    sessions = {}

    def call(input, flow, metric, mode):
        if input.requires_grad:
            raise NotImplementedError("ONNX Runtime runs the forward only")
        if mode not in sessions:
            program = onnx.standalone(mode.removesuffix(STABLE_SUFFIX), stable=mode.endswith(STABLE_SUFFIX), dtype=input.dtype)
            proto = program.model_proto.SerializeToString()
            sessions[mode] = onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"])
        session = sessions[mode]
        arguments = [a for a in (input, flow, metric) if a is not None]
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), arguments)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return call


#: Contenders that have no backward pass.
FORWARD_ONLY = ("onnxruntime",)


def splat_call(backend: str):
    """``splat`` on ``backend``; a mode ending in ``+stable`` (``soft+stable``) runs stable soft."""

    def call(input, flow, metric, mode):
        stable = mode.endswith(STABLE_SUFFIX)
        return api.splat(input, flow, metric, mode=mode.removesuffix(STABLE_SUFFIX), backend=backend, stable=stable)

    return call


#: What a contender's name ends with when it is a backend's deterministic path (--deterministic).
DETERMINISTIC_SUFFIX = " deterministic"


def deterministic_call(backend: str):
    """``splat_call(backend)`` under ``torch.use_deterministic_algorithms(True)``: the backend's
    deterministic path (the CUDA kernels' ordered forward)."""
    plain = splat_call(backend)

    def call(*arguments):
        previous = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return plain(*arguments)
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=warn_only)

    return call


def deterministic_contenders(runnable, device: str, console) -> list:
    """--deterministic: ``(name, call)`` of each runnable backend's ordered forward on
    ``device`` (``ordered_forward_on``: cpp and cupy on CUDA; not the torch backend's
    deterministic ``index_add_``)."""
    device_type = torch.device(device).type
    chosen = [b for b in runnable if device_type in b.ordered_forward_on]
    if not chosen:
        console.print(f"[yellow]--deterministic[/]: no backend timed here has a deterministic path of its own on "
                      f"{device_type} (on the CPU cpp and torch are deterministic as they are)")
    return [(b.name + DETERMINISTIC_SUFFIX, deterministic_call(b.name)) for b in chosen]


def deterministic_ratios(forward: dict, both: dict | None = None) -> list[str]:
    """For every contender timed both ways: its deterministic time over its default one, keyed
    ``(what..., name)`` in ``forward`` (and ``both``, forward+backward)."""
    lines = []
    for key, seconds in forward.items():
        *what, name = key
        if not name.endswith(DETERMINISTIC_SUFFIX):
            continue
        plain = (*what, name.removesuffix(DETERMINISTIC_SUFFIX))
        if plain not in forward:
            continue
        label = " ".join(str(part) for part in what)
        line = f"{label} {name}: forward {seconds / forward[plain]:.2f}x the atomic forward's time"
        if both is not None and both[key] == both[key] and both[plain] == both[plain]:
            line += f", forward+backward {both[key] / both[plain]:.2f}x"
        lines.append(line)
    return lines


def collapsing_inputs(size, channels=3, dtype=torch.float32, device="cpu"):
    """``inputs`` with a collapsing flow instead: every pixel moved onto the 2 x 2 targets
    around the centre, so each of the four is reached by every pixel (the ordered forward's
    worst case: all its work on four targets)."""
    input, _, metric = inputs(size, channels=channels, dtype=dtype, device=device)
    height, width = size
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    flow = torch.stack([width // 2 + 0.5 - xs, height // 2 + 0.5 - ys])[None].expand(input.shape[0], 2, height, width)
    return input, flow.to(device=device, dtype=dtype).contiguous(), metric


def collapsing_times(contenders, size, channels: int, dtype, device: str, repeats: int) -> list[str]:
    """--deterministic: each ordered forward and its backend's atomic forward on a collapsing
    flow (``collapsing_inputs``) of ``size``, soft mode."""
    calls = dict(contenders)
    tensors = collapsing_inputs(size, channels=channels, dtype=dtype, device=device)
    lines = []
    for name, call in contenders:
        plain = name.removesuffix(DETERMINISTIC_SUFFIX)
        if name == plain or plain not in calls:
            continue
        ordered = timed(passes(call, tensors, "soft")[0], device, repeats, warmups=1)
        atomic = timed(passes(calls[plain], tensors, "soft")[0], device, repeats, warmups=1)
        lines.append(f"collapsing flow {size[0]}x{size[1]} (every pixel onto 2x2 targets) {name}: forward "
                     f"{ordered * 1e3:.1f} ms, the atomic forward {atomic * 1e3:.1f} ms")
    return lines


#: Allocators that keep freed memory for the process, named by their library in LD_PRELOAD.
KEEPING_ALLOCATORS = ("tcmalloc",)


def allocator_note(device="cpu", environ=None, libc=None) -> str | None:
    """A line on how CPU outputs get their memory, where it matters to the times: glibc's
    ``malloc`` as it comes gives a large block back to the system when it is freed, so each
    call's outputs are fresh pages the system zeroes (README, Performance). None elsewhere."""
    import os
    import platform

    environ = os.environ if environ is None else environ
    libc = platform.libc_ver()[0] if libc is None else libc
    if str(device) != "cpu" or libc != "glibc":
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    for name in KEEPING_ALLOCATORS:
        if name in preloaded:
            return f"memory: {name} preloaded, which keeps freed memory: outputs reuse it"
    if "malloc" in preloaded:
        return f"memory: the allocator preloaded ({preloaded}) provides the outputs' memory"
    if environ.get("MALLOC_MMAP_MAX_") == "0" and environ.get("MALLOC_TRIM_THRESHOLD_", "").isdigit() and \
            int(environ["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30:
        return ("memory: glibc malloc with MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ of a GB or more: outputs "
                "from its heap, kept once freed")
    return ("memory: glibc malloc as it comes: each call's large outputs are fresh pages the system zeroes, counted "
            "in the times (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736, or TCMalloc preloaded, keeps freed "
            "memory: README, Performance)")


def copy_bandwidth(device="cpu") -> float:
    """Measured bytes per second of a large tensor copy (read + write). The source is written
    first: an untouched ``empty`` tensor's pages all map the kernel's one zero page, whose reads
    hit the cache, which makes the bandwidth come out too high."""
    source = torch.ones(64 * 1024 * 1024 // 4, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, repeats=5)
    return 2 * source.numel() * 4 / seconds


def forward_bytes(size, channels=3, batch=1, dtype=torch.float32, mode="soft") -> int:
    """Bytes the fused forward must move at least: read input, flow and metric, write the
    result (compute dtype) and the normaliser."""
    height, width = size
    pixels = batch * height * width
    itemsize = torch.empty((), dtype=dtype).element_size()
    metric = 4 if Mode.parse(mode.removesuffix(STABLE_SUFFIX)).needs_metric else 0
    normaliser = 4 if mode != "sum" else 0
    return pixels * (channels * itemsize + 2 * 4 + metric + channels * 4 + normaliser)


def backward_bytes(size, channels=3, batch=1, dtype=torch.float32, mode="soft") -> int:
    """Bytes a fused backward must move at least, given the forward's saved tensors: read the
    result's gradient and the input (their dtype), flow and metric, the result and the normaliser
    (float32), write the input's gradient (its dtype), the flow's and the metric's."""
    height, width = size
    pixels = batch * height * width
    itemsize = torch.empty((), dtype=dtype).element_size()
    metric = 4 if Mode.parse(mode.removesuffix(STABLE_SUFFIX)).needs_metric else 0
    normalised = mode != "sum"
    reads = 2 * channels * itemsize + 2 * 4 + metric + (channels * 4 + 4 if normalised else 0)
    writes = channels * itemsize + 2 * 4 + metric
    return pixels * (reads + writes)


def _runnable(args, modes, console):
    """The backends to time (named by --backends, else every registered one) that can run
    the first mode on --device in --dtype; the others are reported as skipped, with why."""
    from rich.markup import escape

    device, dtype = args.device, getattr(torch, args.dtype)
    candidates = backends.all_backends()
    if args.backends:
        candidates = [backends.get(name) for name in args.backends.split(",")]
    runnable = []
    for backend in candidates:
        call = backends.Signature(torch.device(device).type, dtype, Mode.parse(modes[0].removesuffix(STABLE_SUFFIX)))
        reasons = backend.not_supported_reasons(call)
        if not reasons and backend.name == "triton" and not torch.cuda.is_available():
            reasons.append("it would run in Triton's interpreter (no CUDA device), whose times mean nothing")
        if reasons:
            console.print(f"[yellow]skipped {backend.name}[/]: {escape('; '.join(reasons))}")
        else:
            runnable.append(backend)
    return runnable


#: GMFSS's soft splats for one output frame (forward only, under inference_mode, batch 1): an
#: image (C = 3) at 1/2 of the frame size, then features of 64 channels at 1/2, 128 at 1/4 and
#: 192 at 1/8, each made twice (one per direction).
GMFSS = (("image", 3, 2), ("features", 64, 2), ("features", 128, 4), ("features", 192, 8))
WORKLOADS = {"gmfss": GMFSS}


def workload_name(value: str) -> str:
    """--workload: a name of WORKLOADS."""
    if value not in WORKLOADS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(sorted(WORKLOADS))}, got {value!r}")
    return value


def run_workload(args, console) -> int:
    """Each call of a workload and the whole set for one frame, per backend, the naive port and
    the memory bound, in one run: forward under ``torch.inference_mode()``."""
    from rich.table import Table

    frame = parse_size(args.frame)
    device, dtype = args.device, getattr(torch, args.dtype)
    calls = WORKLOADS[args.workload]
    runnable = _runnable(args, ["soft"], console)
    contenders = [(b.name, splat_call(b.name)) for b in runnable]
    if args.deterministic:
        contenders += deterministic_contenders(runnable, device, console)
    contenders += [("naive port", naive_port)]
    bandwidth = copy_bandwidth(device)
    times, bounds = {}, {}
    for what, channels, divisor in calls:
        size = (frame[0] // divisor, frame[1] // divisor)
        tensors = inputs(size, channels=channels, dtype=dtype, device=device)
        bounds[what, channels] = forward_bytes(size, channels=channels, dtype=dtype) / bandwidth

        def forward(call, tensors=tensors):
            with torch.inference_mode():
                call(*tensors, "soft")

        measured = timed_together({name: (lambda c=call: forward(c)) for name, call in contenders}, device, args.repeats)
        for name, seconds in measured.items():
            times[what, channels, name] = seconds
    copies = 2  # each call is made once per direction
    title = (f"softsplat bench --workload {args.workload}: one {frame[0]}x{frame[1]} frame's soft splats on {device}, "
             f"{args.dtype}, forward under inference_mode, batch 1, median of {args.repeats}")
    table = Table(title=title)
    for column in ("call", "channels", "size", *(f"{name} ms (x bound)" for name, _ in contenders)):
        table.add_column(column, justify="right")
    for what, channels, divisor in calls:
        bound = bounds[what, channels]
        table.add_row(what, str(channels), f"{frame[0] // divisor}x{frame[1] // divisor}",
                      *(f"{times[what, channels, name] * 1e3:.2f} ({times[what, channels, name] / bound:.1f}x)"
                        for name, _ in contenders))
    total_bound = copies * sum(bounds.values())
    totals = {name: copies * sum(times[what, channels, name] for what, channels, _ in calls) for name, _ in contenders}
    table.add_row(f"the set ({copies} x each)", "", "",
                  *(f"{totals[name] * 1e3:.1f} ({totals[name] / total_bound:.1f}x)" for name, _ in contenders))
    console.print(table)
    console.print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; bound = bytes the fused forward must move / that bandwidth "
                  f"(the set: {total_bound * 1e3:.1f} ms)")
    note = allocator_note(device)
    if note:
        console.print(note)
    for name, _ in contenders[:-1]:
        console.print(f"{name}: the set at {totals['naive port'] / totals[name]:.1f}x the naive port's speed")
    for line in deterministic_ratios({("the set", name): seconds for name, seconds in totals.items()}):
        console.print(line)
    return 0


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    if args.workload:
        return run_workload(args, console)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    device = args.device
    dtype = getattr(torch, args.dtype)
    runnable = _runnable(args, modes, console)
    bandwidth = copy_bandwidth(device)
    contenders = [(b.name, splat_call(b.name)) for b in runnable]
    if args.deterministic:
        contenders += deterministic_contenders(runnable, device, console)
    contenders += [("naive port", naive_port)]
    if args.onnxruntime:
        reason = onnxruntime_reason(device, dtype)
        if reason:
            console.print(f"[yellow]skipped onnxruntime[/]: {escape(reason)}")
        else:
            contenders.append(("onnxruntime", onnxruntime_call()))
    rows = []
    # Per size and contender, the modes are timed in turns (timed_together): the forwards, then
    # the forward+backward passes, so that a contender's ratios between modes (stable / plain)
    # compare runs of the same moments. Contenders are timed one after the other, each in its
    # own steady state: a run of the naive port, with its image-sized temporaries, leaves the
    # allocator's heap in a state another contender's first calls would pay for.
    times = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing", total=len(sizes) * len(contenders))
        for size in sizes:
            tensors = inputs(size, channels=args.channels, dtype=dtype, device=device)
            for name, call in contenders:
                progress.update(task, description=f"{name} {size[0]}x{size[1]}")
                closures = {mode: passes(call, tensors, mode) for mode in modes}
                forward = timed_together({mode: pair[0] for mode, pair in closures.items()}, device, args.repeats)
                if name in FORWARD_ONLY:
                    both = {mode: float("nan") for mode in modes}
                else:
                    both = timed_together({mode: pair[1] for mode, pair in closures.items()}, device, args.repeats)
                for mode in modes:
                    times[size, mode, name] = (forward[mode], both[mode])
                progress.advance(task)
            for mode in modes:
                measured = {name: times[size, mode, name] for name, _ in contenders}
                moved = forward_bytes(size, args.channels, dtype=dtype, mode=mode)
                both_moved = moved + backward_bytes(size, args.channels, dtype=dtype, mode=mode)
                rows.append((size, mode, measured, moved / bandwidth, both_moved / bandwidth))
    table = Table(title=f"softsplat bench on {device}, {args.channels} channels, {args.dtype}, median of {args.repeats} "
                  "(ratios: how many times faster)")
    for column in ("size", "mode", "backend", "forward ms", "fwd+bwd ms", "vs torch oracle fwd / fwd+bwd", "vs naive port fwd / fwd+bwd", "forward / bandwidth bound",
                   "fwd+bwd / its bound"):
        table.add_column(column, justify="right")
    for size, mode, measured, bound, both_bound in rows:
        oracle, naive = measured.get("torch"), measured["naive port"]
        for name, (forward, both) in measured.items():
            table.add_row(
                f"{size[0]}x{size[1]}", mode, name, f"{forward * 1e3:.1f}", "-" if both != both else f"{both * 1e3:.1f}",
                _speedups(oracle, forward, both) if oracle else "-", _speedups(naive, forward, both), f"{forward / bound:.1f}x",
                "-" if both != both else f"{both / both_bound:.1f}x",
            )
    console.print(table)
    console.print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; bound = bytes the fused forward must move / that bandwidth; "
                  "fwd+bwd's: with those a fused backward must move")
    note = allocator_note(device)
    if note:
        console.print(note)
    for line in stable_ratios(rows):
        console.print(line)
    forward = {(f"{size[0]}x{size[1]}", mode, name): t[0] for size, mode, measured, *_ in rows for name, t in measured.items()}
    both = {(f"{size[0]}x{size[1]}", mode, name): t[1] for size, mode, measured, *_ in rows for name, t in measured.items()}
    for line in deterministic_ratios(forward, both):
        console.print(line)
    if args.deterministic:
        for line in collapsing_times(contenders, sizes[0], args.channels, dtype, device, min(args.repeats, 3)):
            console.print(line)
    return 0


def _speedups(reference, forward: float, both: float) -> str:
    """``reference``'s (forward, forward+backward) times over these ("-" where not measured)."""
    return f"{reference[0] / forward:.1f}x / " + ("-" if both != both else f"{reference[1] / both:.1f}x")


def onnxruntime_reason(device: str, dtype: torch.dtype) -> str | None:
    """Why ONNX Runtime cannot be a contender here, or None."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'softsplat[onnx]')"
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.float16):
        return "compared on the CPU in float32 or float16 only"
    return None


def stable_ratios(rows) -> list[str]:
    """For every mode measured both plain and ``+stable``: how many times the plain forward's
    time the stable forward takes, per backend (the scatter-max pass included)."""
    forward = {(size, mode, name): times[0] for size, mode, measured, *_ in rows for name, times in measured.items()}
    lines = []
    for (size, mode, name), seconds in forward.items():
        plain = forward.get((size, mode.removesuffix(STABLE_SUFFIX), name))
        if mode.endswith(STABLE_SUFFIX) and plain and name != "naive port":
            lines.append(f"{size[0]}x{size[1]} {name}: {mode} forward / {mode.removesuffix(STABLE_SUFFIX)} forward = {seconds / plain:.2f}x")
    return lines


def add_arguments(parser) -> None:
    from . import options

    parser.add_argument("--sizes", default="256x448,1080x1920", type=options.size_list, help="HEIGHTxWIDTH,... (default 256x448,1080x1920)")
    parser.add_argument("--modes", default="soft", type=options.mode_names, help="comma-separated modes, soft+stable for stable soft, max for max splatting (default soft)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=options.device_name,
                        help="cpu, cuda or mps (default: cuda where torch sees a CUDA device)")
    parser.add_argument("--repeats", type=options.positive_int, default=3, help="timed runs per measurement; the median is shown")
    parser.add_argument("--channels", type=options.positive_int, default=3, help="channels of the input (default 3)")
    parser.add_argument("--workload", type=workload_name, default=None,
                        help="time a model's splats for one frame instead (gmfss: the eight soft splats GMFSS makes per "
                        "frame, C = 3 to 192); --frame sets the frame size")
    parser.add_argument("--frame", default="1080x1920", type=options.size_list, help="--workload's frame size (default 1080x1920)")
    parser.add_argument("--backends", default="", type=options.backend_names, help="comma-separated backends (default: every available one)")
    parser.add_argument("--deterministic", action="store_true",
                        help="also time each backend's deterministic path beside its default one where it has one of its "
                        "own (cpp and cupy on CUDA: the ordered forward, under torch.use_deterministic_algorithms(True)), "
                        "and print its time over the default's, and on a collapsing flow (every pixel onto 2x2 "
                        "targets, the first size) beside the atomic forward")
    parser.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=True,
                        help="also time ONNX Runtime (CPU) running the exported model, forward only, when the onnx extra is installed")
