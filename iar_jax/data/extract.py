"""Code extraction: every augmented view of every image through the tokenizer's ORIGINAL codebook.

Layout of an extraction directory (read back by `iar_jax.data.records`):
  metadata.json          grid, vocab, num_aug, token dtype, label range, tokenizer fingerprint, ...
  shard-00000.array_record | shard-00000/ (codes.npy, labels.npy[, detail_codes.npy])
Shard s holds images [s*R, min((s+1)*R, N)) in dataset order, R = `records_per_shard`; one record
per image: codes [num_aug, T] (IAR2: semantic and detail codes) and the label. Host h of P writes
shards s with s % P == h; within a host the batch is split over its devices by `encode_fn`.

Resumable: a shard is written under a temporary name and renamed when complete, so after a kill
the next run skips the finished shards and redoes only the interrupted one; no image is ever
duplicated or dropped. A rerun with different settings (tokenizer, crop, dataset) is refused.

`encode_fn(images) -> codes` takes float32 [B, S, S, 3] in [-1, 1] and returns int codes
[B, h, w], or a (semantic, detail) pair for IAR2; `make_encode_fn` builds it from a tokenizer.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from iar_jax.data import preprocess

METADATA = "metadata.json"
FORMATS = ("array_record", "npy")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    image_size: int = 256
    crop_range: float = 1.1
    ten_crop: bool = True  # 10 views (5 crops x flip) at crop_range; False: the image and its flip
    small: str = "pad"  # images smaller than the crop: "pad" (black border) or "resize" (ADM rule)
    batch_size: int = 16  # images per encode call (x num_aug views)
    records_per_shard: int = 1024
    num_workers: int = 8  # threads decoding and cropping images
    format: str = "auto"  # array_record (if installed) | npy

    @property
    def num_aug(self) -> int:
        return 10 if self.ten_crop else 2


def default_format() -> str:
    try:
        from array_record.python import array_record_module  # noqa: F401

        return "array_record"
    except ImportError:
        return "npy"


def tokenizer_fingerprint(params) -> str:
    """Hash of the tokenizer weights, blind to the row order of the quantizer codebooks.

    The rearranged tokenizer written by `iar-jax rearrange` therefore has the fingerprint of its
    original: training may name either, while codes from any other tokenizer are refused.
    """
    import jax

    h = hashlib.sha256()
    leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key in sorted(leaves):
        a = np.ascontiguousarray(np.asarray(leaves[key], np.float32))
        if "quantize" in key and a.ndim == 2:
            a = a[np.lexsort(a.T[::-1])]
        h.update(f"{key}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def refuse_rearranged(tokenizer_path: str) -> None:
    """Codes must come from the ORIGINAL codebook (training maps them, SPEC §3): refuse the
    tokenizer that `iar-jax rearrange` writes to <dir>/tokenizer next to <dir>/rearrangement.json."""
    path = os.path.abspath(tokenizer_path.rstrip("/"))
    marker = os.path.join(os.path.dirname(path), "rearrangement.json")
    if os.path.basename(path) == "tokenizer" and os.path.exists(marker):
        raise ValueError(f"{tokenizer_path} is a rearranged tokenizer (written by `iar-jax rearrange`); extract codes "
                         "with the original tokenizer and train with "
                         "--config.loss.mapping_file=<rearrange dir>/mapping.npy")


def make_encode_fn(tokenizer_config, params, mode: Optional[str] = None) -> Callable:
    """Jitted tokenizer encode, batch split over this host's devices (padded to a multiple)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from iar_jax.tokenizer import VQModel, build_model

    model = build_model(tokenizer_config)
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, repl)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, mode, method=VQModel.encode),
                 in_shardings=(repl, batch_sh), out_shardings=batch_sh)

    def encode(images):
        n = len(images)
        pad = -n % len(devices)
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
        out = jax.device_get(fn(params, jax.device_put(np.asarray(images, np.float32), batch_sh)))
        return tuple(np.asarray(c)[:n] for c in out) if isinstance(out, (tuple, list)) else np.asarray(out)[:n]

    return encode


