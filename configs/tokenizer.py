"""Tokenizer training configs: LlamaGen VQ-16 / VQ-8, the IAR2 dual tokenizer, tiny CPU presets.

    iar-jax train_tokenizer --config=configs/tokenizer.py:vq16 --workdir=/ckpt/vq16 \
        --config.data.path=/data/imagenet/train --config.data.eval_path=/data/imagenet/val \
        --config.loss.lpips_vgg_path=/weights/vgg16-397923af.pth --config.loss.lpips_lin_path=/weights/vgg.pth

Variants:
  vq16            LlamaGen VQ-16 (ch 128, ch_mult 1,1,2,2,4, 16384 codes × 8), 256 px, batch 128
  vq8             LlamaGen VQ-8 (ch_mult 1,2,2,4)
  iar2            IAR2 dual tokenizer (C_S 256 + C_D 4096) with the two-stage recipe
  tiny            CPU preset on Fashion-MNIST 28 px: 2× downsample (14×14 tokens), 512 codes, no LPIPS/GAN
  tiny7           `tiny` with one more level: 4× downsample (7×7 tokens) for quick AR demos
  tiny_single256  `tiny` with a 256-code codebook (the single-codebook baseline of the dual one)
  tiny_dual       `tiny` with the IAR2 dual quantizer (C_S 256 + C_D 1024)
LPIPS needs user-supplied weights (torchvision vgg16 state dict + LPIPS linear layers); without
them set `--config.loss.perceptual_weight=0` (training then warns that LPIPS is off).
"""
import ml_collections

VARIANTS = ("vq16", "vq8", "iar2", "tiny", "tiny7", "tiny_single256", "tiny_dual")


def _model(**kw):
    m = ml_collections.ConfigDict(dict(
        codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, commit_loss_beta=0.25,
        entropy_loss_ratio=0.0, encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4),
        z_channels=256, ch=128, num_res_blocks=2, in_channels=3, out_channels=3, norm_groups=32,
        norm_eps=1e-6, dropout_p=0.0, dual=False, semantic_codebook_size=256, dtype="float32",
    ))
    m.update(kw)
    return m


def get_config(arg: str = "vq16"):
    variant = (arg or "vq16").split(",")[0]
    if variant not in VARIANTS:
        raise ValueError(f"unknown tokenizer variant {variant!r}; use one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.model = _model()
    # LlamaGen / IAR2 reference loss settings.
    c.loss = ml_collections.ConfigDict(dict(
        reconstruction_loss="l2", reconstruction_weight=1.0, perceptual_weight=1.0, disc_weight=0.5,
        disc_start=20000, disc_loss="hinge", gen_loss="hinge", disc_dim=64, disc_num_layers=3,
        stage1_reconstruction_weight=0.0, lpips_vgg_path="", lpips_lin_path="",
    ))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, beta1=0.9, beta2=0.95, max_grad_norm=1.0))
    c.recipe = ml_collections.ConfigDict(dict(stage1_steps=0, dual_iters=2, semantic_iters=1, usage_window=65536))
    c.data = ml_collections.ConfigDict(dict(
        name="image_folder", path="", eval_path="", split="train", eval_split="val", image_size=256, flip=True,
        eval_images=1000, num_workers=2,  # grain read threads prefetching batches (0: read in the loop)
    ))
    # Params and optimizer state: each array's largest fitting axis is 'embed', split over fsdp.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=(("embed", "fsdp"),)))
    c.train = ml_collections.ConfigDict(dict(
        global_batch=128, num_steps=400_000,  # ~40 ImageNet epochs at batch 128 (LlamaGen)
        seed=0, log_every=100, ckpt_every=5000, keep_ckpts=3, num_grid_images=16,
    ))

    if variant == "vq8":
        c.model.encoder_ch_mult = c.model.decoder_ch_mult = (1, 2, 2, 4)
    elif variant == "iar2":
        c.model.dual = True
        c.model.codebook_size = 4096
        c.recipe.stage1_steps = 200_000
    elif variant.startswith("tiny"):
        # ~0.1 GFLOP per 28 px image: 2 levels (2x downsample, 14x14 tokens), 16-32 channels.
        # `tiny7` adds a level (4x, 7x7 tokens: shorter AR sequences, lower fidelity).
        c.model.update(dict(
            codebook_size=512, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32, ch=16,
            num_res_blocks=1, norm_groups=8, entropy_loss_ratio=0.02,
        ))
        c.loss.perceptual_weight = 0.0  # no VGG weights offline
        c.loss.disc_weight = 0.0  # too few steps for a GAN to help
        c.optim.lr = 2e-3
        c.data.update(dict(name="fashion_mnist", split="train", eval_split="test", image_size=28, eval_images=2000))
        c.train.update(dict(global_batch=32, num_steps=300, log_every=50, ckpt_every=1000))
        c.recipe.usage_window = 8192
        if variant == "tiny7":
            c.model.encoder_ch_mult = c.model.decoder_ch_mult = (1, 1, 2)
        elif variant == "tiny_single256":
            c.model.codebook_size = 256
            c.train.num_steps = 200  # the dual comparison: same budget as tiny_dual
        elif variant == "tiny_dual":
            c.train.num_steps = 200
            c.model.dual = True
            c.model.codebook_size = 1024  # detail codebook; the semantic one has 256 entries
            # No LPIPS offline, so a stage 1 without pixel loss would have no image loss at all; the
            # CPU preset starts directly with the stage-2 cycles (set recipe.stage1_steps to add one).
            c.recipe.stage1_steps = 0
    return c
