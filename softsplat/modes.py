"""Splatting modes: what is splatted beside the input, and how the result is normalised.

This module is a leaf: the API and every backend import it, it imports nothing of the package.
"""

from __future__ import annotations

import enum

import torch

#: The constant of the ``addeps`` and ``clipeps`` normalisations (docs/spec.md).
EPS = 1e-7



class Kind(enum.IntEnum):
    """The kernels' code for what is splatted (``kind`` of the ops; ``taps.h``'s ``Kind``, which a
    test compares with this). ``STABLE`` is soft splatting with each target's maximum metric
    subtracted; ``MAX`` counts, at each target, only the taps of the sources whose metric is that
    maximum. Kinds from ``LINEAR`` on read a metric; ``STABLE`` and ``MAX`` take the maximum ``M``."""

    SUM = 0
    AVG = 1
    LINEAR = 2
    SOFT = 3
    STABLE = 4
    MAX = 5


class Normalisation(enum.IntEnum):
    """The kernels' code for how the normaliser is made safe (``normalisation`` of the ops;
    ``taps.h``'s ``Normalisation``). ``RAW``: no division, the numerator and the normaliser are
    returned as they are (how ``splat_many`` sums several sources before dividing)."""

    ADDEPS = 0
    ZEROEPS = 1
    CLIPEPS = 2
    RAW = 3


_KINDS = ("sum", "avg", "linear", "soft", "max")
_NORMALISATIONS = ("addeps", "zeroeps", "clipeps")
# Names the reference implementation's users and papers also use.
_ALIASES = {"summation": "sum", "average": "avg", "softmax": "soft"}


class Mode(str, enum.Enum):
    """Every splatting mode. A member compares equal to its canonical string (``"soft-addeps"``).

    ``kind`` says what is splatted: ``sum`` the input alone; ``avg``, ``linear`` and ``soft`` the
    input weighted by 1, ``metric`` or ``exp(metric)``, next to the weight itself (the
    normaliser); ``max`` the input of the sources whose metric is the largest at each target
    (weight 1 for them, 0 for the others). ``normalisation`` says how the normaliser ``D`` is made safe before dividing:
    ``addeps`` uses ``D + 1e-7``, ``zeroeps`` replaces ``D == 0`` by 1, ``clipeps`` clamps ``D``
    to at least ``1e-7``.
    """

    SUM = "sum"
    AVG = "avg-addeps"
    AVG_ZEROEPS = "avg-zeroeps"
    AVG_CLIPEPS = "avg-clipeps"
    LINEAR = "linear-addeps"
    LINEAR_ZEROEPS = "linear-zeroeps"
    LINEAR_CLIPEPS = "linear-clipeps"
    SOFT = "soft-addeps"
    SOFT_ZEROEPS = "soft-zeroeps"
    SOFT_CLIPEPS = "soft-clipeps"
    MAX = "max-addeps"
    MAX_ZEROEPS = "max-zeroeps"
    MAX_CLIPEPS = "max-clipeps"

    def __str__(self) -> str:
        return self.value

    @property
    def kind(self) -> str:
        """``"sum"``, ``"avg"``, ``"linear"``, ``"soft"`` or ``"max"``."""
        return self.value.split("-")[0]

    @property
    def normalisation(self) -> str | None:
        """``"addeps"``, ``"zeroeps"``, ``"clipeps"``, or ``None`` for ``sum``."""
        parts = self.value.split("-")
        return parts[1] if len(parts) == 2 else None

    @property
    def needs_metric(self) -> bool:
        return self.kind in ("linear", "soft", "max")

    @property
    def kind_code(self) -> Kind:
        """The code the compiled kernels take for ``kind``."""
        return Kind[self.kind.upper()]

    @property
    def normalisation_code(self) -> Normalisation:
        """The code the compiled kernels take for ``normalisation``; ``ADDEPS`` for ``sum``."""
        return Normalisation[self.normalisation.upper()] if self.normalisation else Normalisation.ADDEPS

    @classmethod
    def parse(cls, value: object, argument: str = "mode") -> Mode:
        """Resolve a user's mode (a ``Mode`` or a string such as ``"soft-zeroeps"``)."""
        if isinstance(value, Mode):
            return value
        if not isinstance(value, str):
            raise TypeError(
                f"{argument}: expected a str or softsplat.Mode, got {type(value).__name__}"
            )
        head, sep, suffix = value.strip().lower().partition("-")
        kind = _ALIASES.get(head, head)
        if kind not in _KINDS or (sep and suffix not in _NORMALISATIONS):
            raise ValueError(
                f"{argument}: expected 'sum', 'avg', 'linear', 'soft' or 'max', the last four optionally with "
                f"'-addeps' (the default), '-zeroeps' or '-clipeps' (legacy names: 'summation', "
                f"'average', 'softmax'), got {value!r}"
            )
        if kind == "sum":
            if sep:
                raise ValueError(
                    f"{argument}: 'sum' is not normalised and takes no suffix, got {value!r}"
                )
            return cls.SUM
        return cls(f"{kind}-{suffix or 'addeps'}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32 (docs/spec.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_normaliser(normaliser: torch.Tensor, mode: Mode) -> torch.Tensor:
    """``D'`` of docs/spec.md: the normaliser made safe to divide by, as ``mode`` says."""
    if mode.normalisation == "addeps":
        return normaliser + EPS
    if mode.normalisation == "zeroeps":
        return torch.where(normaliser == 0, torch.ones_like(normaliser), normaliser)
    return normaliser.clamp_min(EPS)
