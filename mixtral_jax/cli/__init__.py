"""`mixtral-jax VERB`: one thin function per verb, grouped by what the verbs work on (runs.py,
planning.py, checkpoints.py, studies.py); user mistakes print one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mixtral_jax.cli import checkpoints, planning, runs, studies
from mixtral_jax.config import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (like every other error) and exit 2.
    Subcommand parsers inherit the class (add_subparsers uses the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mixtral-jax",
        description="Train and study dense (Mistral) and mixture-of-experts (Mixtral) transformers in JAX.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for group in (runs, planning, checkpoints, studies):  # the order `--help` lists the verbs in
        group.register(verbs)
    return parser


def _one_line(err: BaseException) -> str:
    """An error message as one printable line (messages may quote user text with newlines)."""
    text = str(err) or type(err).__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError) as err:
        # User mistakes (bad config, bad input data, missing or unreadable files): one line, exit 2.
        # OSError includes FileNotFoundError, PermissionError and IsADirectoryError.
        print(f"mixtral-jax {args.verb}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixtral-jax {args.verb}: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The `mixtral-jax` command: restart once with the host allocator settings, then run."""
    from mixtral_jax.host_allocator import reexec_with_tunables

    reexec_with_tunables()
    sys.exit(main())
