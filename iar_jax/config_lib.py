"""Load `configs/FILE.py:ARG` outside absl flags (tests, benchmarks, notebooks)."""
import importlib.util
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, **overrides):
    """`load_config("configs/iar.py:tiny", **{"train.num_steps": 5})` -> ConfigDict.

    Relative paths are tried from the current directory, then from the repository root.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(_ROOT, path)):
        path = os.path.join(_ROOT, path)
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} not found; pass e.g. configs/iar.py:tiny")
    mod_spec = importlib.util.spec_from_file_location(f"_iar_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config(arg or None)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
