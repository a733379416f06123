"""[-1, 1] -> uint8 as the reference samplers, and the grid layout, against values worked out by hand."""
import numpy as np
import pytest
from PIL import Image

from iar_jax import images


def test_to_uint8_reference_rounding():
    # clamp(127.5·x + 128, 0, 255) truncated: 0 -> 128 (not 127), -0.5 -> 64.25 -> 64, 0.5 -> 191.75 -> 191.
    x = np.array([-2.0, -1.0, -0.999, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0])
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 0, 64, 128, 191, 255, 255, 255])
    assert images.to_uint8(x).dtype == np.uint8


def test_grid_layout_by_hand(tmp_path):
    tiles = np.arange(1, 4, dtype=np.uint8)[:, None, None, None] * np.ones((3, 2, 2, 1), np.uint8)
    grid = images.make_grid(tiles, ncols=2, pad=1, fill=9)
    want = np.array([[9, 9, 9, 9, 9, 9, 9],
                     [9, 1, 1, 9, 2, 2, 9],
                     [9, 1, 1, 9, 2, 2, 9],
                     [9, 9, 9, 9, 9, 9, 9],
                     [9, 3, 3, 9, 9, 9, 9],
                     [9, 3, 3, 9, 9, 9, 9],
                     [9, 9, 9, 9, 9, 9, 9]], np.uint8)
    np.testing.assert_array_equal(grid[..., 0], want)
    np.testing.assert_array_equal(images.make_grid(tiles, ncols=8)[..., 0], [[1, 1, 2, 2, 3, 3]] * 2)
    path = images.save_grid(str(tmp_path / "sub" / "g.png"), tiles, ncols=2, pad=1, fill=9)
    with Image.open(path) as im:  # grayscale stays one channel
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), want)
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3)).astype(np.uint8)
    with Image.open(images.save_grid(str(tmp_path / "rgb.png"), rgb, ncols=1)) as im:
        np.testing.assert_array_equal(np.asarray(im), np.concatenate(list(rgb), axis=0))
    with pytest.raises(ValueError, match="uint8"):
        images.make_grid(np.zeros((1, 2, 2, 1), np.float32))
