"""A fixed grid that reaches every path of the CPU kernels, forward and every gradient against
the oracle: each channel count with a path of its own (1-3 packed, 4 and more in blocks) in every
mode, soft with and without stable, each dtype, contiguous and channels_last, at odd sizes, with
flows that land inside, across the border and nowhere; stable soft with and without its
per-image shortcut; and images tall and wide enough for several bands (apart, and merged) and
rows longer than a chunk of taps. Small: it is what ``nox -s arm`` runs under emulation
(ARM_TESTS in ``noxfile.py``), and in the main suite at every x86-64 level."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import softsplat
from softsplat import Mode

from .strategies import Case
from .test_against_oracle import check_case
from .test_edge_cases import _case

#: 1-3: the packed layout (forward scratch, backward rows); 4: its own compile-time count, the
#: forward's channel blocks of 4 lanes; 5: the generic count, a block of 8; 9: a 16-lane block with
#: a tail, and the backward's blocked gather (two blocks of 8; of 4 lanes, three, with 128-bit
#: vectors only); 17: a full 16-lane block, then one of 4 with a single channel, and three blocks
#: of the gather (five of 4 lanes).
CHANNELS = (1, 2, 3, 4, 5, 9, 17)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = (None, "channels_last")


def _grid() -> list:
    """Every channel count in every mode (soft also stable); the dtype and layout turn with the
    mode and the count, so that each count meets every dtype and both layouts."""
    cells = []
    for i, mode in enumerate(Mode):
        for stable in (False, True) if mode.kind == "soft" else (False,):
            for j, channels in enumerate(CHANNELS):
                k = len(cells)  # the seed
                dtype, layout = DTYPES[(i + j) % len(DTYPES)], LAYOUTS[(i + j + stable) % len(LAYOUTS)]
                name = f"{mode.value}{'-stable' if stable else ''}-C{channels}-{str(dtype)[6:]}-{layout or 'contiguous'}"
                cells.append(pytest.param(mode.value, stable, channels, dtype, layout, k, id=name))
    return cells


@pytest.mark.parametrize("mode, stable, channels, dtype, layout, seed", _grid())
def test_cpu_paths(backend, device, mode, stable, channels, dtype, layout, seed) -> None:
    if backend.name != "cpp":
        pytest.skip("a grid of the cpp CPU kernels' paths; other backends' paths are the rest of the suite's")
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} does not take {dtype}")
    # 2 x C x 7 x 11: odd sizes; the edge flows of the first pixels land across the border
    # and nowhere, the others of ~2 pixels mostly inside.
    # Stable soft, every other count: a metric of 400 in the first image, a spread past the
    # shortcut's (40 in float32, 300 in float64), so that it takes the per-tap weights beside
    # a second image that takes the shortcut.
    spread = [400.0] if stable and channels % 2 == 0 else None
    case = _case(mode, dtype, device, shape=(2, channels, 7, 11), layout=layout, metric_values=spread, seed=seed)
    check_case(backend, dataclasses.replace(case, stable=stable), torch.Generator().manual_seed(seed))


def _splat_case(shape, reach: float, mode: str, backend, device) -> Case:
    stable = mode.endswith("-stable")
    parsed = Mode.parse(mode.removesuffix("-stable"))
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(C)
    input = torch.randn((N, C, H, W), generator=generator, dtype=torch.float64)
    flow = torch.randn((N, 2, H, W), generator=generator, dtype=torch.float64) * reach
    metric = torch.randn((N, 1, H, W), generator=generator, dtype=torch.float64) * 3
    dtype = torch.float32 if torch.float32 in backend.dtypes else backend.dtypes[0]
    return Case(input.to(dtype).to(device), flow.to(dtype).to(device),
                metric.to(dtype).to(device) if parsed.needs_metric else None, parsed,
                (True, True, parsed.needs_metric), stable=stable)


@pytest.mark.parametrize("channels", [3, 5, 17], ids=["packed", "unpacked", "blocks"])
@pytest.mark.parametrize("reach", [0.5, 40.0], ids=["bands-apart", "bands-merged"])
@pytest.mark.parametrize("mode", ["sum", "avg-clipeps", "soft-stable"])
def test_cpu_bands(backend, device, channels, reach, mode) -> None:
    """35 rows (the CPU kernels' bands are 8 to 64 rows): flows of ~0.5 rows keep the bands
    apart (two phases), of ~40 rows make them reach the whole image (merged). 17 channels: more
    than one block, whose taps a band fills once for all of them."""
    case = _splat_case((2, channels, 35, 13), reach, mode, backend, device)
    check_case(backend, case, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("channels", [3, 5, 17], ids=["packed", "unpacked", "blocks"])
@pytest.mark.parametrize("mode", ["sum", "soft-stable"])
def test_cpu_long_rows(backend, device, channels, mode) -> None:
    """Rows of 261 pixels: past a chunk of taps (256), and not a multiple of any vector width;
    with 17 channels, chunks a band keeps for its blocks."""
    case = _splat_case((1, channels, 2, 261), 2.0, mode, backend, device)
    check_case(backend, case, torch.Generator().manual_seed(1))


def test_soft_weights_are_exp_within_an_ulp(backend, device) -> None:
    """The CPU kernels' (and the oracle's) soft weight is exp(metric) within 1 ulp of the exact
    value (the bound of Sleef's exp, which the AVX2 and AVX-512 levels call, and of the kernels'
    own at the levels without it), over float32's range of finite, non-zero weights, subnormal
    ones included: with zero flow each pixel lands on its own target alone, so D holds its weight
    as computed. Rows of 37: vectors of 4, 8 and 16 and their tails."""
    if device != "cpu" or backend.name not in ("cpp", "torch"):
        pytest.skip("the GPU kernels' exp (CUDA's expf: within 2 ulp; Triton's) and their atomics' "
                    "flushing of subnormal sums are a GPU's, also where they run on the host: the "
                    "comparisons with the oracle allow for them")
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([torch.linspace(-103.9, 88.7, 40 * 37, dtype=torch.float64),
                        torch.empty(40 * 37, dtype=torch.float64).uniform_(-103.9, 88.7, generator=generator),
                        torch.empty(40 * 37, dtype=torch.float64).uniform_(-1, 1, generator=generator)])
    metric = values.to(torch.float32).view(1, 1, -1, 37)
    input = torch.ones(1, 1, metric.shape[2], 37)
    flow = torch.zeros(1, 2, metric.shape[2], 37)
    _, weights = softsplat.splat(input, flow, metric, mode="soft", backend=backend.name, return_normaliser=True)
    exact = metric.double().exp()
    rounded = exact.float()
    ulp = torch.nextafter(rounded, torch.tensor(math.inf)).double() - rounded.double()
    error = (weights.double() - exact).abs() / ulp
    worst = int(error.argmax())
    assert error.max() <= 1.0, (f"exp({metric.flatten()[worst].item()!r}) = {weights.flatten()[worst].item()!r}, "
                                f"{error.max().item():.2f} ulp from {exact.flatten()[worst].item()!r}")
