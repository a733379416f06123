"""Model families: what the shared trainer and sampler need to know about IAR vs IAR2.

`config.model_family` picks one (`iar_jax.models.iar`, `iar_jax.models.iar2`). A family turns the
config into a Flax module, describes the batch it trains on, computes the loss, checks host
batches for out-of-range ids and gives its per-position sampler step. The trainer and sampler
contain no model-specific code; the benchmarks' cost estimates are in `iar_jax.costs`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from iar_jax import registry


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


_FAMILIES: Dict[str, Family] = {}
_MODULES = {"iar": "iar_jax.models.iar", "iar2": "iar_jax.models.iar2"}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    return registry.lookup(_FAMILIES, _MODULES, name, "config.model_family")


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
