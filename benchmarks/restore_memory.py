"""Peak host RSS of restoring a saved train checkpoint for sampling, against the params' bytes.

    python benchmarks/restore_memory.py --config=configs/iar.py:l [--workdir=DIR] [--full_state]

Saves one train checkpoint of the config (random init: params + Adam moments + rng, as training
writes it) under --workdir unless one is there, then restores it in a fresh process the way
`iar-jax sample` does (`checkpointing.load_params` onto one device) and reads that process's peak
RSS from /proc (the high-water mark is reset just before the restore, so imports do not count).
`--full_state` also restores the whole train state (what sampling read before the split items).
Goal: peak <= 1.3x the params' bytes; the floor is about the params plus the largest array, whose
stored chunk is decoded whole (`largest_array_bytes`). Last line: {"params_bytes", "peak_rss_bytes",
"ratio", ...}.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import common


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _config(name):
    from iar_jax.config_lib import load_config

    return load_config(name, **{"train.global_batch": 1, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})


def save(config_name, workdir):
    import jax

    from iar_jax import checkpointing, trainer as trainer_lib

    tr = trainer_lib.Trainer(_config(config_name), jax.devices()[:1])
    state = tr.init_state(0)
    ck = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ck.save(1, state, {"step": 1}, {"kind": "train_state", "model_family": tr.config.model_family,
                                     "model": trainer_lib.structural_model_meta(tr.config)})
    ck.close()


def restore(config_name, workdir, full_state):
    """Child process: restores and prints `params_bytes largest_array_bytes peak_rss_bytes baseline_rss_bytes`."""
    import jax
    import numpy as np

    from iar_jax import checkpointing, sharding, trainer as trainer_lib
    from iar_jax.models.families import get_family
    from iar_jax.sampling.generate import model_param_shardings

    config = _config(config_name)
    if full_state:
        abstract = trainer_lib.Trainer(config, jax.devices()[:1]).abstract_sharded_state()
    else:
        family = get_family(config.model_family)
        module, _ = family.build(config)
        shardings = model_param_shardings(config, family, module, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    if full_state:
        params = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_latest(
            abstract)[0]["params"]
    else:
        params, _ = checkpointing.load_params(workdir, shardings=shardings)
    jax.block_until_ready(params)
    peak = _status("VmHWM")
    sizes = [int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)]
    print(sum(sizes), max(sizes), peak, base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/iar.py:l")
    ap.add_argument("--workdir", default=None, help="keeps the saved checkpoint (default: a temporary one)")
    ap.add_argument("--full_state", action="store_true")
    ap.add_argument("--child", choices=["save", "params", "full"], default=None)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    common.add_repo_to_path()
    if args.child == "save":
        return save(args.config, args.workdir)
    if args.child:
        return restore(args.config, args.workdir, args.child == "full")

    workdir = args.workdir or tempfile.mkdtemp(prefix="restore_memory_")
    run = lambda child: subprocess.run(  # noqa: E731 - each phase in a fresh process
        [sys.executable, os.path.abspath(__file__), f"--config={args.config}", f"--workdir={workdir}",
         f"--child={child}"], check=True, capture_output=True, text=True).stdout.split()
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        run("save")
    nbytes, largest, peak, base = map(int, run("params")[-4:])
    ratio = (peak - base) / nbytes
    print(f"{args.config}: params {nbytes / 2**30:.3f} GiB; restoring them for sampling raised the host RSS by "
          f"{(peak - base) / 2**30:.3f} GiB at peak ({ratio:.2f}x the params)")
    result = {"config": args.config, "params_bytes": nbytes, "largest_array_bytes": largest,
              "peak_rss_bytes": peak - base, "ratio": round(ratio, 3), "goal_ratio": 1.3,
              "meets_goal": bool(ratio <= 1.3)}
    if args.full_state:
        *_, fpeak, fbase = map(int, run("full")[-4:])
        result["full_state_ratio"] = round((fpeak - fbase) / nbytes, 3)
        print(f"restoring the whole train state instead: {(fpeak - fbase) / 2**30:.3f} GiB "
              f"({result['full_state_ratio']:.2f}x the params)")
    common.emit(result)


if __name__ == "__main__":
    sys.exit(main())
