"""Compiled op libraries: built on first use with ``torch.utils.cpp_extension.load``, cached, and
given their Python side (``register_fake`` and ``register_autograd``) once loaded.

Used by the ``cpp`` backend (namespace ``softsplat``), and by libraries built from sources
outside the package against its headers (``includes``): the test suite's host libraries
(conformance/host) define the same ops of ``csrc/schemas.h`` in a namespace of their own.
Importing this module never compiles.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
import threading

import torch

from . import build_flags
from .ops import refuse_legacy_export, register_python_side

CSRC = pathlib.Path(__file__).parent / "csrc"


#: Set (to 1) to build AddressSanitizer + UndefinedBehaviorSanitizer libraries (`nox -s sanitize`);
#: the process must preload gcc's libasan and libubsan. -O1 (the level AddressSanitizer's
#: documentation suggests, and a third of -O3's build time) and line tables only (-g1;
#: reports still name file and line).
SANITIZE_ENV = "SOFTSPLAT_SANITIZE"
SANITIZE_FLAGS = ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]
SANITIZE_LDFLAGS = ["-fsanitize=address,undefined"]


def compiler_reason() -> str | None:
    """Why no extension can be built here, or None. Looks for tools only; compiles nothing."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja), torch.utils.cpp_extension needs it"
    return None


