"""The public entry: validate, resolve the mode, pick the backend, call it."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from . import backends
from .backends.base import FLOATING, Problem, Signature, dtype_names
from .modes import Mode, safe_normaliser

#: Environment variable that replaces ``backend="auto"`` by a named backend.
BACKEND_ENV = "SOFTSPLAT_BACKEND"


def splat(
    input: torch.Tensor,
    flow: torch.Tensor,
    metric: torch.Tensor | None = None,
    *,
    mode: str | Mode,
    backend: str = "auto",
    return_normaliser: bool = False,
    stable: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Forward-warp ``input`` along ``flow`` (softmax splatting and its relatives).

    Args:
        input: ``[N, C, H, W]``, float16, bfloat16, float32 or float64, any strides.
        flow: ``[N, 2, H, W]``, floating, same device; channel 0 moves pixels along x (columns),
            channel 1 along y (rows), in pixels.
        metric: ``[N, 1, H, W]``, floating, same device; the importance of each source pixel.
            Required for ``linear``, ``soft`` and ``max``, must be ``None`` for ``sum`` and ``avg``.
        mode: ``"sum"``, ``"avg"``, ``"linear"``, ``"soft"`` or ``"max"``, the last four optionally
            with ``"-addeps"`` (the default), ``"-zeroeps"`` or ``"-clipeps"``; or a
            ``softsplat.Mode``.
        backend: ``"auto"`` or a name from ``softsplat.backends.names()``. With ``"auto"``, the
            environment variable ``SOFTSPLAT_BACKEND``, when set, names the backend instead.
        return_normaliser: also return the normaliser ``D`` ``[N, 1, H, W]`` (the splatted
            weights: 0 where nothing landed, a coverage / hole mask), differentiable, in the
            compute dtype (float32, or float64 for float64 input). Normalised modes only.
        stable: ``soft`` modes only: subtract from every metric the largest metric landing on
            the same target pixel, ``exp(metric - M(target))`` (``M`` passes no gradient), so
            that no ``exp`` overflows; equal to ``soft`` wherever that is finite, up to the eps
            effect (``D`` is divided by ``exp(M)``, so ``addeps`` weighs eps differently).

    Returns:
        ``[N, C, H, W]`` in ``input``'s dtype and device (with ``return_normaliser``, the pair
        ``(result, normaliser)``). Every source pixel adds its value,
        weighted bilinearly, to the four target pixels around ``(x + flow_x, y + flow_y)``;
        ``sum`` returns those sums, the other modes divide the sums of ``input * w`` by the sums
        of ``w``, with ``w`` = 1 (``avg``), ``metric`` (``linear``) or ``exp(metric)``
        (``soft``). ``max``: at each target only the sources whose metric is the largest among
        those landing there with a positive bilinear weight count, averaged by their bilinear
        weights (ties all count): the nearest surface wins with ``metric = -depth``.
        Differentiable with respect to ``input``, ``flow`` and ``metric`` (``max``: ``input``
        and ``flow`` only; ``metric`` gets no gradient). Under
        ``torch.use_deterministic_algorithms(True)`` the same bits on every run, on CUDA too
        (the ordered forward of ``cpp`` and ``cupy``; docs/spec.md, section 9).

    Raises:
        TypeError, ValueError: a bad argument; the message names it, what was expected and what
            was given.
        softsplat.BackendNotSupportedError (a ValueError): the named backend, or with ``auto``
            every backend, cannot compute this call; the message lists the reasons.
        RuntimeError: a non-deterministic backend was named under
            ``torch.use_deterministic_algorithms(True)``.
    """
    problem = validate(input, flow, metric, mode)
    _check_return_normaliser(return_normaliser, problem.mode)
    problem = dataclasses.replace(problem, stable=_check_stable(stable, problem.mode))
    out, normaliser = backends.get(resolve_backend(input, problem.mode, backend)).run(problem)
    return (out, normaliser) if return_normaliser else out


