"""`iar-jax train --config=configs/iar.py:SIZE --workdir=DIR [--config.a.b=v]`: train IAR / IAR2."""
from absl import flags, logging
from ml_collections import config_flags

from iar_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/iar.py:b", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics; resumed if it exists.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    runtime.setup()
    from iar_jax import trainer

    config = runtime.resolve_kernels(_CONFIG.value)
    logging.info("config:\n%s", config)
    tr, state = trainer.train_and_evaluate(config, _WORKDIR.value)
    if tr.preempted:
        raise runtime.Preempted(f"stopped by SIGTERM at step {int(state['step'])} after saving it; run the same "
                                "command again to resume")
