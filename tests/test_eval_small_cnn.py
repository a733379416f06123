"""Small Fashion-MNIST CNN: the shipped weights, seeded training (its idx files are read by data.datasets)."""
import os

import numpy as np
import pytest

from iar_jax.evaluation import metrics, small_cnn


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        small_cnn.load_fashion_mnist("validation")


@pytest.fixture(scope="module")
def test_split():
    return small_cnn.load_fashion_mnist("test")


def test_shipped_weights_accuracy_and_fid(test_split):
    assert os.path.getsize(small_cnn.WEIGHTS_FILE) < 1 << 20
    x, y = test_split
    params = small_cnn.load_params()
    assert small_cnn.accuracy(params, x[:2000], y[:2000]) >= 0.87
    real = small_cnn.predict(params, x[:2000])["features"]
    noise = np.random.default_rng(0).integers(0, 256, (2000, 28, 28, 1), dtype=np.uint8)
    assert metrics.fid_from_features(small_cnn.predict(params, noise)["features"], real) > 100


def test_training_is_seeded(test_split):
    x, y = test_split[0][:512], test_split[1][:512]
    a = small_cnn.train(x, y, seed=3, epochs=1)
    b = small_cnn.train(x, y, seed=3, epochs=1)
    leaves = lambda t: [np.asarray(v) for v in __import__("jax").tree_util.tree_leaves(t)]  # noqa: E731
    assert all(np.array_equal(u, v) for u, v in zip(leaves(a), leaves(b)))
    init = small_cnn.SmallCNN().init(__import__("jax").random.key(3), np.zeros((1, 28, 28, 1)))["params"]
    assert not all(np.array_equal(u, v) for u, v in zip(leaves(a), leaves(init)))  # it did train


def test_wrong_weights_file(tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, **{"conv0/kernel": np.zeros((3, 3, 1, 8), np.float32)})
    with pytest.raises(ValueError, match="SmallCNN"):
        small_cnn.load_params(str(p))
