"""`iar-jax sample`: class-conditional samples -> DIR/samples.npz (ADM format) + DIR/grid.png.

    iar-jax sample --config=configs/iar.py:b --workdir=/ckpt/iar_b --checkpoint=ema \
        --tokenizer=/weights/vq_ds16_c2i.pt --per_class=50 --out=/samples/iar_b \
        --guidance=constant --cfg_scale=2.0 [--resize=256] [--global_batch=256]

    # IAR2, progressive attention-guided CFG with its own (start, end) per sub-token:
    iar-jax sample --config=configs/iar2.py:b --workdir=/ckpt/iar2_b --tokenizer=/weights/iar2_vq.pt \
        --guidance=attention --cfg_start=1.75 --cfg_end=3.0 --w_attn=0.05 --num_samples=50000 --out=DIR

--workdir is a train workdir or an `iar-jax convert` output; --checkpoint picks `latest` (default),
a STEP, `ema` (newest EMA params) or `STEP:ema`. Sampling flags take one value or one per
sub-token (IAR2: semantic,detail). Re-running the same command resumes: finished chunks are kept.
num_samples not divisible by the global batch is fine: the last batch is padded and trimmed.
"""
import os

from absl import flags, logging
from ml_collections import config_flags

from iar_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config, e.g. configs/iar.py:b", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Train workdir or `iar-jax convert` output holding the model params")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | STEP | ema | STEP:ema")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "train_tokenizer workdir or official VQ .pt file")
_MAPPING = flags.DEFINE_string("mapping_file", None,
                               "IAR old->new code mapping (.npy); default config.loss.mapping_file; '' = none")
_OUT = flags.DEFINE_string("out", None, "Output directory (re-use it to resume)")
_NUM = flags.DEFINE_integer("num_samples", 0, "Number of samples (default per_class × num_classes)")
_PER_CLASS = flags.DEFINE_integer("per_class", 0, "Class-balanced labels, this many per class (ADM: 50)")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 0, "Samples per step over all devices (default 32 per device)")
_SEED = flags.DEFINE_integer("seed", 0, "Seed: labels (when random) and all sampling randomness")
_RESIZE = flags.DEFINE_integer("resize", 0, "Bicubic resize to this size before saving (e.g. 384 -> 256); 0 = off")
_GRID = flags.DEFINE_integer("grid", 64, "Images in grid.png")
_GUIDANCE = flags.DEFINE_string("guidance", "constant", "constant | interval | linear | attention (per sub-token ok)")
_CFG_SCALE = flags.DEFINE_string("cfg_scale", "2.0", "constant / interval scale")
_CFG_TOKENS = flags.DEFINE_string("cfg_tokens", None, "interval: guide only the first K positions")
_CFG_START = flags.DEFINE_string("cfg_start", None, "linear / attention: scale at the first position")
_CFG_END = flags.DEFINE_string("cfg_end", None, "linear / attention: scale at the last position")
_W_ATTN = flags.DEFINE_string("w_attn", None, "attention: weight of the class-attention term")
_TEMPERATURE = flags.DEFINE_string("temperature", "1.0", "0 = greedy")
_TOP_K = flags.DEFINE_string("top_k", "0", "0 = off")
_TOP_P = flags.DEFINE_string("top_p", "1.0", "1 = off; must be in (0, 1]")
flags.mark_flags_as_required(["config", "workdir", "tokenizer", "out"])

_TORCH_KIND = {"iar": "llamagen_gpt", "iar2": "iar2_gpt"}


def step_fns_for(family: str, module, model_cfg):
    """The family's sampling step (see iar_jax.sampling.sampler.StepFns)."""
    if family == "iar":
        from iar_jax.sampling import gpt_step

        return gpt_step.step_fns(module, model_cfg)
    import importlib

    mod = importlib.import_module("iar_jax.models.iar2") if family == "iar2" else None
    fn = getattr(mod, "sampling_step_fns", None) if mod is not None else None
    if fn is None:
        raise ValueError(f"model family {family!r} has no sampler step (expected iar_jax.models.{family}."
                         "sampling_step_fns); use an IAR config or update iar-jax")
    return fn(module, model_cfg)


