"""Process setup shared by the CLI entry points (multi-host init, logging)."""
import os

import jax
from absl import logging


def _launched_multi_process() -> bool:
    # The launchers JAX auto-detects: Cloud TPU pods, SLURM, Open MPI.
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(int(os.environ.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache, so a re-run (resume, demo, a second sample) skips compiles.
    IAR_JAX_COMPILATION_CACHE=DIR moves it, =off disables it."""
    path = os.environ.get("IAR_JAX_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "iar_jax", "xla"))
    if path.lower() in ("", "0", "off", "none"):
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes; elsewhere (e.g.
    several processes on one GPU node or CPU) set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif _launched_multi_process():
        jax.distributed.initialize()
    if jax.process_count() == 1:
        enable_compilation_cache()
    logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
