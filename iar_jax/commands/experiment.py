"""`iar-jax experiment --config=configs/repro_fmnist.py --workdir=DIR`: IAR's training-speed claim in miniature.

Baseline (token CE), IAR (+ cluster CE on the k-means-rearranged codebook) and a random-cluster
control on Fashion-MNIST codes, two codebook regimes, several seeds per arm; small-CNN FID curves,
the speed ratio and the teacher-forced robustness with 95% bootstrap intervals. Writes
DIR/curves.png, DIR/table.md, DIR/table.json (see `iar_jax.experiment`). Rerunning the same
command resumes: finished stages, runs and FID points are kept; SIGTERM saves and exits 143.
"""
import os

from absl import flags, logging
from ml_collections import config_flags


_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "repro_fmnist.py"), "Experiment config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory; resumed if it exists.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from iar_jax import console

    console.check_output_dir(_WORKDIR.value, "--workdir")
    console.import_tensorflow_quietly()
    from iar_jax import runtime

    runtime.setup()
    import json
    import time

    from iar_jax import experiment

    t0 = time.time()
    runtime.resolve_kernels(_CONFIG.value.ar)
    report = experiment.run(_CONFIG.value, _WORKDIR.value)
    logging.info("experiment done in %.0f s", time.time() - t0)
    print(experiment.table_markdown(report["tables"], report["chance"]), end="")
    print(json.dumps({"workdir": _WORKDIR.value, "tables": report["tables"], "seconds": round(time.time() - t0, 1)}))
