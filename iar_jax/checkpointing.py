"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Resume picks the newest step that restores cleanly: a truncated or corrupt latest checkpoint is
reported and the previous one is used (nothing is deleted). Metadata records the model family
and kind so a checkpoint of another model is refused with a clear error.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class CheckpointKindError(ValueError):
    pass


def _abspath(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)  # keep gs:// and other remote URLs


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = _abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: Dict[str, Any], meta: Dict[str, Any], force: bool = False) -> bool:
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def read_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def restore_latest(self, abstract_state, expect_meta: Optional[Dict[str, Any]] = None, step: Optional[int] = None):
        """(state, data_state, meta, step) of the newest valid checkpoint, or None if there is none."""
        steps = self.all_steps() if step is None else [int(step)]
        if step is not None and int(step) not in self.all_steps():
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        for s in reversed(steps):
            try:
                meta = self.read_meta(s)
            except Exception as e:  # unreadable metadata: treat like a corrupt checkpoint
                logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory, e)
                continue
            if expect_meta:
                check_kind(meta, expect_meta, os.path.join(self.directory, str(s)))
            try:
                state, data, meta = self.restore(s, abstract_state)
            except Exception as e:
                logging.warning("checkpoint step %d in %s is incomplete or corrupt (%s: %s); falling back to the "
                                "previous one", s, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
                if step is not None:
                    raise
                continue
            return state, data, meta, s
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def check_kind(meta: Dict[str, Any], expect: Dict[str, Any], where: str) -> None:
    for key in ("kind", "model_family"):
        if key in expect and meta.get(key) != expect[key]:
            raise CheckpointKindError(
                f"checkpoint {where} holds {key}={meta.get(key)!r} but this run needs {expect[key]!r}; "
                "use the matching config or a fresh --workdir")
    for key in ("model",):
        if key in expect and key in meta and meta[key] != expect[key]:
            diff = sorted(k for k in set(meta[key]) | set(expect[key]) if meta[key].get(k) != expect[key].get(k))
            raise CheckpointKindError(
                f"checkpoint {where} was trained with different model settings ({', '.join(diff)}); "
                "use the matching config or a fresh --workdir")


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def save_params(directory: str, params, meta: Dict[str, Any]) -> None:
    """A params-only checkpoint (converted weights, exports): `DIR/params` (orbax) + `DIR/meta.json`."""
    import json

    directory = _abspath(directory)
    target = os.path.join(directory, "params")
    if os.path.exists(target):
        raise ValueError(f"{target} already exists; choose an empty --out directory (nothing is overwritten)")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as c:
        c.save(target, params)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def load_params(directory: str, expect_meta: Optional[Dict[str, Any]] = None, ema: bool = False,
                step: Optional[int] = None):
    """(params (numpy), meta) from a params-only checkpoint, or from a train workdir's newest readable
    checkpoint (`step`: that one)."""
    import json

    directory = _abspath(directory)
    if os.path.isfile(os.path.join(directory, "meta.json")):
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if expect_meta:
            check_kind(meta, expect_meta, directory)
        if step is not None:
            raise ValueError(f"{directory} is a params-only checkpoint without steps; drop the step")
        with ocp.StandardCheckpointer() as c:
            return c.restore(os.path.join(directory, "params")), meta
    ck_dir = os.path.join(directory, "checkpoints") if os.path.isdir(os.path.join(directory, "checkpoints")) else directory
    ck = Checkpointer(ck_dir, async_save=False)
    steps = ck.all_steps()
    if not steps:
        raise ValueError(f"no checkpoint found in {directory}; pass a train --workdir or a `iar-jax convert` output")
    if step is not None:
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {ck_dir}; available: {steps}")
        steps = [step]
    for s in reversed(steps):
        try:
            meta = ck.read_meta(s)
            if expect_meta:
                check_kind(meta, expect_meta, os.path.join(ck_dir, str(s)))
            state = ck.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        except CheckpointKindError:
            raise
        except Exception as e:
            if step is not None:
                raise
            logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, ck_dir, e)
            continue
        key = "ema_params" if ema else "params"
        if key not in state:
            raise ValueError(f"checkpoint {ck_dir}/{s} has no {key}; train with --config.train.ema_decay>0 or drop ema")
        return state[key], dict(meta, step=s)
    raise ValueError(f"no readable checkpoint in {ck_dir}")
