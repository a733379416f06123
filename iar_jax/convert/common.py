"""Shared machinery of the strict state-dict converters (see `iar_jax.convert`)."""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from iar_jax import registry


class ConversionError(ValueError):
    """A state dict that does not match the model layout (missing / unexpected / mis-shaped keys)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one torch tensor maps onto one Flax parameter (or one slice of a layer-stacked one)."""

    path: Tuple[str, ...]
    to_flax: Callable[[np.ndarray], np.ndarray] = lambda x: x
    to_torch: Callable[[np.ndarray], np.ndarray] = lambda x: x
    stack_index: Optional[int] = None  # slice of a params array stacked by nn.scan over layers


@dataclasses.dataclass(frozen=True)
class Kind:
    # model_config -> {torch_key: Rule}
    rules: Callable[[Any], Dict[str, Rule]]
    # model_config -> nested dict of jax.ShapeDtypeStruct (the Flax params tree, no 'params' wrapper)
    abstract_params: Callable[[Any], Any]
    # model_config -> {torch_key: value}: non-parameter buffers of the torch module (usage counters,
    # constants). Optional on import (shape-checked, then dropped); written back on export.
    buffers: Callable[[Any], Dict[str, np.ndarray]] = lambda cfg: {}
    # (state_dict, model_config) -> None: a kind-specific check run first, for errors that name the fix
    # (e.g. a dual tokenizer checkpoint given as a single one).
    check: Optional[Callable[[Mapping[str, Any], Any], None]] = None


KINDS: Dict[str, Kind] = {}


def register(name: str, rules, abstract_params, buffers=None, check=None) -> None:
    KINDS[name] = Kind(rules, abstract_params, buffers or (lambda cfg: {}), check)


# Converters for these kinds live in modules that register themselves on import.
_KIND_MODULES = {
    "llamagen_gpt": "iar_jax.convert.gpt",
    "iar2_gpt": "iar_jax.convert.iar2_gpt",
    "llamagen_vq": "iar_jax.convert.vq",
    "iar2_vq": "iar_jax.convert.vq",
    "lpips": "iar_jax.convert.lpips",
}


def _kind(name: str) -> Kind:
    return registry.lookup(KINDS, _KIND_MODULES, name, "checkpoint kind", ConversionError)


_WRAPPERS = ("model", "module", "state_dict", "ema", "params")
_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Mapping[str, Any]) -> Dict[str, Any]:
    """Strips the checkpoint wrappers ({'model': ...}, 'module.' / '_orig_mod.' prefixes)."""
    while isinstance(obj, Mapping):
        tensor_like = [k for k, v in obj.items() if hasattr(v, "shape")]
        if tensor_like:
            break
        for w in _WRAPPERS:
            if w in obj and isinstance(obj[w], Mapping):
                obj = obj[w]
                break
        else:
            raise ConversionError(
                f"no state dict found: top-level keys are {sorted(obj)[:10]}; pass the model's state dict"
            )
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _set(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _fmt(keys, n=12):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def from_torch(state_dict: Mapping[str, Any], kind: str, model_config) -> Dict[str, Any]:
    """Official PyTorch state dict -> Flax params tree (numpy leaves). Strict."""
    k = _kind(kind)
    sd = unwrap_state_dict(state_dict)
    if k.check is not None:
        k.check(sd, model_config)
    rules = k.rules(model_config)
    abstract = dict(_flatten(k.abstract_params(model_config)))
    buffers = k.buffers(model_config)
    missing = set(rules) - set(sd)
    unexpected = set(sd) - set(rules) - set(buffers)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    stacked: Dict[Tuple[str, ...], np.ndarray] = {}
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    bad_shapes = []
    for key, rule in rules.items():
        if key not in sd:
            continue
        if rule.path not in abstract:
            raise AssertionError(f"converter rule for {key} points at unknown param {'/'.join(rule.path)}")
        want = tuple(abstract[rule.path].shape)
        if rule.stack_index is not None:
            want = want[1:]
        try:
            value = rule.to_flax(_to_numpy(sd[key]).astype(np.float32))
        except ValueError:  # a fused tensor of another size cannot even be split into heads
            value = None
        if value is None or tuple(value.shape) != want:
            bad_shapes.append(f"{key} {tuple(_to_numpy(sd[key]).shape)} (expected {tuple(rule.to_torch(np.zeros(want)).shape)})")
            continue
        if rule.stack_index is None:
            flat[rule.path] = value
        else:
            full = stacked.setdefault(rule.path, np.zeros(abstract[rule.path].shape, np.float32))
            full[rule.stack_index] = value
    for key, value in buffers.items():
        if key in sd and tuple(_to_numpy(sd[key]).shape) != tuple(np.shape(value)):
            bad_shapes.append(f"{key} {tuple(_to_numpy(sd[key]).shape)} (expected {tuple(np.shape(value))})")
    if bad_shapes:
        problems.append(f"mis-shaped keys: {_fmt(bad_shapes, 6)}")
    if problems:
        raise ConversionError(f"state dict does not match kind {kind!r}: " + "; ".join(problems))
    flat.update(stacked)
    uncovered = set(abstract) - set(flat)
    if uncovered:
        raise AssertionError(f"converter for {kind} leaves params unset: {_fmt('/'.join(p) for p in uncovered)}")
    params: Dict[str, Any] = {}
    for path, value in flat.items():
        _set(params, path, value)
    return params


def to_torch(params: Mapping[str, Any], kind: str, model_config, as_torch: bool = False) -> Dict[str, Any]:
    """Flax params tree -> official state dict (numpy arrays, or torch tensors if `as_torch`)."""
    k = _kind(kind)
    if "params" in params and len(params) == 1:
        params = params["params"]
    flat = {p: np.asarray(v, np.float32) for p, v in _flatten(params)}
    abstract = dict(_flatten(k.abstract_params(model_config)))
    missing = set(abstract) - set(flat)
    unexpected = set(flat) - set(abstract)
    if missing or unexpected:
        raise ConversionError(
            f"params do not match kind {kind!r}: missing {_fmt('/'.join(p) for p in missing)}; "
            f"unexpected {_fmt('/'.join(p) for p in unexpected)}"
        )
    out = {}
    for key, rule in k.rules(model_config).items():
        value = flat[rule.path]
        if rule.stack_index is not None:
            value = value[rule.stack_index]
        out[key] = np.ascontiguousarray(rule.to_torch(value))
    for key, value in k.buffers(model_config).items():
        out[key] = np.array(value, copy=True)
    if as_torch:
        import torch

        out = {k2: torch.from_numpy(v) for k2, v in out.items()}
    return out


def load_torch_file(path: str) -> Dict[str, Any]:
    """Reads a `torch.save` checkpoint (needs the `[torch]` extra)."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"reading {path} needs PyTorch: pip install -e '.[torch]'") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({e}); pass the .pt/.pth file "
                              "written by torch.save") from None
