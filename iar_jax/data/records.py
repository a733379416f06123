"""Random access over codes written by `iar-jax extract_codes` (layout: `iar_jax.data.extract`).

`open_source(path)` -> `RecordSource`, the source the training input (`iar_jax.data.codes.BatchIterator`)
draws from: `len(src)`, `src.num_aug`, `src.get(idx, aug)` -> {"codes": [B, T], "labels": [B]
(, "detail_codes": [B, T])} with view `aug[i]` of image `idx[i]` (all views [B, A, T] when aug is
None). It also satisfies grain's RandomAccessDataSource protocol (`src[i]`, `src.__getitems__`).
Codes are in the ORIGINAL codebook order; training applies the rearrangement's `mapping`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from iar_jax.data import extract


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, extract.METADATA)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} holds no extracted codes ({extract.METADATA} missing); run `iar-jax extract_codes` "
                         "with --out there first")
    with open(meta_path) as f:
        return json.load(f)


class RecordSource:
    def __init__(self, path: str):
        self.path, self.meta = path, read_metadata(path)
        m = self.meta
        shards = [extract.shard_path(path, m, s) for s in range(m["num_shards"])]
        missing = [os.path.basename(p) for p in shards if not os.path.exists(p)]
        if missing:
            raise ValueError(f"extraction in {path} is incomplete: {len(missing)} of {len(shards)} shards missing "
                             f"(e.g. {missing[0]}); rerun the same `iar-jax extract_codes` command to finish it")
        self.fields = extract.record_layout(m)
        self.n, self.per_shard = m["num_images"], m["records_per_shard"]
        if m["format"] == "array_record":
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._records = ArrayRecordDataSource(shards)
            if len(self._records) != self.n:
                raise ValueError(f"{path} has {len(self._records)} records but its metadata says {self.n}; "
                                 "re-extract into a fresh --out")
            self._dtype = np.dtype([(name, dt, shape) for name, dt, shape in self.fields])
        else:
            self._shards = [{name: np.load(os.path.join(p, f"{name}.npy"), mmap_mode="r") for name, _, _ in self.fields}
                            for p in shards]

    # -- metadata ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @property
    def num_aug(self) -> int:
        return self.meta["num_aug"]

    def check(self, fingerprint: Optional[str] = None, num_classes: Optional[int] = None,
              vocab: Optional[int] = None, grid: Optional[int] = None) -> "RecordSource":
        """One-line errors when the training config does not match what was extracted."""
        m = self.meta
        if fingerprint is not None and fingerprint != m["tokenizer_fingerprint"]:
            raise ValueError(f"codes in {self.path} were extracted with tokenizer {m['tokenizer_fingerprint']} but "
                             f"the config names tokenizer {fingerprint}; re-extract with that tokenizer or name the "
                             "one used")
        if num_classes is not None and m["num_classes"] > num_classes:
            raise ValueError(f"codes in {self.path} have labels in [0, {m['num_classes']}) but the model has "
                             f"{num_classes} classes; set model.num_classes to {m['num_classes']}")
        if vocab is not None and m["vocab"][0] != vocab:
            raise ValueError(f"codes in {self.path} come from a {m['vocab'][0]}-code codebook but model.vocab_size is "
                             f"{vocab}; set the vocab to match the tokenizer")
        if grid is not None and tuple(m["grid"]) != (grid, grid):
            raise ValueError(f"codes in {self.path} are on a {m['grid']} grid but model.grid_size is {grid}; "
                             "set grid_size to match the extraction's image_size")
        return self

    # -- access --------------------------------------------------------------------------------
    def _read(self, idx: np.ndarray) -> Dict[str, np.ndarray]:
        if self.meta["format"] == "array_record":
            raw = self._records.__getitems__([int(i) for i in idx])
            rec = np.frombuffer(b"".join(raw), self._dtype) if len(raw) else np.zeros(0, self._dtype)
            return {name: np.asarray(rec[name]) for name, _, _ in self.fields}
        out = {name: np.empty((len(idx),) + shape, dt) for name, dt, shape in self.fields}
        shard = idx // self.per_shard
        for s in np.unique(shard):
            sel = shard == s
            for name, _, _ in self.fields:
                out[name][sel] = self._shards[s][name][idx[sel] - s * self.per_shard]
        return out

    def get(self, idx, aug: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"record index out of range [0, {self.n})")
        out = self._read(idx)
        out["labels"] = out["labels"].astype(np.int32)
        for name in ("codes", "detail_codes"):
            if name in out:
                x = out[name].astype(np.int32)
                out[name] = x if aug is None else x[np.arange(len(idx)), np.asarray(aug)]
        return out

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.get([i]).items()}

    def __getitems__(self, indices):
        batch = self.get(indices)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]


def open_source(path: str, fingerprint: Optional[str] = None, num_classes: Optional[int] = None,
                vocab: Optional[int] = None, grid: Optional[int] = None) -> RecordSource:
    return RecordSource(path).check(fingerprint, num_classes, vocab, grid)
