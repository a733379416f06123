"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

A step holds separate items: `params`, `ema_params` (when the run keeps an EMA), `opt` (every
other state entry: step, optimizer state, rng, ...), `data` (iterator position) and `meta`, so
sampling reads the params alone, sharded straight onto its own mesh. Steps written before this
layout hold one `state` item; they still load (params alone through a partial restore).

Resume takes the newest step. A step whose saved state tree differs from this run's (a config
change) is *incompatible*: the run stops naming the fields, nothing is touched. A step that cannot
be read is *corrupt*: a writer renames it aside (`60.corrupt`) so it is saved again when reached
and never counts toward the kept set, then tries the previous one. Checkpoints that all turn out
unreadable stop the run unless the caller asks to start over. `WorkdirLock` keeps one writer
per workdir.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

STATE_ITEMS = ("params", "ema_params", "opt")
LEGACY_ITEM = "state"  # the whole train state in one item (checkpoints written before STATE_ITEMS)
CORRUPT_SUFFIX = ".corrupt"
SLICE_BYTES = 64 << 20  # sampling restores read large arrays this much at a time where chunks allow


class CheckpointKindError(ValueError):
    pass


class IncompatibleCheckpointError(CheckpointKindError):
    """A readable checkpoint whose state tree differs from the run's (not corrupt: nothing is moved)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NoReadableCheckpointError(ValueError):
    pass


class WorkdirLockedError(ValueError):
    pass


def _abspath(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)  # keep gs:// and other remote URLs


def split_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """Train state dict -> checkpoint items (empty ones left out)."""
    items = {k: state[k] for k in ("params", "ema_params") if k in state}
    rest = {k: v for k, v in state.items() if k not in items}
    if rest:
        items["opt"] = rest
    return items


def _join(items: Dict[str, Any]) -> Dict[str, Any]:
    state = dict(items.get("opt") or {})
    state.update({k: items[k] for k in ("params", "ema_params") if k in items})
    return state


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_signature(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{'opt_state/1/0/mu/output/kernel': (shape, dtype)} of arrays, abstract arrays or orbax
    metadata alike (namedtuple fields and dict keys name the same way)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in leaves}


def describe_difference(saved: Dict[str, Any], wanted: Dict[str, Any], limit: int = 4) -> str:
    """One phrase naming what differs between two flat signatures (whole subtrees collapsed)."""
    parts = []
    tops = lambda sig: {k.split("/")[0] for k in sig}  # noqa: E731
    for top in sorted(tops(wanted) - tops(saved)):
        parts.append(f"{top} (only in this run)")
    for top in sorted(tops(saved) - tops(wanted)):
        parts.append(f"{top} (only in the checkpoint)")
    shared = tops(saved) & tops(wanted)
    leaves = []
    for k in sorted(set(saved) | set(wanted)):
        if k.split("/")[0] not in shared or saved.get(k) == wanted.get(k):
            continue
        s, w = saved.get(k), wanted.get(k)
        fmt = lambda x: "absent" if x is None else f"{list(x[0])} {x[1]}"  # noqa: E731
        leaves.append(f"{k} {fmt(s)} saved vs {fmt(w)} now")
    parts += leaves[:limit] + ([f"{len(leaves) - limit} more"] if len(leaves) > limit else [])
    return "; ".join(parts)


def _all_hosts(ok: bool) -> bool:
    """True where every process got `ok` (restores must agree, or hosts part ways)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _pytree_restore(abstract, partial: bool = False):
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = _abspath(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               enable_async_checkpointing=async_save)
        handlers = {k: ocp.StandardCheckpointHandler() for k in STATE_ITEMS}
        handlers.update(data=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
                        **{LEGACY_ITEM: ocp.PyTreeCheckpointHandler()})  # PyTree: partial restores of old steps
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> List[int]:
        return sorted(self.manager.all_steps())

    def quarantined(self) -> List[str]:
        """Step directories moved aside as unreadable."""
        root = epath.Path(self.directory)
        return sorted(p.name for p in root.iterdir() if CORRUPT_SUFFIX in p.name) if root.exists() else []

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(int(step))

    def is_legacy(self, step: int) -> bool:
        return (self._step_dir(step) / LEGACY_ITEM).exists()

    def save(self, step: int, state, data_state: Dict[str, Any], meta: Dict[str, Any], force: bool = False) -> bool:
        items = {k: ocp.args.StandardSave(v) for k, v in split_state(state).items()}
        return self.manager.save(int(step), args=ocp.args.Composite(
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta), **items), force=force)

    def read_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def saved_signature(self, step: int) -> Dict[str, Any]:
        """Flat (shape, dtype) of every array the step holds, named like the train state's leaves."""
        md = self.manager.item_metadata(step)
        if self.is_legacy(step):
            return flat_signature(md[LEGACY_ITEM].tree)
        return flat_signature(_join({k: md[k].tree for k in STATE_ITEMS if md.get(k) is not None}))

    def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
        json_args = dict(data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        if self.is_legacy(step):
            out = self.manager.restore(step, args=ocp.args.Composite(**{LEGACY_ITEM: _pytree_restore(abstract_state)},
                                                                     **json_args))
            return out[LEGACY_ITEM], out["data"], out["meta"]
        items = {k: ocp.args.StandardRestore(v) for k, v in split_state(abstract_state).items()}
        out = self.manager.restore(step, args=ocp.args.Composite(**items, **json_args))
        return _join({k: out[k] for k in items}), out["data"], out["meta"]

    def restore_items(self, step: int, abstract: Dict[str, Any]) -> Dict[str, Any]:
        """Only the given state entries (e.g. {'params': ...}) of a step, placed as `abstract` says."""
        if self.is_legacy(step):  # one item: read just these subtrees of it
            args = ocp.args.Composite(**{LEGACY_ITEM: _pytree_restore(abstract, partial=True)})
            return self.manager.restore(step, args=args)[LEGACY_ITEM]
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}))
        return {k: out[k] for k in abstract}

    def item_tree(self, step: int, key: str):
        """Orbax metadata (shape, dtype per leaf) of one state entry, or None if the step lacks it;
        reads that item's metadata alone (a damaged optimizer item does not stop a params read)."""
        got = self._item_metadata(step, key)
        return None if got is None else got[2]

    def _item_metadata(self, step: int, key: str):
        """(item directory, its orbax TreeMetadata, the entry's subtree) or None."""
        item = LEGACY_ITEM if self.is_legacy(step) else key
        path = self._step_dir(step) / item
        if not path.exists():
            return None
        md = ocp.PyTreeCheckpointHandler().metadata(path)
        return path, md, (dict(md.tree).get(key) if item == LEGACY_ITEM else md.tree)

    def read_entry(self, step: int, key: str, shardings=None, slice_bytes: int = SLICE_BYTES):
        """One state entry (e.g. 'params') of a step through `read_arrays`; None if the step lacks it."""
        got = self._item_metadata(step, key)
        if got is None:
            return None
        path, md, tree = got
        return read_arrays(path, md.use_zarr3, tree, shardings, slice_bytes)

    def quarantine(self, step: int, reason: str) -> None:
        """Moves an unreadable step aside (never deletes it), on process 0, and re-reads the steps."""
        if jax.process_index() == 0:
            src = self._step_dir(step)
            dst, i = src.parent / f"{src.name}{CORRUPT_SUFFIX}", 1
            while dst.exists():
                dst, i = src.parent / f"{src.name}{CORRUPT_SUFFIX}.{i}", i + 1
            src.rename(dst)
            logging.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s and trying the previous "
                            "one (it is saved again when training reaches it)", step, self.directory, reason, dst.name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"iar_jax quarantine {step}")
        self.manager.reload()

    def restore_latest(self, abstract_state, expect_meta: Optional[Dict[str, Any]] = None, step: Optional[int] = None,
                       start_over: bool = False, fix: str = "resume with the config it was saved with, or use a "
                       "fresh --workdir"):
        """(state, data_state, meta, step) of the newest readable checkpoint, or None if there is none.

        Raises CheckpointKindError for another model, IncompatibleCheckpointError (with `fix` as the
        advice) when the newest step's state tree differs from `abstract_state`, and
        NoReadableCheckpointError when checkpoints exist but none reads (unless `start_over`).
        Unreadable steps are moved aside unless read-only; an explicit `step` that fails raises.
        """
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise ValueError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
            steps = [int(step)]
        wanted = flat_signature(abstract_state)
        failed = []
        for s in reversed(steps):
            where = f"{self.directory}/{s}"
            try:
                meta = self.read_meta(s)
                saved = self.saved_signature(s)
                error = None
            except Exception as e:  # unreadable metadata: treat like a corrupt checkpoint
                error = _short(e)
            if _all_hosts(error is None):
                if expect_meta:
                    check_kind(meta, expect_meta, where)
                if saved != wanted:
                    raise IncompatibleCheckpointError(
                        f"checkpoint {where} does not match this run's train state ({describe_difference(saved, wanted)}); "
                        f"{fix} (nothing was changed on disk)", s)
                try:
                    out = self.restore(s, abstract_state)
                except Exception as e:
                    error, out = _short(e), None
                if _all_hosts(error is None):
                    return out + (s,)
            if step is not None:
                raise ValueError(f"checkpoint {where} is unreadable ({error or 'on another host'})")
            failed.append(s)
            if self.read_only:
                logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory,
                                error)
            else:
                self.quarantine(s, error or "unreadable on another host")
        aside = self.quarantined()
        if not failed and not aside:
            return None
        msg = (f"no readable checkpoint in {self.directory} (unreadable steps moved aside: {', '.join(aside) or failed}; "
               "nothing was deleted)")
        if not start_over:
            raise NoReadableCheckpointError(msg + "; restore them, or pass --config.train.restore=start_over to "
                                            "train from scratch beside them")
        logging.warning("%s; starting from scratch as asked (restore=start_over)", msg)
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


