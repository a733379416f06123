"""Training input: deterministic per seed, epoch-complete, host-split, resumable (both loaders)."""
import functools
import json

import numpy as np
import pytest

from iar_jax.data import codes as codes_lib

# The numpy reader and the grain reader (with read-ahead threads) must obey the same semantics.
LOADERS = pytest.mark.parametrize("loader", [
    codes_lib.BatchIterator, functools.partial(codes_lib.GrainBatchIterator, num_threads=2, prefetch=3)],
    ids=["numpy", "grain"])


def _source(n=10, aug=1):
    shape = (n, aug, 4) if aug > 1 else (n, 4)
    codes = np.arange(np.prod(shape)).reshape(shape).astype(np.int32)
    return codes_lib.ArraySource({"codes": codes, "labels": np.arange(n).astype(np.int32)})


@LOADERS
def test_each_epoch_is_a_permutation_and_seed_fixes_order(loader):
    it = loader(_source(), global_batch=5, seed=3)
    labels = np.concatenate([next(it)["labels"] for _ in range(4)])
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:])  # a fresh order every epoch
    again = loader(_source(), global_batch=5, seed=3)
    np.testing.assert_array_equal(np.concatenate([next(again)["labels"] for _ in range(4)]), labels)
    other = loader(_source(), global_batch=5, seed=4)
    assert not np.array_equal(np.concatenate([next(other)["labels"] for _ in range(4)]), labels)


@LOADERS
def test_batches_cross_epoch_boundaries(loader):
    it = loader(_source(n=10), global_batch=4, seed=0)
    labels = np.concatenate([next(it)["labels"] for _ in range(5)])  # 20 = two epochs exactly
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))


@LOADERS
def test_hosts_split_the_global_batch_in_order(loader):
    whole = loader(_source(), global_batch=6, seed=1)
    parts = [loader(_source(), global_batch=6, seed=1, process_index=i, process_count=3) for i in range(3)]
    for _ in range(3):
        np.testing.assert_array_equal(np.concatenate([next(p)["labels"] for p in parts]), next(whole)["labels"])


@LOADERS
def test_resume_mid_epoch_from_saved_state(loader):
    it = loader(_source(), global_batch=3, seed=7)
    for _ in range(2):
        next(it)
    state = it.state()
    expected = [next(it)["codes"] for _ in range(3)]
    resumed = loader(_source(), global_batch=3, seed=7)
    resumed.restore(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["codes"], e)
    with pytest.raises(ValueError, match="seed=7 but this run has seed=8"):
        loader(_source(), global_batch=3, seed=8).restore(state)


@LOADERS
def test_one_augmented_view_per_image_per_epoch(loader):
    src = _source(n=6, aug=10)
    it = loader(src, global_batch=6, seed=0)
    views = []
    for _ in range(3):
        b = next(it)
        # The chosen row belongs to the labelled image: codes[n, a] = (n * 10 + a) * 4 + [0..3].
        n, a = (b["codes"][:, 0] // 4) // 10, (b["codes"][:, 0] // 4) % 10
        np.testing.assert_array_equal(n, b["labels"])
        views.append(dict(zip(b["labels"], a)))
    assert len({tuple(sorted(v.items())) for v in views}) > 1  # views change between epochs


def test_grain_and_numpy_loaders_agree_and_share_saved_positions():
    src = _source(n=7, aug=3)
    ref = codes_lib.BatchIterator(src, global_batch=4, seed=5)
    expected = [next(ref) for _ in range(9)]  # crosses four epoch boundaries
    it = codes_lib.GrainBatchIterator(src, global_batch=4, seed=5, num_threads=2, prefetch=4)
    for e in expected[:4]:
        b = next(it)
        assert sorted(b) == sorted(e)
        for k in e:
            np.testing.assert_array_equal(b[k], e[k])
    state = json.loads(json.dumps(it.state()))  # as checkpoints store it (JSON)
    assert state["step"] == 4  # batches handed out, not the ones read ahead
    for other in (codes_lib.BatchIterator(src, global_batch=4, seed=5),
                  codes_lib.GrainBatchIterator(src, global_batch=4, seed=5, num_threads=1)):
        other.restore(state)
        for e in expected[4:]:
            np.testing.assert_array_equal(next(other)["codes"], e["codes"])


def test_unknown_loader_is_a_config_error():
    import ml_collections

    from iar_jax import train_loop

    cfg = ml_collections.ConfigDict({"data": {"loader": "tf"}, "train": {"global_batch": 2, "seed": 0}})
    with pytest.raises(ValueError, match="unknown config.data.loader 'tf'; use grain or numpy"):
        train_loop.batch_iterator(cfg, _source())


def test_load_codes_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        codes_lib.load_codes(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "c.npz", codes=np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="no 'labels' array"):
        codes_lib.load_codes(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", codes=np.zeros((3, 4), np.int32), labels=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="different lengths"):
        codes_lib.load_codes(str(tmp_path / "d.npz"))
