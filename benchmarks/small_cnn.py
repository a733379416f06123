"""Train the Fashion-MNIST small CNN (seeded) and check it as an FID feature network.

    python benchmarks/small_cnn.py [--seed=0] [--epochs=2] [--save=iar_jax/evaluation/small_cnn_fmnist.npz]
    python benchmarks/small_cnn.py --eval_only   # check the shipped weights without training

Prints test accuracy (want >= 0.88), FID(train, test) (want < 1), FID(uniform noise, test) (want > 100)
and the training time (wall and CPU: on a shared machine the wall time depends on the load); the last
stdout line is one JSON object. The shipped weights were written by the first command with --save.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from iar_jax.evaluation import metrics, small_cnn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine decay to 0)")
    ap.add_argument("--save", default="", help="write the trained weights (.npz) here")
    ap.add_argument("--eval_only", action="store_true", help="evaluate the shipped weights")
    ap.add_argument("--data_dir", default=small_cnn.FMNIST_DIR)
    args = ap.parse_args()

    x_tr, y_tr = small_cnn.load_fashion_mnist("train", args.data_dir)
    x_te, y_te = small_cnn.load_fashion_mnist("test", args.data_dir)
    t0, c0 = time.time(), time.process_time()
    if args.eval_only:
        params = small_cnn.load_params()
        train_s = train_cpu = 0.0
    else:
        params = small_cnn.train(x_tr, y_tr, seed=args.seed, epochs=args.epochs, learning_rate=args.lr,
                                 log_every=100)
        train_s, train_cpu = time.time() - t0, time.process_time() - c0
        print(f"trained {args.epochs} epochs in {train_s:.1f} s wall, {train_cpu:.1f} s CPU")
    if args.save:
        small_cnn.save_params(params, args.save)
        print(f"saved {args.save}")

    f_tr = small_cnn.predict(params, x_tr)
    f_te = small_cnn.predict(params, x_te)
    acc = float((f_te["logits"].argmax(-1) == y_te).mean())
    noise = np.random.default_rng(args.seed).integers(0, 256, x_te.shape, dtype=np.uint8)
    f_noise = small_cnn.predict(params, noise)
    fid_tt = metrics.fid_from_features(f_tr["features"], f_te["features"])
    fid_noise = metrics.fid_from_features(f_noise["features"], f_te["features"])
    print(f"test accuracy {acc:.4f}  FID(train, test) {fid_tt:.4f}  FID(noise, test) {fid_noise:.1f}")
    print(json.dumps({
        "benchmark": "small_cnn", "seed": args.seed, "epochs": args.epochs, "lr": args.lr,
        "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
        "test_accuracy": round(acc, 4), "fid_train_test": round(fid_tt, 4), "fid_noise_test": round(fid_noise, 2),
        "ok": bool(acc >= 0.88 and fid_tt < 1 and fid_noise > 100),
    }))


if __name__ == "__main__":
    main()
