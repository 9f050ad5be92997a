"""The op contract is defined once: the mode codes and eps of ``softsplat.modes`` are the ones
the compiled kernels (``csrc/taps.h``) and the Triton kernels use."""

from __future__ import annotations

import importlib.util
import re

import pytest

from softsplat.backends.extension import CSRC
from softsplat.modes import EPS, Kind, Normalisation


def c_enum(name: str) -> dict[str, int]:
    """``enum <name> : int { A = 0, B = 1 };`` of taps.h as a dict."""
    match = re.search(rf"enum {name} : int \{{([^}}]*)\}};", (CSRC / "taps.h").read_text())
    assert match, f"taps.h defines no enum {name}"
    return {key.strip(): int(value) for key, value in (item.split("=") for item in match.group(1).split(","))}


@pytest.mark.parametrize("python", [Kind, Normalisation], ids=lambda e: e.__name__)
def test_taps_h_mode_codes_are_those_of_modes_py(python) -> None:
    assert c_enum(python.__name__) == {member.name: int(member) for member in python}


def test_taps_h_eps_is_that_of_modes_py() -> None:
    match = re.search(r"T eps\(\) \{ return static_cast<T>\(([^)]*)\); \}", (CSRC / "taps.h").read_text())
    assert match and float(match.group(1)) == EPS


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_take_the_codes_of_modes_py() -> None:
    from softsplat.backends import triton_kernels as k

    assert [k.SUM.value, k.AVG.value, k.LINEAR.value, k.SOFT.value, k.STABLE.value, k.MAX.value] == list(map(int, Kind))
    assert [k.ADDEPS.value, k.ZEROEPS.value, k.CLIPEPS.value, k.RAW.value] == list(map(int, Normalisation))
    assert k.EPS.value == EPS
