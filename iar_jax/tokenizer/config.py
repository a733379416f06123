"""configs/tokenizer.py ConfigDict -> the small dataclasses the tokenizer modules take."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Type

from iar_jax.tokenizer.vq_model import VQConfig


def _fields(cls: Type, section, where: str, skip=()) -> Dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in dict(section).items() if k not in skip}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config.{where} fields {unknown}; valid: {sorted(names)}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def model_config_from(config) -> VQConfig:
    section = config.model if "model" in config else config
    return VQConfig(**_fields(VQConfig, section, "model")).validate()


def loss_config_from(config):
    from iar_jax.tokenizer.training import LossConfig

    return LossConfig(**_fields(LossConfig, config.loss, "loss", skip=("lpips_vgg_path", "lpips_lin_path"))).validate()


def optim_config_from(config):
    from iar_jax.tokenizer.training import OptimConfig

    return OptimConfig(**_fields(OptimConfig, config.optim, "optim"))


def recipe_from(config):
    from iar_jax.tokenizer.training import RecipeConfig

    return RecipeConfig(**_fields(RecipeConfig, config.recipe, "recipe"))


def model_meta(cfg: VQConfig) -> Dict[str, Any]:
    """JSON-able model settings stored with checkpoints."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def model_config_from_meta(meta: Dict[str, Any]) -> VQConfig:
    return VQConfig(**_fields(VQConfig, meta, "model")).validate()
