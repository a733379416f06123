"""`iar-jax rearrange --tokenizer=CKPT --cluster_size=128 --out=DIR [--codebook=embedding]`.

Balanced k-means over the tokenizer's codebook (IAR, SPEC §3; `iar_jax.rearrange`). Writes to DIR:
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
import os

import numpy as np
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

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def write_outputs(out: str, r, info: dict) -> None:
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "mapping.npy"), r.mapping.astype(np.int32))
    np.save(os.path.join(out, "new_order.npy"), r.new_order.astype(np.int32))
    np.save(os.path.join(out, "codebook.npy"), r.codebook)
    with open(os.path.join(out, "rearrangement.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


def write_tokenizer(out: str, cfg, params, info: dict) -> str:
    from iar_jax.checkpointing import Checkpointer
    from iar_jax.tokenizer.config import model_meta

    path = os.path.join(out, "tokenizer")
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), keep=1, async_save=False)
    meta = {"kind": "tokenizer_rearranged", "model_family": "tokenizer", "model": model_meta(cfg), "rearranged": info}
    ckpt.save(0, {"params": params}, {}, meta, force=True)
    ckpt.close()
    return path


def write_torch(out: str, tokenizer_path: str, codebook: str, r) -> None:
    try:
        import torch
    except ImportError:
        logging.warning("torch is not installed: not writing tokenizer_reordered.pt / mapping.pt")
        return
    raw = torch.load(tokenizer_path, map_location="cpu", weights_only=False)
    key = f"quantize.{codebook}.weight" if codebook == "embedding" else "quantize.embedding_second"
    found = 0
    for sd in (raw, raw.get("model"), raw.get("ema")) if isinstance(raw, dict) else ():
        for k in list(sd or {}) if isinstance(sd, dict) else ():
            if k.split("module.")[-1] == key:
                sd[k] = sd[k][torch.from_numpy(r.new_order)]
                found += 1
    if not found:
        logging.warning("no %s in %s: not writing tokenizer_reordered.pt", key, tokenizer_path)
        return
    torch.save(raw, os.path.join(out, "tokenizer_reordered.pt"))
    torch.save(torch.from_numpy(r.mapping.astype(np.int64)), os.path.join(out, "mapping.pt"))


def main(argv):
    del argv
    from iar_jax import rearrange as R
    from iar_jax.data.extract import tokenizer_fingerprint
    from iar_jax.tokenizer.checkpoint import load_tokenizer

    want = None
    if _CONFIG.value is not None:
        from iar_jax.tokenizer.config import model_config_from

        want = model_config_from(_CONFIG.value)
    cfg, params = load_tokenizer(_TOKENIZER.value, want)
    table = params.get("quantize", {}).get(_CODEBOOK.value)
    if table is None:
        raise ValueError(f"{_TOKENIZER.value} has no quantize/{_CODEBOOK.value}; use --codebook=embedding"
                         + (" or embedding_second" if cfg.dual else ""))
    # Cluster in the geometry the quantizer looks codes up in: IAR2's detail table is used raw.
    normalize = cfg.codebook_l2_norm and _CODEBOOK.value == "embedding"
    kcfg = R.KMeansConfig(cluster_size=_CLUSTER.value, method=_METHOD.value, seed=_SEED.value, nn_chain=_CHAIN.value,
                          normalize=normalize)
    r = R.rearrange_codebook(np.asarray(table), kcfg)
    info = {"tokenizer": os.path.abspath(_TOKENIZER.value), "codebook": _CODEBOOK.value, "num_codes": len(r.mapping),
            "cluster_size": _CLUSTER.value, "method": _METHOD.value, "seed": _SEED.value, "intra_mse": r.intra_mse,
            "iterations": r.iterations, "normalized": normalize, "tokenizer_fingerprint": tokenizer_fingerprint(params)}
    write_outputs(_OUT.value, r, info)
    write_tokenizer(_OUT.value, cfg, R.reorder_params(params, r.new_order, _CODEBOOK.value), info)
    if _TOKENIZER.value.endswith(TORCH_SUFFIXES):
        write_torch(_OUT.value, _TOKENIZER.value, _CODEBOOK.value, r)
    logging.info("rearranged %d codes into clusters of %d: intra-cluster MSE %.6f after %d iterations",
                 len(r.mapping), _CLUSTER.value, r.intra_mse, r.iterations)
    print(json.dumps(info, sort_keys=True))
