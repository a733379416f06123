"""Training input: deterministic per seed, epoch-complete, host-split, resumable."""
import numpy as np
import pytest

from iar_jax.data import codes as codes_lib


def _source(n=10, aug=1):
    shape = (n, aug, 4) if aug > 1 else (n, 4)
    codes = np.arange(np.prod(shape)).reshape(shape).astype(np.int32)
    return codes_lib.ArraySource({"codes": codes, "labels": np.arange(n).astype(np.int32)})


def test_each_epoch_is_a_permutation_and_seed_fixes_order():
    it = codes_lib.BatchIterator(_source(), global_batch=5, seed=3)
    labels = np.concatenate([next(it)["labels"] for _ in range(4)])
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:])  # a fresh order every epoch
    again = codes_lib.BatchIterator(_source(), global_batch=5, seed=3)
    np.testing.assert_array_equal(np.concatenate([next(again)["labels"] for _ in range(4)]), labels)
    other = codes_lib.BatchIterator(_source(), global_batch=5, seed=4)
    assert not np.array_equal(np.concatenate([next(other)["labels"] for _ in range(4)]), labels)


def test_batches_cross_epoch_boundaries():
    it = codes_lib.BatchIterator(_source(n=10), global_batch=4, seed=0)
    labels = np.concatenate([next(it)["labels"] for _ in range(5)])  # 20 = two epochs exactly
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))


def test_hosts_split_the_global_batch_in_order():
    whole = codes_lib.BatchIterator(_source(), global_batch=6, seed=1)
    parts = [codes_lib.BatchIterator(_source(), global_batch=6, seed=1, process_index=i, process_count=3) for i in range(3)]
    for _ in range(3):
        np.testing.assert_array_equal(np.concatenate([next(p)["labels"] for p in parts]), next(whole)["labels"])


def test_resume_mid_epoch_from_saved_state():
    it = codes_lib.BatchIterator(_source(), global_batch=3, seed=7)
    for _ in range(2):
        next(it)
    state = it.state()
    expected = [next(it)["codes"] for _ in range(3)]
    resumed = codes_lib.BatchIterator(_source(), global_batch=3, seed=7)
    resumed.restore(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["codes"], e)
    with pytest.raises(ValueError, match="seed=7 but this run has seed=8"):
        codes_lib.BatchIterator(_source(), global_batch=3, seed=8).restore(state)


def test_one_augmented_view_per_image_per_epoch():
    src = _source(n=6, aug=10)
    it = codes_lib.BatchIterator(src, global_batch=6, seed=0)
    views = []
    for _ in range(3):
        b = next(it)
        # The chosen row belongs to the labelled image: codes[n, a] = (n * 10 + a) * 4 + [0..3].
        n, a = (b["codes"][:, 0] // 4) // 10, (b["codes"][:, 0] // 4) % 10
        np.testing.assert_array_equal(n, b["labels"])
        views.append(dict(zip(b["labels"], a)))
    assert len({tuple(sorted(v.items())) for v in views}) > 1  # views change between epochs


def test_load_codes_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        codes_lib.load_codes(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "c.npz", codes=np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="no 'labels' array"):
        codes_lib.load_codes(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", codes=np.zeros((3, 4), np.int32), labels=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="different lengths"):
        codes_lib.load_codes(str(tmp_path / "d.npz"))