def build_metadata(dataset, cfg: ExtractConfig, grid: Sequence[int], vocab: Sequence[int], fingerprint: str,
                   dataset_name: str = "") -> Dict[str, Any]:
    fmt = default_format() if cfg.format == "auto" else cfg.format
    if fmt not in FORMATS:
        raise ValueError(f"format {cfg.format!r} is unknown; use auto, array_record or npy")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {dataset_name or getattr(dataset, 'name', '')!r} has no images; "
                         "point it at a non-empty source")
    vocab = [int(v) for v in vocab]
    return {
        "version": 1, "format": fmt, "num_images": n, "num_aug": cfg.num_aug, "grid": [int(g) for g in grid],
        "tokens": int(np.prod(grid)), "vocab": vocab, "dual": len(vocab) == 2,
        "dtype": "int16" if max(vocab) <= np.iinfo(np.int16).max + 1 else "int32",
        "num_classes": int(dataset.num_classes), "tokenizer_fingerprint": fingerprint,
        "codebook": "original", "dataset": dataset_name or getattr(dataset, "name", ""),
        "image_size": cfg.image_size, "crop_range": cfg.crop_range, "ten_crop": cfg.ten_crop, "small": cfg.small,
        "records_per_shard": cfg.records_per_shard, "num_shards": -(-n // cfg.records_per_shard),
    }


def shard_path(out_dir: str, meta: Dict[str, Any], s: int) -> str:
    return os.path.join(out_dir, f"shard-{s:05d}" + (".array_record" if meta["format"] == "array_record" else ""))


def record_layout(meta: Dict[str, Any]):
    """(field, dtype, shape) of one record, in byte order."""
    dt = np.dtype(meta["dtype"]).newbyteorder("<")
    shape = (meta["num_aug"], meta["tokens"])
    fields = [("codes", dt, shape)] + ([("detail_codes", dt, shape)] if meta["dual"] else [])
    return fields + [("labels", np.dtype("<i4"), ())]


def _write_metadata(out_dir: str, meta: Dict[str, Any]) -> None:
    path = os.path.join(out_dir, METADATA)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            raise ValueError(f"{out_dir} already holds an extraction with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} vs {[meta.get(k) for k in diff]}); "
                             "resume with the same tokenizer/dataset/flags or use a fresh --out")
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _check_codes(codes, n_views: int, grid, vocab, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != (n_views, *grid):
        raise ValueError(f"encode_fn returned {what} codes of shape {codes.shape}, expected {(n_views, *grid)}; "
                         "the tokenizer's grid does not match image_size")
    if codes.size and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"encode_fn returned {what} codes outside [0, {vocab}); the tokenizer's vocab is not {vocab}")
    return codes.reshape(n_views, -1)


def _batches(dataset, indices, cfg: ExtractConfig, pool):
    """(views uint8 [B, A, S, S, 3], labels [B]) per batch; images are prepared one per thread,
    up to two batches ahead of the encoder."""

    def load(i):
        image, label = dataset[int(i)]
        return preprocess.augmented_views(image, cfg.image_size, cfg.crop_range, cfg.ten_crop, cfg.small), label

    ahead = collections.deque(pool.submit(load, i) for i in indices[:2 * cfg.batch_size])
    nxt = len(ahead)
    while ahead:
        items = [ahead.popleft().result() for _ in range(min(cfg.batch_size, len(ahead)))]
        ahead.extend(pool.submit(load, i) for i in indices[nxt:nxt + len(items)])
        nxt += len(items)
        yield np.stack([v for v, _ in items]), np.array([lab for _, lab in items], np.int64)


def _encode_shard(dataset, lo: int, hi: int, encode_fn, meta, cfg: ExtractConfig, pool, progress):
    grid, a = tuple(meta["grid"]), meta["num_aug"]
    out = {name: [] for name, _, _ in record_layout(meta)}
    for views, labels in _batches(dataset, np.arange(lo, hi), cfg, pool):
        if labels.size and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
            bad = labels[(labels < 0) | (labels >= meta["num_classes"])][0]
            raise ValueError(f"label {bad} in images [{lo}, {hi}) is outside the class range "
                             f"[0, {meta['num_classes']}); fix the dataset's labels or its num_classes")
        b = len(labels)
        if b < cfg.batch_size:  # one batch shape for the whole run: a jitted encoder compiles once
            views = np.concatenate([views, np.repeat(views[-1:], cfg.batch_size - b, 0)])
        codes = encode_fn(preprocess.to_model_range(views.reshape(-1, *views.shape[2:])))
        codes = tuple(c[:b * a] for c in codes) if isinstance(codes, (tuple, list)) else codes[:b * a]
        pair = codes if meta["dual"] else (codes,)
        if meta["dual"] != isinstance(codes, (tuple, list)):
            raise ValueError("encode_fn returned " + ("one code array" if meta["dual"] else "a pair of code arrays")
                             + f" but the metadata says dual={meta['dual']}; pass the vocab of every codebook")
        for name, c, v in zip(("codes", "detail_codes"), pair, meta["vocab"]):
            out[name].append(_check_codes(c, b * a, grid, v, name).reshape(b, a, -1))
        out["labels"].append(labels)
        if progress is not None:
            progress.update(b)
    return {name: np.concatenate(out[name]).astype(dt) for name, dt, _ in record_layout(meta)}


def _write_shard(path: str, arrays: Dict[str, np.ndarray], meta) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    if meta["format"] == "array_record":
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(tmp, "group_size:1")
        fields = record_layout(meta)
        for i in range(len(arrays["labels"])):
            writer.write(b"".join(np.ascontiguousarray(arrays[name][i]).tobytes() for name, _, _ in fields))
        writer.close()
    else:
        os.makedirs(tmp)
        for name, a in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), a)
    os.replace(tmp, path)


def extract(dataset, encode_fn: Callable, out_dir: str, cfg: ExtractConfig, *, grid: Sequence[int],
            vocab: Sequence[int], fingerprint: str, dataset_name: str = "", process_index: Optional[int] = None,
            process_count: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Encodes this host's missing shards; returns the metadata. Safe to rerun after a kill."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    meta = build_metadata(dataset, cfg, grid, vocab, fingerprint, dataset_name)
    os.makedirs(out_dir, exist_ok=True)
    _write_metadata(out_dir, meta)
    r, n = cfg.records_per_shard, meta["num_images"]
    mine = [s for s in range(meta["num_shards"]) if s % process_count == process_index]
    for name in os.listdir(out_dir):  # this host's leftovers of a killed run (others may be writing theirs)
        if name.startswith("shard-") and ".tmp-" in name and int(name[6:11]) % process_count == process_index:
            p = os.path.join(out_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    todo = [s for s in mine if not os.path.exists(shard_path(out_dir, meta, s))]
    size = lambda s: min((s + 1) * r, n) - s * r  # noqa: E731
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(size(s) for s in mine), initial=sum(size(s) for s in mine if s not in todo),
                   unit="img", desc=f"extract codes (host {process_index})")
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_workers)) as pool:
            for s in todo:
                arrays = _encode_shard(dataset, s * r, s * r + size(s), encode_fn, meta, cfg, pool, bar)
                _write_shard(shard_path(out_dir, meta, s), arrays, meta)
    finally:  # also on errors, so that an error message starts on its own line
        if bar is not None:
            bar.close()
    return meta
