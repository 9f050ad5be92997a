"""Splatting modes: what is splatted beside the input, and how the result is normalised.

This module is a leaf: the API and every backend import it, it imports nothing of the package.
"""

from __future__ import annotations

import enum

import torch

#: The constant of the ``addeps`` and ``clipeps`` normalisations (docs/spec.md).
EPS = 1e-7

_KINDS = ("sum", "avg", "linear", "soft")
_NORMALISATIONS = ("addeps", "zeroeps", "clipeps")
#: The compiled kernels' normalisation code for "no division": they return the numerator and
#: the normaliser as they are (how splat_many sums several sources before dividing).
RAW_CODE = 3
#: The compiled kernels' kind code for stable soft splatting (soft with each target's maximum
#: metric subtracted).
STABLE_CODE = 4
# Names the reference implementation's users and papers also use.
_ALIASES = {"summation": "sum", "average": "avg", "softmax": "soft"}


class Mode(str, enum.Enum):
    """Every splatting mode. A member compares equal to its canonical string (``"soft-addeps"``).

    ``kind`` says what is splatted: ``sum`` the input alone; ``avg``, ``linear`` and ``soft`` the
    input weighted by 1, ``metric`` or ``exp(metric)``, next to the weight itself (the
    normaliser). ``normalisation`` says how the normaliser ``D`` is made safe before dividing:
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

    def __str__(self) -> str:
        return self.value

    @property
    def kind(self) -> str:
        """``"sum"``, ``"avg"``, ``"linear"`` or ``"soft"``."""
        return self.value.split("-")[0]

    @property
    def normalisation(self) -> str | None:
        """``"addeps"``, ``"zeroeps"``, ``"clipeps"``, or ``None`` for ``sum``."""
        parts = self.value.split("-")
        return parts[1] if len(parts) == 2 else None

    @property
    def needs_metric(self) -> bool:
        return self.kind in ("linear", "soft")

    @property
    def kind_code(self) -> int:
        """The integer the compiled kernels take for ``kind`` (order of ``_KINDS``)."""
        return _KINDS.index(self.kind)

    @property
    def normalisation_code(self) -> int:
        """The integer the compiled kernels take for ``normalisation``; 0 for ``sum``."""
        return _NORMALISATIONS.index(self.normalisation) if self.normalisation else 0

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
        valid = ", ".join(repr(m.value) for m in cls) + " (legacy: 'summation', 'average', 'softmax')"
        if kind not in _KINDS or (sep and suffix not in _NORMALISATIONS):
            raise ValueError(f"{argument}: expected one of {valid}, got {value!r}")
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
