"""IAR2: fused semantic-detail tokens + local-context window head (arXiv 2510.06928).

Launch (one host, any device count; a TPU pod runs the same line on every worker):

    iar-jax train --config=configs/iar2.py:b --workdir=/tmp/iar2_b \
        --config.data.source=npy --config.data.path=/data/imagenet_dual_codes

`ARG` is a size (tiny | b | l | xl | xxl) optionally followed by `,key=value` presets:
`grid=N` (tokens per side; 24 = 384 px as released, 16 = 256 px), `rope=official|2d` (official,
the default: the released code's RoPE layout, required for official checkpoints; 2d: the proper
2D layout, for new training runs only), `w1=2` (semantic loss weight),
`classes=N`, `vocab=N` / `detail_vocab=N` (codebook sizes). Any field is also overridable with
`--config.a.b=value`. Codes are dual: `codes` (semantic ids) + `detail_codes` + `labels`.

Official checkpoints: `iar-jax convert --kind=iar2_gpt --config=configs/iar2.py:xl --torch=IAR2-XL.pt
--out=DIR`, then sample with the reference guidance (both sub-tokens 1.75 -> 3.0, w_attn 0.05):
`iar-jax sample --config=configs/iar2.py:xl --workdir=DIR ... --guidance=attention --cfg_start=1.75
--cfg_end=3.0 --w_attn=0.05`.

Recipe: the defaults of IAR2's `autoregressive/train/train_c2i_fsdp.py` (sjtuplayer/IAR2, the
README's recommended script): AdamW betas (0.9, 0.95), eps 1e-8, lr 3e-4 cosine to 1e-4 over the
whole run without warmup (CosineAnnealingLR stepped per batch), weight decay 0.05 on every param
whose name lacks "norm" (`optim.decay=not_norm`: its optimizer groups by name, so the biases of the
fusion MLP, the window MLPs and the output MLPs decay too), grad clip 1.0, global batch 256, w1 1
(the README's FSDP command passes `--w1 2.0`: preset `w1=2`), class dropout 0.1, token/residual/FFN
dropout 0.1, attention dropout 0, no drop path, 384 px (24x24 tokens), bf16 compute, no EMA (the
script parses `--ema` but keeps none). The DDP script's (`train_c2i_ddp.py`) grouping and schedule
instead: `--config.optim.decay=ndim --config.optim.lr=1.5e-4 --config.optim.min_lr=5e-5`.
Deviations on purpose: the run length is `train.num_steps` (1.5M steps ~ 300 epochs of ImageNet-1k
at batch 256, as for IAR; the script's 320 epochs are `--config.train.num_steps=1601280`), and params
stay fp32 under bf16 compute.
"""
import importlib.util
import os

import ml_collections

# The shared helpers (mesh, optimizer, train, data sections) live in configs/iar.py.
_spec = importlib.util.spec_from_file_location("_iar_config_base", os.path.join(os.path.dirname(__file__), "iar.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

# (n_layer, n_head, dim): the published IAR2 sizes (143.1M / 408.2M / 884.3M / 1570.1M params).
SIZES = {
    "tiny": (2, 4, 96),
    "b": (12, 12, 768),
    "l": (24, 16, 1024),
    "xl": (36, 20, 1280),
    "xxl": (48, 24, 1536),
}

# Target slice and global batch per size at the released 24x24 grid (see configs/iar.py's TARGETS).
TARGETS = {
    "b": {24: ("v5e:4x4", 256)},
    "l": {24: ("v5e:4x4", 256)},
    "xl": {24: ("v5p:2x2x4", 256)},
    "xxl": {24: ("v5p:2x4x4", 256)},
}
# IAR2-L's sampler at batch 256 does not fit one v5e chip (29.5 GiB of temporaries): use a smaller
# --global_batch or more chips for it.
SAMPLE_TARGETS = {"b": ("v5e:2x2", 256, 1)}
REMAT = {("b", 24): "dots", ("l", 24): "full"}  # measured: see iar.py


def get_config(arg=None):
    # vocab_size is the semantic codebook C_S.
    c, size, opts, tiny = _base.base_config("iar2", arg, SIZES, vocab=(16, 256), grid=(4, 24))
    c.model.remat = _base.remat_policy(REMAT, size, int(c.model.grid_size))
    m = c.model
    m.detail_vocab_size = int(opts.get("detail_vocab", 64 if tiny else 4096))
    m.head_layers = 2 if tiny else 5  # reference factorized_n_layer = 5
    rope = opts.get("rope", "official")
    if rope not in ("official", "2d"):
        raise ValueError(f"rope={rope!r} is not official or 2d; e.g. configs/iar2.py:b,rope=2d")
    m.official_rope = rope == "official"

    loss = c.loss = ml_collections.ConfigDict()
    loss.semantic_weight = float(opts.get("w1", 1.0))  # w1 in w1·CE_sem + CE_det (2.0 in one reference recipe)

    # Reference FSDP recipe (train_c2i_fsdp.py): cosine 3e-4 -> 1e-4, AdamW (0.9, 0.95), wd 0.05 on
    # every param whose name lacks "norm", clip 1.0, batch 256.
    c.optim = _base.optim_config(lr=3e-4, schedule="cosine", min_lr=1e-4, decay="not_norm")
    c.train = _base.train_config(global_batch=16 if tiny else 256, num_steps=100 if tiny else 1_500_000)
    if tiny:
        c.train.log_every, c.train.ckpt_every = 10, 50
    c.data = _base.data_config()
    big = size in ("xl", "xxl")
    c.mesh = _base.mesh_config(fsdp=-1 if big else 1, data=1 if big else -1)
    return c
