"""Sampling speed of the jitted lax.scan sampler vs the weight-streaming floor.

    python benchmarks/sample_speed.py --config=configs/iar.py:b --batch=4 --cfg=2.0
    python benchmarks/sample_speed.py --config=configs/iar.py:l --batch=64,256 --dtype=bfloat16   # GPU

Random weights, the config's token grid (16×16 for `b`), compute dtype from --dtype (fp32 by
default, the CPU target). One decode step must stream every weight once (embedding tables are only
gathered), so the floor is
    floor_s = steps × weight_bytes_per_step / bandwidth,
with `bandwidth` measured here by a large streaming reduction. The KV cache is read on top of
that (`floor_kv_s` adds the valid part of the cache, on average cls + T/2 positions; the sampler's
fixed-size cache reads all of it). The last stdout line is JSON (one run: flat; several: "runs").
"""
import argparse
import os
import time

import common

common.add_repo_to_path()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from iar_jax.config_lib import load_config  # noqa: E402
from iar_jax.families import get_family  # noqa: E402
from iar_jax.sampling import gpt_step, guidance, sampler  # noqa: E402
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


def streamed_weight_bytes(params, dtype) -> int:
    """Bytes one decode step reads from the weights (cast to the compute dtype; tables excluded)."""
    itemsize = jnp.dtype(dtype).itemsize
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "embedding" in name:  # tok_embeddings/embedding, cls_embedding/embedding_table
            continue
        total += int(np.prod(leaf.shape)) * itemsize
    return total


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
    args = ap.parse_args()

    config = load_config(args.config, **{"model.dtype": args.dtype})
    if config.model_family != "iar":
        raise SystemExit("sample_speed.py measures the IAR/LlamaGen GPT; use configs/iar.py:SIZE")
    module, mcfg = get_family("iar").build(config)
    init = jax.jit(lambda r: nn.unbox(module.init(r, jnp.zeros((1, mcfg.num_tokens), jnp.int32),
                                                  jnp.zeros((1,), jnp.int32)))["params"])
    params = init(jax.random.key(0))
    # The output head is zero-initialised; give it values so the draws are not uniform.
    params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(1), params["output"]["kernel"].shape)

    spec = sampler.SamplerSpec((sampler.SubToken(guidance.Constant(args.cfg),
                                                 SamplingConfig(1.0, args.top_k, args.top_p)),))
    spec.validate((mcfg.vocab_size,))
    fn = sampler.make_sampler(gpt_step.step_fns(module, mcfg, unroll_layers=bool(args.unroll)), spec)
    bw = measure_bandwidth(args.bandwidth_mib)
    wbytes = streamed_weight_bytes(params, args.dtype)
    T = mcfg.num_tokens
    itemsize = jnp.dtype(args.dtype).itemsize
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
        kv_full = 2 * mcfg.n_layer * rows * mcfg.seq_len * mcfg.dim * itemsize
        kv_avg = 2 * mcfg.n_layer * rows * (mcfg.cls_token_num + T / 2) * mcfg.dim * itemsize
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
            "config": config.size, "unroll": args.unroll, "platform": dev.platform,
            "device": getattr(dev, "device_kind", ""),
            # Shared machines: the 1-minute load average when the run ended (timings scale with it).
            "load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        })
    common.emit(runs[0] if len(runs) == 1 else {"runs": runs})


if __name__ == "__main__":
    main()
