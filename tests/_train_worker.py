"""Subprocess body for the multi-process / kill-and-resume tests (not collected by pytest).

usage: python _train_worker.py WORKDIR NUM_STEPS OUT_JSON [process_id num_processes port]
"""
import json
import os
import sys

workdir, num_steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4:
    pid, nproc, port = map(int, sys.argv[4:7])
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(nproc), JAX_PROCESS_ID=str(pid))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from iar_jax import runtime, trainer  # noqa: E402
from iar_jax.config_lib import load_config  # noqa: E402

runtime.setup()
config = load_config("configs/iar.py:tiny", **{
    "train.num_steps": num_steps, "train.global_batch": 8, "train.log_every": 1, "train.ckpt_every": 2,
    "train.ema_decay": 0.9, "data.synthetic_size": 64})
tr, state = trainer.train_and_evaluate(config, workdir)
from jax.experimental import multihost_utils  # noqa: E402

params = multihost_utils.process_allgather(state["params"], tiled=True)
if jax.process_index() == 0:
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    with open(out, "w") as f:
        json.dump({"abs_sum": float(sum(np.abs(x).astype(np.float64).sum() for x in leaves)),
                   "devices": jax.device_count(), "processes": jax.process_count()}, f)
    np.savez(out + ".npz", *leaves)
