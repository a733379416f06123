"""The tokenizer's settings dataclasses and configs/tokenizer.py ConfigDict -> those dataclasses."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Type

from iar_jax.tokenizer import discriminator as disc_lib
from iar_jax.tokenizer.vq_model import VQConfig


@dataclasses.dataclass(frozen=True)
class LossConfig:
    reconstruction_loss: str = "l2"  # l2 | l1
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; 0 switches it off
    disc_weight: float = 0.5  # 0 switches the discriminator off entirely
    disc_start: int = 20000
    disc_loss: str = "hinge"  # hinge | vanilla
    gen_loss: str = "hinge"  # hinge | non-saturating
    disc_dim: int = 64
    disc_num_layers: int = 3
    stage1_reconstruction_weight: float = 0.0  # IAR2 stage 1: no pixel loss in the reference

    def validate(self) -> "LossConfig":
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"loss.reconstruction_loss {self.reconstruction_loss!r} is not supported; use 'l2' or 'l1'")
        if self.disc_loss not in disc_lib.D_LOSSES:
            raise ValueError(f"loss.disc_loss {self.disc_loss!r} is not supported; use one of {sorted(disc_lib.D_LOSSES)}")
        if self.gen_loss not in disc_lib.G_LOSSES:
            raise ValueError(f"loss.gen_loss {self.gen_loss!r} is not supported; use one of {sorted(disc_lib.G_LOSSES)}")
        return self


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    stage1_steps: int = 0  # IAR2 only: semantic-only steps before the dual stage
    dual_iters: int = 2  # stage-2 cycle: this many dual iterations ...
    semantic_iters: int = 1  # ... then this many semantic (C_S-updating) iterations
    usage_window: int = 65536  # codes remembered for the usage metric (reference buffer length)


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


def loss_config_from(config) -> LossConfig:
    return LossConfig(**_fields(LossConfig, config.loss, "loss", skip=("lpips_vgg_path", "lpips_lin_path"))).validate()


def optim_config_from(config) -> OptimConfig:
    return OptimConfig(**_fields(OptimConfig, config.optim, "optim"))


def recipe_from(config) -> RecipeConfig:
    return RecipeConfig(**_fields(RecipeConfig, config.recipe, "recipe"))


def model_meta(cfg: VQConfig) -> Dict[str, Any]:
    """JSON-able model settings stored with checkpoints."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def model_config_from_meta(meta: Dict[str, Any]) -> VQConfig:
    return VQConfig(**_fields(VQConfig, meta, "model")).validate()
