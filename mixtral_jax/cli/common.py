"""What the verbs share: the choice keys' epilog, the --config / --run arguments, and a
stdout kept for JSON alone."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator

from mixtral_jax.config.choices import CHOICE_KEYS, SOURCE_FORMS
from mixtral_jax.hardware import HARDWARE_CHOICES


def choices_epilog() -> str:
    """The values every choice key takes, read from the registries (config/choices.py)."""
    lines = [f"  {key}: {', '.join(registry.names)}" for key, registry in CHOICE_KEYS.items()]
    lines.append(f"  data.source: {SOURCE_FORMS}")
    lines.append(f"  cost.hardware: {', '.join(HARDWARE_CHOICES)}")
    return "choice keys:\n" + "\n".join(lines) + "\nevery key, its default and meaning: docs/configs.md"


def add_config_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """--config FILE and the trailing key=value overrides every config-reading verb takes."""
    parser.add_argument("--config", required=True, help=help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def add_run_argument(parser: argparse.ArgumentParser, help: str = "run directory (runs/NAME)") -> None:
    parser.add_argument("--run", required=True, help=help)


def add_new_run_argument(parser: argparse.ArgumentParser) -> None:
    """--out RUN of the verbs that write a run directory (import-hf, upcycle)."""
    parser.add_argument("--out", required=True, metavar="RUN", help="new run directory (runs/NAME); must have no "
                                                                    "checkpoints")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile (Python prints and writes to file descriptor
    1 from native code alike) to stderr, so that a --json verb's stdout is its JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
