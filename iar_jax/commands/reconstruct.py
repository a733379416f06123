"""`iar-jax reconstruct --tokenizer=CKPT --out=DIR [--config=configs/tokenizer.py:VARIANT] [--image_dir=D]`.

Encodes and decodes held-out images with a tokenizer (a train_tokenizer workdir or an official
PyTorch checkpoint) and writes DIR/reconstructions.png (originals and reconstructions side by
side) and DIR/metrics.json (PSNR, SSIM, codebook usage).
"""
import json
import os

from absl import flags, logging
from ml_collections import config_flags


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Tokenizer config (data settings; model settings when the checkpoint has none)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "train_tokenizer workdir or official .pt/.pth file")
_OUT = flags.DEFINE_string("out", None, "Output directory")
_IMAGES = flags.DEFINE_integer("images", 256, "Number of held-out images to evaluate")
_GRID = flags.DEFINE_integer("grid", 16, "Number of image pairs in the PNG")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Folder of images to reconstruct (instead of config.data)")
flags.mark_flags_as_required(["tokenizer", "out"])


def main(argv):
    del argv
    from iar_jax import console

    console.check_input(_TOKENIZER.value, "--tokenizer", fix="pass a train_tokenizer workdir or a VQ .pt file")
    if _IMAGE_DIR.value:
        console.check_input(_IMAGE_DIR.value, "--image_dir", "dir")
    console.check_output_dir(_OUT.value, "--out")
    from iar_jax import runtime

    runtime.setup()
    import jax

    from iar_jax.evaluation import reconstruction
    from iar_jax.tokenizer import training
    from iar_jax.tokenizer.checkpoint import TORCH_SUFFIXES, load_tokenizer
    from iar_jax.tokenizer.config import model_config_from
    from iar_jax.tokenizer.vq_model import build_model

    config = _CONFIG.value
    if config is None:
        from iar_jax.config_lib import load_config

        config = load_config("configs/tokenizer.py:tiny")
        logging.warning("no --config: reading images as configured by configs/tokenizer.py:tiny")
    # Model settings come from the checkpoint; a --config only pins them for official .pt files.
    is_torch = _TOKENIZER.value.endswith(TORCH_SUFFIXES)
    want = model_config_from(config) if (is_torch and _CONFIG.value is not None) else None
    cfg, params = load_tokenizer(_TOKENIZER.value, want)
    if _IMAGE_DIR.value:
        from iar_jax.tokenizer.data import load_image_files

        images = load_image_files(_IMAGE_DIR.value, int(config.data.image_size), _IMAGES.value, cfg.in_channels)
    else:
        images = training.make_image_source(config, config.data.eval_split, _IMAGES.value, channels=cfg.in_channels)
    model = build_model(cfg)
    results, recon = training.evaluate(model, jax.device_put(params), images, _BATCH.value,
                                       mode="dual" if cfg.dual else None)
    os.makedirs(_OUT.value, exist_ok=True)
    n = _GRID.value
    reconstruction.save_reconstruction_grid(os.path.join(_OUT.value, "reconstructions.png"), images[:n], recon[:n])
    with open(os.path.join(_OUT.value, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    logging.info("reconstruction metrics: %s", results)
    print(json.dumps(results))
