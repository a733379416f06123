"""`iar-jax rearrange --tokenizer=CKPT --cluster_size=128 --out=DIR [--codebook=embedding]`.

Balanced k-means over the tokenizer's codebook (IAR, SPEC §3; `iar_jax.rearrange`; files:
`iar_jax.pipeline.rearrange_tokenizer`). Writes to DIR:
  mapping.npy        old code id -> new id: training applies it to codes extracted with the
                     ORIGINAL tokenizer (`--config.loss.mapping_file=DIR/mapping.npy`);
  new_order.npy      new id -> old id;  codebook.npy: the reordered (un-normalised) codebook;
  rearrangement.json cluster size, intra-cluster MSE, iterations, tokenizer fingerprint;
  tokenizer/         the tokenizer with its codebook reordered, for decoding rearranged codes
                     (loads like a train_tokenizer workdir); never extract codes with it;
  tokenizer_reordered.pt, mapping.pt   the same for the official PyTorch code, when the input is a
                     PyTorch file and torch is installed.
`--codebook=embedding` is the single codebook (or IAR2's semantic one), `embedding_second` IAR2's
detail codebook.
"""
import json

from absl import flags, logging
from ml_collections import config_flags

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "train_tokenizer workdir or official .pt/.pth file")
_OUT = flags.DEFINE_string("out", None, "Output directory")
_CLUSTER = flags.DEFINE_integer("cluster_size", 128, "Codes per cluster (must divide the codebook size)")
_CODEBOOK = flags.DEFINE_enum("codebook", "embedding", ["embedding", "embedding_second"],
                              "Quantizer table: embedding (single / IAR2 semantic), embedding_second (IAR2 detail)")
_METHOD = flags.DEFINE_enum("method", "anneal", ["anneal", "greedy"], "Balanced k-means method (greedy = reference)")
_SEED = flags.DEFINE_integer("seed", 0, "k-means seed")
_CHAIN = flags.DEFINE_bool("nn_chain", True, "Order codes inside a cluster as a nearest-neighbour chain (cosmetic)")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Tokenizer config, only to pin the model of a .pt file")
flags.mark_flags_as_required(["tokenizer", "out"])


def main(argv):
    del argv
    from iar_jax import console, runtime

    console.check_input(_TOKENIZER.value, "--tokenizer", fix="pass a train_tokenizer workdir or a VQ .pt file")
    console.check_output_dir(_OUT.value, "--out")
    if _CLUSTER.value < 1:
        raise ValueError(f"--cluster_size={_CLUSTER.value} must be positive (IAR: 128 for 16384 codes)")
    from iar_jax.pipeline import rearrange_tokenizer

    runtime.setup()

    want = None
    if _CONFIG.value is not None:
        from iar_jax.tokenizer.config import model_config_from

        want = model_config_from(_CONFIG.value)
    info = rearrange_tokenizer(_TOKENIZER.value, _OUT.value, _CLUSTER.value, _CODEBOOK.value, _METHOD.value,
                               _SEED.value, _CHAIN.value, want)
    logging.info("rearranged %d codes into clusters of %d: intra-cluster MSE %.6f after %d iterations",
                 info["num_codes"], _CLUSTER.value, info["intra_mse"], info["iterations"])
    print(json.dumps(info, sort_keys=True))
