"""Image batches for tokenizer training and evaluation.

Sources (all offline): the labelled datasets of `iar_jax.data.datasets` held in memory
(`fashion_mnist_embedded`: the subset shipped with the package, `fashion_mnist`: the Debian
`dataset-fashion-mnist` idx files, `digits`: scikit-learn's 8×8 digits), `npz` (an `images` uint8
[N, H, W, C] array), and `image_folder` (`ImageFiles`: e.g. ImageNet `train/<class>/*.JPEG` or a flat
folder) decoded while training with LlamaGen's random-crop + flip augmentation.
Images are returned as float32 [N, H, W, C] in [-1, 1]; grayscale is repeated to `channels`;
images smaller than `image_size` are padded with the background value (-1) evenly on each side.

Training batches come from `ImageSource` through grain (`train_loop.batch_iterator`): a pure
function of (seed, step), so resuming at step s gives exactly the batches an uninterrupted run
would have seen (random flips and crops included).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

IN_MEMORY = ("fashion_mnist_embedded", "embedded", "fashion_mnist", "digits")


def to_model_range(images_uint8: np.ndarray, channels: int = 3, image_size: Optional[int] = None) -> np.ndarray:
    """uint8 [N, H, W(, C)] -> float32 [N, S, S, channels] in [-1, 1] (pad with -1 to image_size)."""
    x = np.asarray(images_uint8)
    if x.ndim == 3:
        x = x[..., None]
    x = x.astype(np.float32) / 127.5 - 1.0
    if x.shape[-1] == 1 and channels != 1:
        x = np.repeat(x, channels, axis=-1)
    if x.shape[-1] != channels:
        raise ValueError(f"images have {x.shape[-1]} channels, the tokenizer takes {channels}; set model.in_channels")
    if image_size is not None and (x.shape[1] != image_size or x.shape[2] != image_size):
        ph, pw = image_size - x.shape[1], image_size - x.shape[2]
        if ph < 0 or pw < 0:
            raise ValueError(f"images are {x.shape[1]}x{x.shape[2]}, larger than data.image_size={image_size}; "
                             "set data.image_size to at least the image size")
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=-1.0)
    return x


def load_images(name: str, split: str, channels: int, image_size: Optional[int], path: Optional[str] = None,
                limit: Optional[int] = None) -> np.ndarray:
    """float32 [N, S, S, C] in [-1, 1] for one of the in-memory sources."""
    if name == "npz":  # images only; labelled datasets go through iar_jax.data.datasets
        x = _npz_images(path)
    elif name in IN_MEMORY:
        from iar_jax.data import datasets

        x = datasets.load_dataset(name, split, path or None).images
    else:
        raise ValueError(f"data.name {name!r} is not an in-memory source; use {', '.join(IN_MEMORY)}, npz or "
                         "image_folder")
    if limit:
        x = x[:limit]
    return to_model_range(x, channels, image_size)


def random_crop(image, image_size: int, rng: np.random.Generator, min_crop_frac: float = 0.8,
                max_crop_frac: float = 1.0):
    """LlamaGen/ADM `random_crop_arr`: short side resized to a random size in
    [size / max_frac, size / min_frac] (box-halving first, then bicubic), then a random square crop."""
    import math

    from PIL import Image

    lo, hi = math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)
    smaller = int(rng.integers(lo, hi + 1))
    while min(*image.size) >= 2 * smaller:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = smaller / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    y = int(rng.integers(arr.shape[0] - image_size + 1))
    x = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[y:y + image_size, x:x + image_size]


class ImageFiles:
    """The images under `root` (recursively: ImageNet `root/<class>/*.JPEG` or a flat folder; sorted),
    decoded lazily: `ds[i] -> (PIL image, 0)` like the sources of `iar_jax.data.datasets`."""

    def __init__(self, root: str, channels: int = 3):
        from iar_jax.data.datasets import IMG_EXTENSIONS

        if not root or not os.path.isdir(root):
            raise ValueError(f"data.path {root!r} is not a folder of images; set --config.data.path")
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(root, followlinks=True) for f in fs
                            if f.lower().endswith(IMG_EXTENSIONS))
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}; point it at a folder of images")
        self.mode, self.name = "RGB" if channels == 3 else "L", f"images:{root}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from iar_jax.data.datasets import decode_image

        return decode_image(self.files[i], self.mode), 0


class ImageSource:
    """Training images for `iar_jax.data.codes`' batch stream (`train_loop.batch_iterator`):
    `get(idx, aug)` -> {"images": float32 [n, S, S, C] in [-1, 1]}.

    `data` is a float array already in [-1, 1], an `ArrayDataset` (uint8, converted per batch) or a
    lazily decoded source (`ImageFiles`) that gets LlamaGen's random crop. `aug` is the seeded
    per-image, per-epoch value the stream draws: it is the flip bit of arrays and seeds the crop and
    flip of decoded images, so batches depend only on (seed, step) on any number of devices."""

    def __init__(self, data, image_size: int, channels: int, flip: bool = True):
        self.data, self.image_size, self.channels, self.flip = data, int(image_size), int(channels), bool(flip)
        self.lazy = not isinstance(data, np.ndarray) and not hasattr(data, "images")
        if not len(self):
            raise ValueError("the tokenizer's training data has no images; point data.name / data.path at some")

    def __len__(self) -> int:
        return len(self.data)

    @property
    def num_aug(self) -> int:
        return 2 ** 31 if self.lazy else (2 if self.flip else 1)

    def get(self, idx: np.ndarray, aug: Optional[np.ndarray] = None):
        if self.lazy:
            out = []
            for i, a in zip(idx, aug):
                rng = np.random.default_rng(int(a))
                arr = random_crop(self.data[int(i)][0], self.image_size, rng)
                out.append(arr[:, ::-1] if self.flip and rng.random() < 0.5 else arr)
            return {"images": to_model_range(np.stack(out), self.channels)}
        if isinstance(self.data, np.ndarray):
            x = self.data[idx]
        else:
            x = to_model_range(self.data.images[idx], self.channels, self.image_size)
        if aug is not None:
            x = np.where((aug == 1)[:, None, None, None], x[:, :, ::-1], x)
        return {"images": np.ascontiguousarray(x, np.float32)}


def training_data(name: str, split: str, path: Optional[str], channels: int):
    """The training images of `data.name` for `ImageSource`: a dataset of `iar_jax.data.datasets`,
    an images-only npz, or an `ImageFiles` folder."""
    from iar_jax.data import datasets

    if name == "image_folder":
        return ImageFiles(path, channels)
    if name == "npz":
        x = _npz_images(path)
        return datasets.ArrayDataset(x, np.zeros(len(x), np.int64), 1, path)
    if name in IN_MEMORY:
        return datasets.load_dataset(name, split, path or None)
    raise ValueError(f"data.name {name!r} is not a tokenizer dataset; use {', '.join(IN_MEMORY)}, npz or image_folder")


def _npz_images(path: Optional[str]) -> np.ndarray:
    if not path or not os.path.exists(path):
        raise ValueError(f"data.path {path!r} does not exist; point it at an .npz with an 'images' array")
    with np.load(path) as f:
        if "images" not in f.files:
            raise ValueError(f"data.path {path} has arrays {f.files}; it needs 'images' (uint8 [N, H, W(, C)])")
        return f["images"]


def load_image_files(directory: str, image_size: int, limit: Optional[int] = None, channels: int = 3) -> np.ndarray:
    """The `ImageFiles` under `directory` -> [N, S, S, C] in [-1, 1]: each image centre-cropped to
    a square and resized (bicubic) to image_size."""
    from PIL import Image

    files = ImageFiles(directory, channels)
    out = []
    for i in range(min(len(files), limit) if limit else len(files)):
        im = files[i][0]
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((image_size, image_size), Image.BICUBIC)
        out.append(np.asarray(im))
    return to_model_range(np.stack(out), channels)
