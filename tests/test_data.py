"""Datasets (embedded subset, idx reader, digits, npz, image folder, ImageNet errors) and the
LlamaGen/ADM preprocessing (ten-crop geometry, center-crop-arr, padding rule), on images whose
pixel values encode their coordinates."""
import gzip
import os

import numpy as np
import pytest
from PIL import Image

from iar_jax.data import datasets, preprocess


def coord_image(h, w):
    """uint8 [h, w, 3]: channel 0 = row, channel 1 = column, channel 2 = 7."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(h)[:, None]
    img[..., 1] = np.arange(w)[None, :]
    img[..., 2] = 7
    return img


@pytest.mark.parametrize("small", ["pad", "resize"])
def test_ten_crop_geometry(small):
    img = coord_image(35, 35)  # already the enlarged crop: int(32 * 1.1) = 35, so no resampling
    views = preprocess.augmented_views(img, 32, crop_range=1.1, small=small)
    assert views.shape == (10, 32, 32, 3) and views.dtype == np.uint8
    # torchvision TenCrop: tl, tr, bl, br, centre (round(3 / 2) = 2), then the same on the flipped image.
    offsets = [(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]
    for k, (top, left) in enumerate(offsets * 2):
        rows = np.arange(top, top + 32)
        cols = np.arange(left, left + 32)
        if k >= 5:
            cols = 34 - cols  # crop of the mirrored image
        np.testing.assert_array_equal(views[k, :, :, 0], np.broadcast_to(rows[:, None], (32, 32)))
        np.testing.assert_array_equal(views[k, :, :, 1], np.broadcast_to(cols[None, :], (32, 32)))
        assert np.all(views[k, :, :, 2] == 7)
    two = preprocess.augmented_views(coord_image(32, 32), 32, ten_crop_views=False)
    np.testing.assert_array_equal(two[1], two[0][:, ::-1])
    np.testing.assert_array_equal(two[0], coord_image(32, 32))


def test_center_offsets_use_python_rounding():
    # 256 px at crop_range 1.1: int(281.6) = 281, (281 - 256) / 2 = 12.5 -> 12; 384 px: 422 -> 19.
    assert preprocess.five_crop_offsets(281, 281, 256)[4] == (12, 12)
    assert preprocess.five_crop_offsets(422, 422, 384)[4] == (19, 19)
    assert preprocess.five_crop_offsets(40, 50, 30)[1:4] == [(0, 20), (10, 0), (10, 20)]


def test_center_crop_arr_box_halving_and_crop():
    # 100 x 60 (h x w) to 30: short side 60 >= 2*30 -> box-halve to 50 x 30; then scale 1 (no
    # bicubic change); crop rows (50 - 30) // 2 = 10. A box pixel averages source rows 2r, 2r+1.
    out = preprocess.center_crop_arr(coord_image(100, 60), 30)
    assert out.shape == (30, 30, 3)
    rows = 2 * (np.arange(30) + 10) + 0.5
    cols = 2 * np.arange(30) + 0.5
    assert np.abs(out[..., 0] - rows[:, None]).max() <= 0.5
    assert np.abs(out[..., 1] - cols[None, :]).max() <= 0.5
    # Bicubic step: a 40 x 40 image to 30 keeps the full field of view (corners stay corners).
    out = preprocess.center_crop_arr(coord_image(40, 40), 30)
    assert out.shape == (30, 30, 3) and out[0, 0, 0] <= 1 and out[-1, -1, 1] >= 38


def test_padding_rule_and_ranges():
    gray = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 251
    views = preprocess.augmented_views(gray.astype(np.uint8), 32, crop_range=1.1)  # 28 -> black 35x35, 3 px border
    tl = views[0]
    assert np.all(tl[:3] == 0) and np.all(tl[:, :3] == 0) and np.all(tl[31:] == 0)
    np.testing.assert_array_equal(tl[3:31, 3:31, 0], gray)
    assert np.all(tl[..., 0] == tl[..., 1]) and np.all(tl[..., 1] == tl[..., 2])  # grey -> 3 equal channels
    rgba = np.dstack([coord_image(8, 8), np.full((8, 8), 9, np.uint8)])
    np.testing.assert_array_equal(preprocess.to_rgb_array(rgba), coord_image(8, 8))
    np.testing.assert_allclose(preprocess.to_model_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        preprocess.augmented_views(np.zeros((8, 8), np.float32), 8)


def test_embedded_fashion_mnist():
    train, test = datasets.load_dataset("embedded", "train"), datasets.load_dataset("fashion_mnist_embedded", "test")
    assert (len(train), len(test), train.num_classes) == (6000, 1000, 10)
    assert np.all(np.bincount(train.labels) == 600) and np.all(np.bincount(test.labels) == 100)
    img, label = train[5]
    assert img.shape == (28, 28) and img.dtype == np.uint8 and 0 <= label < 10
    assert os.path.exists(os.path.join(os.path.dirname(datasets.EMBEDDED), "LICENSE-fashion-mnist"))


def test_idx_reader_and_missing_fashion_mnist(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in images.shape) + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + labels.tobytes())
    ds = datasets.load_dataset("fashion_mnist", "test", path=str(tmp_path))
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        datasets.load_dataset("fashion_mnist", "train", path=str(tmp_path))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x07\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        datasets.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in images.shape)
                      + images.tobytes()[:-1])
    with pytest.raises(ValueError, match=r"header says \[5, 28, 28\] but holds 3919 values"):
        datasets.read_idx(str(short))


def test_digits_npz_and_label_errors(tmp_path):
    train, test = datasets.digits("train"), datasets.digits("test")
    assert (len(train), len(test)) == (1500, 297) and train.images.max() == 255 and train[0][0].shape == (8, 8)
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 7]))
    assert datasets.load_dataset("npz", path=str(tmp_path / "d.npz")).num_classes == 8
    with pytest.raises(ValueError, match=r"label 7 .* outside the class range \[0, 5\)"):
        datasets.load_dataset("npz", path=str(tmp_path / "d.npz"), num_classes=5)
    with pytest.raises(ValueError, match="label -1"):
        datasets.ArrayDataset(np.zeros((2, 4, 4), np.uint8), [0, -1], 3)
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load_dataset("cifar10")


def test_image_folder(tmp_path):
    for cls, n in (("n02", 2), ("n01", 1)):
        os.makedirs(tmp_path / cls / "sub")
        for i in range(n):
            Image.fromarray(coord_image(9, 7)).save(tmp_path / cls / f"img{i}.JPEG", quality=100)
    Image.fromarray(np.full((5, 5), 200, np.uint8), "L").save(tmp_path / "n02" / "sub" / "gray.png")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    ds = datasets.load_dataset("image_folder", path=str(tmp_path))
    assert ds.classes == ["n01", "n02"] and len(ds) == 4
    assert [label for _, label in ds.samples] == [0, 1, 1, 1]
    assert [os.path.basename(p) for p, _ in ds.samples] == ["img0.JPEG", "img0.JPEG", "img1.JPEG", "gray.png"]
    img, label = ds[3]
    assert label == 1 and np.asarray(img).shape == (5, 5, 3) and np.all(np.asarray(img) == 200)
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(ValueError, match="no images"):
        datasets.load_dataset("image_folder", path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load_dataset("image_folder", path=str(tmp_path / "missing"))


def test_imagenet_without_tars_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lacks ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar.*nothing is downlo"):
        datasets.load_dataset("imagenet2012", "train", path=str(tmp_path), data_dir=str(tmp_path / "tfds"))
