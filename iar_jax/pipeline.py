"""The pipeline's resumable stages: tokenizer -> rearrangement -> codes -> model -> samples -> evaluation.

Each stage takes its output folder and inputs explicitly, skips itself when the folder holds its
`done.json` record and otherwise continues from what an interrupted run left there (checkpoints,
shards, chunks). Drivers: `iar_jax.demo` (`iar-jax demo`) and `iar_jax.experiment`. The file side
of `iar-jax rearrange` (`rearrange_tokenizer`) is here too; the algorithm is `iar_jax.rearrange`.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any, Dict, Optional

import ml_collections
import numpy as np

DONE = "done.json"


# ----------------------------------------------------------------------------------------------
# Bookkeeping


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Atomic: a killed run leaves the old file or the new one, never half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_done(out: str) -> Optional[Dict[str, Any]]:
    """The stage record of `out` (None: the stage has not completed)."""
    return read_json(os.path.join(out, DONE))


def mark_done(out: str, info: Dict[str, Any]) -> Dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, DONE), info)
    return info


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _step_bar(total: int, desc: str, enabled: bool):
    """(log_fn(step, metrics) advancing a bar to `step` with the loss as postfix, close)."""
    bar = _bar(total, desc, "step", enabled)

    def log_fn(step, metrics):
        bar.update(step - bar.n)
        if "loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    return log_fn, bar.close


def check_finished(step, total: int, what: str = "training") -> None:
    """Trainers return normally after a SIGTERM save: such a stage must not be marked done, and the
    command exits with runtime.PREEMPTED_EXIT_CODE (143), as `train` does."""
    if int(step) < int(total):
        from iar_jax.runtime import Preempted

        raise Preempted(f"{what} stopped at step {int(step)} of {int(total)}; run the same command again to resume")


def dataset_images(dataset, limit: int = 0) -> np.ndarray:
    """The first `limit` (0: all) uint8 images of `dataset`, NHWC (grayscale gets its channel axis)."""
    x = dataset.images[:limit] if limit else dataset.images
    return x if x.ndim == 4 else x[..., None]


# ----------------------------------------------------------------------------------------------
# Stages


def train_tokenizer_stage(out: str, tok_config, dataset, eval_images: Optional[np.ndarray] = None,
                          progress: bool = True) -> Dict[str, Any]:
    """Trains `tok_config` on the uint8 images of `dataset` (resuming from out/checkpoints), evaluates
    PSNR / SSIM / usage on `eval_images` (uint8) and marks `out` done; returns the record."""
    done = read_done(out)
    if done:
        return done
    from iar_jax.tokenizer import data as tok_data
    from iar_jax.tokenizer import training

    t0 = time.time()
    ch, size = int(tok_config.model.in_channels), int(tok_config.data.image_size)
    images = tok_data.to_model_range(dataset_images(dataset), ch, size)
    ev = tok_data.to_model_range(eval_images, ch, size) if eval_images is not None and len(eval_images) else None
    log_fn, close = _step_bar(int(tok_config.train.num_steps), "1/6 tokenizer", progress)
    try:
        trainer, state, results = training.train_and_evaluate(tok_config, out, images=images, eval_images=ev,
                                                              log_fn=log_fn)
    finally:
        close()
    check_finished(state["step"], tok_config.train.num_steps, "tokenizer training")
    return mark_done(out, {"seconds": time.time() - t0, "steps": int(tok_config.train.num_steps),
                           "vocab": list(trainer.model_cfg.vocab_sizes), "eval": results})


def rearrange_stage(out: str, tok_dir: str, cluster_size: int) -> Dict[str, Any]:
    """Balanced k-means over the tokenizer's (semantic) codebook: out/mapping.npy and the rest of the
    `iar-jax rearrange` outputs; returns the record (`mapping_file` included)."""
    done = read_done(out)
    if done:
        return done
    t0 = time.time()
    info = rearrange_tokenizer(tok_dir, out, int(cluster_size))
    return mark_done(out, {"seconds": time.time() - t0, "mapping_file": os.path.join(out, "mapping.npy"),
                           "intra_mse": info["intra_mse"], "iterations": info["iterations"],
                           "cluster_size": int(cluster_size)})


def extract_codes_stage(out: str, tok_dir: str, dataset, image_size: int, batch_size: int = 256,
                        records_per_shard: int = 1000, progress: bool = True) -> Dict[str, Any]:
    """Codes of every image of `dataset` and its flip with the ORIGINAL codebook (resumable shards)."""
    done = read_done(out)
    if done:
        return done
    from iar_jax.data import extract
    from iar_jax.tokenizer.checkpoint import load_tokenizer

    t0 = time.time()
    cfg, params = load_tokenizer(tok_dir)
    ecfg = extract.ExtractConfig(image_size=int(image_size), ten_crop=False, batch_size=int(batch_size),
                                 records_per_shard=int(records_per_shard), num_workers=2, format="npy")
    meta = extract.extract(dataset, extract.make_encode_fn(cfg, params, "dual" if cfg.dual else None), out, ecfg,
                           grid=(int(image_size) // cfg.downsample_factor,) * 2, vocab=cfg.vocab_sizes,
                           fingerprint=extract.tokenizer_fingerprint(params),
                           dataset_name=getattr(dataset, "name", ""), progress=progress)
    return mark_done(out, {"seconds": time.time() - t0, "num_images": meta["num_images"], "grid": meta["grid"],
                           "vocab": meta["vocab"]})


def model_config_for(model_config, codes_dir: str, tok_dir: str, rearrangement: Optional[Dict[str, Any]] = None):
    """The model config pointed at the extracted codes and, for IAR, at the rearrangement (the
    `rearrange_stage` record): its mapping file and the cluster size the loss groups logits by."""
    c = ml_collections.ConfigDict(model_config.to_dict())
    c.data.source, c.data.path, c.data.tokenizer = "records", codes_dir, tok_dir
    r = rearrangement or {}
    if "mapping_file" in c.get("loss", {}):
        c.loss.mapping_file = r.get("mapping_file", "")
        if r.get("cluster_size"):
            c.loss.cluster_size = int(r["cluster_size"])
    return c


def train_model_stage(out: str, config, progress: bool = True) -> Dict[str, Any]:
    """`trainer.train_and_evaluate(config, out)` (resuming from out/checkpoints); returns the record."""
    done = read_done(out)
    if done:
        return done
    from iar_jax import trainer

    t0 = time.time()
    last: Dict[str, float] = {}
    log_fn, close = _step_bar(int(config.train.num_steps), "4/6 " + config.model_family, progress)

    def log(step, metrics):
        last.update(metrics)
        log_fn(step, metrics)

    try:
        _, state = trainer.train_and_evaluate(config, out, log_fn=log)
    finally:
        close()
    check_finished(state["step"], config.train.num_steps)
    return mark_done(out, {"seconds": time.time() - t0, "steps": int(config.train.num_steps),
                           "final_metrics": last})


def sample_classes(config, model_dir: str, tok_dir: str, out: str, labels, s, global_batch: int, seed: int,
                   progress: bool):
    """Samples `labels` from the model trained in `model_dir` into out/samples.npz (resumable chunks),
    with the guidance and filtering settings of `s` (keys as the demo's config.sample)."""
    from iar_jax.sampling import generate as gen

    return gen.sample_from_workdir(config, model_dir, tok_dir, out, labels, guidance=s.guidance,
                                   cfg_scale=s.cfg_scale or None, cfg_start=s.cfg_start or None,
                                   cfg_end=s.cfg_end or None, w_attn=s.w_attn or None, temperature=s.temperature,
                                   top_k=s.top_k, top_p=s.top_p, global_batch=global_batch,
                                   seed=seed, grid=0, progress=progress)


def sample_stage(out: str, config, model_dir: str, tok_dir: str, sample_cfg, progress: bool = True) -> Dict[str, Any]:
    """`sample_cfg.per_class` samples of every class (resumable chunks) -> out/samples.npz."""
    done = read_done(out)
    if done:
        return done
    from iar_jax.sampling import generate as gen

    t0 = time.time()
    labels = gen.class_labels(0, int(config.model.num_classes), int(sample_cfg.per_class))
    summary = sample_classes(config, model_dir, tok_dir, out, labels, sample_cfg, int(sample_cfg.global_batch),
                             int(sample_cfg.seed), progress)
    return mark_done(out, {"seconds": time.time() - t0, "num_samples": summary["num_samples"],
                           "npz": os.path.join(out, "samples.npz")})


def evaluate_stage(out: str, samples_npz: str, ref_images: np.ndarray, real_images: Optional[np.ndarray] = None
                   ) -> Dict[str, Any]:
    """Small-CNN FID / precision / recall against `ref_images` and class accuracy of the samples; with
    `real_images`, also the FID of as many real training images (the floor the samples aim at)."""
    done = read_done(out)
    if done:
        return done
    from scipy.linalg import LinAlgWarning

    from iar_jax.evaluation import metrics, small_cnn

    t0 = time.time()
    params = small_cnn.load_params()
    with np.load(samples_npz) as z:
        images, labels = z["arr_0"], z["labels"]
    ref = small_cnn.predict(params, ref_images)
    with warnings.catch_warnings():  # few samples: a singular covariance product is expected, not news
        warnings.simplefilter("ignore", LinAlgWarning)
        report = small_cnn.score_samples(images, labels, None, params, ref_pred=ref)
        if real_images is not None:
            real = small_cnn.predict(params, real_images[:len(images)])
            report["fid_real_train"] = metrics.fid_from_features(real["features"], ref["features"])
    report.update(num_samples=len(images), num_ref_images=len(ref_images))
    report["seconds"] = time.time() - t0
    return mark_done(out, report)


# ----------------------------------------------------------------------------------------------
# Rearrangement files (`iar-jax rearrange`, `rearrange_stage`)


def _write_outputs(out: str, r, info: dict) -> None:
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "mapping.npy"), r.mapping.astype(np.int32))
    np.save(os.path.join(out, "new_order.npy"), r.new_order.astype(np.int32))
    np.save(os.path.join(out, "codebook.npy"), r.codebook)
    with open(os.path.join(out, "rearrangement.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


def _write_tokenizer(out: str, cfg, params, info: dict) -> str:
    from iar_jax.checkpointing import Checkpointer
    from iar_jax.tokenizer.config import model_meta

    path = os.path.join(out, "tokenizer")
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), keep=1, async_save=False)
    meta = {"kind": "tokenizer_rearranged", "model_family": "tokenizer", "model": model_meta(cfg), "rearranged": info}
    ckpt.save(0, {"params": params}, {}, meta, force=True)
    ckpt.close()
    return path


