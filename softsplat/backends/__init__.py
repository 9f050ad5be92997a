"""The backend registry and dispatch.

``auto`` walks ``PRIORITY`` and takes the first backend with no reason against the call; a
backend named by the caller (or by ``SOFTSPLAT_BACKEND``) runs or raises, it never falls back.
Under ``torch.use_deterministic_algorithms(True)`` a backend that is not deterministic on the
tensors' device is passed over by ``auto`` and refused with a ``RuntimeError`` when named.
"""

from __future__ import annotations

import importlib
import threading
import warnings

from .base import Backend, BackendFailedError, Signature

#: Every backend, by name: ``module:class`` (imported on first use, never compiling) or an
#: instance given to ``register``. Each backend's module bears the backend's name, which for
#: torch, triton and cupy is also the name of the library it uses: importing a submodule binds
#: its name in this package's namespace, so this module imports none of those libraries.
_REGISTRY: dict[str, str | Backend] = {
    "torch": "torch:TorchBackend",
    "cpp": "cpp:CppBackend",
    "triton": "triton:TritonBackend",
    "cupy": "cupy:CupyBackend",
}

_REGISTRY_LOCK = threading.Lock()

#: The order in which ``auto`` tries backends (the fused kernels first, the oracle last).
PRIORITY = ("cpp", "triton", "cupy", "torch")


class BackendNotSupportedError(ValueError):
    """No backend (or not the named one) can compute this call; the message says why."""


def names() -> tuple[str, ...]:
    """Every registered backend name."""
    return tuple(_REGISTRY)


def get(name: str, argument: str = "backend") -> Backend:
    """The backend called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"{argument}: expected 'auto' or one of {', '.join(map(repr, _REGISTRY))}, got {name!r}")
    return _instance(name)


def _instance(name: str) -> Backend:
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        with _REGISTRY_LOCK:  # one instance per backend, even when threads race to the first call
            entry = _REGISTRY[name]
            if isinstance(entry, str):
                module, cls = entry.split(":")
                entry = _REGISTRY[name] = getattr(importlib.import_module(f".{module}", __name__), cls)()
    return entry


def register(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``: from then on it can be named (``backend=``,
    ``SOFTSPLAT_BACKEND``, the command line) and ``softsplat info`` lists it, but ``auto`` never
    picks it (it is not added to ``PRIORITY``). A backend from outside the package is added this
    way: the test suite's conftest.py registers its host backends (conformance/host)."""
    _REGISTRY[backend.name] = backend


def unregister(name: str) -> None:
    """Remove the backend called ``name`` (one that ``register`` added)."""
    _REGISTRY.pop(name)


def all_backends() -> list[Backend]:
    return [get(name) for name in _REGISTRY]


def _determinism_reason(backend: Backend, call: Signature, deterministic: bool) -> str | None:
    if deterministic and not backend.is_deterministic(call.device_type):
        return (
            f"backend {backend.name!r} is not deterministic on {call.device_type}, and "
            "torch.use_deterministic_algorithms(True) is set"
        )
    return None


def select(call: Signature, name: str, argument: str = "backend", deterministic: bool = False) -> Backend:
    """The backend that computes a call like ``call``: ``name``, or the first fit of ``PRIORITY``.

    ``argument`` is what the user set (``backend`` or the environment variable), for messages;
    ``deterministic`` is ``torch.are_deterministic_algorithms_enabled()``. The chosen backend
    is prepared (built, loaded) before it is returned.
    """
    while True:
        backend = _choose(call, name, argument, deterministic)
        if name == "auto":
            _warn_if_slow(call, backend)
        try:
            backend.prepare_once()
            # Preparing can take a device away (the cpp backend's CUDA build failed, its CPU
            # kernels did not): asked again, it no longer offers that device.
            reasons = backend.not_supported_reasons(call)
            if not reasons:
                return backend
            error = BackendFailedError(f"backend {backend.name!r} cannot compute this call after all: {'; '.join(reasons)}")
            if name != "auto":
                raise error
        except BackendFailedError as failed:
            if name != "auto":
                raise
            error = failed
        # One warning per backend and process: a failed backend is not tried again, so later
        # calls pass it over in _choose without a word.
        slower = (f"; CPU calls go to a backend {SLOW_FALLBACK} (softsplat's wheel has prebuilt kernels and "
                  "needs no compiler)") if backend.name == "cpp" and call.device_type == "cpu" else ""
        warnings.warn(f"softsplat: 'auto' passes over {error}{slower}; softsplat info shows it", RuntimeWarning,
                      stacklevel=4)


#: What the warning about a slow CPU fallback says of its speed (measured with softsplat bench:
#: the torch oracle takes 10 to 100 times cpp's time at the sizes of the README's tables).
SLOW_FALLBACK = "typically 10 to 100 times slower than cpp on a CPU"
_warned_slow: set[str] = set()


def _warn_if_slow(call: Signature, chosen: Backend) -> None:
    """Once per process and reason: 'auto' leaves the fast CPU kernels (cpp) for a CPU call
    because cpp cannot be built here (no compiler, no ninja), saying how much slower the
    fallback is and how to get cpp. Not when cpp is merely unsuited to the call (a dtype, the
    deterministic mode); a failed build says so in select's warning."""
    if call.device_type != "cpu" or chosen.name == "cpp" or PRIORITY[0] != "cpp":
        return
    why = get("cpp").unavailable_reason  # a failed build has a warning of its own (select)
    if why is None or why in _warned_slow:
        return
    _warned_slow.add(why)
    first_line = why.strip().splitlines()[0]
    warnings.warn(
        f"softsplat: the fast CPU kernels (backend 'cpp') cannot be used here: {first_line}. 'auto' uses "
        f"{chosen.name!r} instead, {SLOW_FALLBACK}. To get cpp: install softsplat's wheel (prebuilt "
        "kernels, no compiler needed), or install a C++ compiler and ninja and run `softsplat build`; "
        "`softsplat info` shows what is missing", RuntimeWarning, stacklevel=5)


def _choose(call: Signature, name: str, argument: str, deterministic: bool) -> Backend:
    if name != "auto":
        backend = get(name, argument)
        if backend.failure is not None:  # it failed to build or load earlier in this process
            raise backend.failed_error()
        reasons = backend.not_supported_reasons(call)
        if reasons:
            raise BackendNotSupportedError(
                f"{argument}: {name!r} cannot compute this call: {'; '.join(reasons)}"
            )
        nondeterministic = _determinism_reason(backend, call, deterministic)
        if nondeterministic:
            raise RuntimeError(
                f"{nondeterministic}. Choose a deterministic backend (softsplat info lists "
                "them) or backend='auto'."
            )
        return backend
    every_reason = []
    for candidate in PRIORITY:
        backend = get(candidate)
        reasons = backend.not_supported_reasons(call)
        nondeterministic = _determinism_reason(backend, call, deterministic)
        reasons += [nondeterministic] if nondeterministic else []
        if not reasons:
            return backend
        every_reason.append(f"{candidate}: {'; '.join(reasons)}")
    raise BackendNotSupportedError(
        f"{argument}: no backend can compute this call ('auto'):\n  " + "\n  ".join(every_reason)
    )
