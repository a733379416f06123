"""LPIPS (VGG16 + linear heads) state dicts <-> Flax params (kind `lpips`).

The kind's torch layout is the reference `LPIPS` module's own state dict:
`net.slice{s}.{i}.weight|bias` (torchvision `features.{i}` regrouped into five slices) and
`lin{k}.model.1.weight`; its `scaling_layer.shift|scale` buffers are constants here.
`from_torchvision(vgg16_sd, lin_sd)` builds that layout from the two files users have: a
torchvision `vgg16` state dict (`features.{i}.*`; the unused `classifier.*` is dropped) and the
LPIPS linear weights (`lin{k}.model.1.weight`); `load_lpips_params` reads those two files.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from iar_jax.convert.common import ConversionError, Rule, from_torch, load_torch_file, register, unwrap_state_dict
from iar_jax.tokenizer.lpips import SLICES, lpips_abstract_params

SCALING_BUFFERS = {
    "scaling_layer.shift": np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1),
    "scaling_layer.scale": np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1),
}


def _oihw_to_hwio(w):
    return np.transpose(w, (2, 3, 1, 0))


def _hwio_to_oihw(w):
    return np.transpose(w, (3, 2, 0, 1))


def _rules(cfg=None) -> Dict[str, Rule]:
    rules = {}
    for s, convs in SLICES:
        for i in convs:
            rules[f"net.slice{s}.{i}.weight"] = Rule(("net", f"features_{i}", "kernel"), _oihw_to_hwio, _hwio_to_oihw)
            rules[f"net.slice{s}.{i}.bias"] = Rule(("net", f"features_{i}", "bias"))
    for k in range(5):
        rules[f"lin{k}.model.1.weight"] = Rule((f"lin{k}", "kernel"), _oihw_to_hwio, _hwio_to_oihw)
    return rules


def _abstract(cfg=None):
    return lpips_abstract_params()


def _buffers(cfg=None):
    return dict(SCALING_BUFFERS)


register("lpips", _rules, _abstract, buffers=_buffers)


def from_torchvision(vgg16_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any]):
    """torchvision `vgg16` state dict + LPIPS `lin{k}.model.1.weight` dict -> Flax LPIPS params (strict)."""
    slice_of = {i: s for s, convs in SLICES for i in convs}
    sd: Dict[str, Any] = {}
    stray = []
    for k, v in vgg16_state_dict.items():
        parts = k.split(".")
        if parts[0] == "classifier":
            continue  # the VGG16 head is not part of LPIPS
        if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) in slice_of:
            sd[f"net.slice{slice_of[int(parts[1])]}.{parts[1]}.{parts[2]}"] = v
        else:
            stray.append(k)
    if stray:
        raise ConversionError(
            f"VGG16 file has keys outside torchvision's vgg16 layout: {sorted(stray)[:6]}; pass torchvision's vgg16 state dict"
        )
    for k, v in lin_state_dict.items():
        if k in sd:
            raise ConversionError(f"key {k} is in both the VGG16 and the LPIPS linear-layer files; pass them in order (vgg, lin)")
        sd[k] = v
    return from_torch(sd, "lpips", None)


def load_lpips_params(vgg_path: Optional[str], lin_path: Optional[str]):
    """Reads the user's torchvision VGG16 and LPIPS-linear files into LPIPS params (one-line errors)."""
    for what, p, flag in (("VGG16", vgg_path, "lpips_vgg_path"), ("LPIPS linear-layer", lin_path, "lpips_lin_path")):
        if not p or not os.path.exists(p):
            raise ValueError(
                f"LPIPS is on but the {what} weights file {p!r} does not exist; set config.loss.{flag} to a local file "
                f"or turn LPIPS off with --config.loss.perceptual_weight=0"
            )
    vgg = unwrap_state_dict(_load(vgg_path))
    lin = unwrap_state_dict(_load(lin_path))
    return from_torchvision(vgg, lin)


def _load(path: str):
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    return load_torch_file(path)
