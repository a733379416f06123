"""Model families: what the shared trainer and sampler need to know about IAR vs IAR2.

`config.model_family` picks one. A family turns the config into a Flax module, describes the
batch it trains on, computes the loss and checks host batches for out-of-range ids. The trainer
and sampler contain no model-specific code.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Family:
    name: str
    # config -> (flax module, frozen model config)
    build: Callable[[Any], Tuple[Any, Any]]
    # config -> {key: (shape without batch dim, dtype)} of one training example
    batch_spec: Callable[[Any], Dict[str, Tuple[Tuple[int, ...], Any]]]
    # (module, config) -> fn(params, batch, rng, train) -> (loss, metrics); built once, traced in jit
    make_loss: Callable[[Any, Any], Callable]
    # (batch of numpy arrays, config) -> None; raises ValueError naming the bad input
    check_batch: Callable[[Dict[str, np.ndarray], Any], None]
    # (module, rng, batch) -> variables
    init: Callable[[Any, Any, Dict[str, Any]], Any]


_FAMILIES: Dict[str, Family] = {}
_MODULES = {"iar": "iar_jax.families", "iar2": "iar_jax.models.iar2"}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _FAMILIES:
        raise ValueError(f"unknown config.model_family {name!r}; use one of {sorted(_MODULES)}")
    return _FAMILIES[name]


def model_kwargs(model_cfg_cls, section) -> Dict[str, Any]:
    """Fields of a model dataclass taken from a config section (unknown keys are errors)."""
    fields = {f.name for f in dataclasses.fields(model_cfg_cls)}
    d = dict(section)
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown config.model fields {sorted(unknown)}; valid: {sorted(fields)}")
    return d


def check_ids(name: str, x: np.ndarray, upper: int, fix: str) -> None:
    if x.size and (x.min() < 0 or x.max() >= upper):
        bad = int(x.max()) if x.max() >= upper else int(x.min())
        raise ValueError(f"{name} id {bad} is outside [0, {upper}); {fix}")


# ----------------------------------------------------------------------------------------------
# IAR (LlamaGen GPT + cluster CE)


def load_mapping(path: str, vocab: int) -> np.ndarray:
    m = np.load(path)
    if m.ndim != 1 or m.shape[0] != vocab:
        raise ValueError(f"mapping file {path} has shape {m.shape}, expected ({vocab},); "
                         "regenerate it with `iar-jax rearrange` for this codebook")
    if not np.array_equal(np.sort(m), np.arange(vocab)):
        raise ValueError(f"mapping file {path} is not a permutation of 0..{vocab - 1}; regenerate it with `iar-jax rearrange`")
    return m.astype(np.int32)


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


IAR = register(Family("iar", _iar_build, _iar_spec, _iar_loss, _iar_check, _iar_init))
