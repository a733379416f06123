"""`iar-jax SUBCOMMAND [flags]`: one console script, one module per subcommand.

Each subcommand module defines its absl flags at import and a `main(argv)`; only the chosen module
is imported, so flags of different subcommands never collide. `iar-jax SUBCOMMAND --help` lists
that module's flags only; logs are quiet (warnings and errors) unless --verbosity is given.
"""
import importlib
import os
import sys

# name -> (module, one line for `iar-jax --help`)
SUBCOMMANDS = {
    "demo": ("iar_jax.commands.demo", "the whole pipeline in miniature on the embedded Fashion-MNIST (offline, ~5 min)"),
    "train_tokenizer": ("iar_jax.commands.train_tokenizer", "train a VQ tokenizer or the IAR2 dual tokenizer"),
    "reconstruct": ("iar_jax.commands.reconstruct", "encode + decode held-out images: PSNR, SSIM, a PNG"),
    "rearrange": ("iar_jax.commands.rearrange", "IAR codebook rearrangement (balanced k-means): mapping.npy"),
    "extract_codes": ("iar_jax.commands.extract_codes", "encode a dataset (ten-crop + flips) into code records"),
    "train": ("iar_jax.commands.train", "train an IAR / IAR2 model on codes (resumes from its workdir)"),
    "sample": ("iar_jax.commands.sample", "class-conditional samples with CFG -> samples.npz (ADM) + grid.png"),
    "evaluate": ("iar_jax.commands.evaluate", "FID / sFID / IS / precision / recall (ADM), or small-CNN FID"),
    "experiment": ("iar_jax.commands.experiment", "IAR's training-speed claim in miniature on Fashion-MNIST"),
    "convert": ("iar_jax.commands.convert", "official PyTorch checkpoints <-> Flax params; FID Inception weights -> .npz"),
}
HELP = ("-h", "--help", "--helpshort")


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = [f"  {name:<{width}}  {line}" for name, (_, line) in SUBCOMMANDS.items()]
    return "\n".join(["usage: iar-jax SUBCOMMAND [--flag=value ...]", "", "subcommands:", *rows, "",
                      "`iar-jax SUBCOMMAND --help` lists its flags; --verbosity=0 shows INFO logs."])


def _flag_line(flag) -> str:
    required = any("must have a value other than None" in getattr(v, "message", "") for v in flag.validators)
    if flag.flag_type() == "config object":
        note = "required" if required else f"default: {flag.default}"
        return f"  --{flag.name}=FILE.py[:ARG]  {flag.help} ({note}; --{flag.name}.FIELD=VALUE overrides a field)"
    note = "required" if required else "default: " + ("none" if flag.default is None else flag.default_as_str)
    return f"  --{flag.name}  {flag.help} ({note})"


def subcommand_help(name: str, module) -> str:
    """The module's docstring and its own flags, one line each with its default."""
    from absl import flags

    own = sorted(flags.FLAGS.get_flags_for_module(module.__name__), key=lambda f: f.name)
    doc = (module.__doc__ or "").strip()
    lines = [f"usage: iar-jax {name} [--flag=value ...]", "", doc, "", "flags:"]
    lines += [_flag_line(f) for f in own]
    lines += ["", "  --verbosity=0  show INFO logs (default: warnings and errors only)"]
    return "\n".join(lines)


def _parse_error(e: Exception, args) -> str:
    """One line from a flag or config-file error (config_flags embeds the config's traceback)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Traceback" in text:  # keep the flag and the final exception line
        last = lines[-1].split(": ", 1)[-1]
        return f"{lines[0].rstrip(':').split(': Error whilst')[0]}: {last}"
    if isinstance(e, (AttributeError, KeyError)):  # an override of a field the config lacks
        key = text.strip("\"'")
        bad = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--") and "." in a.split("=", 1)[0]
               and a.split("=", 1)[0].rsplit(".", 1)[-1] == key] or [f"field {key!r}"]
        return f"{bad[0]}: the config has no field {key!r}; check the spelling against the config file"
    if "Failed loading config file" in text:
        path = next((ln for ln in lines if ln.endswith(".py")), "")
        flag = next((a.split("=", 1)[0] for a in args if path and a.startswith("--") and path.split("/")[-1] in a),
                    "--config")
        return f"{flag}: config file {path or '?'} not found; pass e.g. configs/iar.py:b"
    return " ".join(lines)


def _make_parser(prog: str, module):
    def parse(args):
        from absl import flags

        try:
            rest = flags.FLAGS(args)
            for f in flags.FLAGS.get_flags_for_module(module.__name__):
                if f.flag_type() == "config object" and f.value is not None:
                    getattr(f.value, "get")  # a config file that failed to load raises only when first read
            return rest
        except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
            sys.exit(f"{prog}: error: {_parse_error(e, args)}")

    return parse


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP:
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in SUBCOMMANDS:
        sys.exit(f"iar-jax: error: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)} (iar-jax --help)")
    verbose = any(a.startswith(("--verbosity", "-v=")) for a in argv[2:])
    if not verbose:  # C++ (XLA, TensorFlow) INFO/WARNING lines; must be set before those libraries load
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name == SUBCOMMANDS[name][0]:
            sys.exit(f"iar-jax: subcommand {name!r} is not available in this version")
        raise
    if any(a in HELP for a in argv[2:]):
        print(subcommand_help(name, module))
        sys.exit(0)
    from absl import app, logging

    from iar_jax.runtime import PREEMPTED_EXIT_CODE, Preempted

    prog = f"iar-jax {name}"

    def run(args):
        if not verbose:  # orbax, clu and the trainers log at INFO; the progress line says what happens
            logging.set_verbosity(logging.WARNING)
        try:
            return module.main(args)
        except Preempted as e:  # saved but unfinished: a distinct code, so schedulers requeue the job
            print(f"{prog}: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        except (ValueError, FloatingPointError) as e:  # bad input / runtime.NonFiniteLossError: one line
            sys.exit(f"{prog}: error: {e}")
        except OSError as e:  # a path the checks did not foresee: still one line, naming the file
            sys.exit(f"{prog}: error: {e}; check the path and its permissions")

    app.run(run, argv=[prog] + argv[2:], flags_parser=_make_parser(prog, module))


if __name__ == "__main__":
    main()
