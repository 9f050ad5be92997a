"""softsplat: softmax splatting (differentiable forward warping) for PyTorch.

Commands: info (the backends here), build (build the compiled backends ahead of first use),
demo (the modes compared on a scene or your frames), bench (every backend timed side by side),
export-onnx (a standalone splatting model as an ONNX file).
"""

from __future__ import annotations

import argparse
import sys

from . import backends
from .backends.base import dtype_names
from .options import DependencyError, UsageError, mode_name, output_file, source_count


def info(args: argparse.Namespace) -> int:
    """Print every backend: availability, devices, dtypes, determinism and reason."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="softsplat backends (auto tries: " + " > ".join(backends.PRIORITY) + ")")
    for column in ("backend", "available", "devices", "dtypes", "deterministic on", "reason"):
        table.add_column(column)
    for backend in backends.all_backends():
        failure = backend.known_failure() if backend.is_available() else None
        available = backend.is_available() and failure is None
        table.add_row(
            backend.name,
            "[green]yes[/]" if available else "[red]no[/]" if failure is None else "[red]build failed[/]",
            "/".join(backend.devices()),
            dtype_names(backend.dtypes),
            "; ".join(filter(None, ["/".join(backend.deterministic_on), "/".join(backend.deterministic_when_asked_on)
                                    and "/".join(backend.deterministic_when_asked_on) + " (deterministic mode)"])) or "-",
            escape(backend.summary if available else failure or backend.unavailable_reason),
        )
    Console(width=max(Console().width, 140)).print(table)
    return 0


def build(args: argparse.Namespace) -> int:
    """Build (or find already built) every compiled backend that can be built here."""
    failed = 0
    for backend in backends.all_backends():
        if not backend.is_available():
            print(f"{backend.name}: skipped, {backend.unavailable_reason}")
            continue
        try:
            backend.forget_failure()  # a failed build is retried here, with its output
            offered = backend.devices()
            backend.prepare()
        except Exception as error:  # report every backend, then fail
            failed += 1
            print(f"{backend.name}: FAILED, {type(error).__name__}: {error}")
            continue
        lost = [device for device in offered if device not in backend.devices()]
        if lost:  # a part failed (the cpp backend's CUDA kernels) and the rest works
            import torch

            from .modes import Mode

            failed += 1
            call = backends.Signature(lost[0], torch.float32, Mode.parse("sum"))
            print(f"{backend.name}: ready on {'/'.join(backend.devices())}; FAILED on {'/'.join(lost)}, "
                  f"{'; '.join(backend.not_supported_reasons(call))}")
        else:
            print(f"{backend.name}: ready")
    return 1 if failed else 0


def demo(args: argparse.Namespace) -> int:
    from . import demo as demo_module

    return demo_module.run(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from . import demo as demo_module

    demo_module.add_arguments(parser)


def export_onnx(args: argparse.Namespace) -> int:
    """Write a standalone splatting model to ONNX (for pipelines that compose ONNX files)."""
    import importlib.util

    import torch

    from . import onnx
    from .modes import Mode

    mode = Mode.parse(args.mode)
    if args.stable and mode.kind != "soft":
        raise UsageError(f"argument --stable: expected a soft mode (stable soft splatting), got --mode {args.mode}")
    if args.normaliser and not mode.normalisation:
        raise UsageError(f"argument --normaliser: expected a mode that normalises, got --mode {args.mode}, which has "
                         "no normaliser")
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"export-onnx needs {' and '.join(missing)}: pip install 'softsplat[onnx]'")
    program = onnx.standalone(args.mode, stable=args.stable, return_normaliser=args.normaliser,
                              sources=args.sources, dtype=getattr(torch, args.dtype))
    program.save(args.out)
    inputs = ", ".join(i.name for i in program.model.graph.inputs)
    outputs = ", ".join(o.name for o in program.model.graph.outputs)
    print(f"{args.out}: ONNX opset {onnx.OPSET}, inputs {inputs} (batch, channels, height, width dynamic), outputs {outputs}")
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, type=mode_name, help="splatting mode, e.g. soft, avg, linear-zeroeps, sum")
    parser.add_argument("--stable", action="store_true", help="stable soft splatting (soft modes)")
    parser.add_argument("--normaliser", action="store_true", help="also output the normaliser (normalised modes)")
    parser.add_argument("--sources", type=source_count, default=1, help="joint splatting of this many sources (splat_many)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype of the input images")
    parser.add_argument("--out", default="softsplat.onnx", type=output_file, help="file to write (default softsplat.onnx)")


def bench(args: argparse.Namespace) -> int:
    from . import bench as bench_module

    return bench_module.run(args)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from . import bench as bench_module

    bench_module.add_arguments(parser)


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake answered in one line (exit code 2): the option, what was
    expected, what was given."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="softsplat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands.add_parser("info", help=info.__doc__).set_defaults(func=info)
    commands.add_parser("build", help=build.__doc__).set_defaults(func=build)
    demo_parser = commands.add_parser("demo", help="warp an embedded scene (or your frames) with all four modes")
    _demo_arguments(demo_parser)
    demo_parser.set_defaults(func=demo)
    bench_parser = commands.add_parser("bench", help="time every available backend side by side")
    _bench_arguments(bench_parser)
    bench_parser.set_defaults(func=bench)
    export_parser = commands.add_parser("export-onnx", help="write a standalone splatting model to ONNX")
    _export_arguments(export_parser)
    export_parser.set_defaults(func=export_onnx)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:  # a combination of options that cannot work, found later
        print(f"softsplat {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # what no option explains: one line, the traceback under --debug
        if args.debug:
            raise
        text = " ".join(str(error).split()) or type(error).__name__
        what = "" if isinstance(error, DependencyError) else f"{type(error).__name__}: "
        print(f"softsplat {args.command}: error: {what}{text} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
