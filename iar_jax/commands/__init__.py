"""CLI subcommands: each module defines its flags and `main(argv)`."""
