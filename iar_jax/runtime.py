"""Process setup and run control shared by the CLI entry points and trainers (multi-host init,
compile cache, SIGTERM, non-finite loss)."""
import os
import signal

import jax
import numpy as np
from absl import logging


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN/inf; the CLI prints it as one line."""


# 128 + SIGTERM, what a shell reports for a job killed by it: schedulers requeue such a job.
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    """A run stopped by SIGTERM after saving its checkpoint; the CLI exits with PREEMPTED_EXIT_CODE."""


def _launched_multi_process() -> bool:
    # The launchers JAX auto-detects: Cloud TPU pods, SLURM, Open MPI.
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(int(os.environ.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache, so a re-run (resume, demo, a second sample) skips compiles.
    IAR_JAX_COMPILATION_CACHE=DIR moves it, =off disables it; without it, a cache directory already
    configured (JAX_COMPILATION_CACHE_DIR, or an earlier call) is kept."""
    path = os.environ.get("IAR_JAX_COMPILATION_CACHE")
    if path is None:
        if jax.config.jax_compilation_cache_dir:
            return
        path = os.path.join(os.path.expanduser("~"), ".cache", "iar_jax", "xla")
    if path.lower() in ("", "0", "off", "none"):
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def resolve_kernels(config, devices=None):
    """`model.kernels=auto` -> "xla_cpu" when every device the program is compiled for is a CPU,
    else "xla" (never keyed on the host backend). For entry points; returns the config."""
    m = config.model
    if m.get("kernels") == "auto":
        devices = jax.devices() if devices is None else devices
        m.kernels = "xla_cpu" if all(d.platform == "cpu" for d in devices) else "xla"
    return config


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


class Preemption:
    """SIGTERM flag. Several hosts agree on it only every `every` steps (at log steps): the
    all-gather waits for the queued steps, so doing it every step would stall async dispatch."""

    def __init__(self, every: int = 1):
        self.requested = False
        self.every = max(int(every), 1)
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, *_):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_host(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
