"""Metric tests against closed forms and brute-force references (no network, no weights)."""
import numpy as np
import pytest

from iar_jax.evaluation import metrics


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_two_gaussians_closed_form_commuting():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_fid_two_gaussians_closed_form_general():
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), computed by eigendecomposition only.
    rng = np.random.default_rng(1)
    d = 6
    s1, s2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_fid_of_sampled_gaussians_approaches_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu2 = np.array([1.0, 0, 0, 0])
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) * 2.0 + mu2
    want = 1.0 + d * (1 - 2) ** 2  # |mu|^2 + sum (1 - 2)^2
    assert metrics.fid_from_features(x, y) == pytest.approx(want, abs=0.05)


def test_fid_identical_sets_is_zero():
    x = np.random.default_rng(3).normal(size=(500, 16))
    assert abs(metrics.fid_from_features(x, x)) < 1e-6


def test_fid_singular_product_uses_eps_fallback():
    # Rank-deficient covariances (fewer samples than dims) still give a finite, ~0 self-distance.
    x = np.random.default_rng(4).normal(size=(5, 12))
    s = metrics.GaussianStats.from_features(x)
    with np.errstate(all="ignore"):
        v = metrics.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    assert np.isfinite(v) and abs(v) < 1e-3


def test_fid_size_mismatch_is_one_line_error():
    with pytest.raises(ValueError, match="same network"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_known_cases():
    k = 10
    same = np.zeros((50, k))
    same[:, 3] = 1
    assert metrics.inception_score(same) == pytest.approx(1.0)
    uniform = np.eye(k)[np.arange(50) % k]  # one-hot, each class equally often
    assert metrics.inception_score(uniform) == pytest.approx(float(k))
    # Mixed case by hand: half the samples one-hot on class 0, half uniform over 2 classes.
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    py = p.mean(0)
    kl = (np.log(1 / py[0]) + (0.5 * np.log(0.5 / py[0]) + 0.5 * np.log(0.5 / py[1]))) / 2
    assert metrics.inception_score(p) == pytest.approx(np.exp(kl))


def test_inception_score_splits_average():
    k = 4
    a = np.eye(k)[np.arange(8) % k]  # IS = 4
    b = np.tile(np.eye(k)[:1], (8, 1))  # IS = 1
    assert metrics.inception_score(np.concatenate([a, b]), split_size=8) == pytest.approx(2.5)
    assert metrics.inception_score(np.concatenate([a, b]), num_splits=2) == pytest.approx(2.5)


def _brute_pr(ref, smp, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((smp[:, None] - ref[None]) ** 2).sum(-1)
    prec = np.mean(np.any(d <= radii(ref)[None], axis=1))
    rec = np.mean(np.any(d.T <= radii(smp)[None], axis=1))
    return prec, rec


def test_precision_recall_known_answers():
    # References on a unit grid; their 3rd-NN squared radius is 1. Samples: 2 on the grid, 2 far away.
    ref = np.array([[i, j] for i in range(4) for j in range(4)], np.float32)
    smp = np.array([[0, 0], [1.5, 1.5], [10, 10], [20, 20]], np.float32)
    p, r = metrics.precision_recall(ref, smp, k=3)
    assert p == pytest.approx(0.5)
    # Sample radii: [0,0]->[1.5,1.5] is 4.5, 3rd NN of [0,0] is [10,10] at 200: refs all within.
    assert r == pytest.approx(1.0)
    p2, r2 = metrics.precision_recall(ref, ref, k=3)
    assert (p2, r2) == (1.0, 1.0)


def test_precision_recall_matches_brute_force_with_blocks():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(37, 8)).astype(np.float32)
    smp = (rng.normal(size=(29, 8)) * 1.3 + 0.4).astype(np.float32)
    got = metrics.precision_recall(ref, smp, k=3, block=10)  # several row/col blocks + ragged tails
    assert got == pytest.approx(_brute_pr(ref, smp, 3))


def test_manifold_radii_count_self_and_duplicates():
    x = np.array([[0.0], [0.0], [1.0], [3.0], [7.0]], np.float32)
    # k=1: nearest other point (self at 0 is index 0); the duplicate gives 0.
    np.testing.assert_allclose(metrics.manifold_radii(x, k=1), [0, 0, 1, 4, 16])


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(400, 8))
    kid_same, _ = metrics.kernel_inception_distance(a, b, num_subsets=10, subset_size=200)
    kid_shift, _ = metrics.kernel_inception_distance(a, b + 1.0, num_subsets=10, subset_size=200)
    assert abs(kid_same) < 0.02 < kid_shift


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    m = 6
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    want = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    got, _ = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=6)
    assert got == pytest.approx(want)


def test_all_metrics_reports_unavailable_is_and_pr():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 4))
    st = metrics.GaussianStats.from_features(x)
    side = {"pool": None, "logits": None, "stats": st, "spatial_stats": None}
    r = metrics.all_metrics(side, dict(side))
    assert abs(r["fid"]) < 1e-9 and r["inception_score"] is None and r["precision"] is None
    assert "IS unavailable" in r["notes"]["inception_score"] and "sfid" in r["notes"]
    with_logits = dict(side, pool=x, logits=rng.normal(size=(50, 7)))
    r = metrics.all_metrics(with_logits, dict(side, pool=x), kid=True)
    assert r["precision"] == r["recall"] == 1.0 and 1 < r["inception_score"] < 7 and "kid" in r
