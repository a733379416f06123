"""Name -> entry registries whose entries register themselves when their module is imported."""
import importlib
from typing import Dict, Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Dict[str, T], modules: Mapping[str, str], name: str, what: str, error=ValueError) -> T:
    """registry[name], importing the module that registers it first; `error` names the choices."""
    if name not in registry and name in modules:
        importlib.import_module(modules[name])
    if name not in registry:
        raise error(f"unknown {what} {name!r}; use one of {sorted(modules)}")
    return registry[name]
