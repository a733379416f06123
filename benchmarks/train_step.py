"""Training-step throughput: tokens/s, seconds/step, model TFLOPs/step and MFU.

    python benchmarks/train_step.py --config=configs/iar.py:b --batch=8 --steps=3

    python benchmarks/train_step.py --config=configs/iar2.py:b --batch=8 --steps=3

Model FLOPs (`iar_jax.costs.train_flops`) count the matmuls of forward + backward (6 · matmul
params · the tokens each part sees, plus the attention score/value products), not
rematerialisation. On CPU there is no published peak, so `mfu` is reported only for known
accelerators.
"""
import argparse
import time

import common

common.add_repo_to_path()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from iar_jax import costs, runtime, train_loop, trainer as trainer_lib  # noqa: E402
from iar_jax.config_lib import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/iar.py:b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="compute dtype override (float32 | bfloat16)")
    ap.add_argument("--kernels", default="auto", help="model.kernels: auto | xla | xla_cpu")
    ap.add_argument("--attention", default="dot_product", help="model.attention: dot_product | pallas_flash")
    args = ap.parse_args()
    on_cpu = jax.devices()[0].platform == "cpu"
    overrides = {"train.global_batch": args.batch, "model.kernels": args.kernels, "model.attention": args.attention}
    if args.dtype or on_cpu:
        overrides["model.dtype"] = args.dtype or "float32"
    config = runtime.resolve_kernels(load_config(args.config, **overrides))
    tr = trainer_lib.Trainer(config)
    state = tr.init_state(0)
    src = trainer_lib.make_source(config, tr.spec)
    it = train_loop.batch_iterator(config, src)
    batch = tr.put_batch(next(it))
    t0 = time.perf_counter()
    state, metrics = tr.step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        batch = tr.put_batch(next(it))
        t0 = time.perf_counter()
        state, metrics = tr.step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = args.batch * config.model.grid_size ** 2
    flops = costs.train_flops(config.model_family, tr.model_cfg, args.batch)
    result = {
        "config": args.config, "batch": args.batch, "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(), "dtype": config.model.dtype,
        "kernels": config.model.kernels, "attention": config.model.attention,
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_step": round(flops / 1e12, 4), "achieved_tflops": round(flops / step_s / 1e12, 4),
        "first_step_s": round(compile_s, 2), "loss": float(metrics["loss"]),
        "huge_pages": common.huge_pages(),
    }
    peak = common.device_peak_flops(jax.devices()[0])
    if peak:
        result["mfu"] = round(flops / step_s / (peak * jax.device_count()), 4)
    for i, t in enumerate(times):
        print(f"step {i}: {t:.3f} s")
    common.emit(result)


if __name__ == "__main__":
    main()
