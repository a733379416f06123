"""The IAR model family (arXiv 2501.00880; SPEC §3-4): LlamaGen's GPT (`iar_jax.models.gpt`) trained
with token CE + cluster CE on the rearranged code ids (`iar_jax.cluster_loss`, `iar_jax.rearrange`).

Codes are extracted with the ORIGINAL tokenizer; `loss.mapping_file` (`load_mapping`) maps them
to the rearranged ids inside the loss.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from iar_jax.models.families import Family, check_ids, model_kwargs, register


def load_mapping(path: str, vocab: int) -> np.ndarray:
    """old id -> new id from `iar-jax rearrange`'s mapping.npy or the official IAR mapping .pt (a
    torch int64 tensor, read with torch: it is a view at a storage offset)."""
    m = _read_mapping(path)
    if m.ndim != 1 or m.shape[0] != vocab:
        raise ValueError(f"mapping file {path} has shape {m.shape}, expected ({vocab},); "
                         "regenerate it with `iar-jax rearrange` for this codebook")
    if not np.array_equal(np.sort(m), np.arange(vocab)):
        raise ValueError(f"mapping file {path} is not a permutation of 0..{vocab - 1}; regenerate it with `iar-jax rearrange`")
    return m.astype(np.int32)


def _read_mapping(path: str) -> np.ndarray:
    import zipfile

    if not os.path.isfile(path):
        raise ValueError(f"mapping file {path} does not exist; pass the mapping.npy of `iar-jax rearrange`")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        return np.load(path)
    if head[:2] == b"PK" and not any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
        raise ValueError(f"mapping file {path} is an .npz archive; pass the mapping .npy (or the official .pt)")
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise ValueError(f"mapping file {path} is neither a .npy array nor a torch.save file; pass mapping.npy")
    try:
        import torch
    except ImportError:
        raise ValueError(f"mapping file {path} is a PyTorch file; reading it needs torch: "
                         'pip install -e ".[torch]"') from None
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"mapping file {path} holds a {type(t).__name__}, not a tensor of old id -> new id")
    return t.numpy()  # honours the view's storage offset


def _iar_build(config):
    from iar_jax.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(**model_kwargs(GPTConfig, config.model)).validate()
    m = config.loss.cluster_size
    if m < 1 or cfg.vocab_size % m:
        raise ValueError(f"vocab_size {cfg.vocab_size} is not divisible by loss.cluster_size {m}; "
                         "set --config.loss.cluster_size to a divisor of the vocab")
    return GPT(cfg), cfg


def _iar_spec(config):
    t = config.model.grid_size ** 2
    return {"codes": ((t,), np.int32), "labels": ((), np.int32)}


def _iar_loss(module, config):
    from iar_jax.cluster_loss import iar_loss

    mapping = None
    if config.loss.get("mapping_file"):
        mapping = jnp.asarray(load_mapping(config.loss.mapping_file, config.model.vocab_size))
    m, lam = int(config.loss.cluster_size), float(config.loss.cluster_weight)

    def loss_fn(params, batch, rng, train):
        codes = batch["codes"]
        if mapping is not None:  # codes come from the ORIGINAL codebook; train on rearranged ids
            codes = mapping[codes]
        logits = module.apply({"params": params}, codes, batch["labels"], train=train, rngs={"dropout": rng})
        return iar_loss(logits, codes, m, lam)

    return loss_fn


def _iar_check(batch, config):
    if "detail_codes" in batch:
        raise ValueError("batch has 'detail_codes' (dual IAR2 codes) but model_family 'iar' trains one codebook; "
                         "train dual codes with configs/iar2.py, or extract single-codebook codes")
    check_ids("class label", batch["labels"], config.model.num_classes,
              "labels must be < config.model.num_classes (the null class is reserved for CFG)")
    check_ids("code", batch["codes"], config.model.vocab_size,
              "codes must come from a tokenizer with config.model.vocab_size entries")


def _iar_init(module, rng, batch):
    return module.init(rng, batch["codes"], batch["labels"])


def _iar_sampling_step(module, cfg, unroll_layers=True):
    from iar_jax.sampling import gpt_step

    return gpt_step.step_fns(module, cfg, unroll_layers=unroll_layers)


IAR = register(Family("iar", _iar_build, _iar_spec, _iar_loss, _iar_check, _iar_init, _iar_sampling_step))
