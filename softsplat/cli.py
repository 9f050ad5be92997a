"""The command line: ``softsplat info``, ``build``, ``demo``. Imports only downward."""

from __future__ import annotations

import argparse

from . import backends
from .backends.base import dtype_names


def info(args: argparse.Namespace) -> int:
    """Print every backend: availability, devices, dtypes, determinism and reason."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="softsplat backends (auto tries: " + " > ".join(backends.PRIORITY) + ")")
    for column in ("backend", "available", "devices", "dtypes", "deterministic on", "reason"):
        table.add_column(column)
    for backend in backends.all_backends():
        available = backend.is_available()
        table.add_row(
            backend.name,
            "[green]yes[/]" if available else "[red]no[/]",
            "/".join(backend.devices()),
            dtype_names(backend.dtypes),
            "/".join(backend.deterministic_on) or "-",
            backend.summary if available else backend.unavailable_reason,
        )
    Console(width=max(Console().width, 140)).print(table)
    return 0


def build(args: argparse.Namespace) -> int:
    """Build (or find already built) every compiled backend that can be built here."""
    failed = 0
    for backend in backends.all_backends():
        if backend.test_only:
            continue
        if not backend.is_available():
            print(f"{backend.name}: skipped, {backend.unavailable_reason}")
            continue
        try:
            backend.prepare()
        except Exception as error:  # report every backend, then fail
            failed += 1
            print(f"{backend.name}: FAILED, {type(error).__name__}: {error}")
        else:
            print(f"{backend.name}: ready")
    return 1 if failed else 0


def demo(args: argparse.Namespace) -> int:
    from . import demo as demo_module

    return demo_module.run(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from . import demo as demo_module

    demo_module.add_arguments(parser)


def bench(args: argparse.Namespace) -> int:
    from . import bench as bench_module

    return bench_module.run(args)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from . import bench as bench_module

    bench_module.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softsplat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help=info.__doc__).set_defaults(func=info)
    commands.add_parser("build", help=build.__doc__).set_defaults(func=build)
    demo_parser = commands.add_parser("demo", help="warp an embedded scene (or your frames) with all four modes")
    _demo_arguments(demo_parser)
    demo_parser.set_defaults(func=demo)
    bench_parser = commands.add_parser("bench", help="time every available backend side by side")
    _bench_arguments(bench_parser)
    bench_parser.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)
