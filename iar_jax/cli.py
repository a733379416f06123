"""`iar-jax SUBCOMMAND [flags]`: one console script, one module per subcommand.

Each subcommand module defines its absl flags at import and a `main(argv)`; only the chosen module
is imported, so flags of different subcommands never collide.
"""
import importlib
import sys

SUBCOMMANDS = {
    "train": "iar_jax.commands.train",
    "train_tokenizer": "iar_jax.commands.train_tokenizer",
    "reconstruct": "iar_jax.commands.reconstruct",
    "rearrange": "iar_jax.commands.rearrange",
    "extract_codes": "iar_jax.commands.extract_codes",
    "sample": "iar_jax.commands.sample",
    "evaluate": "iar_jax.commands.evaluate",
    "demo": "iar_jax.commands.demo",
    "experiment": "iar_jax.commands.experiment",
    "convert": "iar_jax.commands.convert",
}


def _usage() -> str:
    return "usage: iar-jax {%s} [--flags]" % ",".join(SUBCOMMANDS)


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in SUBCOMMANDS:
        sys.exit(f"iar-jax: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}")
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name == SUBCOMMANDS[name]:
            sys.exit(f"iar-jax: subcommand {name!r} is not available in this version")
        raise
    from absl import app

    from iar_jax.runtime import PREEMPTED_EXIT_CODE, NonFiniteLossError, Preempted

    def run(args):
        try:
            return module.main(args)
        except Preempted as e:  # saved but unfinished: a distinct code, so schedulers requeue the job
            print(f"iar-jax {name}: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        except (ValueError, NonFiniteLossError) as e:  # bad input / non-finite loss: one line, no traceback
            sys.exit(f"iar-jax {name}: error: {e}")

    app.run(run, argv=[f"iar-jax {name}"] + argv[2:])


if __name__ == "__main__":
    main()
