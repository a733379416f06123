"""`iar-jax convert`: official PyTorch checkpoints <-> Flax params; FID Inception weights -> .npz.

    iar-jax convert --kind=llamagen_gpt --config=configs/iar.py:b --torch=c2i_B_256.pt --out=DIR
    iar-jax convert --kind=llamagen_gpt --config=configs/iar.py:b --params=WORKDIR_OR_DIR --to_torch=out.pt [--ema]
    iar-jax convert --kind=inception --from=default_1.pt --to=inception.npz   (then: evaluate --weights=inception.npz)
"""
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config describing the model (configs/FILE.py:ARG).")
_KIND = flags.DEFINE_enum("kind", None, ["llamagen_gpt", "iar2_gpt", "llamagen_vq", "iar2_vq", "lpips", "inception"],
                          "Checkpoint kind")
_TORCH = flags.DEFINE_string("torch", None, "PyTorch checkpoint to convert to Flax.")
_OUT = flags.DEFINE_string("out", None, "Directory for the converted Flax params (must not exist yet).")
_PARAMS = flags.DEFINE_string("params", None, "Flax params dir or train workdir to export to PyTorch.")
_TO_TORCH = flags.DEFINE_string("to_torch", None, "Output .pt file for the export.")
_EMA = flags.DEFINE_bool("ema", False, "Export the EMA params of a train workdir.")
_FROM = flags.DEFINE_string("from", None, "--kind=inception: FID Inception weights (.pb, .pth, default_1.pt).")
_TO = flags.DEFINE_string("to", None, "--kind=inception: output .npz, read by `evaluate --weights` without torch.")
flags.mark_flags_as_required(["kind"])


def model_config_for(kind: str, config):
    if kind in ("llamagen_gpt", "iar2_gpt"):
        from iar_jax.models.families import get_family

        family = "iar" if kind == "llamagen_gpt" else "iar2"
        if config is None or config.get("model_family") != family:
            raise ValueError(f"--kind={kind} needs --config of model_family {family!r} (e.g. configs/{family}.py:b)")
        return get_family(family).build(config)[1]
    if kind in ("llamagen_vq", "iar2_vq"):
        from iar_jax.tokenizer.config import model_config_from

        if config is None:
            raise ValueError(f"--kind={kind} needs --config=configs/tokenizer.py:VARIANT")
        return model_config_from(config)
    return None


def check_inputs() -> None:
    """Paths and the torch install, before any checkpoint is read or written."""
    import importlib.util

    from iar_jax import console

    if _KIND.value == "inception":
        if _TORCH.value or _PARAMS.value or not (_FROM.value and _TO.value):
            raise ValueError("--kind=inception takes --from=WEIGHTS (.pb, .pth or default_1.pt) and --to=FILE.npz")
        console.check_input(_FROM.value, "--from", "file", "pass an Inception weights file")
        if not _TO.value.endswith(".npz"):
            raise ValueError(f"--to={_TO.value}: the converted weights are an .npz; pass --to=FILE.npz")
        console.check_output_file(_TO.value, "--to", exist_ok=False)
    elif _FROM.value or _TO.value:
        raise ValueError(f"--from/--to are for --kind=inception; for --kind={_KIND.value} pass --torch/--out or "
                         "--params/--to_torch")
    elif _TORCH.value:
        console.check_input(_TORCH.value, "--torch", "file", "pass the official .pt/.pth checkpoint")
        if not _OUT.value:
            raise ValueError("--torch needs --out=DIR for the Flax params")
        if os.path.exists(_OUT.value):
            raise ValueError(f"--out={_OUT.value} exists; choose a new directory (nothing is overwritten)")
        console.check_output_dir(_OUT.value, "--out")
        if importlib.util.find_spec("torch") is None:
            raise ValueError(f"reading --torch={_TORCH.value} needs PyTorch: pip install -e '.[torch]'")
    elif _PARAMS.value:
        console.check_input(_PARAMS.value, "--params", "dir", "pass a Flax params dir or a train workdir")
        if not _TO_TORCH.value:
            raise ValueError("--params needs --to_torch=FILE.pt")
        console.check_output_file(_TO_TORCH.value, "--to_torch", exist_ok=False)
        if importlib.util.find_spec("torch") is None:
            raise ValueError(f"writing --to_torch={_TO_TORCH.value} needs PyTorch: pip install -e '.[torch]'")
    else:
        raise ValueError("pass --torch=CKPT --out=DIR (import) or --params=DIR --to_torch=FILE (export)")


def main(argv):
    del argv
    check_inputs()
    if _KIND.value == "inception":
        from iar_jax.evaluation import weights

        flat = weights.load_inception_weights(_FROM.value)
        tmp = f"{_TO.value}.tmp{os.getpid()}.npz"  # np.savez adds .npz to other names
        np.savez(tmp, **flat)
        os.replace(tmp, _TO.value)
        logits = "with" if weights.has_logits(flat) else "without"
        print(f"wrote {len(flat)} Inception arrays ({logits} logits) to {_TO.value}")
        return
    from iar_jax import checkpointing
    from iar_jax.convert import from_torch, load_torch_file, to_torch

    kind, config = _KIND.value, _CONFIG.value
    model_cfg = model_config_for(kind, config)
    meta = {"kind": kind}
    if config is not None and "model_family" in config:
        from iar_jax.trainer import structural_model_meta

        meta.update(model_family=config.model_family, model=structural_model_meta(config))
    if _TORCH.value:
        params = from_torch(load_torch_file(_TORCH.value), kind, model_cfg)
        checkpointing.save_params(_OUT.value, params, dict(meta, source=os.path.abspath(_TORCH.value)))
        print(f"wrote Flax params of {kind} to {_OUT.value}")
    elif _PARAMS.value:
        params, _ = checkpointing.load_params(_PARAMS.value, ema=_EMA.value)
        import torch

        torch.save(to_torch(params, kind, model_cfg, as_torch=True), _TO_TORCH.value)
        print(f"wrote PyTorch state dict of {kind} to {_TO_TORCH.value}")
