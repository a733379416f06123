"""Code extraction throughput: VQ-16 at 256 px, ten-crop (10 views per image), random weights.

    python benchmarks/extract_speed.py [--images=2 --batch_size=1]          # CPU: a few minutes
    python benchmarks/extract_speed.py --images=512 --batch_size=32          # an accelerator

Runs the whole `iar_jax.data.extract` pipeline (decode + center-crop-arr + ten-crop on host
threads, jitted encode split over the local devices, ArrayRecord writing) on synthetic 320x400
RGB images, after one warm-up batch (compile excluded). Also reports the host preprocessing
alone. Last line: {"images_per_sec", "views_per_sec", "preprocess_images_per_sec", ...}.
"""
import os
import tempfile
import time

from absl import app, flags

import common

common.add_repo_to_path()

import numpy as np  # noqa: E402

flags.DEFINE_string("variant", "vq16", "configs/tokenizer.py variant")
flags.DEFINE_integer("images", 2, "images to extract (after warm-up)")
flags.DEFINE_integer("batch_size", 1, "images per encode call (x10 views)")
flags.DEFINE_integer("image_size", 256, "tokenizer input size")
flags.DEFINE_integer("num_workers", 8, "preprocessing threads")
FLAGS = flags.FLAGS


def main(_):
    import jax

    from iar_jax.config_lib import load_config
    from iar_jax.data import datasets, extract, preprocess
    from iar_jax.tokenizer import abstract_params
    from iar_jax.tokenizer.config import model_config_from

    cfg = model_config_from(load_config(f"configs/tokenizer.py:{FLAGS.variant}"))
    rng = np.random.default_rng(0)
    # Random weights with the checkpoint's shapes (scaled so activations stay finite); speed only.
    params = jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.02).astype(np.float32),
                                    abstract_params(cfg))
    n = FLAGS.images + FLAGS.batch_size
    data = datasets.ArrayDataset(rng.integers(0, 256, (n, 320, 400, 3)).astype(np.uint8), np.arange(n) % 10, 10)
    ecfg = extract.ExtractConfig(image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                                 records_per_shard=FLAGS.batch_size, num_workers=FLAGS.num_workers)
    encode = extract.make_encode_fn(cfg, params)
    grid = (FLAGS.image_size // cfg.downsample_factor,) * 2
    t = time.perf_counter()
    for i in range(min(n, 16)):
        preprocess.augmented_views(data[i][0], FLAGS.image_size)
    pre = min(n, 16) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as out:
        warm = datasets.ArrayDataset(data.images[:FLAGS.batch_size], data.labels[:FLAGS.batch_size], 10)
        t = time.perf_counter()
        extract.extract(warm, encode, os.path.join(out, "warm"), ecfg, grid=grid, vocab=cfg.vocab_sizes,
                        fingerprint="bench", process_index=0, process_count=1, progress=False)
        compile_s = time.perf_counter() - t
        rest = datasets.ArrayDataset(data.images[FLAGS.batch_size:], data.labels[FLAGS.batch_size:], 10)
        t = time.perf_counter()
        extract.extract(rest, encode, os.path.join(out, "run"), ecfg, grid=grid, vocab=cfg.vocab_sizes,
                        fingerprint="bench", process_index=0, process_count=1, progress=False)
        sec = time.perf_counter() - t
    ips = FLAGS.images / sec
    print(f"{FLAGS.variant} at {FLAGS.image_size} px on {jax.device_count()} x {jax.devices()[0].device_kind}: "
          f"{ips:.3f} images/s ({10 * ips:.2f} views/s); host preprocessing alone {pre:.1f} images/s; "
          f"first batch incl. compile {compile_s:.1f} s")
    common.emit({"images_per_sec": round(ips, 4), "views_per_sec": round(10 * ips, 3),
                 "preprocess_images_per_sec": round(pre, 2), "seconds": round(sec, 2),
                 "first_batch_seconds": round(compile_s, 2), "images": FLAGS.images, "batch_size": FLAGS.batch_size,
                 "image_size": FLAGS.image_size, "variant": FLAGS.variant, "devices": jax.device_count(),
                 "device": jax.devices()[0].device_kind})


if __name__ == "__main__":
    app.run(main)
