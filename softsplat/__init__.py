"""softsplat: softmax splatting (differentiable forward warping) for PyTorch, on every device."""

from . import backends
from .api import BACKEND_ENV, softsplat, splat
from .backends import BackendNotSupportedError
from .modes import Mode

__all__ = ["BACKEND_ENV", "BackendNotSupportedError", "Mode", "backends", "softsplat", "splat"]
__version__ = "0.1.0"
