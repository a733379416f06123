"""Tokenizer encode / decode throughput.

    python benchmarks/tokenizer_speed.py --config=configs/tokenizer.py:vq16 --batch=4 --size=256 [--dtype=bfloat16]

Random weights (the speed does not depend on them), jitted `encode` and `decode`; reports images/s
after a warm-up call (compile time reported separately). Last stdout line: one JSON object.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit  # noqa: E402


def _time(fn, *args, iters):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters, compile_s, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tokenizer.py:vq16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="", help="compute dtype override (float32, bfloat16)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from iar_jax.config_lib import load_config
    from iar_jax.tokenizer import VQModel, build_model, check_images
    from iar_jax.tokenizer.config import model_config_from
    from iar_jax.tokenizer.vq_model import abstract_params

    config = load_config(args.config)
    if args.dtype:
        config.model.dtype = args.dtype
    cfg = model_config_from(config)
    check_images(cfg, (args.batch, args.size, args.size, cfg.in_channels))
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape), jnp.float32),
                                    abstract_params(cfg))
    images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.size, args.size, cfg.in_channels)), jnp.float32)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQModel.encode))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQModel.decode))
    t_enc, c_enc, codes = _time(encode, params, images, iters=args.iters)
    t_dec, c_dec, _ = _time(decode, params, codes, iters=args.iters)
    f = cfg.downsample_factor
    res = {
        "config": args.config, "device": jax.devices()[0].device_kind, "batch": args.batch, "size": args.size,
        "tokens": [args.size // f, args.size // f], "dtype": cfg.dtype, "dual": cfg.dual,
        "encode_images_per_sec": round(args.batch / t_enc, 3), "decode_images_per_sec": round(args.batch / t_dec, 3),
        "encode_ms_per_batch": round(1e3 * t_enc, 2), "decode_ms_per_batch": round(1e3 * t_dec, 2),
        "compile_seconds": {"encode": round(c_enc, 1), "decode": round(c_dec, 1)},
    }
    print(f"encode {res['encode_images_per_sec']} img/s, decode {res['decode_images_per_sec']} img/s "
          f"({args.batch}x{args.size}px, {jax.devices()[0].device_kind})")
    emit(res)


if __name__ == "__main__":
    main()