def load_model_params(workdir: str, checkpoint: str, expect_meta):
    from iar_jax import checkpointing

    from iar_jax.sampling.generate import parse_checkpoint

    step, ema = parse_checkpoint(checkpoint)
    if step is None:
        params, meta = checkpointing.load_params(workdir, expect_meta, ema=ema)
        return params, meta
    import orbax.checkpoint as ocp

    ck_dir = os.path.join(workdir, "checkpoints") if os.path.isdir(os.path.join(workdir, "checkpoints")) else workdir
    ck = checkpointing.Checkpointer(ck_dir, async_save=False)
    if step not in ck.all_steps():
        raise ValueError(f"no checkpoint for step {step} in {ck_dir}; available: {ck.all_steps()}")
    meta = ck.read_meta(step)
    checkpointing.check_kind(meta, expect_meta, os.path.join(ck_dir, str(step)))
    state = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    key = "ema_params" if ema else "params"
    if key not in state:
        raise ValueError(f"checkpoint {ck_dir}/{step} has no {key}; train with --config.train.ema_decay>0 or drop :ema")
    return state[key], dict(meta, step=step)


def main(argv):
    del argv
    runtime.setup()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iar_jax import sharding
    from iar_jax.families import get_family, load_mapping
    from iar_jax.sampling import generate as gen
    from iar_jax.tokenizer.checkpoint import load_tokenizer
    from iar_jax.trainer import structural_model_meta

    config = _CONFIG.value
    family = get_family(config.model_family)
    module, model_cfg = family.build(config)
    step_fns = step_fns_for(config.model_family, module, model_cfg)
    spec = gen.make_spec(step_fns.sub_tokens, _GUIDANCE.value, _CFG_SCALE.value, _CFG_START.value, _CFG_END.value,
                         _W_ATTN.value, _CFG_TOKENS.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    spec.validate(step_fns.vocab_sizes or None, step_fns.sub_tokens)
    num_classes = int(config.model.num_classes)
    labels = gen.class_labels(_NUM.value, num_classes, _PER_CLASS.value, _SEED.value)

    vq_cfg, vq_params = load_tokenizer(_TOKENIZER.value)
    model_vocab = (config.model.vocab_size,) + ((config.model.detail_vocab_size,) if vq_cfg.dual and
                                                "detail_vocab_size" in config.model else ())
    gen.check_vocab(model_vocab, vq_cfg.vocab_sizes)
    mapping_file = _MAPPING.value if _MAPPING.value is not None else config.get("loss", {}).get("mapping_file", "")
    new_order = None
    if mapping_file and not vq_cfg.dual:
        new_order = np.argsort(load_mapping(mapping_file, int(config.model.vocab_size)))

    expect = {"model_family": config.model_family, "model": structural_model_meta(config)}
    params, meta = load_model_params(_WORKDIR.value, _CHECKPOINT.value, expect)
    logging.info("model params from %s (%s)", _WORKDIR.value, {k: meta.get(k) for k in ("kind", "step", "source")})

    mesh = sharding.make_mesh(config.mesh)
    dummy = {k: jnp.zeros((1,) + tuple(s), d) for k, (s, d) in family.batch_spec(config).items()}
    # Logical names only (no mesh context: shapes are traced, nothing is placed yet).
    boxed = jax.eval_shape(lambda r: family.init(module, r, dummy), jax.random.PRNGKey(0))["params"]
    param_shardings = sharding.logical_shardings(boxed, mesh, config.mesh)
    params = jax.device_put(params, param_shardings)

    global_batch = _GLOBAL_BATCH.value or 32 * jax.device_count()
    sample_fn = gen.make_sharded_sampler(step_fns, spec, mesh, param_shardings)
    decode_fn = gen.make_decode_fn(gen.vq_decoder(vq_cfg, jax.device_put(vq_params)), int(config.model.grid_size),
                                   vq_cfg.dual, new_order)
    settings = {"checkpoint": _CHECKPOINT.value, "step": meta.get("step"), "spec": repr(spec),
                "per_class": _PER_CLASS.value, "tokenizer": os.path.abspath(_TOKENIZER.value)}
    summary = gen.generate(sample_fn, params, labels, _OUT.value, global_batch=global_batch, mesh=mesh,
                           decode_fn=decode_fn, num_classes=num_classes, seed=_SEED.value, resize=_RESIZE.value,
                           grid=_GRID.value, settings=settings)
    logging.info("sampling done: %s", summary)
    if jax.process_index() == 0:
        print(summary)