def splat_many(
    sources,
    *,
    mode: str | Mode,
    backend: str = "auto",
    return_normaliser: bool = False,
    stable: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Joint splatting: several sources warped into one target and normalised together.

    Args:
        sources: a sequence of ``(input, flow, metric)`` (``metric`` None for sum and avg), each
            as for ``splat``; every ``input`` has the same shape, dtype and device. For example
            frame 0 with the flow to time t and frame 1 with the flow back to t, or K flows of
            one frame.
        mode, backend, return_normaliser: as for ``splat``.
        stable: as for ``splat``, with each target's maximum taken over every source (as ``max``
            takes its maximum).

    Returns:
        ``sum``: the sum of the sources' ``splat``. Normalised modes: the sources' numerators
        and normalisers are summed, then divided once (``eps`` as the mode says), so that where
        several sources land, the metric decides between them as it does within one.
    """
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ValueError(f"sources: expected a non-empty list of (input, flow, metric), got {sources!r:.80}")
    problems = []
    for i, source in enumerate(sources):
        if not isinstance(source, (list, tuple)) or len(source) != 3:
            raise ValueError(f"sources[{i}]: expected (input, flow, metric), got {type(source).__name__}")
        problem = validate(*source, mode)
        first = problems[0].input if problems else problem.input
        if (problem.input.shape, problem.input.dtype, problem.input.device) != (first.shape, first.dtype, first.device):
            raise ValueError(
                f"sources[{i}]: expected input of shape {tuple(first.shape)}, {first.dtype} on {first.device} "
                f"like sources[0], got {tuple(problem.input.shape)}, {problem.input.dtype} on {problem.input.device}"
            )
        problems.append(dataclasses.replace(problem, raw=True))
    mode = problems[0].mode
    _check_return_normaliser(return_normaliser, mode)
    chosen = backends.get(resolve_backend(problems[0].input, mode, backend))
    stable = _check_stable(stable, mode)
    if stable or mode.kind == "max":
        problems = [dataclasses.replace(p, stable=stable) for p in problems]
        maxima = [chosen.maximum(p) for p in problems]
        joint = functools.reduce(torch.maximum, maxima)  # NaN propagates, as in one source
        problems = [dataclasses.replace(p, maximum=joint) for p in problems]
    parts = [chosen.run(problem) for problem in problems]
    # Summed in source order, each sum one new buffer (no stacked copy of every part).
    numerator = functools.reduce(torch.add, (part[0] for part in parts))
    if mode.kind == "sum":
        return numerator.to(problems[0].input.dtype)
    normaliser = functools.reduce(torch.add, (part[1] for part in parts))
    out = (numerator / safe_normaliser(normaliser, mode)).to(problems[0].input.dtype)
    return (out, normaliser) if return_normaliser else out


def _check_stable(value, mode: Mode) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"stable: expected a bool, got {type(value).__name__}")
    if value and mode.kind != "soft":
        why = " (max mode has no exp to keep from overflowing)" if mode.kind == "max" else ""
        raise ValueError(
            f"stable: only soft modes subtract a maximum{why} (expected False), got True with mode {mode.value!r}"
        )
    return value


def _check_return_normaliser(value, mode: Mode) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"return_normaliser: expected a bool, got {type(value).__name__}")
    if value and mode.kind == "sum":
        raise ValueError("return_normaliser: mode 'sum' has no normaliser (expected False), got True")


def resolve_backend(input: torch.Tensor, mode: str | Mode, backend: str = "auto") -> str:
    """The name of the backend ``splat`` uses for an ``input`` like this one in ``mode``:
    ``backend``, or with ``"auto"`` the environment variable ``SOFTSPLAT_BACKEND`` when set,
    else the first fit of ``softsplat.backends.PRIORITY``. Builds the backend if it needs it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    argument = "backend"
    if backend == "auto" and os.environ.get(BACKEND_ENV, "").strip():
        backend, argument = os.environ[BACKEND_ENV].strip(), BACKEND_ENV
    deterministic = torch.are_deterministic_algorithms_enabled()
    mode = Mode.parse(mode)
    return _choose(input.device.type, input.dtype, mode.value, backend, argument, deterministic)


@torch.compiler.assume_constant_result
def _choose(device_type, dtype, mode: str, backend: str, argument: str, deterministic: bool) -> str:
    """The name of the backend for this call; under torch.compile, a constant of the graph
    (so it takes only constants: no tensors, no dataclasses)."""
    call = Signature(device_type, dtype, Mode(mode))
    return backends.select(call, backend, argument, deterministic).name


def softsplat(
    tenIn: torch.Tensor, tenFlow: torch.Tensor, tenMetric: torch.Tensor | None, strMode: str
) -> torch.Tensor:
    """Drop-in for the reference implementation's ``softsplat(tenIn, tenFlow, tenMetric, strMode)``."""
    return splat(tenIn, tenFlow, tenMetric, mode=strMode)


def validate(input, flow, metric, mode) -> Problem:
    """Check every argument against docs/spec.md; the only place where arguments are checked."""
    mode = Mode.parse(mode)
    _check_tensor("input", input)
    N, C, H, W = _check_shape("input", input, "[N, C, H, W]", None)
    _check_tensor("flow", flow)
    _check_shape("flow", flow, "[N, 2, H, W]", (N, 2, H, W))
    _check_device("flow", flow, input)
    if mode.needs_metric:
        if metric is None:
            raise ValueError(f"metric: mode {mode.value!r} needs a metric [N, 1, H, W], got None")
        _check_tensor("metric", metric)
        _check_shape("metric", metric, "[N, 1, H, W]", (N, 1, H, W))
        _check_device("metric", metric, input)
    elif metric is not None:
        raise ValueError(
            f"metric: mode {mode.value!r} takes no metric (expected None), got "
            f"{type(metric).__name__}"
            + (f" of shape {tuple(metric.shape)}" if isinstance(metric, torch.Tensor) else "")
        )
    return Problem(input, flow, metric, mode, deterministic=torch.are_deterministic_algorithms_enabled())




def _check_tensor(name, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOATING:
        raise TypeError(
            f"{name}: expected a floating tensor ({dtype_names(FLOATING)}), "
            f"got {dtype_names([value.dtype])}"
        )


def _check_shape(name, value, layout, expected) -> tuple[int, ...]:
    if value.dim() != 4:
        raise ValueError(
            f"{name}: expected a 4-D tensor {layout}, got {value.dim()}-D of shape {tuple(value.shape)}"
        )
    if expected is not None and tuple(value.shape) != expected:
        raise ValueError(
            f"{name}: expected shape {layout} = {expected} to match input, got {tuple(value.shape)}"
        )
    return tuple(value.shape)


def _check_device(name, value, input) -> None:
    if value.device != input.device:
        raise ValueError(
            f"{name}: expected a tensor on {input.device} (the device of input), got {value.device}"
        )
