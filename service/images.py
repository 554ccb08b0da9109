"""Pictures of image outputs, for `deepserve infer MODEL --png FILE` on a generator: a grid of the samples as one
greyscale PNG. Pillow does the encoding; numpy lays out the grid. No torch, like the rest of the service."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SCALE = 8  # 8x8 digits are too small to see at one pixel per pixel: each becomes a 64x64 tile
GAP = 2  # pixels of mid-grey between tiles, so black backgrounds stay apart


def grid(images: np.ndarray, columns: int | None = None, scale: int = SCALE) -> np.ndarray:
    """[N, 1, H, W] (or [N, H, W]) intensities in [0, 1] -> one uint8 [rows, cols] grid, row-major, white = 1.
    Values outside [0, 1] are clipped; a non-finite value is an error (it has no grey level)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"images have shape {list(np.shape(images))}; expected [N, 1, H, W] or [N, H, W], N >= 1")
    if not np.isfinite(x).all():
        raise ValueError("images hold NaN or infinite values; expected intensities in [0, 1]")
    n, h, w = x.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = np.kron(np.clip(x, 0.0, 1.0), np.ones((scale, scale), np.float32))  # nearest-neighbour upscale
    th, tw = h * scale, w * scale
    out = np.full((rows * (th + GAP) + GAP, cols * (tw + GAP) + GAP), 0.5, np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = GAP + r * (th + GAP), GAP + c * (tw + GAP)
        out[top:top + th, left:left + tw] = tiles[i]
    return np.round(out * 255).astype(np.uint8)


def grid_png(images: np.ndarray, path: str | Path) -> None:
    """Write `images` [N, 1, H, W] in [0, 1] as a PNG grid (about square: ceil(sqrt(N)) columns)."""
    from PIL import Image

    Image.fromarray(grid(images)).save(Path(path), format="PNG")  # uint8 [rows, cols]: 8-bit greyscale ("L")
