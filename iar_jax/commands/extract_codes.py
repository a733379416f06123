"""`iar-jax extract_codes --tokenizer=CKPT --dataset=NAME [--data_path=P] --out=DIR [--image_size=256]`.

Encodes every augmented view of every image (ten-crop at --crop_range 1.1 + flips, or the image
and its flip with --noten_crop) with the ORIGINAL tokenizer, sharded over this host's devices and,
when launched on several hosts, over hosts; writes ArrayRecord (or .npy) shards plus
metadata.json to DIR (layout: `iar_jax.data.extract`). Rerunning the same command after a kill
finishes the missing shards only. Train on it with `--config.data.source=records
--config.data.path=DIR` (+ `--config.loss.mapping_file` from `iar-jax rearrange` for IAR).

Datasets (`iar_jax.data.datasets`): fashion_mnist_embedded (default), fashion_mnist, digits, npz,
image_folder (--data_path=root/<class>/*), imagenet2012 (--data_path=manual_dir with the ImageNet
tars, --tfds_dir for the prepared TFDS copy).
"""
import json

from absl import flags, logging
from ml_collections import config_flags


_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "train_tokenizer workdir or official .pt/.pth file (original codebook)")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Tokenizer config, only to pin the model of a .pt file")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist_embedded", "Dataset name (see iar_jax.data.datasets)")
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split")
_DATA_PATH = flags.DEFINE_string("data_path", None, "Dataset path (folder, .npz, or ImageNet manual_dir)")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "TFDS data_dir for imagenet2012")
_OUT = flags.DEFINE_string("out", None, "Output directory")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Tokenizer input size (grid = image_size / downsample)")
_CROP_RANGE = flags.DEFINE_float("crop_range", 1.1, "Enlarged crop for ten-crop (IAR: 1.1)")
_TEN_CROP = flags.DEFINE_bool("ten_crop", True, "10 views per image (else 2: the image and its flip)")
_SMALL = flags.DEFINE_enum("small", "pad", ["pad", "resize"], "Images smaller than the crop: pad or resize")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per encode call (x number of views)")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 1024, "Images per output shard (the unit of resumption)")
_WORKERS = flags.DEFINE_integer("num_workers", 8, "Threads decoding and cropping images")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "array_record", "npy"], "Record format")
flags.mark_flags_as_required(["tokenizer", "out"])


def main(argv):
    del argv
    from iar_jax import console
    from iar_jax.data import datasets

    if _DATASET.value not in datasets.NAMES:
        raise ValueError(f"--dataset={_DATASET.value!r} is unknown; use one of {', '.join(datasets.NAMES)}")
    console.check_input(_TOKENIZER.value, "--tokenizer", fix="pass a train_tokenizer workdir or a VQ .pt file")
    if _DATA_PATH.value:
        console.check_input(_DATA_PATH.value, "--data_path", fix="pass the dataset's folder or file")
    console.check_output_dir(_OUT.value, "--out")
    from iar_jax import runtime

    runtime.setup()
    import jax

    from iar_jax.data import extract
    from iar_jax.tokenizer.checkpoint import load_tokenizer

    extract.refuse_rearranged(_TOKENIZER.value)
    want = None
    if _CONFIG.value is not None:
        from iar_jax.tokenizer.config import model_config_from

        want = model_config_from(_CONFIG.value)
    cfg, params = load_tokenizer(_TOKENIZER.value, want)
    f = cfg.downsample_factor
    if _IMAGE_SIZE.value % f:
        raise ValueError(f"--image_size={_IMAGE_SIZE.value} is not divisible by the tokenizer's downsample factor {f}; "
                         f"use a multiple of {f}")
    dataset = datasets.load_dataset(_DATASET.value, _SPLIT.value, _DATA_PATH.value, _TFDS_DIR.value)
    ecfg = extract.ExtractConfig(image_size=_IMAGE_SIZE.value, crop_range=_CROP_RANGE.value, ten_crop=_TEN_CROP.value,
                                 small=_SMALL.value, batch_size=_BATCH.value, records_per_shard=_PER_SHARD.value,
                                 num_workers=_WORKERS.value, format=_FORMAT.value)
    encode = extract.make_encode_fn(cfg, params, "dual" if cfg.dual else None)
    grid = (_IMAGE_SIZE.value // f,) * 2
    meta = extract.extract(dataset, encode, _OUT.value, ecfg, grid=grid, vocab=cfg.vocab_sizes,
                           fingerprint=extract.tokenizer_fingerprint(params),
                           dataset_name=f"{_DATASET.value}/{_SPLIT.value}", progress=jax.process_index() == 0)
    logging.info("host %d finished its shards of %s", jax.process_index(), _OUT.value)
    print(json.dumps(meta, sort_keys=True))
