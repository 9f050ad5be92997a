"""The compiled library is built once per set of sources and torch, then reused by every
checkout and environment that shares the extension directory; a build always says so, and a
checkout with other sources builds beside the first, never over it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from softsplat.backends.extension import compiler_reason

PROBE = """
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
using torch::stable::Tensor;
Tensor probe(Tensor x) { return torch::stable::clone(x); }
STABLE_TORCH_LIBRARY(softsplat_cache_probe, m) { m.def("probe(Tensor x) -> Tensor"); }
STABLE_TORCH_LIBRARY_IMPL(softsplat_cache_probe, CPU, m) { m.impl("probe", TORCH_BOX(&probe)); }
"""

# Run in a fresh process per checkout: a library's ops can be defined once per process.
LOAD = """
import pathlib, sys, torch
from softsplat.backends.extension import OpLibrary

class Probe(OpLibrary):
    def _register(self):
        pass

library = Probe("softsplat_cache_probe", ["probe.cpp"], root=pathlib.Path(sys.argv[1]))
assert library.ops().probe(torch.ones(2)).tolist() == [1.0, 1.0]
print(library.library_path())
"""


def load(checkout, extensions) -> tuple[str, str]:
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = subprocess.run([sys.executable, "-c", LOAD, str(checkout)], env=environment, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1], result.stderr


@pytest.mark.skipif(compiler_reason() is not None, reason=f"cannot build here: {compiler_reason()}")
def test_checkouts_sharing_an_extension_directory_build_once_and_never_over_each_other(tmp_path) -> None:
    extensions = tmp_path / "extensions"
    first, second, changed = (tmp_path / name for name in ("first", "second", "changed"))
    for checkout, source in ((first, PROBE), (second, PROBE), (changed, PROBE + "// another version\n")):
        checkout.mkdir()
        (checkout / "probe.cpp").write_text(source)

    library, said = load(first, extensions)
    assert "softsplat: building softsplat_cache_probe" in said
    built = os.stat(library).st_mtime_ns

    for checkout in (second, first):  # the same sources elsewhere, then the first again: reused
        again, said = load(checkout, extensions)
        assert again == library and "building" not in said, said
        assert os.stat(library).st_mtime_ns == built

    other, said = load(changed, extensions)  # other sources: a build of their own, which says so
    assert other != library and "softsplat: building softsplat_cache_probe" in said
    assert os.stat(library).st_mtime_ns == built

    # A build interrupted after the library file was written (Ctrl-C, a killed compiler) is not
    # taken for a finished one: the next load builds it again instead of failing to load it.
    pathlib.Path(library).write_bytes(b"truncated")
    (pathlib.Path(library).parent / "build-complete").unlink()
    again, said = load(first, extensions)
    assert again == library and "softsplat: building softsplat_cache_probe" in said, said
