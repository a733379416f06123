"""Image batches for tokenizer training and evaluation.

Sources (all offline): the labelled datasets of `iar_jax.data.datasets` held in memory
(`fashion_mnist_embedded`: the subset shipped with the package, `fashion_mnist`: the Debian
`dataset-fashion-mnist` idx files, `digits`: scikit-learn's 8×8 digits), `npz` (an `images` uint8
[N, H, W, C] array), and `image_folder` (e.g. ImageNet `train/<class>/*.JPEG`) streamed with LlamaGen's
random-crop + flip augmentation (`FolderBatches`).
Images are returned as float32 [N, H, W, C] in [-1, 1]; grayscale is repeated to `channels`;
images smaller than `image_size` are padded with the background value (-1) evenly on each side.

Batches are a pure function of (seed, step): resuming at step s gives exactly the batches an
uninterrupted run would have seen (random horizontal flips included).
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
        if not path or not os.path.exists(path):
            raise ValueError(f"data.path {path!r} does not exist; point it at an .npz with an 'images' array")
        with np.load(path) as f:
            if "images" not in f.files:
                raise ValueError(f"data.path {path} has arrays {f.files}; it needs 'images' (uint8 [N, H, W(, C)])")
            x = f["images"]
    elif name in IN_MEMORY:
        from iar_jax.data import datasets

        x = datasets.load_dataset(name, split, path or None).images
    else:
        raise ValueError(f"data.name {name!r} is not an in-memory source; use {', '.join(IN_MEMORY)}, npz or "
                         "image_folder")
    if limit:
        x = x[:limit]
    return to_model_range(x, channels, image_size)


class ArrayBatches:
    """Deterministic shuffled batches over an in-memory array: `batch(step)` depends on (seed, step) only."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int = 0, flip: bool = True):
        if len(images) < batch_size:
            raise ValueError(f"dataset has {len(images)} images, fewer than batch_size={batch_size}; lower the batch size")
        self.images, self.batch_size, self.seed, self.flip = images, batch_size, seed, flip
        self.per_epoch = len(images) // batch_size
        self._perm_epoch, self._perm = -1, None

    def _indices(self, step: int):
        epoch, i = divmod(int(step), self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_images)
            self._perm_epoch = epoch
        return epoch, i, self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    @property
    def num_images(self) -> int:
        return len(self.images)

    def batch(self, step: int, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """Rows [lo, hi) of global batch `step` (a host loads only its own slice)."""
        epoch, i, idx = self._indices(step)
        hi = self.batch_size if hi is None else hi
        x = self.images[idx[lo:hi]]
        if self.flip:
            f = (np.random.default_rng((self.seed, epoch, i, 1)).random(self.batch_size) < 0.5)[lo:hi]
            x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
        return x


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


class FolderBatches(ArrayBatches):
    """Streams an image folder (ImageNet layout `root/<class>/*.JPEG` or flat), LlamaGen augmentation:
    random crop (`random_crop`) + horizontal flip; deterministic in (seed, step) like ArrayBatches."""

    EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

    def __init__(self, root: str, image_size: int, batch_size: int, seed: int = 0, flip: bool = True,
                 workers: int = 16, channels: int = 3):
        if not root or not os.path.isdir(root):
            raise ValueError(f"data.path {root!r} is not a folder of images; set --config.data.path")
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(self.EXTS))
        if len(self.files) < batch_size:
            raise ValueError(f"{root} has {len(self.files)} images, fewer than batch_size={batch_size}")
        self.image_size, self.batch_size, self.seed, self.flip = image_size, batch_size, seed, flip
        self.channels, self.workers = channels, workers
        self.per_epoch = len(self.files) // batch_size
        self._perm_epoch, self._perm = -1, None

    @property
    def num_images(self) -> int:
        return len(self.files)

    def _load(self, args):
        from iar_jax.data.datasets import decode_image

        path, key = args
        rng = np.random.default_rng(key)
        arr = random_crop(decode_image(path, "RGB" if self.channels == 3 else "L"), self.image_size, rng)
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return arr

    def batch(self, step: int, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        epoch, i, idx = self._indices(step)
        hi = self.batch_size if hi is None else hi
        jobs = [(self.files[j], (self.seed, epoch, int(j))) for j in idx[lo:hi]]
        with ThreadPoolExecutor(self.workers) as pool:
            arrs = list(pool.map(self._load, jobs))
        return to_model_range(np.stack(arrs), self.channels)


def load_image_files(directory: str, image_size: int, limit: Optional[int] = None, channels: int = 3) -> np.ndarray:
    """Images under `directory` (recursively; png/jpg/jpeg/bmp/webp, sorted) -> [N, S, S, C] in [-1, 1].

    Each image is centre-cropped to a square and resized (bicubic) to image_size.
    """
    from PIL import Image

    from iar_jax.data.datasets import decode_image

    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if f.lower().endswith(exts))
    if not files:
        raise ValueError(f"no images ({', '.join(exts)}) under {directory!r}; point --image_dir at a folder of images")
    files = files[:limit] if limit else files
    out = []
    for path in files:
        im = decode_image(path, "RGB" if channels == 3 else "L")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((image_size, image_size), Image.BICUBIC)
        out.append(np.asarray(im))
    return to_model_range(np.stack(out), channels)
