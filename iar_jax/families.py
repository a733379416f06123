"""Model families: what the shared trainer and sampler need to know about IAR vs IAR2.

`config.model_family` picks one. A family turns the config into a Flax module, describes the
batch it trains on, computes the loss and checks host batches for out-of-range ids; for sampling
and the benchmarks it gives its per-position sampler step and its costs (weight and KV-cache bytes
one sampling position reads, model FLOPs of a training step). The trainer, sampler and benchmarks
contain no model-specific code.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
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
    # (module, model_cfg, unroll_layers) -> iar_jax.sampling.sampler.StepFns
    sampling_step: Optional[Callable[[Any, Any, bool], Any]] = None
    # (model_cfg, params, rows, dtype) -> {"weights": bytes of weights one sampling position streams,
    # "kv_full": bytes of its fixed-size attention caches, "kv_avg": their valid part, averaged}
    decode_bytes: Optional[Callable[[Any, Any, int, Any], Dict[str, float]]] = None
    # (model_cfg, batch) -> model FLOPs of one training step (forward + backward matmuls, no remat)
    train_flops: Optional[Callable[[Any, int], float]] = None


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
    if d.get("kernels") == "auto":  # resolved by the entry points (`runtime.resolve_kernels`) when they know the devices
        d["kernels"] = "xla"
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


def matmul_weight_bytes(params, dtype, repeat: Optional[Dict[str, int]] = None) -> int:
    """Bytes of the weights in `dtype`, skipping embedding tables (gathered, not streamed); a
    top-level part named in `repeat` counts that many times (it runs more than once per position)."""
    itemsize, total = jnp.dtype(dtype).itemsize, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", k)) for k in path]
        if any("embedding" in n for n in names):  # tok_embeddings/embedding, cls_embedding/embedding_table
            continue
        total += int(np.prod(leaf.shape)) * itemsize * (repeat or {}).get(names[0], 1)
    return total


def kv_bytes(n_layer: int, rows: int, positions: float, dim: int, dtype) -> float:
    """Bytes of keys + values of `positions` cache entries in each of `n_layer` layers."""
    return 2.0 * n_layer * rows * positions * dim * jnp.dtype(dtype).itemsize


def _iar_decode_bytes(cfg, params, rows, dtype):
    # Decode step n attends to the class token(s) and n image tokens: cls + T/2 entries on average.
    return {"weights": matmul_weight_bytes(params, dtype),
            "kv_full": kv_bytes(cfg.n_layer, rows, cfg.seq_len, cfg.dim, dtype),
            "kv_avg": kv_bytes(cfg.n_layer, rows, cfg.cls_token_num + cfg.num_tokens / 2, cfg.dim, dtype)}


def _iar_train_flops(cfg, batch: int) -> float:
    """6 · non-embedding params · tokens, plus the attention score/value products (fwd + bwd)."""
    from iar_jax.models.gpt import abstract_params, count_params

    params = abstract_params(cfg)
    seq = cfg.seq_len - 1  # the teacher-forced forward: class token(s) + the first T-1 codes
    n = count_params(params) - count_params({k: v for k, v in params.items() if "embedding" in k})
    attn = 6.0 * 2 * cfg.n_layer * cfg.n_head * seq * seq * cfg.head_dim * batch  # QK^T and PV
    return 6.0 * n * batch * seq + attn


IAR = register(Family("iar", _iar_build, _iar_spec, _iar_loss, _iar_check, _iar_init,
                      _iar_sampling_step, _iar_decode_bytes, _iar_train_flops))
