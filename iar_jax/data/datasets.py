"""Labelled image datasets, all offline, as random-access sources: `len(ds)`, `ds[i] -> (image, label)`.

`image` is a uint8 HxWx3 array or a PIL image (image folders; decoded lazily), `label` an int in
[0, ds.num_classes). The sources also satisfy grain's `RandomAccessDataSource` protocol.

Names for `load_dataset(name, split, path)`:
  * `fashion_mnist_embedded` (default, alias `embedded`): 6000 train / 1000 test Fashion-MNIST
    images (600 / 100 per class, the first ones of each class in the original files) committed
    under `iar_jax/data/embedded/` with their MIT licence: works on a fresh install.
  * `fashion_mnist`: all 60000 / 10000 images from the Debian package `dataset-fashion-mnist`
    (`/usr/share/datasets/fashion-mnist`, or `path`).
  * `digits`: scikit-learn's 8x8 digits (first 1500 train, last 297 test), values scaled to 0..255.
  * `npz`: an .npz with `images` uint8 [N, H, W(, C)] and `labels` [N].
  * `image_folder`: `path/<class>/<image>` (ImageNet layout); classes are the sorted folder names,
    files are sorted within each class (torchvision `ImageFolder` order).
  * `imagenet2012`: TFDS `imagenet2012` prepared from a manual_dir (`path`, holding
    ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar); never downloads. `data_dir` is where
    TFDS keeps the prepared ArrayRecord files.
Grayscale images become 3 channels in preprocessing (`iar_jax.data.preprocess`); how images smaller
than the tokenizer's input are handled is documented there (padding by default).
"""
from __future__ import annotations

import gzip
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "fashion_mnist_subset.npz")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NAMES = ("fashion_mnist_embedded", "embedded", "fashion_mnist", "digits", "npz", "image_folder", "imagenet2012")


def check_labels(labels, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels of {where} must be a 1-D integer array; got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise ValueError(f"label {bad} of {where} is outside the class range [0, {num_classes}); "
                         f"fix the labels or set num_classes to at least {int(labels.max()) + 1}")
    return labels.astype(np.int64)


class ArrayDataset:
    """In-memory uint8 images [N, H, W(, C)] with integer labels [N]."""

    def __init__(self, images, labels, num_classes: Optional[int] = None, name: str = "arrays"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"{name}: images must be uint8 [N, H, W] or [N, H, W, C]; "
                             f"got {images.dtype} {images.shape}")
        if len(images) != len(np.asarray(labels)):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels; give one label per image")
        if len(images) == 0:
            raise ValueError(f"{name} has no images; point the dataset at a non-empty source")
        labels = np.asarray(labels)
        self.num_classes = int(num_classes) if num_classes is not None else int(labels.max()) + 1
        self.labels = check_labels(labels, self.num_classes, name)
        self.images, self.name = images, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> Tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def read_idx(path: str) -> np.ndarray:
    """An MNIST-format idx file (optionally .gz) -> numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E):
        raise ValueError(f"{path} is not an idx file (bad magic); pass the Fashion-MNIST *-idx?-ubyte.gz files")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3]))
    arr = np.frombuffer(data, dtype, offset=4 + 4 * data[3])
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: idx header says {list(shape)} but holds {arr.size} values; the file is truncated")
    return arr.reshape(shape)


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} does not exist; use 'train' or 'test'")
    return split


def fashion_mnist(split: str = "train", root: Optional[str] = None) -> ArrayDataset:
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[_split(split)]
    paths = [os.path.join(root, f"{prefix}-{kind}-idx{d}-ubyte.gz") for kind, d in (("images", 3), ("labels", 1))]
    for p in paths:
        if not os.path.exists(p) and os.path.exists(p[:-3]):
            paths[paths.index(p)] = p[:-3]
    if not all(os.path.exists(p) for p in paths):
        raise ValueError(f"Fashion-MNIST is not at {root} (no {os.path.basename(paths[0])}); "
                         "apt-get install dataset-fashion-mnist, pass its folder as path, "
                         "or use fashion_mnist_embedded")
    return ArrayDataset(read_idx(paths[0]), read_idx(paths[1]), 10, f"fashion_mnist/{split}")


def fashion_mnist_embedded(split: str = "train") -> ArrayDataset:
    with np.load(EMBEDDED) as z:
        return ArrayDataset(z[f"{_split(split)}_images"], z[f"{split}_labels"], 10, f"fashion_mnist_embedded/{split}")


def build_embedded_subset(root: Optional[str] = None, out: str = EMBEDDED, per_class=(600, 100)) -> None:
    """Writes the committed subset: the first `per_class` images of each class of each split."""
    arrays = {}
    for split, k in zip(("train", "test"), per_class):
        full = fashion_mnist(split, root)
        idx = np.sort(np.concatenate([np.flatnonzero(full.labels == c)[:k] for c in range(10)]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = full.images[idx], full.labels[idx].astype(np.uint8)
    np.savez_compressed(out, **arrays)


def digits(split: str = "train") -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    sl = slice(None, 1500) if _split(split) == "train" else slice(1500, None)
    images = np.round(d.images[sl] * (255.0 / 16.0)).astype(np.uint8)
    return ArrayDataset(images, d.target[sl], 10, f"digits/{split}")


def npz_dataset(path: str, num_classes: Optional[int] = None) -> ArrayDataset:
    if not path or not os.path.isfile(path):
        raise ValueError(f"npz dataset {path!r} does not exist; pass an .npz with 'images' and 'labels' arrays")
    with np.load(path) as z:
        if "images" not in z.files or "labels" not in z.files:
            raise ValueError(f"{path} has arrays {z.files}; it needs 'images' (uint8 [N, H, W(, C)]) and 'labels'")
        return ArrayDataset(z["images"], z["labels"], num_classes, path)


def decode_image(path: str, mode: str = "RGB"):
    """A PIL image in `mode`; a truncated or non-image file is a one-line error naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {path} ({e}); replace or remove that file and rerun "
                         "(finished work is kept)") from None


