import numpy as np
import pytest

from iar_jax import cluster_loss


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cluster_ce_matches_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 64)).astype(np.float32) * 3
    targets = rng.integers(0, 64, size=(3, 5))
    m = 8
    p = np.exp(_log_softmax(logits.astype(np.float64)))
    expected = np.mean([-np.log(p[b, t, (targets[b, t] // m) * m:(targets[b, t] // m + 1) * m].sum())
                        for b in range(3) for t in range(5)])
    got = float(cluster_loss.cluster_ce(logits, targets, m))
    assert got == pytest.approx(expected, rel=1e-5)


def test_cluster_size_one_is_token_ce():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 32)).astype(np.float32)
    targets = rng.integers(0, 32, size=(4,))
    expected = -np.mean(_log_softmax(logits.astype(np.float64))[np.arange(4), targets])
    assert float(cluster_loss.token_ce(logits, targets)) == pytest.approx(expected, rel=1e-6)
    assert float(cluster_loss.cluster_ce(logits, targets, 1)) == pytest.approx(expected, rel=1e-6)


def test_iar_loss_is_weighted_sum_and_accuracies():
    logits = np.full((1, 2, 4), -10.0, np.float32)
    logits[0, 0, 1] = 10.0  # predicts token 1 (cluster 0); target 0 -> token wrong, cluster right
    logits[0, 1, 3] = 10.0  # predicts 3, target 3 -> both right
    targets = np.array([[0, 3]])
    loss, m = cluster_loss.iar_loss(logits, targets, cluster_size=2, cluster_weight=0.5)
    assert float(m["token_acc"]) == 0.5 and float(m["cluster_acc"]) == 1.0
    assert float(loss) == pytest.approx(float(m["token_ce"]) + 0.5 * float(m["cluster_ce"]), rel=1e-6)


def test_vocab_not_divisible_by_cluster_size():
    with pytest.raises(ValueError, match="not divisible by cluster_size"):
        cluster_loss.cluster_logits(np.zeros((2, 10), np.float32), 3)
