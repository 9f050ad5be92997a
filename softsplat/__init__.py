"""softsplat: softmax splatting (differentiable forward warping) for PyTorch, on every device."""

from . import backends
from .api import BACKEND_ENV, resolve_backend, softsplat, splat
from .backends import BackendNotSupportedError
from .modes import Mode

__all__ = [
    "BACKEND_ENV", "BackendNotSupportedError", "Mode", "backends", "resolve_backend", "softsplat", "splat",
]
__version__ = "0.1.0"
