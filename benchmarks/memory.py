"""Per-device memory of the train step, compiled ahead of time for N virtual devices.

    python benchmarks/memory.py --config=configs/iar.py:xxl --devices=32 --batch=256

Lowers and compiles the real sharded train step (FSDP/tensor mesh from the config) for
`--devices` CPU devices with `--xla_force_host_platform_device_count` and reads XLA's
`memory_analysis()`: arguments (params + optimizer state + batch) + temporaries + outputs not
aliased with donated inputs. The compute dtype defaults to bf16 (what accelerators run).
"""
import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/iar.py:xxl")
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit_gib", type=float, default=16.0)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import common

    common.add_repo_to_path()
    import jax

    from iar_jax import trainer as trainer_lib
    from iar_jax.config_lib import load_config
    from iar_jax.models import gpt

    config = load_config(args.config, **{"train.global_batch": args.batch, "model.dtype": args.dtype})
    tr = trainer_lib.Trainer(config, jax.devices()[: args.devices])
    state = tr.abstract_sharded_state()
    batch = {k: jax.ShapeDtypeStruct((args.batch,) + tuple(s), d, sharding=tr.batch_shardings[k])
             for k, (s, d) in tr.spec.items()}
    with tr._ctx(), gpt.cpu_layouts(False):  # the program an accelerator runs, not the CPU-tuned VJPs
        compiled = tr._jit_step.lower(state, batch).compile()
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    mesh = dict(tr.mesh.shape)
    print(f"mesh {mesh}; per device: arguments {ma.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{ma.temp_size_in_bytes / 2**30:.2f} GiB, outputs {ma.output_size_in_bytes / 2**30:.2f} GiB, "
          f"aliased {ma.alias_size_in_bytes / 2**30:.2f} GiB")
    common.emit({"config": args.config, "devices": args.devices, "batch": args.batch, "mesh": mesh,
                 "remat": config.model.remat, "dtype": args.dtype, "bytes_per_device": int(total),
                 "gib_per_device": round(total / 2**30, 3), "fits_limit": bool(total <= args.limit_gib * 2**30),
                 "limit_gib": args.limit_gib})


if __name__ == "__main__":
    sys.exit(main())