def _target(metadata_tree, shardings, where: str):
    """Abstract arrays with the saved shapes/dtypes and the caller's shardings (default: this
    process's first device)."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                                      metadata_tree)
    try:
        return abstract_with_shardings(metadata_tree, shardings)
    except ValueError as e:
        raise CheckpointKindError(f"{where} holds params that do not match the model ({_short(e)}); use the "
                                  "matching config") from None


def _host_buffer(shape, dtype) -> np.ndarray:
    """An uninitialised host array on a 64-byte boundary: jax's CPU client adopts such a buffer as
    the device buffer instead of copying it, so a CPU restore holds each array once."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


def _pieces(box, chunk, itemsize: int, slice_bytes: int):
    """Sub-boxes of `box` ((start, stop) per axis) to read one after another: whole stored chunks
    along the first axis where the box spans several, about `slice_bytes` each (at least one
    chunk), so each chunk is decoded once. A box inside one chunk is one piece: the chunk is
    decoded whole anyway."""
    extent = [hi - lo for lo, hi in box]
    for axis, ((lo, hi), c) in enumerate(zip(box, chunk)):
        if hi - lo > 0 and lo // c != (hi - 1) // c:
            break
    else:
        return [list(box)]
    row = itemsize * int(np.prod(extent, dtype=np.int64)) // extent[axis]
    step = max(1, slice_bytes // (row * c)) * c
    cuts = [lo, *range((lo // step + 1) * step, hi, step), hi]
    return [[(a, b) if i == axis else box[i] for i in range(len(box))] for a, b in zip(cuts, cuts[1:])]


def _at_zero(t, box):
    return t[tuple(slice(lo, hi) for lo, hi in box)][ts.d[:].translate_to[0]]


def _read_array(t, target: jax.ShapeDtypeStruct, slice_bytes: int) -> jax.Array:
    """Each distinct addressable shard of `target` read from the opened store `t` into its own host
    buffer, a piece at a time (so decoding holds about one piece beside the result), then put on
    its devices."""
    shape, dtype = tuple(target.shape), np.dtype(target.dtype)
    if tuple(t.shape) != shape or t.dtype.numpy_dtype != dtype:
        raise ValueError(f"stored array is {list(t.shape)} {t.dtype.numpy_dtype}, metadata says {list(shape)} {dtype}")
    chunk = t.chunk_layout.read_chunk.shape or shape
    chunk = [c or n or 1 for c, n in zip(chunk, shape)]
    shards = {}
    for device, index in target.sharding.addressable_devices_indices_map(shape).items():
        box = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
        shards.setdefault(box, []).append(device)
    arrays = []
    for box, devices in shards.items():
        out = _host_buffer([hi - lo for lo, hi in box], dtype)
        dst = ts.array(out, copy=False, write=True)
        for piece in _pieces(box, chunk, dtype.itemsize, slice_bytes):
            rel = [(lo - b[0], hi - b[0]) for (lo, hi), b in zip(piece, box)]
            _at_zero(dst, rel).write(_at_zero(t, piece)).result()
        arrays += [jax.device_put(out, d) for d in devices]
        del out, dst  # only the device arrays hold it now
    return jax.make_array_from_single_device_arrays(shape, target.sharding, arrays)


def read_arrays(item_dir, use_zarr3: bool, stored, shardings=None, slice_bytes: int = SLICE_BYTES):
    """Arrays of an orbax pytree item, read one at a time with tensorstore straight into their
    shards: `stored` is (a subtree of) the item's orbax metadata, `shardings` a matching tree
    (default: this process's first device). Orbax's own restore holds a second host copy of each
    array beside the result (IAR-L peaked at 1.4x the params); this holds the result plus one
    piece's decode buffers, and on CPU the read buffers become the device buffers."""
    item_dir = epath.Path(item_dir)
    target = _target(stored, shardings, item_dir)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(item_dir)
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    out = []
    for md, leaf in zip(jax.tree_util.tree_leaves(stored), jax.tree_util.tree_leaves(target)):
        info = ocp.type_handlers.ParamInfo(name=md.name, parent_dir=item_dir, use_zarr3=use_zarr3, ts_context=context)
        try:
            t = ts.open(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt), open=True, read=True,
                        context=context).result()
            out.append(_read_array(t, leaf, slice_bytes))
        except Exception as e:
            raise ValueError(f"cannot read {md.name} from {item_dir} ({_short(e)})") from e
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), out)


class WorkdirLock:
    """One writer per workdir: `WORKDIR/train.lock` holds host, pid and a token. A lock of a dead
    process on this host is taken over with a warning; any other holder is an error naming it.
    Process 0 holds it for all hosts. Object stores (gs://...) have no exclusive create: there the
    lock is skipped with a warning."""

    NAME = "train.lock"

    def __init__(self, workdir: str):
        self.workdir = _abspath(workdir)
        self.path = os.path.join(self.workdir, self.NAME)
        self.token = None

    def __enter__(self):
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = bool(multihost_utils.broadcast_one_to_all(np.array(error is None)))
            if not ok and error is None:
                raise WorkdirLockedError(f"process 0 could not lock {self.path}; see its error")
        if error is not None:
            raise error
        return self

    def _acquire(self):
        if "://" in self.workdir:
            logging.warning("%s is on an object store: no workdir lock there; run one trainer per workdir", self.workdir)
            return
        os.makedirs(self.workdir, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # removed meanwhile
                if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
                    logging.warning("taking over the stale lock %s of process %s on %s (no longer running)",
                                    self.path, holder.get("pid"), holder.get("host"))
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by process {holder.get('pid')} on host {holder.get('host')} "
                    f"(since {holder.get('since')}); wait for it to finish, use another --workdir, or delete "
                    f"{self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            if (self._read() or {}).get("token") == me["token"]:  # another taker did not replace it
                self.token = me["token"]
                return
        raise WorkdirLockedError(f"could not lock {self.path} (it keeps changing); is another trainer starting?")

    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": "?", "since": "? (unreadable lock file)"}

    def __exit__(self, *exc):
        if self.token is not None and (self._read() or {}).get("token") == self.token:
            os.remove(self.path)
        self.token = None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError):
        return True  # unknown holder: never take it over
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_params(directory: str, params, meta: Dict[str, Any]) -> None:
    """A params-only checkpoint (converted weights, exports): `DIR/params` (orbax) + `DIR/meta.json`."""
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
                step: Optional[int] = None, shardings=None, slice_bytes: int = SLICE_BYTES):
    """(params, meta) from a params-only checkpoint, or from a train workdir's newest readable
    checkpoint (`step`: that one). Only `params` (or `ema_params`) is read. `shardings` (a tree
    matching the params, e.g. of the sampling mesh) places them directly, whatever mesh trained
    them; without it they come back as numpy arrays. Large arrays are read `slice_bytes` at a
    time where their stored chunks allow (see `read_arrays`)."""
    directory = _abspath(directory)
    as_numpy = (lambda t: jax.tree_util.tree_map(np.asarray, t)) if shardings is None else (lambda t: t)
    if os.path.isfile(os.path.join(directory, "meta.json")):
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if expect_meta:
            check_kind(meta, expect_meta, directory)
        if step is not None:
            raise ValueError(f"{directory} is a params-only checkpoint without steps; drop the step")
        path = epath.Path(directory) / "params"
        md = ocp.PyTreeCheckpointHandler().metadata(path)
        return as_numpy(read_arrays(path, md.use_zarr3, md.tree, shardings, slice_bytes)), meta
    ck_dir = os.path.join(directory, "checkpoints") if os.path.isdir(os.path.join(directory, "checkpoints")) else directory
    if not os.path.isdir(ck_dir):
        raise ValueError(f"{directory} does not exist; pass a train --workdir or a `iar-jax convert` output")
    ck = Checkpointer(ck_dir, async_save=False, read_only=True)
    steps = ck.all_steps()
    if not steps:
        raise ValueError(f"no checkpoint found in {directory}; pass a train --workdir or a `iar-jax convert` output")
    if step is not None:
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {ck_dir}; available: {steps}")
        steps = [step]
    key = "ema_params" if ema else "params"
    for s in reversed(steps):
        where = f"{ck_dir}/{s}"
        try:
            meta = ck.read_meta(s)
            if expect_meta:
                check_kind(meta, expect_meta, where)
            params = ck.read_entry(s, key, shardings, slice_bytes)
            if params is None:
                raise CheckpointKindError(f"checkpoint {where} has no {key}; train with --config.train.ema_decay>0 "
                                          "or drop ema")
        except CheckpointKindError:
            raise
        except Exception as e:
            if step is not None:
                raise ValueError(f"checkpoint {where} is unreadable ({_short(e)})") from None
            logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, ck_dir, _short(e))
            continue
        return as_numpy(params), dict(meta, step=s)
    raise ValueError(f"no readable checkpoint in {ck_dir}")
