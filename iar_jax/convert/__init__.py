"""PyTorch state dict <-> Flax params conversion for the official checkpoints.

Python API (used by other tools):

    params = from_torch(state_dict, kind, model_config)   # numpy/torch tensors -> Flax params
    state_dict = to_torch(params, kind, model_config)     # Flax params -> dict of numpy arrays

`kind` is one of `KINDS`. Conversion is strict: missing, unexpected or mis-shaped keys raise a
`ConversionError` listing them.
"""
from iar_jax.convert.common import ConversionError, KINDS, from_torch, load_torch_file, register, to_torch, unwrap_state_dict

__all__ = ["ConversionError", "KINDS", "from_torch", "to_torch", "register", "load_torch_file", "unwrap_state_dict"]
