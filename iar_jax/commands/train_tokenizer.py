"""`iar-jax train_tokenizer --config=configs/tokenizer.py:VARIANT --workdir=DIR [--config.a.b=v]`.

Trains a LlamaGen VQ tokenizer or the IAR2 dual tokenizer (two-stage recipe), resuming from
DIR/checkpoints; at the end evaluates PSNR / SSIM / codebook usage on `data.eval_split` and writes
DIR/eval.json and DIR/reconstructions.png.
"""
from absl import flags, logging
from ml_collections import config_flags

from iar_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tokenizer.py:vq16",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics; resumed if it exists.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    runtime.setup()
    from iar_jax.tokenizer import training

    config = _CONFIG.value
    logging.info("config:\n%s", config)
    n_eval = int(config.data.eval_images)
    eval_images = training.make_image_source(config, config.data.eval_split, n_eval) if n_eval else None
    tr, state, results = training.train_and_evaluate(config, _WORKDIR.value, eval_images=eval_images)
    if tr.preempted:
        raise runtime.Preempted(f"stopped by SIGTERM at step {int(state['step'])} after saving it; run the same "
                                "command again to resume")
    if results:
        logging.info("evaluation: %s", results)
