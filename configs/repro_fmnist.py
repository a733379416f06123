"""Miniature reproduction of IAR's training-speed claim on Fashion-MNIST (issue 8; `iar_jax/experiment.py`).

    nice -n 10 iar-jax experiment --config=configs/repro_fmnist.py --workdir=/tmp/repro_fmnist

One tiny tokenizer (`configs/tokenizer.py:tiny7`: 7x7 tokens, 512 codes, 200 steps) trained on the full
Fashion-MNIST train split (Debian `dataset-fashion-mnist`; the embedded 6000-image subset with a
warning when it is missing), its codebook rearranged by balanced k-means into clusters of
`cluster_size`, codes (image + flip) extracted once for the first `code_images` training images;
then `seeds` runs of each arm of the tiny IAR GPT (2 layers, dim 64) on those codes:
  baseline  token CE only (loss.cluster_weight = 0)
  iar       token CE + cluster CE on the rearranged codebook (loss.cluster_weight = 1)
Both arms train on the rearranged ids with the same seeds (same init, same batches), so the loss
is the only difference. Every `eval_every` steps: `eval_per_class` class-balanced samples per
class, small-CNN FID against the 10 000 test images. Writes curves.png, table.md, table.json
(updated after every run, so a killed experiment leaves partial results); rerunning resumes.
Measured: 39 minutes on the shared 2-core CPU (load average 7-11); the README lists the results.
Any field can be overridden, e.g. `--config.seeds=5 --config.ar.train.num_steps=2000
--config.eval_every=200` (use a fresh workdir when changing the run settings).
"""
import importlib.util
import os

import ml_collections


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_repro_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.dataset = "fashion_mnist"  # fashion_mnist (Debian package) | fashion_mnist_embedded
    c.data_path = ""  # Fashion-MNIST idx folder; "" = /usr/share/datasets/fashion-mnist
    c.code_images = 20000  # AR codes for the first N training images (0 = all); the tokenizer sees all

    tok = c.tokenizer = _load("tokenizer").get_config("tiny7")
    tok.train.num_steps = 200
    tok.train.log_every = 50
    tok.train.ckpt_every = 100
    tok.data.eval_images = 0

    c.cluster_size = 16  # codes per cluster: 512 codes -> 32 clusters (IAR: 128 per cluster of 16384)
    c.extract_batch = 256  # images per encode call

    ar = c.ar = _load("iar").get_config("tiny,vocab=512,grid=7,classes=10,cluster=16")
    ar.optim.lr = 1e-3
    ar.optim.warmup_steps = 50
    ar.train.global_batch = 64
    ar.train.num_steps = 400
    ar.train.log_every = 50

    c.arms = "baseline,iar"  # baseline: cluster_weight 0; iar: cluster_weight 1
    c.seeds = 3
    c.eval_every = 50  # K: FID at steps K, 2K, ..., num_steps
    c.eval_per_class = 50  # class-balanced samples per FID point (10 classes)
    c.cfg_scale = 1.0  # constant classifier-free guidance while sampling (1 = off: half the sampling cost)
    c.ref_split = "test"  # FID reference images
    c.keep_samples = True  # keep the final samples of each run (grid.png + samples.npz)
    return c
