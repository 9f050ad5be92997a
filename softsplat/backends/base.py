"""What every backend declares and answers; the registry and the API rely on nothing else."""

from __future__ import annotations

import abc
import dataclasses
import functools

import torch

from ..modes import Kind, Mode, Normalisation, compute_dtype

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendFailedError(RuntimeError):
    """A backend could not be built or loaded here; the message has the error's tail and a fix."""


@dataclasses.dataclass(frozen=True)
class Signature:
    """What decides which backends can compute a call: hashable, free of tensors, so that the
    choice is cached and is a constant for torch.compile."""

    device_type: str
    dtype: torch.dtype  # input's
    mode: Mode


@dataclasses.dataclass(frozen=True)
class Problem:
    """One validated call: shapes, devices and dtypes have been checked by ``api.py``."""

    input: torch.Tensor  # [N, C, H, W]
    flow: torch.Tensor  # [N, 2, H, W]
    metric: torch.Tensor | None  # [N, 1, H, W] for linear, soft and max, else None
    mode: Mode
    #: Return the numerator instead of the normalised result (no division; splat_many).
    raw: bool = False
    #: Stable soft splatting: subtract each target's maximum metric (soft modes only).
    stable: bool = False
    #: A given per-target maximum [N, 1, H, W] for stable and max (splat_many's joint one), else
    #: None.
    maximum: torch.Tensor | None = None
    #: The same bits on every run are asked for (``torch.use_deterministic_algorithms(True)``):
    #: a backend with a deterministic path of its own (``deterministic_when_asked_on``) takes it.
    deterministic: bool = False

    @property
    def per_tap(self) -> bool:
        """Whether each tap's weight depends on its target's maximum ``M`` (stable and max)."""
        return self.stable or self.mode.kind == "max"

    @property
    def kind_code(self) -> Kind:
        return Kind.STABLE if self.stable else self.mode.kind_code

    @property
    def normalisation_code(self) -> Normalisation:
        return Normalisation.RAW if self.raw else self.mode.normalisation_code

    @property
    def signature(self) -> Signature:
        return Signature(self.input.device.type, self.input.dtype, self.mode)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.input.dtype)


class Backend(abc.ABC):
    """A way to compute ``splat``. Subclasses set the class attributes and implement ``run``."""

    name: str = ""
    summary: str = ""
    #: Input dtypes the backend computes (``flow``/``metric`` may have any floating dtype).
    dtypes: tuple[torch.dtype, ...] = FLOATING
    #: Device types on which the backend is run-to-run deterministic.
    deterministic_on: tuple[str, ...] = ()
    #: Device types on which it is deterministic only under
    #: ``torch.use_deterministic_algorithms(True)`` (torch's deterministic kernels, or the
    #: backend's own ordered path, then run: ``Problem.deterministic``).
    deterministic_when_asked_on: tuple[str, ...] = ()
    #: Device types on which that path is an ordered forward of its own (docs/spec.md, section
    #: 9), rather than torch's deterministic kernels: what ``softsplat bench --deterministic`` times.
    ordered_forward_on: tuple[str, ...] = ()
    #: Device types on which its float32 sums are atomic adds that flush subnormal operands and
    #: results to zero, as GPUs' do (docs/spec.md, "Floating point").
    flushes_subnormals_on: tuple[str, ...] = ()
    #: How to fix a failure to prepare (build or load) the backend; ends its error messages.
    fix_hint: str = ""
    #: Why ``prepare`` failed in this process, or None; a failed backend is not tried again.
    failure: str | None = None

    def devices(self) -> tuple[str, ...]:
        """Device types the backend can run on (may depend on the environment)."""
        return ("cpu", "cuda")

    def runs_on(self, device_type: str) -> bool:
        """Whether it can run on ``device_type``: ``device_type in devices()``, which a backend
        may answer without asking about every device (every call asks)."""
        return device_type in self.devices()

    def _unavailable_reason(self) -> str | None:
        """Why the backend cannot run on this machine at all, or None. Must not compile."""
        return None

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason()

    def is_available(self) -> bool:
        return self.unavailable_reason is None

    def is_deterministic(self, device_type: str, asked: bool = True) -> bool:
        """Whether it gives the same bits on every run on ``device_type``: always, or (``asked``)
        under ``torch.use_deterministic_algorithms(True)``."""
        return device_type in self.deterministic_on or (asked and device_type in self.deterministic_when_asked_on)

    def _call_reasons(self, call: Signature) -> list[str]:
        """Backend-specific reasons beyond availability, device and dtype."""
        return []

    def not_supported_reasons(self, call: Signature) -> list[str]:
        """Every reason this backend cannot compute a call like ``call``; empty when it can."""
        if self.unavailable_reason is not None:
            return [self.unavailable_reason]
        if self.failure is not None:
            return [self.failure]
        reasons = []
        if not self.runs_on(call.device_type):
            reasons.append(f"runs on {'/'.join(self.devices())}, the tensors are on {call.device_type}")
        if call.dtype not in self.dtypes:
            reasons.append(f"computes {dtype_names(self.dtypes)}, input is {dtype_names([call.dtype])}")
        return reasons + self._call_reasons(call)

    def prepare(self) -> None:
        """Make ``run`` ready (for example build and load a library). Called once the backend is
        chosen, outside any torch.compile trace; raises with the reason if it cannot be done."""
        return None

    def known_failure(self) -> str | None:
        """A failure to prepare known without trying (this process's, or one recorded by an
        earlier one), or None."""
        return self.failure

    def forget_failure(self) -> None:
        """Let ``prepare_once`` try again."""
        self.failure = None

    def prepare_once(self) -> None:
        """``prepare``, remembering a failure: raises ``BackendFailedError`` with the reason (the
        error's last lines and how to fix it), now and on every later call, without retrying."""
        if self.failure is None:
            try:
                self.prepare()
                return
            except Exception as error:
                lines = [line for line in str(error).strip().splitlines() if line.strip()]
                tail = "\n    ".join(lines[-12:]) or type(error).__name__
                self.failure = f"failed to build or load ({type(error).__name__}): {tail}" + (
                    f"\n  fix: {self.fix_hint}" if self.fix_hint else "")
        raise self.failed_error()

    def failed_error(self) -> BackendFailedError:
        """The error a backend that failed to prepare raises when it is asked for."""
        return BackendFailedError(f"backend {self.name!r} {self.failure}")

    def maximum(self, problem: Problem) -> torch.Tensor:
        """``M`` of stable soft or max splatting for ``problem`` ([N, 1, H, W], compute dtype, no
        gradient): what ``run`` computes first when ``problem.maximum`` is None."""
        raise NotImplementedError(f"backend {self.name!r} has no stable soft or max splatting")

    @abc.abstractmethod
    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(result, normaliser)``, both differentiable: the result ``[N, C, H, W]`` in
        ``input``'s dtype (with ``problem.raw``: the numerator, in the compute dtype), the
        normaliser ``D`` ``[N, 1, H, W]`` in the compute dtype (None for sum)."""


def dtype_names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)
