"""softsplat: softmax splatting (differentiable forward warping) for PyTorch, on every device."""

from . import backends, onnx
from .api import BACKEND_ENV, resolve_backend, softsplat, splat, splat_many
from .backends import BackendNotSupportedError
from .backends.base import BackendFailedError
from .modes import Mode
from .modules import Splat, SplatMany

__all__ = [
    "BACKEND_ENV", "BackendFailedError", "BackendNotSupportedError", "Mode", "Splat", "SplatMany", "backends", "onnx",
    "resolve_backend", "softsplat", "splat", "splat_many",
]
__version__ = "0.1.0"
