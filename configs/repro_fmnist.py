"""Reproduction of IAR's training-speed claim on Fashion-MNIST, in miniature (`iar_jax/experiment.py`).

    nice -n 10 iar-jax experiment --config=configs/repro_fmnist.py --workdir=/tmp/repro_fmnist

Two codebook regimes, each with its own tiny tokenizer (`configs/tokenizer.py:tiny7`: 7x7 tokens, an
L2-normalised 8-dim codebook as LlamaGen's) trained on the full Fashion-MNIST train split (Debian
`dataset-fashion-mnist`; the embedded 6000-image subset with a warning when it is missing):
  codes512   512 codes
  codes4096  4096 codes (LlamaGen-like: large, low-dimensional, normalised)
Both keep IAR's cluster size of 128 (IAR: 128 clusters of 128 for 16384 codes), i.e. its ratio of
cluster size to codes is kept as the cluster *size*, the property the loss groups by; that gives 4
and 32 clusters. Codes (image + flip) of the first `code_images` training images; then `seeds` runs of
each arm of the tiny IAR GPT: baseline (token CE), iar (+ cluster CE, k-means clusters), random (+
cluster CE, random clusters). Every `eval_every` steps: FID from `eval_per_class` x 10 samples against
the 10 000 test images; at the end the teacher-forced robustness on `heldout_images` test images.
Writes table.md, table.json and curves.png (updated after every run); rerunning resumes.
Any field can be overridden, e.g. `--config.seeds=3 --config.regime_names=codes4096`
(use a fresh workdir when changing the run settings).
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
    c.heldout_images = 2000  # test images whose codes measure the teacher-forced robustness

    tok = c.tokenizer = _load("tokenizer").get_config("tiny7")
    tok.train.update(dict(num_steps=300, log_every=50, ckpt_every=100))
    tok.data.eval_images = 0

    c.regimes = ml_collections.ConfigDict({
        "codes512": {"codebook_size": 512, "cluster_size": 128},
        "codes4096": {"codebook_size": 4096, "cluster_size": 128},
    })
    c.regime_names = "codes512,codes4096"
    c.extract_batch = 256  # images per encode call

    ar = c.ar = _load("iar").get_config("tiny,grid=7,classes=10")
    # dim 96, not the demo's 128: a cheaper step (the 4096-code head is most of it); both baselines still
    # flatten by step 1000 (at dim 128, batch 32 for 500 steps did not).
    ar.model.update(dict(dim=96, n_head=4, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0))
    ar.optim.update(dict(lr=2e-3, schedule="cosine", min_lr=1e-4, warmup_steps=20))
    ar.train.update(dict(global_batch=64, num_steps=1000, log_every=100))
    ar.data.num_workers = 0

    c.arms = "baseline,iar,random"
    c.seeds = 5
    c.eval_every = 200  # K: FID at steps K, 2K, ..., num_steps
    c.eval_per_class = 200  # class-balanced samples per FID point (10 classes)
    c.decode_batch = 250  # images per decoder call (0 = a whole FID point at once; 250 is ~1.5x faster on CPU)
    c.cfg_scale = 1.0  # constant classifier-free guidance while sampling (1 = off: half the sampling cost)
    c.ref_split = "test"  # FID reference images
    c.keep_samples = True  # keep the final samples of each run (grid.png + samples.npz)
    c.bootstrap = 2000  # resamples of the seeds for the 95% intervals
    c.parallel_regimes = True  # one worker process per regime, then the other regimes' runs (about a core each)
    return c
