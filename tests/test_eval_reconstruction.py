"""PSNR / SSIM against hand-computed values and a NumPy transcription of Wang et al. 2004; the
reconstruction grid's layout."""
import numpy as np
import pytest
from PIL import Image

from iar_jax import images
from iar_jax.evaluation import reconstruction


def np_ssim(x, y):
    """SSIM of two [H, W, C] images on [0, 1]: valid-mode 11-tap Gaussian (σ 1.5), population
    (co)variances, K1 0.01, K2 0.03, mean over pixels and channels."""
    t = np.arange(-5, 6, dtype=np.float64)
    k = np.exp(-0.5 * (t / 1.5) ** 2)
    k /= k.sum()

    def blur(a):
        h = sum(k[i] * a[i:a.shape[0] - 10 + i] for i in range(11))
        return sum(k[i] * h[:, i:h.shape[1] - 10 + i] for i in range(11))

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))


def test_psnr_by_hand():
    a = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16, 16, 1))
    b = a.copy()
    b[0] += 0.2  # 0.1 on [0, 1]: MSE 1e-2 -> 20 dB
    b[1] += 0.02  # MSE 1e-4 -> 40 dB
    np.testing.assert_allclose(reconstruction.psnr(a, b), 30.0, atol=1e-9)


def test_ssim_matches_numpy_transcription():
    rng = np.random.default_rng(1)
    for c in (1, 3):
        a = rng.uniform(-1, 1, (2, 16, 20, c))
        b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1)
        want = np.mean([np_ssim((a[i] + 1) / 2, (b[i] + 1) / 2) for i in range(2)])
        np.testing.assert_allclose(reconstruction.ssim(a, b), want, rtol=1e-6)
        assert reconstruction.ssim(a, a) == pytest.approx(1.0)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="same shape"):
        reconstruction.psnr(np.zeros((2, 16, 16, 1)), np.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        reconstruction.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))


def test_reconstruction_grid(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.uniform(-1, 1, (3, 4, 4, 3)), rng.uniform(-1, 1, (3, 4, 4, 3))
    path = reconstruction.save_reconstruction_grid(str(tmp_path / "g.png"), a, b, pairs_per_row=2)
    with Image.open(path) as im:
        grid = np.asarray(im)
    assert grid.shape == (2 * 6 + 2, 4 * 6 + 2, 3)  # rows (orig, recon, orig, recon) with 2-px white gaps
    np.testing.assert_array_equal(grid[2:6, 8:12], images.to_uint8(b[0]))
    np.testing.assert_array_equal(grid[8:12, 2:6], images.to_uint8(a[2]))
    assert (grid[:2] == 255).all() and (grid[8:, 14:] == 255).all()  # the gaps and the empty cells
