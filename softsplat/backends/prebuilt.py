"""Prebuilt op libraries: the compiled kernels a wheel carries, so that no compiler is needed.

A wheel built by ``setup.py`` holds, in ``softsplat/_prebuilt/``, one CPU library per
instruction-set level (each defines the ``softsplat`` ops and registers their CPU kernels) and,
in a CUDA wheel, one library of CUDA kernels (it registers the ops' CUDA implementations), all
on torch's stable ABI (``csrc/tensor.h``), and ``manifest.json``: what was built, against which
torch, for which levels and GPU architectures, and a digest of the sources.

A prebuilt library is used when the manifest's digest is that of the sources beside it (a source
checkout whose sources changed builds on first use instead, as without a wheel) and the torch
running is at least ``build_flags.OLDEST_TORCH``; the CUDA library also needs torch's CUDA major
to be the one it was built with. This module imports nothing heavy; ``setup.py`` loads it by
path to write the manifest.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

#: Where a wheel's libraries and manifest are.
DIRECTORY = pathlib.Path(__file__).resolve().parents[1] / "_prebuilt"
MANIFEST = "manifest.json"
CSRC = pathlib.Path(__file__).resolve().parent / "csrc"


def sources_digest(root: pathlib.Path = CSRC) -> str:
    """A digest of every source and header under ``root`` (by relative path and content)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")):
        digest.update(str(path.relative_to(root).as_posix()).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def manifest(directory: pathlib.Path | None = None) -> dict | None:
    """The manifest of the prebuilt libraries, or None when there are none."""
    directory = directory or DIRECTORY
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def unusable_reason(found: dict | None, torch_version: str, directory: pathlib.Path | None = None) -> str | None:
    """Why the prebuilt libraries cannot be used with this torch and these sources, or None."""
    directory = directory or DIRECTORY
    if found is None:
        return "no prebuilt libraries (a source checkout: the kernels build on first use)"
    if found.get("sources") != sources_digest():
        return "the prebuilt libraries were built from other sources than these (they build on first use)"
    oldest = tuple(found["oldest_torch"])
    if _version(torch_version) < oldest:
        return f"the prebuilt libraries need torch >= {'.'.join(map(str, oldest))} (stable ABI), this is {torch_version}"
    missing = [name for name in found["cpu"].values() if not (directory / name).exists()]
    if missing:
        return f"prebuilt libraries missing: {', '.join(missing)}"
    return None


def cpu_library(level: str, torch_version: str, directory: pathlib.Path | None = None) -> pathlib.Path | None:
    """The prebuilt CPU library of ``level`` when it can be used here, else None."""
    directory = directory or DIRECTORY
    found = manifest(directory)
    if unusable_reason(found, torch_version, directory) is not None or level not in found["cpu"]:
        return None
    return directory / found["cpu"][level]


def runs_on(architectures: list[str], capability: tuple[int, int]) -> bool:
    """Whether a fatbin of ``architectures`` (``sm_80`` machine code, ``compute_120`` PTX) has
    code for a GPU of compute ``capability``: machine code of the same major and a minor no
    higher (sm_80 runs on sm_86), or PTX of a capability no higher (the driver compiles it)."""
    major, minor = capability
    for name in architectures:
        kind, _, number = name.partition("_")
        code = int(number.rstrip("af"))
        if kind == "sm" and code // 10 == major and code % 10 <= minor and not number.endswith(("a", "f")):
            return True
        if kind == "compute" and code <= 10 * major + minor:
            return True
    return False


def uncovered_devices(architectures: list[str], capabilities: list[tuple[int, int]]) -> list[str]:
    """The GPUs (``sm_70``) among ``capabilities`` that ``architectures`` has no code for."""
    return [f"sm_{major}{minor}" for major, minor in capabilities if not runs_on(architectures, (major, minor))]


def cuda_library(torch_cuda: str | None, directory: pathlib.Path | None = None,
                 capabilities: list[tuple[int, int]] | None = None) -> tuple[pathlib.Path | None, str]:
    """``(path, what)``: the prebuilt CUDA library when this torch can load it (CUDA build of the
    same major) and it has code for every GPU of ``capabilities`` (the visible ones), with the
    architectures it holds; else ``(None, why not)``."""
    directory = directory or DIRECTORY
    found = manifest(directory)
    cuda = (found or {}).get("cuda")
    if not cuda:
        return None, "this wheel has no CUDA kernels"
    if torch_cuda is None:
        return None, f"this torch is a CPU build (the wheel's CUDA kernels need a CUDA {cuda['cuda']} torch)"
    if torch_cuda.split(".")[0] != cuda["cuda"].split(".")[0]:
        return None, f"built for CUDA {cuda['cuda']}, this torch is a CUDA {torch_cuda} build"
    uncovered = uncovered_devices(cuda["architectures"], capabilities or [])
    if uncovered:
        return None, (f"prebuilt for {', '.join(cuda['architectures'])}, which has no code for this GPU "
                      f"({', '.join(sorted(set(uncovered)))})")
    return directory / cuda["library"], "prebuilt for " + ", ".join(cuda["architectures"])
