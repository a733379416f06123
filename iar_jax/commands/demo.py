"""`iar-jax demo [--workdir=DIR] [--variant=iar|iar2]`: the whole pipeline in miniature, offline.

Trains a tiny tokenizer on the embedded Fashion-MNIST subset, rearranges its codebook (IAR), extracts
codes, trains a tiny IAR (or IAR2) model, samples every class and reports the small-classifier FID
and class accuracy: DIR/grid.png, DIR/metrics.json, DIR/summary.txt (`iar_jax.demo`, its stages
`iar_jax.pipeline`). About 5 minutes on a 2-core CPU (README: measured). Rerunning the same command
resumes; DIR defaults to ~/iar-jax-demo/VARIANT. `--preset=smoke` is a seconds-long run with useless
quality (tests).
"""
from absl import flags, logging


_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default ~/iar-jax-demo/VARIANT); rerun to resume")
_VARIANT = flags.DEFINE_enum("variant", "iar", ["iar", "iar2"], "iar: cluster loss; iar2: dual codebook")
_PRESET = flags.DEFINE_enum("preset", "default", ["default", "smoke"], "smoke: a few steps per stage (tests)")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show the logs (INFO and up) of every stage")


def main(argv):
    del argv
    from iar_jax import console

    # The progress bars and the summary say what happens; --verbose brings back every stage's INFO logs
    # (the CLI quiets them to warnings before a subcommand runs).
    logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.ERROR)
    from iar_jax import demo

    workdir = console.check_output_dir(_WORKDIR.value or demo.default_workdir(_VARIANT.value), "--workdir")
    console.import_tensorflow_quietly()
    from iar_jax import runtime

    runtime.setup()
    config = demo.get_config(_VARIANT.value, _PRESET.value)
    runtime.resolve_kernels(config.model)
    demo.run(config, workdir, progress=_PROGRESS.value)
