"""Official VQ tokenizer state dicts <-> Flax params (kinds `llamagen_vq` and `iar2_vq`).

Torch keys follow LlamaGen's `VQModel` (`encoder.conv_blocks.{l}.res.{i}.conv1.weight`, ...), and
IAR2's second-stage model adds `quantize.embedding_second` (a bare parameter, no `.weight`). The
Flax tree (`iar_jax.tokenizer.vq_model`) uses the same names with `.i` written `_i`, so each rule is
a rename plus a transpose: conv OIHW <-> HWIO, GroupNorm weight <-> scale.

The usage counters `quantize.codebook_used` / `codebook_used2` are buffers, not parameters: accepted
and dropped on import, written back as zeros on export (through the `buffers` hook of
`convert/common.py.register` when it has one; `load_state_dict` drops them itself otherwise).

`model_config` is a `VQConfig`; `llamagen_vq` needs `dual=False`, `iar2_vq` needs `dual=True`.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Dict, Mapping

import numpy as np

from iar_jax.convert.common import ConversionError, Rule, _flatten, from_torch, register, unwrap_state_dict

USAGE_BUFFER_LEN = 65536  # the reference's rolling window of recent codes


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (3, 2, 0, 1))


_LIST = re.compile(r"^(conv_blocks|res|attn|mid)_(\d+)$")


def _torch_prefix(path) -> str:
    parts = []
    for p in path:
        m = _LIST.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    return ".".join(parts)


def rules_for_tree(abstract) -> Dict[str, Rule]:
    """Torch key -> Rule for every leaf of a Flax tree named after the torch modules."""
    rules: Dict[str, Rule] = {}
    for path, _ in _flatten(abstract):
        *mod, leaf = path
        prefix = _torch_prefix(mod)
        if leaf == "kernel":
            rules[f"{prefix}.weight"] = Rule(path, _oihw_to_hwio, _hwio_to_oihw)
        elif leaf == "scale":
            rules[f"{prefix}.weight"] = Rule(path)
        elif leaf == "bias":
            rules[f"{prefix}.bias"] = Rule(path)
        elif leaf == "embedding":
            rules[f"{prefix}.embedding.weight"] = Rule(path)
        elif leaf == "embedding_second":
            rules[f"{prefix}.embedding_second"] = Rule(path)
        else:
            raise AssertionError(f"no conversion rule for Flax leaf {'/'.join(path)}")
    return rules


def _check_kind(cfg, dual: bool, kind: str):
    if bool(getattr(cfg, "dual", False)) != dual:
        other = "iar2_vq" if not dual else "llamagen_vq"
        raise ConversionError(
            f"kind {kind!r} needs a VQConfig with dual={dual}; got dual={not dual}: use kind {other!r} or the matching config"
        )


def _abstract(cfg):
    from iar_jax.tokenizer.vq_model import abstract_params

    return abstract_params(cfg)


def _make(kind: str, dual: bool):
    def rules(cfg):
        _check_kind(cfg, dual, kind)
        return rules_for_tree(_abstract(cfg))

    def abstract(cfg):
        _check_kind(cfg, dual, kind)
        return _abstract(cfg)

    def buffers(cfg):
        out = {"quantize.codebook_used": np.zeros((USAGE_BUFFER_LEN,), np.float32)}
        if dual:
            out["quantize.codebook_used2"] = np.zeros((USAGE_BUFFER_LEN,), np.float32)
        return out

    return rules, abstract, buffers


def _check_mixup(sd: Mapping[str, Any], cfg) -> None:
    """One-line errors for a dual (IAR2) checkpoint given as single and vice versa."""
    dual_sd = "quantize.embedding_second" in sd
    if dual_sd and not cfg.dual:
        raise ConversionError(
            "this is a dual (IAR2) tokenizer checkpoint (has quantize.embedding_second) but the config is single; "
            "use configs/tokenizer.py:iar2 (dual=True) and kind 'iar2_vq'"
        )
    if cfg.dual and not dual_sd and "quantize.embedding.weight" in sd:
        raise ConversionError(
            "this is a single-codebook tokenizer checkpoint (no quantize.embedding_second) but the config is dual; "
            "use a single config such as configs/tokenizer.py:vq16 (dual=False) and kind 'llamagen_vq'"
        )


_HOOKS = set(inspect.signature(register).parameters)  # buffer/check hooks of convert/common.py, if present
BUFFERS = {}
for _kind, _dual in (("llamagen_vq", False), ("iar2_vq", True)):
    _r, _a, _b = _make(_kind, _dual)
    BUFFERS[_kind] = _b
    _extra = {k: v for k, v in (("buffers", _b), ("check", _check_mixup)) if k in _HOOKS}
    register(_kind, _r, _a, **_extra)


def detect_kind(state_dict: Mapping[str, Any]) -> str:
    """'iar2_vq' if the state dict has IAR2's detail codebook, else 'llamagen_vq'."""
    sd = unwrap_state_dict(state_dict)
    return "iar2_vq" if "quantize.embedding_second" in sd else "llamagen_vq"


def load_state_dict(state_dict: Mapping[str, Any], cfg) -> Dict[str, Any]:
    """Official VQ state dict -> Flax params for `cfg`, with a one-line error on a single/dual mix-up."""
    sd = unwrap_state_dict(state_dict)
    _check_mixup(sd, cfg)
    kind = "iar2_vq" if cfg.dual else "llamagen_vq"
    if "buffers" not in _HOOKS:  # common.py without buffer support: drop the usage counters here
        sd = {k: v for k, v in sd.items() if k not in BUFFERS[kind](cfg)}
    return from_torch(sd, kind, cfg)


def infer_config(state_dict: Mapping[str, Any], **overrides):
    """The VQConfig of an official state dict, read from its tensor shapes (LlamaGen / IAR2 layout)."""
    from iar_jax.tokenizer.vq_model import VQConfig

    sd = unwrap_state_dict(state_dict)
    shape = lambda k: tuple(np.shape(sd[k])) if k in sd else None
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight", "decoder.conv_out.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConversionError(f"not a LlamaGen/IAR2 VQ state dict: missing {missing}; pass the tokenizer checkpoint")
    ch, in_ch = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
    mult = tuple(shape(f"encoder.conv_blocks.{l}.res.0.conv2.weight")[0] // ch for l in levels)
    dec_levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.conv_blocks.")})
    dec_mult = tuple(shape(f"decoder.conv_blocks.{i}.res.0.conv2.weight")[0] // ch for i in reversed(dec_levels))
    n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")})
    dual = "quantize.embedding_second" in sd
    emb = shape("quantize.embedding.weight")
    kw = dict(
        ch=ch, in_channels=in_ch, encoder_ch_mult=mult, decoder_ch_mult=dec_mult, num_res_blocks=n_res,
        z_channels=shape("encoder.conv_out.weight")[0], out_channels=shape("decoder.conv_out.weight")[0],
        codebook_embed_dim=emb[1], dual=dual,
    )
    if dual:
        kw.update(semantic_codebook_size=emb[0], codebook_size=shape("quantize.embedding_second")[0])
    else:
        kw.update(codebook_size=emb[0])
    kw.update(overrides)
    return VQConfig(**kw).validate()
