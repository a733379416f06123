"""IAR: LlamaGen GPT + cluster-oriented cross-entropy on a rearranged codebook.

Launch (one host, any device count; a TPU pod runs the same line on every worker):

    iar-jax train --config=configs/iar.py:b --workdir=/tmp/iar_b \
        --config.data.path=/data/imagenet_codes --config.loss.mapping_file=/data/rearranged/mapping.npy

`ARG` is a size (tiny | b | l | xl | xxl | 3b) optionally followed by `,key=value` presets:
`grid=24` (384 px, 24x24 tokens), `vocab=N`, `classes=N`, `cluster=N`. Any field is also
overridable with `--config.a.b=value`.

Recipe: the defaults of IAR's `autoregressive/train/train_c2i.py` (sjtuplayer/IAR): AdamW lr 1e-4
constant (no scheduler, no warmup), betas (0.9, 0.95), eps 1e-8, weight decay 0.05 on >= 2-D params
only (`optim.decay=ndim`; the GPT has no biases, so `not_norm` would pick the same tensors), grad clip
1.0, global batch 256, class dropout 0.1, token/residual/FFN dropout 0.1, attention dropout 0, no
drop path, cluster CE weight 1 with cluster size 128, 256 px (16x16 tokens), bf16 compute, EMA off
(`--ema` is opt-in there; its decay 0.9999 is `--config.train.ema_decay=0.9999` here). Deviations on
purpose: the run length is `train.num_steps` (1.5M steps ~ 300 epochs of ImageNet-1k at batch 256)
instead of epochs, and params stay fp32 under bf16 compute.
"""
import ml_collections

# (n_layer, n_head, dim): the published LlamaGen/IAR sizes.
SIZES = {
    "tiny": (2, 4, 64),
    "b": (12, 12, 768),
    "l": (24, 16, 1024),
    "xl": (36, 20, 1280),
    "xxl": (48, 24, 1536),
    "3b": (24, 32, 3200),
}

# Target slice and global batch of each size, per token grid (16x16 = 256 px, 24x24 = 384 px), proven
# by `python benchmarks/tpu_aot.py --table` (README: "Proven on TPU ahead of time"). Slice names count
# chips: v5e:2x4 is v5e-8, v5e:4x4 v5e-16, v5p:2x2x4 v5p-32 (16 chips), v5p:2x4x4 v5p-64.
TARGETS = {
    "b": {16: ("v5e:2x4", 256), 24: ("v5e:4x4", 256)},
    "l": {16: ("v5e:4x4", 256), 24: ("v5e:4x4", 256)},
    "xl": {16: ("v5p:2x2x4", 256), 24: ("v5p:2x2x4", 256)},
    "xxl": {16: ("v5p:2x2x4", 256), 24: ("v5p:2x2x4", 256)},
    "3b": {16: ("v5p:2x4x4", 256), 24: ("v5p:2x4x4", 256)},
}
# Activation rematerialisation each (size, grid) needs to fit its target (measured; see remat_policy).
REMAT = {("b", 24): "dots", ("l", 24): "dots"}
# Sampling: (slice, images with CFG, chips used): batch 256 on one v5e chip.
SAMPLE_TARGETS = {"b": ("v5e:2x2", 256, 1), "l": ("v5e:2x2", 256, 1)}


def parse_arg(arg, default_size="b"):
    parts = [p for p in (arg or default_size).split(",") if p]
    size, opts = parts[0], {}
    for p in parts[1:]:
        if "=" not in p:
            raise ValueError(f"config argument {p!r} is not key=value; use e.g. configs/iar.py:b,grid=24")
        k, v = p.split("=", 1)
        opts[k] = v
    return size, opts


def mesh_config(data=-1, fsdp=1, tensor=1):
    mesh = ml_collections.ConfigDict()
    # Axis sizes; one may be -1 (= the remaining devices). data x fsdp x tensor must equal the count.
    mesh.data, mesh.fsdp, mesh.tensor = data, fsdp, tensor
    # Logical -> mesh axis rules (MaxText style). Parameters: 'embed' is split over fsdp (ZeRO-3:
    # all-gathered per layer, gradients reduce-scattered); 'heads'/'mlp'/'vocab' over tensor.
    # Activations have names of their own ('act_*'): batch over data and fsdp, features replicated
    # except the tensor-parallel heads/mlp/vocab.
    mesh.rules = (
        ("act_batch", ("data", "fsdp")),
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv", None),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("kv", None),
        ("length", None),
        ("layers", None),
        ("norm", None),
        ("classes", None),
    )
    return mesh


