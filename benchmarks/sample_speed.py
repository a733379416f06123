"""Sampling speed of the jitted lax.scan sampler vs the weight-streaming floor.

    python benchmarks/sample_speed.py --config=configs/iar.py:b --batch=4 --cfg=2.0
    python benchmarks/sample_speed.py --config=configs/iar.py:l --batch=64,256 --dtype=bfloat16   # GPU
    python benchmarks/sample_speed.py --config=configs/iar2.py:b --batch=4 --cfg=2.0

Random weights, the config's token grid (16×16 for `b`), compute dtype from --dtype (fp32 by
default, the CPU target). The model family (`config.model_family`) gives the sampler step and
what one step must read (`iar_jax.costs.decode_bytes`): every weight once (embedding tables are only
gathered; IAR2's head twice), so the floor is
    floor_s = steps × weight_bytes_per_step / bandwidth,
with `bandwidth` measured here by a large streaming reduction. The KV cache is read on top of
that (`floor_kv_s` adds the valid part of the cache, e.g. cls + T/2 positions on average for IAR;
the sampler's fixed-size cache reads all of it). The last stdout line is JSON (one run: flat;
several: "runs"). `--cfg` is the constant guidance scale of every sub-token.
"""
import argparse
import os
import time

import common

common.add_repo_to_path()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from iar_jax import costs, runtime  # noqa: E402
from iar_jax.config_lib import load_config  # noqa: E402
from iar_jax.models.families import get_family  # noqa: E402
from iar_jax.sampling import guidance, sampler  # noqa: E402
from iar_jax.sampling.filtering import SamplingConfig  # noqa: E402


def measure_bandwidth(mib: int, repeats: int = 5) -> float:
    """Bytes/s of a streaming reduction over a `mib` MiB fp32 array (best of `repeats`)."""
    n = mib * (1 << 20) // 4
    x = jnp.ones((n // 1024, 1024), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a, axis=0))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.size * 4 / best


def randomize_zero_kernels(params, key):
    """Output layers are zero-initialised; give them values so the draws are not uniform."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [0.02 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
           if str(getattr(path[-1], "key", "")) == "kernel" and not bool(jnp.any(x)) else x
           for i, (path, x) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/iar.py:b")
    ap.add_argument("--batch", default="4", help="images per call (CFG doubles the rows); comma list ok")
    ap.add_argument("--cfg", type=float, default=2.0, help="constant guidance scale (1 = no CFG rows)")
    ap.add_argument("--dtype", default="float32", help="compute dtype; weights are cast to it once per call")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--unroll", type=int, default=1, help="1: per-layer weights in the decode; 0: nn.scan layout")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after compilation (best reported)")
    ap.add_argument("--bandwidth_mib", type=int, default=512, help="array size for the bandwidth measurement")
    ap.add_argument("--kernels", default="auto", help="model.kernels: auto | xla | xla_cpu")
    args = ap.parse_args()

    config = runtime.resolve_kernels(load_config(args.config, **{"model.dtype": args.dtype,
                                                                 "model.kernels": args.kernels}))
    family = get_family(config.model_family)
    if family.sampling_step is None:
        raise SystemExit(f"model family {family.name!r} has no sampling step; use configs/iar.py or configs/iar2.py")
    module, mcfg = family.build(config)
    dummy = {k: jnp.zeros((1,) + tuple(s), d) for k, (s, d) in family.batch_spec(config).items()}
    params = jax.jit(lambda r: nn.unbox(family.init(module, r, dummy))["params"])(jax.random.key(0))
    params = randomize_zero_kernels(params, jax.random.key(1))

    step_fns = family.sampling_step(module, mcfg, bool(args.unroll))
    sub = sampler.SubToken(guidance.Constant(args.cfg), SamplingConfig(1.0, args.top_k, args.top_p))
    spec = sampler.SamplerSpec((sub,) * len(step_fns.sub_tokens))
    spec.validate(step_fns.vocab_sizes, step_fns.sub_tokens)
    fn = sampler.make_sampler(step_fns, spec)
    bw = measure_bandwidth(args.bandwidth_mib)
    T = step_fns.num_positions
    dev = jax.devices()[0]
    runs = []
    for B in [int(b) for b in args.batch.split(",")]:
        labels = jnp.arange(B, dtype=jnp.int32) % mcfg.num_classes
        ids = jnp.arange(B, dtype=jnp.int32)
        key = jax.random.key(0)
        t = time.perf_counter()
        compiled = fn.lower(params, labels, ids, key).compile()
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            compiled(params, labels, ids, key).block_until_ready()
            times.append(time.perf_counter() - t)
        seconds = min(times)
        rows = 2 * B if spec.cfg else B
        cost = costs.decode_bytes(family.name, mcfg, params, rows, args.dtype)
        wbytes, kv_full, kv_avg = cost["weights"], cost["kv_full"], cost["kv_avg"]
        floor_s = T * wbytes / bw
        floor_kv_s = T * (wbytes + kv_avg) / bw
        print(f"{config.size}: layers={mcfg.n_layer} dim={mcfg.dim} grid={mcfg.grid_size} batch={B} rows={rows} "
              f"dtype={args.dtype} unroll={args.unroll} on {dev.platform} ({getattr(dev, 'device_kind', '')})")
        print(f"  compile {compile_s:.1f}s; runs {', '.join(f'{x:.3f}s' for x in times)}; "
              f"{1e3 * seconds / T:.2f} ms/step")
        print(f"  weights {wbytes / 2**20:.1f} MiB/step; KV cache {kv_full / 2**20:.1f} MiB (valid avg "
              f"{kv_avg / 2**20:.1f}); bandwidth {bw / 1e9:.1f} GB/s; floor {floor_s:.3f}s (+KV {floor_kv_s:.3f}s)")
        runs.append({
            "seconds": round(seconds, 4), "tokens_per_s": round(B * T / seconds, 1), "floor_s": round(floor_s, 4),
            "ratio_to_floor": round(seconds / floor_s, 3), "floor_kv_s": round(floor_kv_s, 4),
            "ratio_to_floor_kv": round(seconds / floor_kv_s, 3), "step_ms": round(1e3 * seconds / T, 3),
            "compile_s": round(compile_s, 1), "bandwidth_gbs": round(bw / 1e9, 2),
            "weight_mib": round(wbytes / 2**20, 1), "batch": B, "cfg": args.cfg, "steps": T, "dtype": args.dtype,
            "config": config.size, "unroll": args.unroll, "kernels": mcfg.kernels, "platform": dev.platform,
            "device": getattr(dev, "device_kind", ""),
            # Shared machines: the 1-minute load average when the run ended (timings scale with it).
            "load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "huge_pages": common.huge_pages(),
        })
    common.emit(runs[0] if len(runs) == 1 else {"runs": runs})


if __name__ == "__main__":
    main()
