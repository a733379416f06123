"""Loading a trained tokenizer: our orbax training checkpoints or official PyTorch files.

`load_tokenizer(path)` -> (VQConfig, params):
  * a `train_tokenizer` workdir (or its `checkpoints/` folder): newest step, model settings from
    the checkpoint metadata;
  * a PyTorch file (`.pt`, `.pth`, `.bin`, `.ckpt`): the official LlamaGen / IAR2 state dict
    (`{'model': ...}` or `{'ema': ...}` wrappers are unwrapped); the architecture is read from the
    tensor shapes unless `config` is given.
A `config` that disagrees with the checkpoint (e.g. dual vs single) is a one-line error.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple


from iar_jax.tokenizer.vq_model import VQConfig, check_params

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_tokenizer(path: str, config: Optional[VQConfig] = None, use_ema: bool = False) -> Tuple[VQConfig, Any]:
    if not path or not os.path.exists(path):
        raise ValueError(f"tokenizer checkpoint {path!r} does not exist; pass a train_tokenizer workdir or a .pt file")
    if path.endswith(TORCH_SUFFIXES):
        return _load_torch(path, config, use_ema)
    return _load_orbax(path, config)


def _load_torch(path, config, use_ema):
    from iar_jax.convert.common import load_torch_file, unwrap_state_dict
    from iar_jax.convert.vq import infer_config, load_state_dict

    raw = load_torch_file(path)
    if use_ema:
        if not (isinstance(raw, dict) and "ema" in raw):
            raise ValueError(f"{path} has no 'ema' weights; drop use_ema")
        raw = raw["ema"]
    sd = unwrap_state_dict(raw)
    cfg = config if config is not None else infer_config(sd)
    return cfg, load_state_dict(sd, cfg)


def _load_orbax(path, config):
    from iar_jax.checkpointing import Checkpointer, load_params
    from iar_jax.tokenizer.config import model_config_from_meta

    directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    ck = Checkpointer(directory, async_save=False, read_only=True)
    steps = ck.all_steps()
    if not steps:
        raise ValueError(f"no tokenizer checkpoint in {directory}; train one with `iar-jax train_tokenizer` first")
    meta = ck.read_meta(steps[-1])
    ck.close()
    if meta.get("model_family") != "tokenizer":
        raise ValueError(f"{directory} holds a {meta.get('model_family')!r} checkpoint, not a tokenizer; pass a "
                         "train_tokenizer workdir")
    saved_cfg = model_config_from_meta(meta["model"])
    params, _ = load_params(directory, step=steps[-1])  # params only, onto this process's first device
    cfg = saved_cfg
    if config is not None:
        check_params(config, params)
        if config.dual != saved_cfg.dual or config.vocab_sizes != saved_cfg.vocab_sizes:
            raise ValueError(f"checkpoint tokenizer has vocab {saved_cfg.vocab_sizes} (dual={saved_cfg.dual}) but the "
                             f"config asks for {config.vocab_sizes} (dual={config.dual}); use the matching config")
        cfg = config
    return cfg, params