def optim_config(lr=1e-4, schedule="constant", min_lr=0.0, warmup_steps=0, decay="ndim"):
    o = ml_collections.ConfigDict()
    o.lr = lr
    o.schedule = schedule  # constant | cosine
    o.min_lr = min_lr  # cosine end value
    o.warmup_steps = warmup_steps
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.05
    # Which params decay (trainer.DECAY_RULES): ndim = >= 2-D only (LlamaGen, IAR train_c2i.py,
    # IAR2 train_c2i_ddp.py); not_norm = all but norm weights, biases too (IAR2 train_c2i_fsdp.py).
    o.decay = decay
    o.grad_clip = 1.0
    return o


def train_config(global_batch=256, num_steps=1_500_000):
    t = ml_collections.ConfigDict()
    t.seed = 0
    t.global_batch = global_batch
    t.micro_batches = 1  # gradient accumulation: global_batch is split into this many scanned chunks
    t.num_steps = num_steps
    t.ema_decay = 0.0  # 0 disables the EMA copy of the params
    t.log_every = 100
    t.ckpt_every = 5000
    t.keep_ckpts = 3
    # auto | params_only (a changed state tree, e.g. ema_decay: keep params + step, re-init the
    # rest) | start_over (every checkpoint unreadable: train from scratch beside them)
    t.restore = "auto"
    return t


def data_config():
    d = ml_collections.ConfigDict()
    # synthetic (tests) | npy (codes [N, T] + labels [N] in .npz / .npy pair) | records (extracted codes)
    d.source = "synthetic"
    d.path = ""
    d.tokenizer = ""  # tokenizer checkpoint the codes must come from (checked by fingerprint); "" = unchecked
    d.synthetic_size = 4096
    d.loader = "grain"  # grain | numpy: the same batches and saved positions; grain prefetches in threads
    d.num_workers = 2  # grain read threads (0: read each batch in the training loop)
    return d


def base_config(family: str, arg, sizes, vocab, grid):
    """(config, size, opts, tiny) with the model fields IAR and IAR2 share; `vocab` and `grid` are
    the (tiny, full-size) defaults."""
    size, opts = parse_arg(arg)
    if size not in sizes:
        raise ValueError(f"unknown {family.upper()} size {size!r}; use one of {', '.join(sizes)}")
    n_layer, n_head, dim = sizes[size]
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.model_family = family
    c.size = size

    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = int(opts.get("vocab", vocab[0] if tiny else vocab[1]))
    m.num_classes = int(opts.get("classes", 10 if tiny else 1000))
    m.dim, m.n_layer, m.n_head = dim, n_layer, n_head
    m.grid_size = int(opts.get("grid", grid[0] if tiny else grid[1]))
    m.cls_token_num = 1
    m.token_dropout = 0.1
    m.attn_dropout = 0.0
    m.resid_dropout = 0.1
    m.ffn_dropout = 0.1
    m.drop_path = 0.0
    m.class_dropout = 0.1
    m.dtype = "float32" if tiny else "bfloat16"  # compute dtype; params stay fp32
    m.scan_layers = True
    # auto: the entry points (CLI, benchmarks) use the XLA:CPU-tuned programs when they compile for
    # CPU devices and "xla" (what accelerators run) otherwise; library code reads auto as "xla".
    m.kernels = "auto"
    m.attention = "dot_product"  # dot_product (cuDNN flash on GPU, fused XLA on TPU) | pallas_flash (TPU)
    m.remat = "none"  # the family's REMAT table sets the policy its target needs (get_config)
    return c, size, opts, tiny


def remat_policy(remat_table, size, grid):
    """The cheapest remat policy (none < dots < full) with which `size` at `grid` fits its target
    slice with >= 10% HBM headroom, as benchmarks/tpu_aot.py measured it; none where unlisted.
    A user's own slice or batch may need another: `--config.model.remat=dots|full`."""
    return remat_table.get((size, grid), "none")


def get_config(arg=None):
    c, size, opts, tiny = base_config("iar", arg, SIZES, vocab=(256, 16384), grid=(4, 16))
    c.model.remat = remat_policy(REMAT, size, int(c.model.grid_size))

    loss = c.loss = ml_collections.ConfigDict()
    loss.cluster_size = int(opts.get("cluster", 16 if tiny else 128))
    loss.cluster_weight = 1.0  # lambda; 0 = plain LlamaGen token CE
    loss.mapping_file = ""  # old -> new code ids (.npy) from `iar-jax rearrange`; "" = codes already in new order

    c.optim = optim_config(lr=1e-4)
    c.train = train_config(global_batch=16 if tiny else 256, num_steps=100 if tiny else 1_500_000)
    if tiny:
        c.train.log_every, c.train.ckpt_every = 10, 50
    c.data = data_config()
    c.mesh = mesh_config(fsdp=-1 if size in ("xl", "xxl", "3b") else 1, data=1 if size in ("xl", "xxl", "3b") else -1)
    return c
