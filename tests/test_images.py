"""service.images.grid_png: the picture `deepserve infer` writes of a generator's samples, read back with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.images import GAP, SCALE, grid_png


def test_grid_png_lays_out_the_images_row_major_with_grey_gaps(tmp_path: Path) -> None:
    images = np.zeros((3, 1, 8, 8), np.float32)
    images[0] = 1.0  # white
    images[1, 0, 2, 5] = 0.5  # one mid-grey pixel in a black image
    images[2] = 7.0  # out of range: clipped to white
    path = tmp_path / "grid.png"
    grid_png(images, path)
    with Image.open(path) as im:
        assert (im.format, im.mode) == ("PNG", "L")
        pixels = np.asarray(im)
    tile = 8 * SCALE
    side = 2 * (tile + GAP) + GAP  # 3 images: ceil(sqrt(3)) = 2 columns, 2 rows
    assert pixels.shape == (side, side)

    def at(i: int) -> np.ndarray:
        r, c = divmod(i, 2)
        return pixels[GAP + r * (tile + GAP):GAP + r * (tile + GAP) + tile, GAP + c * (tile + GAP):][:, :tile]

    assert (at(0) == 255).all() and (at(2) == 255).all()
    second = at(1)
    assert (second[2 * SCALE:3 * SCALE, 5 * SCALE:6 * SCALE] == 128).all()  # the pixel, upscaled SCALE x SCALE
    assert int((second == 128).sum()) == SCALE * SCALE and int((second == 0).sum()) == tile * tile - SCALE * SCALE
    assert (at(3) == 128).all()  # the empty fourth slot is background grey
    assert (pixels[:GAP] == 128).all() and (pixels[:, :GAP] == 128).all()


def test_grid_png_takes_n_h_w_and_refuses_what_is_not_an_image_batch(tmp_path: Path) -> None:
    grid_png(np.full((1, 8, 8), 0.25, np.float32), tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as im:
        assert im.size == (tile := 8 * SCALE + 2 * GAP, tile) and np.asarray(im)[GAP, GAP] == 64
    for bad in (np.zeros((4, 3, 8, 8)), np.zeros((0, 1, 8, 8)), np.zeros(64)):
        with pytest.raises(ValueError, match=r"expected \[N, 1, H, W\]"):
            grid_png(bad, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="NaN"):
        grid_png(np.full((2, 1, 8, 8), np.nan), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
