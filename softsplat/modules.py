"""``splat`` and ``splat_many`` as ``torch.nn.Module`` s, for models built of modules (and what
``softsplat.onnx.standalone`` exports)."""

from __future__ import annotations

import torch

from . import api
from .modes import Mode


class Splat(torch.nn.Module):
    """``splat`` as a module: ``forward(input, flow, metric=None)`` -> the result (and, with
    ``return_normaliser``, the normaliser). ``mode``, ``stable``, ``return_normaliser`` and
    ``backend`` as for ``softsplat.splat``; the mode is checked here, at construction."""

    def __init__(self, mode: str = "soft", stable: bool = False, return_normaliser: bool = False, backend: str = "auto"):
        super().__init__()
        Mode.parse(mode)  # a bad mode fails here, not at the first call
        self.mode, self.stable, self.return_normaliser, self.backend = mode, stable, return_normaliser, backend

    def forward(self, input, flow, metric=None):
        return api.splat(input, flow, metric, mode=self.mode, stable=self.stable,
                         return_normaliser=self.return_normaliser, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, stable={self.stable}, return_normaliser={self.return_normaliser}"


class SplatMany(torch.nn.Module):
    """``splat_many`` of ``sources`` sources as a module: ``forward(input0, flow0[, metric0],
    input1, flow1[, metric1], ...)`` (a metric per source for the modes that take one)."""

    def __init__(self, mode: str = "soft", sources: int = 2, stable: bool = False, backend: str = "auto"):
        super().__init__()
        if not isinstance(sources, int) or isinstance(sources, bool) or sources < 1:
            raise ValueError(f"sources: expected a positive number of sources, got {sources!r}")
        self.mode, self.stable, self.sources, self.backend = mode, stable, sources, backend
        self.per_source = 3 if Mode.parse(mode).needs_metric else 2

    def forward(self, *tensors):
        step = self.per_source
        if len(tensors) != step * self.sources:
            raise ValueError(f"tensors: expected {step * self.sources} ({self.sources} sources of {step}), got {len(tensors)}")
        groups = [tuple(tensors[i:i + step]) + ((None,) if step == 2 else ()) for i in range(0, len(tensors), step)]
        return api.splat_many(groups, mode=self.mode, stable=self.stable, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, sources={self.sources}, stable={self.stable}"
