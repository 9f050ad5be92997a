"""Sessions: ``nox -s tests``, ``nox -s conformance -- --require-backends cupy,cpp,triton``, ``nox -s lint``.

Every session installs the pinned CPU torch first (an unpinned torch pulls a multi-GB CUDA build;
on a GPU machine set SOFTSPLAT_TORCH to the torch requirement to install instead) and builds the
package without build isolation. Dependencies live in pyproject.toml's extras only.
"""

from __future__ import annotations

import os

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
    _install(session, "test,triton,cupy")
    session.run("pytest", *session.posargs)


@nox.session
def conformance(session: nox.Session) -> None:
    """Only the conformance suite; GPU CI passes --require-backends cupy,cpp,triton."""
    _install(session, "test,triton,cupy")
    session.run("pytest", "conformance", *session.posargs)


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
