"""`iar-jax train --config=configs/iar.py:SIZE --workdir=DIR [--config.a.b=v]`: train IAR / IAR2.

Shows a progress line (step, loss, steps/s, ETA); the config goes to DIR/config.json, metrics to
DIR (TensorBoard); rerunning the same command resumes from DIR/checkpoints. Codes from
`iar-jax extract_codes` (or the demo's DEMO/codes) need a config with the tokenizer's vocab and grid,
e.g. `--config=configs/iar.py:tiny,grid=7,vocab=512` for the demo's codes.
"""
from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/iar.py:b", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics; resumed if it exists.")
flags.mark_flags_as_required(["config", "workdir"])


def check_inputs(config, workdir: str) -> None:
    """Everything a run reads or writes, checked before the model is built (one-line errors)."""
    import numpy as np

    from iar_jax import console

    console.check_output_dir(workdir, "--workdir")
    if config.data.source != "synthetic":
        console.check_input(config.data.path, "--config.data.path", fix="point it at `iar-jax extract_codes` output "
                            "or an .npz with codes and labels")
    console.check_config_paths(config, {"data.tokenizer": "any", "loss.mapping_file": "file"})
    if config.get("loss", {}).get("mapping_file"):
        path, vocab = config.loss.mapping_file, int(config.model.vocab_size)
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (ValueError, OSError) as e:
            raise ValueError(f"--config.loss.mapping_file={path} is not a .npy array ({e}); pass the mapping.npy "
                             "written by `iar-jax rearrange`") from None
        if shape != (vocab,):
            raise ValueError(f"--config.loss.mapping_file={path} maps {shape[0] if shape else '?'} codes but "
                             f"config.model.vocab_size is {vocab}: configure the model for the tokenizer's codebook "
                             f"(e.g. --config=configs/iar.py:SIZE,vocab={shape[0] if shape else 'N'},grid=G)")


def check_source(source, config, path: str) -> None:
    """The codes match the model (ids, grid), named by file and by the config field to change."""
    import numpy as np

    n = len(source)
    if n == 0:
        raise ValueError(f"--config.data.path={path} holds no codes; extract some with `iar-jax extract_codes`")
    rows = source.get(np.arange(min(n, 1024)))
    vocab, grid = int(config.model.vocab_size), int(config.model.grid_size)
    for key in ("codes", "labels"):
        if not np.issubdtype(np.asarray(rows[key]).dtype, np.integer):
            raise ValueError(f"--config.data.path={path}: {key!r} has dtype {rows[key].dtype}, expected integer ids; "
                             "write codes with `iar-jax extract_codes`")
    codes = np.asarray(rows["codes"])
    if codes.shape[-1] != grid * grid:
        side = int(round(codes.shape[-1] ** 0.5))
        raise ValueError(f"--config.data.path={path} has {codes.shape[-1]} codes per image but config.model.grid_size="
                         f"{grid} means {grid * grid}; set grid={side} (e.g. --config=configs/iar.py:SIZE,grid={side})")
    if codes.size and codes.max() >= vocab:
        raise ValueError(f"--config.data.path={path} has code id {int(codes.max())} but config.model.vocab_size is "
                         f"{vocab}; set the tokenizer's codebook size (e.g. --config=configs/iar.py:SIZE,vocab=N)")


def main(argv):
    del argv
    from iar_jax import console

    config, workdir = _CONFIG.value, _WORKDIR.value
    check_inputs(config, workdir)
    from iar_jax import train_loop, trainer
    from iar_jax.models.families import get_family

    def source():
        src = trainer.make_source(config, get_family(config.model_family).batch_spec(config))
        if config.data.source != "synthetic":
            check_source(src, config, config.data.path)
        return src

    # In-memory codes are checked before anything starts; records may load the tokenizer, which
    # must wait for the multi-host setup.
    src = None if config.data.source == "records" else source()
    console.import_tensorflow_quietly()
    from iar_jax import runtime

    runtime.setup()
    runtime.resolve_kernels(config)
    import jax

    src = src if src is not None else source()
    main_process = jax.process_index() == 0
    if main_process:
        logging.info("config: %s", console.write_config_json(config, workdir))
    total = int(config.train.num_steps)
    on_step, on_log, close = console.progress_hooks(total, "train", enabled=main_process)
    try:
        tr, state = trainer.train_and_evaluate(config, workdir, source=src, log_fn=on_log, step_fn=on_step)
    finally:
        close()
    train_loop.raise_if_preempted(tr, state)
    step = int(jax.device_get(state["step"]))
    if main_process and step == total:
        print(f"trained to step {step}: {workdir}")