class OpLibrary:
    """One compiled library of the ``splat_forward``/``splat_backward`` ops in ``namespace``."""

    def __init__(self, namespace: str, sources: list[str], *, cflags=(), cuda_cflags=(), fused_stable=False,
                 root: pathlib.Path = CSRC, includes: tuple[pathlib.Path, ...] = (), level: str | None = None,
                 prebuilt: list[pathlib.Path] | None = None, cuda_only: bool = False):
        self.namespace = namespace
        #: A library of CUDA kernels only, for ops another library of the namespace defines and
        #: registers (loaded after it): named "cuda" instead of a CPU level, no Python side.
        self.cuda_only = cuda_only
        #: Compiled libraries to load instead of building (a wheel's, prebuilt.py), the one that
        #: defines the ops first; None: build on first use.
        self.prebuilt = prebuilt
        self.fused_stable = fused_stable  # defines splat_stable_forward (schemas.h)
        self.root = root  # sources and headers are under it (csrc/)
        #: Further header directories (csrc/ for sources kept elsewhere): searched after the
        #: root, and hashed with it.
        self.includes = tuple(includes)
        self.sources = [root / s for s in sources]
        #: The CPU instruction-set level the library is built for (build_flags).
        self.level = "cuda" if cuda_only else level or build_flags.chosen_level()
        cpu, link = ([], []) if cuda_only else build_flags.cpu_flags(self.level, build_flags.compiler_kind(),
                                                                    build_flags.architecture())
        sanitize = bool(os.environ.get(SANITIZE_ENV))
        self.cflags = cpu + list(cflags) + (SANITIZE_FLAGS if sanitize else [])
        self.ldflags = link + (SANITIZE_LDFLAGS if sanitize else [])
        self.cuda_cflags = list(cuda_cflags) + build_flags.stable_abi_flags()
        self._lock = threading.Lock()
        self._ops = None

    def name(self) -> str:
        """Library name: namespace, level, and a hash of what makes a build valid: every source
        and header (by path relative to the root or include directory, and content; not by
        where the checkout is), the flags (which name the level; no flag depends on this
        particular CPU) and torch's version. Two checkouts or environments with the same sources
        and torch share one build."""
        digest = hashlib.sha256()
        for number, root in enumerate((self.root, *self.includes)):
            headers = {p for pattern in ("**/*.h", "**/*.cuh") for p in root.glob(pattern)}
            sources = set(self.sources) if number == 0 else set()
            prefix = f"include {number}: " if number else ""
            for path in sorted(sources | headers):
                digest.update(f"{prefix}{path.relative_to(root)}".encode() + path.read_bytes())
        digest.update(" ".join(self.cflags + self.ldflags + self.cuda_cflags).encode() + torch.__version__.encode())
        return f"{self.namespace}_{self.level}_{digest.hexdigest()[:12]}"

    def build_directory(self) -> pathlib.Path:
        """Under torch's extension directory (``TORCH_EXTENSIONS_DIR`` when set)."""
        from torch.utils import cpp_extension

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        return pathlib.Path(root) / "softsplat" / self.name()

    def library_path(self) -> pathlib.Path:
        return self.build_directory() / f"{self.name()}.so"

    def is_built(self) -> bool:
        """A prebuilt library, or a build that ran to its end (a build that was interrupted
        can leave a library file that does not load: it is built again)."""
        return self.prebuilt is not None or (self.library_path().exists() and self.complete_path().exists())

    def complete_path(self) -> pathlib.Path:
        """Written once a build has finished."""
        return self.build_directory() / "build-complete"

    def ops(self):
        """``torch.ops.<namespace>``, building and loading the library on the first call."""
        if self._ops is None:
            with self._lock:  # one build, even when many threads make the first call at once
                if self._ops is None:
                    self._ops = self._load()
        return self._ops

    def failure_path(self) -> pathlib.Path:
        return self.build_directory() / "build-failed.txt"

    def earlier_failure(self) -> str | None:
        """The error of an earlier failed build of this library with this compiler, or None."""
        try:
            compiler, _, error = self.failure_path().read_text().partition("\n")
        except OSError:
            return None
        return error if compiler == os.environ.get("CXX", "c++") else None

    def forget_failure(self) -> None:
        """Let the next load try the build again (``softsplat build`` does)."""
        self.failure_path().unlink(missing_ok=True)

    def _load(self):
        """Load the library, building it first if no valid build exists. A finished build is
        loaded as it is, never handed to ninja again: ninja would rebuild it whenever the
        checkout or environment that asks differs from the one that built it. A failed build is
        recorded (with the compiler it used) and not tried again until ``forget_failure``."""
        if self.prebuilt is not None:
            for path in self.prebuilt:
                torch.ops.load_library(str(path))
            self._register()
            return getattr(torch.ops, self.namespace)
        if not self.is_built():
            earlier = self.earlier_failure()
            if earlier is not None:
                raise RuntimeError(f"an earlier build failed ({self.failure_path()}); `softsplat build` tries again:\n{earlier}")
            try:
                # An interrupted build's library file may be newer than its objects: ninja would
                # take it for done. Removed, it is linked again.
                self.library_path().unlink(missing_ok=True)
                self._build()
                self.complete_path().write_text("")
            except Exception as error:
                self.failure_path().parent.mkdir(parents=True, exist_ok=True)
                self.failure_path().write_text(f"{os.environ.get('CXX', 'c++')}\n{type(error).__name__}: {error}")
                raise
        torch.ops.load_library(str(self.library_path()))
        self._register()
        return getattr(torch.ops, self.namespace)

    def _build(self) -> None:
        from torch.utils import cpp_extension

        directory = self.build_directory()
        print(
            f"softsplat: building {self.namespace} ({', '.join(s.name for s in self.sources)}), "
            f"once for these sources and this torch, into {directory}",
            file=sys.stderr,
            flush=True,
        )
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=self.name(),
            sources=[str(s) for s in self.sources],
            # Copies: cpp_extension appends to the lists it is given, and name() hashes ours.
            extra_cflags=list(self.cflags),
            extra_cuda_cflags=list(self.cuda_cflags),
            extra_ldflags=list(self.ldflags),
            extra_include_paths=[str(self.root), *map(str, self.includes)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )

    def _register(self) -> None:
        """The Python side of the ops (fake tensors, autograd; a clear refusal of the legacy
        ONNX exporter), unless another library of the namespace gives it."""
        if self.cuda_only:
            return
        register_python_side(self.namespace, self.fused_stable)
        names = ["splat_forward", "splat_backward", "splat_maximum"] + (["splat_stable_forward"] if self.fused_stable else [])
        refuse_legacy_export(self.namespace, names)
