"""The suite tests its own helpers: a wrong backend must fail it, with a useful message."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softsplat import Mode, backends
from softsplat.backends import torch as oracle
from softsplat.modes import safe_normaliser

from ..compare import compare
from ..strategies import Case, cases, shapes
from ..test_against_oracle import check_case


class _Wrong(oracle.TorchBackend):
    """The oracle with one deliberate bug, chosen by ``bug``."""

    def __init__(self, bug: str):
        self.name, self.bug = f"wrong-{bug}", bug

    def run(self, problem):
        input, flow, metric, mode = problem.input, problem.flow, problem.metric, problem.mode
        if self.bug == "nonfinite-as-zero-flow":  # an existing port's bug
            flow = torch.where(flow.isfinite(), flow, 0)
        elif self.bug == "flow-off-by-1e-3":
            flow = flow + 1e-3
        elif self.bug == "no-eps" and mode.normalisation:
            mode = Mode(f"{mode.kind}-zeroeps")
        elif self.bug == "detached-metric" and metric is not None:
            metric = metric.detach()
        elif self.bug.startswith("max-") and mode.kind == "max":
            return self._wrong_max(problem)
        return oracle.splat_with_normaliser(input, flow, metric, mode, problem.raw)

    def _wrong_max(self, problem):
        """Max splatting with one of the ``max-`` bugs, from the oracle's pieces."""
        dtype = problem.compute_dtype
        values, flow, metric = problem.input.to(dtype), problem.flow.to(dtype), problem.metric.to(dtype)
        tap_weight = oracle.max_tap_weight
        if self.bug == "max-losers-count":  # every tap on a reached target counts
            def tap_weight(m, reached):
                return torch.where(reached.isnan(), float("nan"), (reached > float("-inf")).to(reached.dtype))
        elif self.bug == "max-metric-gradient":  # the same values, a gradient of 1 for the winners' metric
            def tap_weight(m, reached):
                share = oracle.max_tap_weight(m, reached)
                return torch.where(share == 1, torch.exp(m - reached.detach()), share)
        chosen = metric
        if self.bug == "max-nan-loses":  # a NaN metric never wins
            chosen = torch.where(metric.isnan(), float("-inf"), metric)
        # stable mode's maximum: taps of weight 0 compete too
        maximum = oracle.splat_maximum(chosen, flow, covering=self.bug != "max-zero-weight-taps-compete")
        numerator, normaliser = oracle.splat_per_tap(values, metric, flow, maximum, tap_weight)
        if problem.raw:
            return numerator, normaliser
        return (numerator / safe_normaliser(normaliser, problem.mode)).to(problem.input.dtype), normaliser


BUGS = ["nonfinite-as-zero-flow", "flow-off-by-1e-3", "no-eps", "detached-metric"]
#: Bugs of max splatting only; the search draws max modes alone for them.
MAX_BUGS = ["max-losers-count", "max-metric-gradient", "max-nan-loses", "max-zero-weight-taps-compete"]
MAX_MODES = tuple(mode for mode in Mode if mode.kind == "max")


@pytest.fixture(params=BUGS + MAX_BUGS)
def wrong(request):
    backend = _Wrong(request.param)
    backends.register(backend)
    yield backend
    backends.unregister(backend.name)


def test_a_wrong_backend_fails_the_suite(wrong) -> None:
    """Hypothesis must find a falsifying case for every deliberate bug."""
    modes = MAX_MODES if wrong.bug in MAX_BUGS else tuple(Mode)

    @settings(max_examples=300, derandomize=True, database=None)
    @given(case=cases(dtypes=(torch.float32, torch.float64), modes=modes), seed=st.integers(0, 100))
    def conformance(case, seed):
        check_case(wrong, case, torch.Generator().manual_seed(seed))

    with pytest.raises(AssertionError):
        conformance()


def test_compare_names_the_worst_element() -> None:
    reference = torch.zeros(2, 3, dtype=torch.float64)
    got = reference.clone().float()
    got[1, 2] = 0.5
    got[0, 0] = 1e-3
    with pytest.raises(AssertionError, match=r"2 of 6 elements off \(33.33%\); worst at \(1, 2\): got 0.5"):
        compare("output", got, reference, reference, torch.ones(()))


def test_compare_requires_matching_nonfinite_kinds() -> None:
    reference = torch.tensor([math.nan, math.inf, 1.0], dtype=torch.float64)
    compare("same", reference.float(), reference, reference, torch.ones(()))
    with pytest.raises(AssertionError, match="1 of 3"):
        compare("inf for nan", torch.tensor([math.inf, math.inf, 1.0]), reference, reference, torch.ones(()))
    with pytest.raises(AssertionError, match="1 of 3"):
        compare("-inf for inf", torch.tensor([math.nan, -math.inf, 1.0]), reference, reference, torch.ones(()))


def test_compare_accepts_the_compute_dtype_answer() -> None:
    """Where float32 overflows and float64 does not, matching the float32 oracle is right."""
    reference = torch.tensor([1.0, 2.0], dtype=torch.float64)
    float32_result = torch.tensor([math.nan, 2.0], dtype=torch.float64)
    compare("overflow", torch.tensor([math.nan, 2.0]), reference, float32_result, torch.ones(()))


@given(shape=shapes())
def test_shapes_have_four_non_negative_sizes(shape) -> None:
    assert len(shape) == 4 and all(size >= 0 for size in shape)


@given(case=cases())
def test_cases_are_valid_calls(case: Case) -> None:
    assert (case.metric is None) == (not case.mode.needs_metric)
    assert case.flow.shape[1] == 2 and case.flow.shape[0] == case.input.shape[0]
    assert not case.requires_grad[2] or case.metric is not None
