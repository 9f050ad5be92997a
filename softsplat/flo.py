"""Reading and writing optical flow in the Middlebury ``.flo`` format.

A ``.flo`` file is the float32 ``202021.25`` (the bytes ``PIEH``), the width and the height as
little-endian int32, then ``height * width * 2`` little-endian float32: for every pixel, row by
row, its x then y displacement.
"""

from __future__ import annotations

import os

import numpy as np
import torch

MAGIC = 202021.25
_MAX_SIDE = 1 << 16  # a sanity bound on either side; larger headers are taken as corrupt


class FloError(ValueError):
    """A file that is not a valid ``.flo``; the message names the file and what is wrong."""


def read_flo(path: str | os.PathLike) -> torch.Tensor:
    """The flow in ``path`` as a float32 tensor ``[2, H, W]`` (x then y displacement)."""
    data = open(path, "rb").read()
    if len(data) < 12:
        raise FloError(f"{path}: expected a .flo header of 12 bytes, got a file of {len(data)} bytes")
    magic = np.frombuffer(data, "<f4", 1)[0]
    if magic != np.float32(MAGIC):
        raise FloError(f"{path}: expected the .flo magic {MAGIC} ('PIEH'), got {data[:4]!r}")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", 2, offset=4))
    if not (0 <= width <= _MAX_SIDE and 0 <= height <= _MAX_SIDE):
        raise FloError(f"{path}: expected a width and height in [0, {_MAX_SIDE}], got {width} x {height}")
    expected = 12 + 8 * width * height
    if len(data) != expected:
        raise FloError(
            f"{path}: a {width} x {height} flow needs {expected} bytes, the file has {len(data)} "
            f"({'truncated' if len(data) < expected else 'trailing data'})"
        )
    values = np.frombuffer(data, "<f4", 2 * width * height, offset=12).reshape(height, width, 2)
    return torch.from_numpy(values.astype(np.float32)).permute(2, 0, 1).contiguous()


def write_flo(path: str | os.PathLike, flow: torch.Tensor | np.ndarray) -> None:
    """Write ``flow`` to ``path`` in the ``.flo`` format: a tensor ``[2, H, W]`` (or
    ``[1, 2, H, W]``), as ``splat`` takes it, or a numpy array ``[H, W, 2]``, as OpenCV's optical
    flow (``cv2.calcOpticalFlowFarneback``, DIS) returns it."""
    if isinstance(flow, np.ndarray):
        if flow.ndim != 3 or flow.shape[2] != 2:
            raise ValueError(f"flow: expected a numpy array [H, W, 2] (OpenCV's layout), got shape {flow.shape}")
        flow = torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32)).permute(2, 0, 1)
    if not isinstance(flow, torch.Tensor):
        raise TypeError(f"flow: expected a torch.Tensor [2, H, W] or a numpy array [H, W, 2], got {type(flow).__name__}")
    if flow.dim() == 4 and flow.shape[0] == 1:
        flow = flow[0]
    if flow.dim() != 3 or flow.shape[0] != 2:
        raise ValueError(f"flow: expected a tensor [2, H, W], got shape {tuple(flow.shape)}")
    height, width = flow.shape[1:]
    values = flow.detach().to("cpu", torch.float32).permute(1, 2, 0).contiguous().numpy()
    with open(path, "wb") as file:
        file.write(np.array([MAGIC], "<f4").tobytes())
        file.write(np.array([width, height], "<i4").tobytes())
        file.write(values.astype("<f4").tobytes())
