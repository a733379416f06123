"""Training input: token codes + labels, deterministic per seed, resumable from a saved position.

The global batch of step s is the slice [s·G, (s+1)·G) of an endless stream in which every epoch
is a fresh seeded permutation of the N examples; process h of P reads rows [h·G/P, (h+1)·G/P) of
it. The stream depends only on (seed, N, G), so a run resumed from `state()` — or run on another
number of hosts — sees exactly the same batches. Sources with several augmented views per image
(`codes` of shape [N, A, T]) get one seeded view per image per epoch.

Two readers of that stream give identical batches and interchangeable `state()`s:
`GrainBatchIterator` (the trainer's default, `config.data.loader="grain"`) makes step s element s
of a `grain.MapDataset`, so grain's read threads prefetch whole host batches; `BatchIterator`
(`"numpy"`) reads them in the calling thread.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Mapping, Optional

import numpy as np


class ArraySource:
    """Random access over in-memory arrays that share their first dimension (codes, labels, ...)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        n = {k: len(v) for k, v in arrays.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"codes arrays have different lengths {n}; every array needs one row per image")
        self.arrays = dict(arrays)

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    @property
    def num_aug(self) -> int:
        c = self.arrays["codes"]
        return c.shape[1] if c.ndim == 3 else 1

    def get(self, idx: np.ndarray, aug: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        out = {}
        for k, v in self.arrays.items():
            x = v[idx]
            if aug is not None and x.ndim == 3 and k != "labels":
                x = x[np.arange(len(idx)), aug]
            out[k] = x
        return out


def load_codes(path: str) -> ArraySource:
    """`.npz` with `codes` [N, T] (or [N, A, T]), `labels` [N] (+ `detail_codes` for IAR2), or a
    directory holding `codes.npy` / `labels.npy` (/ `detail_codes.npy`)."""
    if os.path.isdir(path):
        files = {f[:-4]: os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npy")}
        arrays = {k: np.load(f, mmap_mode="r") for k, f in files.items()}
    elif os.path.isfile(path):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"codes path {path!r} does not exist; set --config.data.path to a .npz or a directory of .npy files")
    for need in ("codes", "labels"):
        if need not in arrays:
            raise ValueError(f"codes file {path} has no {need!r} array (found {sorted(arrays)}); "
                             "write codes with `iar-jax extract_codes`")
    arrays = {k: v for k, v in arrays.items() if k in ("codes", "labels", "detail_codes")}
    return ArraySource(arrays)


def synthetic_source(spec: Mapping[str, tuple], size: int, seed: int, vocab: int, num_classes: int,
                     detail_vocab: Optional[int] = None) -> ArraySource:
    """Random codes and labels with the shapes of `spec` (tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for k, (shape, dtype) in spec.items():
        hi = num_classes if k == "labels" else (detail_vocab if k == "detail_codes" else vocab)
        arrays[k] = rng.integers(0, hi, size=(size,) + tuple(shape)).astype(dtype)
    return ArraySource(arrays)


class BatchIterator:
    """Host-local batches of a deterministic global stream; `state()` / `restore()` for checkpoints."""

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                 step: int = 0):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.source, self.global_batch, self.seed = source, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.step = step
        self._perm_cache: Dict[int, tuple] = {}
        self._lock = threading.Lock()

    def _epoch(self, e: int):
        with self._lock:  # grain's read threads build batches concurrently
            if e not in self._perm_cache:
                if len(self._perm_cache) > 2:
                    self._perm_cache.pop(min(self._perm_cache))
                n = len(self.source)
                rng = np.random.default_rng([self.seed, e])
                perm = rng.permutation(n)
                aug = rng.integers(0, self.source.num_aug, size=n) if self.source.num_aug > 1 else None
                self._perm_cache[e] = (perm, aug)
            return self._perm_cache[e]

    def indices(self, step: int):
        n = len(self.source)
        pos = step * self.global_batch + self.offset + np.arange(self.local)
        epochs, within = pos // n, pos % n
        idx = np.empty(self.local, np.int64)
        aug = np.zeros(self.local, np.int64) if self.source.num_aug > 1 else None
        for e in np.unique(epochs):
            perm, a = self._epoch(int(e))
            sel = epochs == e
            idx[sel] = perm[within[sel]]
            if aug is not None:
                aug[sel] = a[idx[sel]]
        return idx, aug

    def __iter__(self):
        return self

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        """This host's rows of global batch `step` (a pure function of the step)."""
        idx, aug = self.indices(step)
        order = np.argsort(idx, kind="stable")  # sorted reads are friendlier to mmap/record files
        batch = self.source.get(idx[order], None if aug is None else aug[order])
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return {k: np.ascontiguousarray(v[inv]) for k, v in batch.items()}

    def __next__(self) -> Dict[str, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def seek(self, step: int) -> None:
        self.step = step

    def state(self) -> Dict[str, int]:
        return {"step": int(self.step), "seed": int(self.seed), "global_batch": int(self.global_batch),
                "size": int(len(self.source))}

    def restore(self, state: Mapping[str, int]) -> None:
        mine = self.state()
        for k in ("seed", "global_batch", "size"):
            if k in state and int(state[k]) != mine[k]:
                raise ValueError(f"saved data position has {k}={state[k]} but this run has {k}={mine[k]}; "
                                 "resume with the same data and config, or use a fresh --workdir")
        self.seek(int(state["step"]))


class GrainBatchIterator(BatchIterator):
    """`BatchIterator`'s stream read through grain: `grain.MapDataset` element s is this host's
    batch of step s, and `num_threads` > 0 read threads prefetch up to `prefetch` batches ahead
    (0: read on demand in the calling thread). The position is the number of batches handed out,
    not read ahead, so `state()` / `restore()` are exactly BatchIterator's."""

    _MAX_STEPS = 2 ** 62  # the stream is endless; grain datasets need a length

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                 step: int = 0, num_threads: int = 0, prefetch: int = 4):
        import grain

        super().__init__(source, global_batch, seed, process_index, process_count)
        self._dataset = grain.MapDataset.range(0, self._MAX_STEPS).map(self.batch)
        self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch if num_threads else 0)
        self.seek(step)

    def seek(self, step: int) -> None:
        self.step = step
        self._iter = iter(self._dataset[step:].to_iter_dataset(self._options))

    def __next__(self) -> Dict[str, np.ndarray]:
        out = next(self._iter)
        self.step += 1
        return out