class ImageFolder:
    """`root/<class>/<file>` images, decoded lazily with PIL (torchvision `ImageFolder` order)."""

    def __init__(self, root: str, extensions: Sequence[str] = IMG_EXTENSIONS):
        if not root or not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist; pass a directory laid out as root/<class>/<image>")
        self.classes: List[str] = sorted(e.name for e in os.scandir(root) if e.is_dir())
        exts = tuple(e.lower() for e in extensions)
        self.samples: List[Tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(exts)]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(exts)}) found under {root}; expected root/<class>/<image> files")
        self.root, self.num_classes, self.name = root, len(self.classes), f"image_folder:{root}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return decode_image(path), label


class TFDSImageNet:
    """TFDS `imagenet2012` prepared from the user's manual_dir as ArrayRecord; never downloads."""

    FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

    def __init__(self, split: str = "train", manual_dir: Optional[str] = None, data_dir: Optional[str] = None):
        split = {"test": "validation", "val": "validation"}.get(split, split)
        if split not in ("train", "validation"):
            raise ValueError(f"imagenet2012 split {split!r} is not available offline; use 'train' or 'validation'")
        tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
        missing = [f for f in self.FILES if not (manual_dir and os.path.isfile(os.path.join(manual_dir, f)))]
        if missing and not os.path.isdir(os.path.join(tfds_dir, "imagenet2012")):  # checked before importing TF
            raise ValueError(f"imagenet2012 is not prepared in {tfds_dir} and manual_dir {manual_dir!r} lacks "
                             f"{', '.join(missing)}; pass path=<folder with the ImageNet tars> (nothing is downloaded)")
        import tensorflow_datasets as tfds

        builder = tfds.builder("imagenet2012", data_dir=tfds_dir, file_format="array_record")
        if not builder.is_prepared():
            if missing:
                raise ValueError(f"imagenet2012 in {tfds_dir} is incomplete and manual_dir {manual_dir!r} lacks "
                                 f"{', '.join(missing)}; pass path=<folder with the ImageNet tars>")
            builder.download_and_prepare(file_format="array_record", download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=False))
        self.source = builder.as_data_source(split=split)
        self.num_classes, self.name = 1000, f"imagenet2012/{split}"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        ex = self.source[int(i)]
        return np.asarray(ex["image"]), int(ex["label"])


def load_dataset(name: str = "fashion_mnist_embedded", split: str = "train", path: Optional[str] = None,
                 data_dir: Optional[str] = None, num_classes: Optional[int] = None):
    """One of the sources above (see the module docstring)."""
    if name in ("fashion_mnist_embedded", "embedded"):
        return fashion_mnist_embedded(split)
    if name == "fashion_mnist":
        return fashion_mnist(split, path)
    if name == "digits":
        return digits(split)
    if name == "npz":
        return npz_dataset(path, num_classes)
    if name == "image_folder":
        return ImageFolder(path)
    if name == "imagenet2012":
        return TFDSImageNet(split, path, data_dir)
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(NAMES)}")
