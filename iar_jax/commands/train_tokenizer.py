"""`iar-jax train_tokenizer --config=configs/tokenizer.py:VARIANT --workdir=DIR [--config.a.b=v]`.

Trains a LlamaGen VQ tokenizer or the IAR2 dual tokenizer (two-stage recipe), resuming from
DIR/checkpoints; at the end evaluates PSNR / SSIM / codebook usage on `data.eval_split` and writes
DIR/eval.json and DIR/reconstructions.png. Shows a progress line; the config goes to
DIR/config.json. `--config.data.name` takes fashion_mnist_embedded (shipped with the package),
fashion_mnist, digits, npz (data.path) or image_folder (data.path, data.eval_path).
"""
from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tokenizer.py:vq16",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics; resumed if it exists.")
flags.mark_flags_as_required(["config", "workdir"])


def check_inputs(config, workdir: str) -> None:
    from iar_jax import console
    from iar_jax.tokenizer.data import IN_MEMORY

    console.check_output_dir(workdir, "--workdir")
    name = config.data.name
    if name not in IN_MEMORY + ("npz", "image_folder"):
        raise ValueError(f"--config.data.name={name!r} is not a tokenizer dataset; use one of "
                         f"{', '.join(IN_MEMORY[:1] + IN_MEMORY[2:])}, npz or image_folder")
    if name in ("npz", "image_folder"):
        console.check_input(config.data.path, "--config.data.path", "file" if name == "npz" else "dir")
    console.check_config_paths(config, {"data.eval_path": "dir", "loss.lpips_vgg_path": "file", "loss.lpips_lin_path": "file"})


def main(argv):
    del argv
    from iar_jax import console

    config, workdir = _CONFIG.value, _WORKDIR.value
    check_inputs(config, workdir)
    console.import_tensorflow_quietly()
    from iar_jax import runtime

    runtime.setup()
    import jax

    from iar_jax import train_loop
    from iar_jax.tokenizer import training

    n_eval = int(config.data.eval_images)
    eval_images = training.make_image_source(config, config.data.eval_split, n_eval) if n_eval else None
    main_process = jax.process_index() == 0
    if main_process:
        logging.info("config: %s", console.write_config_json(config, workdir))
    on_step, on_log, close = console.progress_hooks(int(config.train.num_steps), "train_tokenizer",
                                                    enabled=main_process)
    try:
        tr, state, results = training.train_and_evaluate(config, workdir, eval_images=eval_images, log_fn=on_log,
                                                         step_fn=on_step)
    finally:
        close()
    train_loop.raise_if_preempted(tr, state)
    if results and main_process:
        print(f"evaluation ({workdir}/eval.json): "
              + ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in results.items()))