def _write_torch(out: str, tokenizer_path: str, codebook: str, r) -> None:
    try:
        import torch
    except ImportError:
        logging.warning("torch is not installed: not writing tokenizer_reordered.pt / mapping.pt")
        return
    raw = torch.load(tokenizer_path, map_location="cpu", weights_only=False)
    key = f"quantize.{codebook}.weight" if codebook == "embedding" else "quantize.embedding_second"
    found = 0
    for sd in (raw, raw.get("model"), raw.get("ema")) if isinstance(raw, dict) else ():
        for k in list(sd or {}) if isinstance(sd, dict) else ():
            if k.split("module.")[-1] == key:
                sd[k] = sd[k][torch.from_numpy(r.new_order)]
                found += 1
    if not found:
        logging.warning("no %s in %s: not writing tokenizer_reordered.pt", key, tokenizer_path)
        return
    torch.save(raw, os.path.join(out, "tokenizer_reordered.pt"))
    torch.save(torch.from_numpy(r.mapping.astype(np.int64)), os.path.join(out, "mapping.pt"))


def rearrange_tokenizer(tokenizer: str, out: str, cluster_size: int, codebook: str = "embedding",
                        method: str = "anneal", seed: int = 0, nn_chain: bool = True, want=None) -> dict:
    """Rearranges a tokenizer's codebook (a train_tokenizer workdir or official .pt file) and writes
    mapping.npy, new_order.npy, codebook.npy, rearrangement.json and the reordered tokenizer/ to
    `out` (layout: `iar_jax.commands.rearrange`); returns the rearrangement.json contents.
    `want` (a VQConfig) pins the model of a .pt file."""
    from iar_jax.data.extract import tokenizer_fingerprint
    from iar_jax.tokenizer.checkpoint import TORCH_SUFFIXES, load_tokenizer

    from iar_jax.rearrange import KMeansConfig, rearrange_codebook, reorder_params

    cfg, params = load_tokenizer(tokenizer, want)
    table = params.get("quantize", {}).get(codebook)
    if table is None:
        raise ValueError(f"{tokenizer} has no quantize/{codebook}; use --codebook=embedding"
                         + (" or embedding_second" if cfg.dual else ""))
    # Cluster in the geometry the quantizer looks codes up in: IAR2's detail table is used raw.
    normalize = cfg.codebook_l2_norm and codebook == "embedding"
    kcfg = KMeansConfig(cluster_size=cluster_size, method=method, seed=seed, nn_chain=nn_chain, normalize=normalize)
    r = rearrange_codebook(np.asarray(table), kcfg)
    info = {"tokenizer": os.path.abspath(tokenizer), "codebook": codebook, "num_codes": len(r.mapping),
            "cluster_size": cluster_size, "method": method, "seed": seed, "intra_mse": r.intra_mse,
            "iterations": r.iterations, "normalized": normalize, "tokenizer_fingerprint": tokenizer_fingerprint(params)}
    _write_outputs(out, r, info)
    _write_tokenizer(out, cfg, reorder_params(params, r.new_order, codebook), info)
    if tokenizer.endswith(TORCH_SUFFIXES):
        _write_torch(out, tokenizer, codebook, r)
    return info
