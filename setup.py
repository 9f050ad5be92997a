"""Builds softsplat's wheel with its kernels compiled ahead of time (docs/design.md, "Prebuilt
libraries"): ``python -m build --wheel --no-isolation`` with torch installed (the torch to build
against; isolation would fetch an unpinned one).

The wheel holds one CPU library per instruction-set level of the target architecture and, when
a CUDA toolkit and a CUDA build of torch are present (or ``SOFTSPLAT_CUDA=1``), one library of
CUDA kernels for ``SOFTSPLAT_CUDA_ARCHS`` (default: ``build_flags.cuda_architectures`` of torch's
CUDA version, plus PTX of the newest), all
on torch's stable ABI: one wheel serves every torch from ``build_flags.OLDEST_TORCH`` on, and,
tagged ``abi3``, every CPython from 3.10 on.

``pip install -e .`` (a source checkout) builds nothing here: the kernels build on first use.
``SOFTSPLAT_PREBUILT=0`` makes a wheel without libraries, ``=1`` insists on them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import sys

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent
CSRC = ROOT / "softsplat" / "backends" / "csrc"
PREBUILT = "softsplat._prebuilt"


@functools.cache
def _load(name: str):
    """A module of softsplat/backends loaded by path (importing softsplat would need its
    dependencies at build time)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "softsplat" / "backends" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wanted() -> bool:
    setting = os.environ.get("SOFTSPLAT_PREBUILT", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    editable = any(command in sys.argv for command in ("develop", "editable_wheel"))
    return not editable and importlib.util.find_spec("torch") is not None


def _cuda_archs(cuda_version: str) -> list[str]:
    """SOFTSPLAT_CUDA_ARCHS ("80;90"), else the list for this CUDA version (build_flags)."""
    chosen = os.environ.get("SOFTSPLAT_CUDA_ARCHS", "").replace(",", ";")
    return [a.strip() for a in chosen.split(";") if a.strip()] or _load("build_flags").cuda_architectures(cuda_version)


def _extensions():
    import torch
    from torch.utils import cpp_extension

    build_flags = _load("build_flags")
    cpu_sources = build_flags.CPU_SOURCES
    kind, arch = build_flags.compiler_kind(), build_flags.architecture()
    extensions, cpu = [], {}
    for level in build_flags.LEVELS.get(arch, ("baseline",)):
        flags, link = build_flags.cpu_flags(level, kind, arch)
        name = f"softsplat_cpu_{level}"
        extensions.append(cpp_extension.CppExtension(
            f"{PREBUILT}.{name}", [str((CSRC / s).relative_to(ROOT)) for s in cpu_sources],
            include_dirs=[str(CSRC)], extra_compile_args={"cxx": flags}, extra_link_args=link, py_limited_api=True))
        cpu[level] = name
    cuda = None
    want_cuda = os.environ.get("SOFTSPLAT_CUDA", "").strip()
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" or (want_cuda != "0" and has_cuda):
        archs = _cuda_archs(torch.version.cuda)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for later GPUs
        extensions.append(cpp_extension.CUDAExtension(
            f"{PREBUILT}.softsplat_cuda", [str((CSRC / "cuda" / "ops.cu").relative_to(ROOT))], include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": ["-O3", *build_flags.stable_abi_flags(kind)],
                                "nvcc": [*build_flags.CUDA_FLAGS, *build_flags.stable_abi_flags(), *gencode]},
            py_limited_api=True))
        cuda = {"cuda": torch.version.cuda, "architectures": [f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"]}
    return extensions, cpu, cuda


def _build_ext_class(cpu, cuda):
    from torch.utils.cpp_extension import BuildExtension

    prebuilt = _load("prebuilt")
    build_flags = _load("build_flags")

    class BuildPrebuilt(BuildExtension):
        """torch's BuildExtension, each library in a directory of its own (the CPU levels compile
        the same sources with other flags), then the manifest beside the libraries."""

        def build_extensions(self):
            # Python's own compile flags (sysconfig's CFLAGS) add -fwrapv and -g, which the
            # first-use build has not: with -fwrapv (signed overflow defined) the kernels' loops
            # optimise worse (1080p forward ~10% slower); -g only adds size.
            if hasattr(self.compiler, "compiler_so"):
                self.compiler.compiler_so = [f for f in self.compiler.compiler_so if f not in ("-fwrapv", "-g")]
            super().build_extensions()

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base

        def run(self):
            super().run()
            import torch

            names = {ext.name.rsplit(".", 1)[-1]: pathlib.Path(self.get_ext_fullpath(ext.name)).name for ext in self.extensions}
            manifest = {
                "oldest_torch": list(build_flags.OLDEST_TORCH),
                "built_with_torch": torch.__version__,
                "architecture": build_flags.architecture(),
                "sources": prebuilt.sources_digest(CSRC),
                "cpu": {level: names[name] for level, name in cpu.items()},
                "cuda": dict(cuda, library=names["softsplat_cuda"]) if cuda else None,
            }
            target = pathlib.Path(self.get_ext_fullpath(self.extensions[0].name)).parent / prebuilt.MANIFEST
            target.write_text(json.dumps(manifest, indent=1) + "\n")

    return BuildPrebuilt


if _wanted():
    extensions, cpu_levels, cuda_info = _extensions()
    setup(
        ext_modules=extensions,
        cmdclass={"build_ext": _build_ext_class(cpu_levels, cuda_info)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
else:
    setup()
