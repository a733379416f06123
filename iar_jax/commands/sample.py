r"""`iar-jax sample`: class-conditional samples -> DIR/samples.npz (ADM format) + DIR/grid.png.

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
from absl import flags, logging
from ml_collections import config_flags


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


def _numbers(kind):
    def ok(value):
        if value is None:
            return True
        try:
            [kind(v) for v in value.split(",")]
        except ValueError:
            return False
        return True

    return ok


for _flag, _kind in ((_CFG_SCALE, float), (_CFG_TOKENS, int), (_CFG_START, float), (_CFG_END, float),
                     (_W_ATTN, float), (_TEMPERATURE, float), (_TOP_K, int), (_TOP_P, float)):
    flags.register_validator(_flag.name, _numbers(_kind),
                             f"--{_flag.name} takes {'an integer' if _kind is int else 'a number'} or one per "
                             "sub-token, e.g. 2.0 or 1.5,3.0 (semantic,detail)")


def check_inputs() -> None:
    from iar_jax import console

    console.check_input(_WORKDIR.value, "--workdir", "dir", "pass a train workdir or an `iar-jax convert` output")
    console.check_input(_TOKENIZER.value, "--tokenizer", fix="pass a train_tokenizer workdir or a VQ .pt file")
    mapping = _MAPPING.value if _MAPPING.value is not None else _CONFIG.value.get("loss", {}).get("mapping_file")
    if mapping:
        flag = "--mapping_file" if _MAPPING.value else "--config.loss.mapping_file"
        console.check_input(mapping, flag, "file", "pass the mapping.npy of `iar-jax rearrange` (or '' for none)")
    console.check_output_dir(_OUT.value, "--out")

def main(argv):
    del argv
    check_inputs()
    from iar_jax import runtime

    runtime.setup()
    import jax

    from iar_jax.sampling import generate as gen

    config = runtime.resolve_kernels(_CONFIG.value)
    labels = gen.class_labels(_NUM.value, int(config.model.num_classes), _PER_CLASS.value, _SEED.value)
    summary = gen.sample_from_workdir(
        config, _WORKDIR.value, _TOKENIZER.value, _OUT.value, labels, checkpoint=_CHECKPOINT.value,
        mapping_file=_MAPPING.value, guidance=_GUIDANCE.value, cfg_scale=_CFG_SCALE.value, cfg_start=_CFG_START.value,
        cfg_end=_CFG_END.value, w_attn=_W_ATTN.value, cfg_tokens=_CFG_TOKENS.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value, global_batch=_GLOBAL_BATCH.value, seed=_SEED.value,
        resize=_RESIZE.value, grid=_GRID.value, settings={"per_class": _PER_CLASS.value})
    logging.info("sampling done: %s", summary)
    if jax.process_index() == 0:
        print(summary)
