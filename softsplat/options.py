"""The command line's option checkers and its two errors, shared by ``cli`` and the commands'
modules (``bench``, ``demo``), which import them from here: each checker turns a mistake into
argparse's one line naming the option, what was expected and what was given."""

from __future__ import annotations

import argparse


def mode_name(value: str) -> str:
    """--mode: one splatting mode."""
    from .modes import Mode

    try:
        Mode.parse(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a mode such as soft, avg, linear, sum or soft-zeroeps, got {value!r}") from None
    return value


def source_count(value: str) -> int:
    """--sources: a positive integer."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of sources, got {value!r}")
    return int(value)


def positive_int(value: str) -> int:
    """--repeats, --channels: a positive integer."""
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def backend_name(value: str) -> str:
    """--backend: 'auto' or a registered backend."""
    from . import backends

    if value != "auto" and value not in backends.names():
        raise argparse.ArgumentTypeError(f"expected 'auto' or one of {', '.join(backends.names())}, got {value!r}")
    return value


def backend_names(value: str) -> str:
    """--backends: a comma-separated list of backend names."""
    for name in value.split(","):
        if name.strip() and name.strip() != "auto":
            backend_name(name.strip())
    return value


def mode_names(value: str) -> str:
    """--modes: comma-separated modes, each optionally with +stable (soft modes only)."""
    from .modes import Mode

    for name in value.split(","):
        base, stable = name.strip().removesuffix("+stable"), name.strip().endswith("+stable")
        try:
            mode = Mode.parse(base)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected modes such as soft, avg, linear, sum, max, soft-zeroeps or soft+stable, got {name!r}"
            ) from None
        if stable and mode.kind != "soft":
            raise argparse.ArgumentTypeError(f"expected +stable on soft modes only, got {name!r}")
    return value


def times(value: str) -> str:
    """--times: comma-separated numbers (empty: the default, --t alone)."""
    for item in value.split(",") if value else []:
        try:
            unit_time(item)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated times from 0 to 1 such as 0,0.5,1, got {item!r}") from None
    return value


def flo_file(value: str) -> str:
    """--flow: a readable Middlebury .flo file."""
    from . import flo

    try:
        flo.read_flo(value)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"expected a readable .flo file, got {value!r} ({error.strerror})") from None
    except flo.FloError as error:
        raise argparse.ArgumentTypeError(f"expected a Middlebury .flo file, got {error}") from None
    return value


def image_file(value: str) -> str:
    """--one/--two: a readable image file."""
    import os

    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"expected an image file (PNG), got {value!r}, which does not exist")
    try:
        with open(value, "rb") as file:
            head = file.read(8)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"expected a readable image file (PNG), got {value!r} ({error.strerror})") from None
    if not head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        raise argparse.ArgumentTypeError(f"expected a PNG or JPEG image, got {value!r}, which is neither")
    return value


def output_file(value: str) -> str:
    """--out/--gif: a file to write, in a directory that exists (checked before any work)."""
    import os

    directory = os.path.dirname(value) or "."
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"expected a file in an existing directory, got {value!r} "
                                         f"(no directory {directory!r})")
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"expected a file name, got {value!r}, which is a directory")
    return value


def finite_float(value: str) -> float:
    """--alpha and friends: a finite number."""
    import math

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def unit_time(value: str) -> float:
    """--t: a time between the two frames, 0 to 1."""
    number = finite_float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a time from 0 (frame one) to 1 (frame two), got {value!r}")
    return number


def non_negative_float(value: str) -> float:
    """--alpha: a finite number >= 0."""
    number = finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def device_name(value: str) -> str:
    """--device: cpu, cuda / cuda:N where torch sees that CUDA device, or mps where torch has it."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda (cuda:N) or mps, got {value!r}") from None
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"expected cpu: torch {torch.__version__} has no MPS device here, got {value!r}")
        return value
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda (cuda:N) or mps, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"expected cpu: torch {torch.__version__} sees no CUDA device, got {value!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"expected a CUDA device below cuda:{torch.cuda.device_count()}, got {value!r}")
    return value


def size_list(value: str) -> str:
    """--sizes: comma-separated HEIGHTxWIDTH."""
    for item in value.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH sizes such as 256x448,1080x1920, got {item!r}")
    return value


class UsageError(ValueError):
    """Options that are each valid but do not go together (demo: image sizes, the flow's size)."""


class DependencyError(RuntimeError):
    """A command needs a package that is not installed (its message says which extra)."""
