"""Sample-quality metrics with the ADM evaluator's conventions (guided-diffusion evaluations/evaluator.py).

* FID / sFID: Frechet distance of Gaussian fits; float64 `scipy.linalg.sqrtm` of sigma1 @ sigma2,
  retried with eps * I added to both covariances when the root is not finite, and the real part taken
  when the imaginary residue on the diagonal is <= 1e-3 (else an error), as ADM / TTUR do. Means are
  float64 here (ADM's np.mean of float32 activations stays float32: a ~1e-6 relative difference).
* IS: exp(E_x KL(p(y|x) || p(y))) over consecutive splits of `split_size` samples (ADM: 5000, i.e. 10
  splits for 50 000 samples), averaged over splits; 0 * log 0 counts as 0.
* Precision / recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator): squared Euclidean distances;
  each point's radius is the distance to its k-th nearest neighbour (k = 3) within its own set, the
  point itself counted at distance 0 (so duplicates count as neighbours, like np.partition in ADM);
  precision = fraction of samples inside some reference ball (d <= radius), recall = the converse.
  Distances here are float32 (ADM tries float16 first and falls back to float32 on overflow); set
  `distance_dtype=jnp.float16` to mimic that.
* KID (optional): unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 over random subsets.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


@dataclasses.dataclass
class GaussianStats:
    """Mean and covariance of a feature set (ADM's FIDStatistics)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features) -> "GaussianStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need a (N >= 2, D) feature array for mean/covariance, got shape {x.shape}")
        return cls(x.mean(axis=0), np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (ADM / TTUR numerics)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape}; compare features from the same network / layer")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has imaginary component {np.max(np.abs(covmean.imag))}; "
                             "the covariances are degenerate (use more samples than feature dimensions)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(feats1, feats2) -> float:
    a, b = GaussianStats.from_features(feats1), GaussianStats.from_features(feats2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def softmax_np(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs, split_size: int = 5000, num_splits: int | None = None) -> float:
    """IS of class probabilities (N, K): ADM splits into consecutive chunks of `split_size`.

    `num_splits` instead splits into that many near-equal chunks (the improved-GAN convention).
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"inception_score expects (N, num_classes) probabilities, got shape {p.shape}")
    if num_splits is not None:
        parts = np.array_split(p, num_splits)
    else:
        parts = [p[i:i + split_size] for i in range(0, len(p), split_size)]
    scores = []
    for part in parts:
        py = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_dists(u, v, dtype):
    u, v = u.astype(dtype), v.astype(dtype)
    nu = jnp.sum(u * u, axis=1)[:, None]
    nv = jnp.sum(v * v, axis=1)[None, :]
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype)
    return jnp.maximum(nu - 2 * uv + nv, 0).astype(jnp.float32)


def _block_dists(u, v, dtype):
    """Squared Euclidean distances (ADM's DistanceBlock); float16 falls back to float32 on overflow."""
    d = _sq_dists(u, v, dtype)
    if dtype != jnp.float32:
        d = jax.lax.cond(jnp.isfinite(d).all(), lambda: d, lambda: _sq_dists(u, v, jnp.float32))
    return d


def pairwise_sq_distances(u, v, dtype=jnp.float32) -> np.ndarray:
    return np.asarray(jax.jit(_block_dists, static_argnums=2)(jnp.asarray(u, jnp.float32),
                                                               jnp.asarray(v, jnp.float32), dtype))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _knn_step(best, rows, cols, col_valid, k, dtype):
    # Keep the k + 1 smallest distances per row seen so far (the row itself included, at 0).
    d = jnp.where(col_valid[None, :], _block_dists(rows, cols, dtype), jnp.inf)
    return -jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)[0]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _inside_step(hit, points, centers, radii, dtype):
    # Padded centers carry radius -1, so nothing is inside them.
    d = _block_dists(points, centers, dtype)
    return hit | jnp.any(d <= radii[None, :], axis=1)


def _padded_blocks(x: np.ndarray, block: int):
    """Yield (start, count, block padded to `block` rows) so every step has one shape."""
    for i in range(0, len(x), block):
        b = x[i:i + block]
        if len(b) < block:
            b = np.concatenate([b, np.zeros((block - len(b), x.shape[1]), x.dtype)])
        yield i, min(block, len(x) - i), b


def manifold_radii(features, k: int = 3, block: int = 10000, dtype=jnp.float32) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set."""
    x = np.asarray(features, np.float32)
    n = len(x)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {n}")
    block = min(block, n)
    radii = np.zeros(n, np.float32)
    for i, m, rows in _padded_blocks(x, block):
        best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
        for j, mc, cols in _padded_blocks(x, block):
            best = _knn_step(best, rows, cols, jnp.arange(block) < mc, k=k, dtype=dtype)
        radii[i:i + m] = np.asarray(best[:m, k])
    return radii


def _inside_any(points, centers, radii, block, dtype) -> np.ndarray:
    """For each point: is it within the radius of some center (d <= r)?"""
    bp, bc = min(block, len(points)), min(block, len(centers))
    out = np.zeros(len(points), bool)
    r = np.full(-(-len(centers) // bc) * bc, -1.0, np.float32)
    r[:len(centers)] = radii
    for i, m, pts in _padded_blocks(points, bp):
        hit = jnp.zeros(bp, bool)
        for j, _, ctr in _padded_blocks(centers, bc):
            hit = _inside_step(hit, pts, ctr, r[j:j + bc], dtype=dtype)
        out[i:i + m] = np.asarray(hit)[:m]
    return out


def precision_recall(ref_features, sample_features, k: int = 3, block: int = 10000,
                     dtype=jnp.float32) -> tuple[float, float]:
    """(precision, recall) of samples against references, ADM's k-NN manifold estimate."""
    ref = np.asarray(ref_features, np.float32)
    smp = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision/recall needs (N, D) features of equal D, got {ref.shape} and {smp.shape}")
    r_ref = manifold_radii(ref, k, block, dtype)
    r_smp = manifold_radii(smp, k, block, dtype)
    precision = _inside_any(smp, ref, r_ref, block, dtype).mean()
    recall = _inside_any(ref, smp, r_smp, block, dtype).mean()
    return float(precision), float(recall)


def kernel_inception_distance(feats1, feats2, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    a, b = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def all_metrics(sample: dict[str, Any], ref: dict[str, Any], *, pr_k: int = 3, kid: bool = False,
                is_split_size: int = 5000) -> dict[str, Any]:
    """Metrics from feature dicts: {'pool': (N, D) or None, 'stats': GaussianStats or None,
    'spatial_stats': GaussianStats or None, 'logits': (N, K) or None}. Unavailable ones are None
    with a reason under 'notes'."""
    out: dict[str, Any] = {}
    notes: dict[str, str] = {}
    out["fid"] = frechet_distance(sample["stats"].mu, sample["stats"].sigma, ref["stats"].mu, ref["stats"].sigma)
    if sample.get("spatial_stats") is not None and ref.get("spatial_stats") is not None:
        s, r = sample["spatial_stats"], ref["spatial_stats"]
        out["sfid"] = frechet_distance(s.mu, s.sigma, r.mu, r.sigma)
    else:
        out["sfid"] = None
        notes["sfid"] = "skipped (--sfid=false) or no spatial statistics (mu_s/sigma_s) on one side"
    if sample.get("logits") is not None:
        out["inception_score"] = inception_score(softmax_np(sample["logits"]), split_size=is_split_size)
    else:
        out["inception_score"] = None
        notes["inception_score"] = ("IS unavailable: the weights lack logits (softmax/weights); use the ADM "
                                    "classify_image_graph_def.pb or pytorch-fid's pt_inception .pth")
    if sample.get("pool") is not None and ref.get("pool") is not None:
        out["precision"], out["recall"] = precision_recall(ref["pool"], sample["pool"], k=pr_k)
        if kid:
            out["kid"], out["kid_std"] = kernel_inception_distance(sample["pool"], ref["pool"])
    else:
        out["precision"] = out["recall"] = None
        notes["precision_recall"] = "reference has statistics only (no images in arr_0)"
    if notes:
        out["notes"] = notes
    return out
