"""Mapping files: mapping.npy and the official IAR .pt tensor (a view at a storage offset)."""
import sys

import numpy as np
import pytest

from iar_jax.models.iar import load_mapping

VOCAB = 16384


def _official_pt(path, perm):
    """As sjtuplayer/IAR's mapping-kmeans+nearest-cluster_size=128.pt: an int64 tensor viewing the
    second half of a 32768-long storage (the first half holds the identity)."""
    torch = pytest.importorskip("torch")
    storage = torch.cat([torch.arange(VOCAB), torch.from_numpy(perm)])
    view = storage[VOCAB:]
    assert view.storage_offset() == 16384 and view.untyped_storage().nbytes() == 32768 * 8
    torch.save(view, path)


def test_official_pt_mapping_with_storage_offset(tmp_path):
    perm = np.random.default_rng(0).permutation(VOCAB)
    _official_pt(tmp_path / "mapping.pt", perm)
    got = load_mapping(str(tmp_path / "mapping.pt"), VOCAB)
    np.testing.assert_array_equal(got, perm)  # not the identity of the storage's first half
    assert got.dtype == np.int32
    np.save(tmp_path / "mapping.npy", perm)
    np.testing.assert_array_equal(load_mapping(str(tmp_path / "mapping.npy"), VOCAB), perm)


def test_pt_mapping_is_checked_and_needs_torch(tmp_path, monkeypatch):
    bad = np.arange(VOCAB)
    bad[5] = 6
    _official_pt(tmp_path / "bad.pt", bad)
    with pytest.raises(ValueError, match="not a permutation"):
        load_mapping(str(tmp_path / "bad.pt"), VOCAB)
    with pytest.raises(ValueError, match=r"shape \(16384,\), expected \(256,\)"):
        load_mapping(str(tmp_path / "bad.pt"), 256)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ValueError, match=r'needs torch: pip install -e "\.\[torch\]"'):
        load_mapping(str(tmp_path / "bad.pt"), VOCAB)
    np.savez(tmp_path / "m.npz", np.arange(VOCAB))
    with pytest.raises(ValueError, match="is an .npz archive"):
        load_mapping(str(tmp_path / "m.npz"), VOCAB)
    with pytest.raises(ValueError, match="does not exist"):
        load_mapping(str(tmp_path / "none.npy"), VOCAB)
