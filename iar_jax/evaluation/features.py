"""Batched, data-parallel feature extraction and ADM-style npz batches.

Sample / reference batches are ADM npz files: `arr_0` = uint8 NHWC images (optionally `arr_1` = class
labels), and reference files may carry precomputed `mu, sigma` (pool_3) and `mu_s, sigma_s` (spatial)
statistics. Images are streamed from the zip member, so a 50 000 x 256 x 256 x 3 file is never loaded
whole. Each batch is padded to a fixed size (one compilation), split over all local devices along the
batch axis, and the padding rows are dropped afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import zipfile
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@contextlib.contextmanager
def _open_member(path: str, key: str):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e}); save batches with np.savez(path, arr_0=images)") from e
    with zf:
        if f"{key}.npy" not in zf.namelist():
            raise ValueError(f"{path} has no array {key!r} (has {sorted(n[:-4] for n in zf.namelist())}); "
                             "ADM batches store images as arr_0")
        with zf.open(f"{key}.npy") as f:
            yield f


def npz_keys(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e}); pass an npz written by np.savez") from e


def _read_header(f, where: str):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"{where}: unsupported .npy format version {version}; re-save with np.savez")


def npz_array_shape(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    with _open_member(path, key) as f:
        shape, _, dtype = _read_header(f, f"{path}:{key}")
    return tuple(shape), dtype


def iter_npz_batches(path: str, key: str = "arr_0", batch_size: int = 250,
                     limit: int | None = None) -> Iterator[np.ndarray]:
    """Stream `key` of an npz in batches along axis 0 (works for np.savez and np.savez_compressed)."""
    with _open_member(path, key) as f:
        shape, fortran, dtype = _read_header(f, f"{path}:{key}")
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key} is Fortran-ordered or has objects; save a C-ordered numeric array")
        n = shape[0] if limit is None else min(shape[0], limit)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            buf = f.read(m * row)
            if len(buf) != m * row:
                raise ValueError(f"{path}:{key} is truncated at row {start}")
            yield np.frombuffer(buf, dtype).reshape((m, *shape[1:]))


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), ("data",))


class FeatureExtractor:
    """Run `fn(params, images) -> dict of (N, ...) arrays` over batches, data-parallel over devices."""

    def __init__(self, fn: Callable, params, batch_size: int = 200, mesh: Mesh | None = None):
        self.mesh = mesh or data_mesh()
        n_dev = self.mesh.devices.size
        self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)  # a multiple of the device count
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self._in = NamedSharding(self.mesh, P("data"))
        self._fn = jax.jit(fn, in_shardings=(NamedSharding(self.mesh, P()), self._in))

    def __call__(self, batches: Iterable[np.ndarray], total: int | None = None,
                 desc: str = "features", progress: bool = True) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        outs: dict[str, list[np.ndarray]] = {}
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
        for batch in _rebatch(batches, self.batch_size):
            n = len(batch)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            res = self._fn(self.params, jax.device_put(batch, self._in))
            for k, v in res.items():
                outs.setdefault(k, []).append(np.asarray(v)[:n])
            bar.update(n)
        bar.close()
        if not outs:
            raise ValueError("no images to extract features from (empty batch file?)")
        return {k: np.concatenate(v) for k, v in outs.items()}


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    buf: list[np.ndarray] = []
    have = 0
    for b in batches:
        buf.append(np.asarray(b))
        have += len(b)
        while have >= size:
            cat = np.concatenate(buf)
            yield cat[:size]
            buf, have = [cat[size:]], have - size
    if have:
        yield np.concatenate(buf)


@functools.lru_cache(maxsize=None)
def inception_feature_fn(with_logits: bool, dtype=jnp.float32, channel_divisor: int = 1) -> Callable:
    """params, uint8 NHWC -> {'pool', 'spatial'[, 'logits']} for the FID Inception.

    Cached, so every FeatureExtractor of one configuration shares one compilation.
    """
    from iar_jax.evaluation.inception import InceptionV3
    from iar_jax.evaluation.preprocess import preprocess_images

    net = InceptionV3(with_logits=with_logits, channel_divisor=channel_divisor, dtype=dtype)

    def fn(params, images):
        out = net.apply({"params": params}, preprocess_images(images))
        res = {"pool": out["pool_3"], "spatial": out["spatial"]}
        if with_logits:
            res["logits"] = out["logits"]
        return res

    return fn
