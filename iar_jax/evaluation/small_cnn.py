"""A small Fashion-MNIST classifier: the quality metric of the embedded demo and the reproduction run.

Inception features mean little on 28x28 grayscale clothes, so FID here uses the 128-d penultimate
layer of a CNN trained on Fashion-MNIST itself (same Frechet-distance code as metrics.py), and the
classifier's own prediction gives the class-conditional accuracy of generated samples.

The shipped weights `small_cnn_fmnist.npz` (next to this file) come from the seeded command
    python benchmarks/small_cnn.py --save=iar_jax/evaluation/small_cnn_fmnist.npz
(2 epochs of Adam, cosine-decayed from 3e-3, batch 128, on the 60 000 training images: about a
minute of CPU time).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
WEIGHTS_FILE = os.path.join(os.path.dirname(__file__), "small_cnn_fmnist.npz")
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class SmallCNNConfig:
    # 3x3 stride-2 convs, 28 -> 14 -> 7 -> 4: strided convs train ~4x faster than conv + max pool
    # under XLA on CPU at the same accuracy, which keeps training at about a minute.
    widths: tuple[int, ...] = (32, 64, 64)
    feature_dim: int = 128  # the FID feature layer
    num_classes: int = NUM_CLASSES


class SmallCNN(nn.Module):
    """uint8 / [0, 255] float (N, 28, 28, 1) -> {'features': (N, 128), 'logits': (N, 10)}."""

    config: SmallCNNConfig = SmallCNNConfig()

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:3] != (28, 28):
            raise ValueError(f"SmallCNN expects (N, 28, 28[, 1]) Fashion-MNIST images, got {tuple(x.shape)}")
        if x.shape[-1] == 3:  # RGB samples of a grayscale model: back to one channel
            x = x.mean(axis=-1, keepdims=True)
        x = x / 127.5 - 1.0
        for i, w in enumerate(self.config.widths):
            x = nn.relu(nn.Conv(w, (3, 3), strides=(2, 2), padding="SAME", name=f"conv{i}")(x))
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.config.feature_dim, name="features")(x))
        logits = nn.Dense(self.config.num_classes, name="head")(feats)
        return {"features": feats, "logits": logits}


# ------------------------------------------------------------------------------------------------
# Data: the Debian package dataset-fashion-mnist (idx gz files).
# ------------------------------------------------------------------------------------------------

def load_fashion_mnist(split: str, data_dir: str = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28, 1), labels int32 (N,)) for split 'train' (60k) or 'test' (10k)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    img = os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")
    lab = os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.exists(img) and os.path.exists(lab)):
        raise ValueError(f"Fashion-MNIST not found in {data_dir}; install it with "
                         "`apt-get install -y dataset-fashion-mnist` or pass data_dir=")
    from iar_jax.data.datasets import read_idx

    return read_idx(img)[..., None], read_idx(lab).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Training (seeded) and inference.
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _train_step(config: SmallCNNConfig, learning_rate: float, steps: int):
    """(optimizer, jitted step) for one schedule; cached so equal runs share one compilation."""
    model = SmallCNN(config)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, step


def train(images: np.ndarray, labels: np.ndarray, *, seed: int = 0, epochs: int = 2, batch_size: int = 128,
          learning_rate: float = 3e-3, config: SmallCNNConfig = SmallCNNConfig(), log_every: int = 0):
    """Adam with cosine decay on cross-entropy; the seed fixes the init and the shuffling. Returns params."""
    if len(images) < batch_size or len(images) != len(labels):
        raise ValueError(f"need >= batch_size ({batch_size}) images with one label each, got "
                         f"{len(images)} images and {len(labels)} labels")
    params = SmallCNN(config).init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]
    steps = epochs * (len(images) // batch_size)
    tx, step = _train_step(config, float(learning_rate), steps)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    n = (len(images) // batch_size) * batch_size
    it = 0
    for _ in range(epochs):
        order = rng.permutation(len(images))[:n].reshape(-1, batch_size)
        for idx in order:
            params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
            it += 1
            if log_every and it % log_every == 0:
                print(f"step {it} loss {float(loss):.4f}", flush=True)
    return params


@jax.jit
def _apply(params, images):
    return SmallCNN().apply({"params": params}, images)


def predict(params, images: np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """{'features': (N, 128), 'logits': (N, 10)} in batches (padded to one shape: one compile)."""
    outs: dict[str, list] = {"features": [], "logits": []}
    for i in range(0, len(images), batch_size):
        b = np.asarray(images[i:i + batch_size])
        n = len(b)
        if n < batch_size and len(images) > batch_size:
            b = np.concatenate([b, np.zeros((batch_size - n, *b.shape[1:]), b.dtype)])
        r = _apply(params, b)
        for k in outs:
            outs[k].append(np.asarray(r[k])[:n])
    return {k: np.concatenate(v) for k, v in outs.items()}


def accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images the classifier assigns to `labels` (class-conditional sample accuracy)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((predict(params, images)["logits"].argmax(-1) == labels).mean())


def score_samples(images: np.ndarray, labels, ref_images: np.ndarray | None, params=None, pr_k: int = 3,
                  kid: bool = False, ref_pred: dict | None = None) -> dict[str, Any]:
    """FID of the classifier's features, precision / recall (k = pr_k), optional KID, of uint8 samples
    against reference images (or their `predict` output `ref_pred`), and the class accuracy of the
    samples (None without labels)."""
    from iar_jax.evaluation import metrics

    params = load_params() if params is None else params
    fs, fr = predict(params, images), ref_pred if ref_pred is not None else predict(params, ref_images)
    report: dict[str, Any] = {"fid": metrics.fid_from_features(fs["features"], fr["features"])}
    report["precision"], report["recall"] = metrics.precision_recall(fr["features"], fs["features"], k=pr_k)
    if kid:
        report["kid"], report["kid_std"] = metrics.kernel_inception_distance(fs["features"], fr["features"])
    report["class_accuracy"] = (float((fs["logits"].argmax(-1) == np.asarray(labels).reshape(-1)).mean())
                                if labels is not None else None)
    return report


def save_params(params: Mapping[str, Any], path: str) -> None:
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v, np.float32)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez_compressed(path, **flat)


def load_params(path: str | None = None) -> dict:
    """Trained weights (default: the shipped small_cnn_fmnist.npz) as a Flax params tree."""
    path = path or WEIGHTS_FILE
    if not os.path.exists(path):
        raise ValueError(f"small-CNN weights {path} not found; train them with "
                         "`python benchmarks/small_cnn.py --save=iar_jax/evaluation/small_cnn_fmnist.npz`")
    tree: dict = {}
    with np.load(path) as z:
        for name in z.files:
            node = tree
            *parents, leaf = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(z[name])
    want = jax.eval_shape(lambda: SmallCNN().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
    got_s = jax.tree_util.tree_map(lambda a: a.shape, tree)
    want_s = jax.tree_util.tree_map(lambda a: a.shape, want)
    if got_s != want_s:
        raise ValueError(f"{path} does not hold SmallCNN weights (shapes {got_s} != {want_s}); retrain them")
    return tree
