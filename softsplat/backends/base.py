"""What every backend declares and answers; the registry and the API rely on nothing else."""

from __future__ import annotations

import abc
import dataclasses
import functools

import torch

from ..modes import Mode, compute_dtype

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One validated call: shapes, devices and dtypes have been checked by ``api.py``."""

    input: torch.Tensor  # [N, C, H, W]
    flow: torch.Tensor  # [N, 2, H, W]
    metric: torch.Tensor | None  # [N, 1, H, W] for linear and soft, else None
    mode: Mode

    @property
    def device_type(self) -> str:
        return self.input.device.type

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.input.dtype)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.input, self.flow, self.metric) if t is not None)


class Backend(abc.ABC):
    """A way to compute ``splat``. Subclasses set the class attributes and implement ``run``."""

    name: str = ""
    summary: str = ""
    #: Input dtypes the backend computes (``flow``/``metric`` may have any floating dtype).
    dtypes: tuple[torch.dtype, ...] = FLOATING
    #: Device types on which the backend is run-to-run deterministic.
    deterministic_on: tuple[str, ...] = ()

    def devices(self) -> tuple[str, ...]:
        """Device types the backend can run on (may depend on the environment)."""
        return ("cpu", "cuda")

    def _unavailable_reason(self) -> str | None:
        """Why the backend cannot run on this machine at all, or None. Must not compile."""
        return None

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason()

    def is_available(self) -> bool:
        return self.unavailable_reason is None

    def is_deterministic(self, device_type: str) -> bool:
        return device_type in self.deterministic_on

    def _problem_reasons(self, problem: Problem) -> list[str]:
        """Backend-specific reasons beyond availability, device and dtype."""
        return []

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        """Every reason this backend cannot compute ``problem``; empty when it can."""
        if self.unavailable_reason is not None:
            return [self.unavailable_reason]
        reasons = []
        if problem.device_type not in self.devices():
            reasons.append(
                f"runs on {'/'.join(self.devices())}, the tensors are on {problem.device_type}"
            )
        if problem.input.dtype not in self.dtypes:
            reasons.append(f"computes {dtype_names(self.dtypes)}, input is {dtype_names([problem.input.dtype])}")
        return reasons + self._problem_reasons(problem)

    @abc.abstractmethod
    def run(self, problem: Problem) -> torch.Tensor:
        """The differentiable result ``[N, C, H, W]`` in ``input``'s dtype and device."""


def dtype_names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)
