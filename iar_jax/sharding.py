"""Device mesh and logical-axis sharding (data / fsdp / tensor), configured by `config.mesh`."""
from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int):
    shape = [int(mesh_cfg[a]) for a in AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh has more than one axis set to -1 ({dict(zip(AXES, shape))}); fix all but one")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, shape))} cannot fill {num_devices} devices; "
                             f"set --config.mesh.* so their product divides {num_devices}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh data×fsdp×tensor = {'×'.join(map(str, shape))} = {int(np.prod(shape))} does not match "
                         f"the {num_devices} devices; set --config.mesh.data/fsdp/tensor (one may be -1)")
    return tuple(shape)


def make_mesh(mesh_cfg, devices: Sequence = None) -> Mesh:
    """The data × fsdp × tensor mesh over `devices` (default: all), laid out on the physical
    topology by `mesh_utils` (tensor and fsdp on the fastest links). Only CPU devices, which have
    no topology, fall back to a plain reshape; elsewhere a shape the topology cannot hold is an error."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception as e:
        if not all(d.platform == "cpu" for d in devices):
            raise ValueError(f"mesh data×fsdp×tensor = {'×'.join(map(str, shape))} does not fit the physical "
                             f"topology of the {len(devices)} {devices[0].device_kind} devices ({e}); pick axis "
                             "sizes that tile the slice (--config.mesh.data/fsdp/tensor)") from None
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, axis_rules):
    """`jax.set_mesh(mesh)` + Flax's logical axis rules, so `nn.with_logical_constraint` inside a
    jit traced here becomes a sharding constraint. (Under the legacy `with mesh:` Flax sees no mesh
    and every activation constraint is silently dropped.) Enter it outside jit."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
        yield


def rules(mesh_cfg):
    return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in mesh_cfg.rules)


def logical_shardings(abstract_boxed, mesh: Mesh, mesh_cfg):
    """NamedShardings for a tree of boxed (nn.LogicallyPartitioned) abstract values."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules(mesh_cfg))


def shape_logical_shardings(abstract_tree, mesh: Mesh, axis_rules):
    """NamedShardings for a tree without logical names (e.g. the tokenizer's): each >= 2-D leaf calls
    its largest axis that the mesh axes of the 'embed' rule divide 'embed' (FSDP under rules that map
    it to fsdp); everything else is replicated. Equal shapes get equal shardings, so optimizer
    moments follow their params."""
    target = dict(axis_rules).get("embed")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 0

    def one(x):
        names = [None] * x.ndim
        fits = [i for i in range(x.ndim) if n and x.ndim >= 2 and x.shape[i] % n == 0]
        if fits:
            names[max(fits, key=lambda i: x.shape[i])] = "embed"
        return nn.logical_to_mesh_sharding(P(*names), mesh, axis_rules)

    return jax.tree_util.tree_map(one, abstract_tree)


def batch_sharding(mesh: Mesh, ndim_extra: int = 0) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * ndim_extra)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_global_batch(global_batch: int, mesh: Mesh, micro_batches: int = 1) -> None:
    dp = data_parallel_size(mesh)
    if global_batch % (dp * micro_batches):
        raise ValueError(f"global batch {global_batch} is not divisible by data-parallel size {dp} × micro_batches "
                         f"{micro_batches}; set --config.train.global_batch to a multiple of {dp * micro_batches}")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by the {jax.process_count()} processes")


def host_local_to_global(batch, mesh: Mesh):
    """Per-host numpy slices of the global batch -> global jax.Arrays sharded over the batch axes."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim - 1), np.asarray(x)), batch)
