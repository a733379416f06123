"""Ahead-of-time compilation of the real train step and sampler for a TPU slice, from any host.

With libtpu installed (`pip install -e ".[tpu]"`), `tpu_devices("v5e:4x4")` gives the devices of
that slice without a TPU; `compile_train` / `compile_sampler` lower and compile the project's own
programs for them, and `report` reads what the TPU compiler will allocate per chip
(`memory_analysis`), its FLOP count and the collectives in the HLO. `benchmarks/tpu_aot.py` is the
command line; tests compile the tiny config for `v5e:2x2`.
"""
from __future__ import annotations

import re
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GIB = 2 ** 30
# HBM per chip by device_kind prefix (Cloud TPU docs).
HBM_GIB = {"TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v4": 32, "TPU v6 lite": 32,
           "TPU v6e": 32}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def tpu_devices(topology: str):
    """Devices of a TPU slice, e.g. "v5e:4x4" (names must be multiples of the host bounds: v5e 2x2,
    v5p 2x2x1). Needs libtpu; works with JAX_PLATFORMS=cpu."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu missing, or a name that is not a slice
        raise ValueError(f"cannot describe TPU topology {topology!r} ({str(e).splitlines()[0][:160]}); install "
                         "libtpu with pip install -e \".[tpu]\" and use a slice name such as v5e:2x2, v5e:4x4, "
                         "v5p:2x2x4") from None


def hbm_bytes(device) -> Optional[int]:
    kind = getattr(device, "device_kind", "")
    for name, gib in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return gib * GIB
    return None


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
    """Static inventory of the collectives in an HLO module: count and result bytes per kind (an op
    inside a loop body, e.g. the nn.scan over layers, counts once)."""
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3) and len(shapes) > 1:  # async start: a tuple of (operands, results): count the results
            shapes = shapes[len(shapes) // 2:]
        nbytes = sum(_DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
                     for d, dims in shapes)
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += int(nbytes)
    return out


def report(compiled, devices, model_flops: Optional[float] = None, compile_s: Optional[float] = None) -> Dict[str, Any]:
    """Per-chip bytes (arguments / temporaries / outputs / aliased), HBM headroom, FLOPs and collectives."""
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    hbm = hbm_bytes(devices[0])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    r = {
        "chips": len(devices), "device": getattr(devices[0], "device_kind", ""),
        "argument_gib": round(ma.argument_size_in_bytes / GIB, 3), "temp_gib": round(ma.temp_size_in_bytes / GIB, 3),
        "output_gib": round(ma.output_size_in_bytes / GIB, 3), "alias_gib": round(ma.alias_size_in_bytes / GIB, 3),
        "gib_per_chip": round(total / GIB, 3), "hbm_gib": round(hbm / GIB, 2) if hbm else None,
        "headroom": round(1.0 - total / hbm, 4) if hbm else None,
        "xla_tflops_per_chip": round(float((cost or {}).get("flops", 0.0)) / 1e12, 4),
        "collectives": collectives(text),
        "attention_kernels": sorted({k for k in ("attention_dot_product", "attention_pallas_flash") if k in text}
                                    | ({"tpu_custom_call"} if "tpu_custom_call" in text else set())),
    }
    if model_flops is not None:
        r["model_tflops_per_chip"] = round(model_flops / len(devices) / 1e12, 4)
    if compile_s is not None:
        r["compile_s"] = round(compile_s, 1)
    return r


def compile_train(config, devices):
    """(compiled train step, trainer) for `devices`: the Trainer's own jitted step, lowered on
    abstract sharded state and batch."""
    from iar_jax import runtime, trainer as trainer_lib

    tr = trainer_lib.Trainer(runtime.resolve_kernels(config, devices), list(devices))
    state = tr.abstract_sharded_state()
    gb = int(config.train.global_batch)
    batch = {k: jax.ShapeDtypeStruct((gb,) + tuple(s), d, sharding=tr.batch_shardings[k])
             for k, (s, d) in tr.spec.items()}
    with tr._ctx():
        compiled = tr._jit_step.lower(state, batch).compile()
    return compiled, tr


def sampler_spec(config):
    """The papers' guidance: IAR constant CFG 2.0; IAR2 progressive attention-guided 1.75 -> 3.0, w 0.05."""
    if config.model_family == "iar2":
        return dict(guidance="attention", cfg_start="1.75", cfg_end="3.0", w_attn="0.05")
    return dict(guidance="constant", cfg_scale="2.0")


def compile_sampler(config, devices, batch: int):
    """(compiled sampler, family, model config): the sampler `iar-jax sample` runs, for `batch`
    images (CFG doubles the rows) on `devices`, params in the training layout (fp32)."""
    from iar_jax import checkpointing, runtime, sharding
    from iar_jax.models.families import get_family
    from iar_jax.sampling import generate as gen

    config = runtime.resolve_kernels(config, devices)
    family = get_family(config.model_family)
    module, model_cfg = family.build(config)
    step_fns = family.sampling_step(module, model_cfg, True)
    spec = gen.make_spec(step_fns.sub_tokens, **sampler_spec(config))
    mesh = sharding.make_mesh(config.mesh, list(devices))
    shardings = gen.model_param_shardings(config, family, module, mesh)
    fn = gen.make_sharded_sampler(step_fns, spec, mesh, shardings)
    abstract = jax.eval_shape(lambda r: family.init(module, r, {k: jnp.zeros((1,) + tuple(s), d) for k, (s, d) in
                                                               family.batch_spec(config).items()}),
                              jax.random.PRNGKey(0))
    params = checkpointing.abstract_with_shardings(nn.unbox(abstract)["params"], shardings)
    batch_sh = sharding.batch_sharding(mesh)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    return fn.lower(params, rows, rows, key).compile(), family, model_cfg


def prove(config, topology: str, what: str = "train", devices=None) -> Dict[str, Any]:
    """Compile `what` (train | sample) of `config` for `topology` (or the given `devices`) and report."""
    from iar_jax import costs

    devices = list(devices) if devices is not None else tpu_devices(topology)
    t0 = time.perf_counter()
    batch = int(config.train.global_batch)
    if what == "train":
        compiled, tr = compile_train(config, devices)
        flops = costs.train_flops(config.model_family, tr.model_cfg, batch)
        mesh = dict(tr.mesh.shape)
    elif what == "sample":
        compiled, _, _ = compile_sampler(config, devices, batch)
        flops, mesh = None, None
    else:
        raise ValueError(f"--what={what!r} is not train or sample")
    r = report(compiled, devices, flops, time.perf_counter() - t0)
    r.update(topology=topology, what=what, batch=batch, mesh=mesh, remat=config.model.remat,
             micro_batches=int(config.train.micro_batches), grid=int(config.model.grid_size),
             dtype=config.model.dtype, kernels=config.model.kernels, attention=config.model.attention)
    return r
