"""Helpers shared by the launch scripts in this folder (tpu_launch.py, slurm_launch.py).

The scripts are run directly (`python tpu_scripts/tpu_launch.py ...`), so Python puts this
folder first on sys.path and `import common` finds this module.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The repository root: the folder above tpu_scripts/ (what `setup` copies to TPU workers).
REPO_ROOT = Path(__file__).resolve().parent.parent

# Prefix of every printed command, in --dry-run and when running for real (as `set -x` does).
COMMAND_PREFIX = "+ "


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`PROG: error: MESSAGE`) and exit status 2,
    like `mixtral-jax` itself, instead of argparse's usage block followed by the message.
    Subparsers made with add_subparsers() inherit this class."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_overrides(parser: argparse.ArgumentParser, overrides: list[str]) -> list[str]:
    """Config overrides must look like `a.b=c` (what `mixtral-jax train` accepts)."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key.startswith("-"):
            parser.error(f"override '{item}' is not of the form key=value (e.g. train.steps=10)")
    return overrides


def parse_env(parser: argparse.ArgumentParser, items: list[str] | None) -> dict[str, str]:
    """`--env KEY=VALUE` (repeatable) as an ordered dict."""
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "").isalnum() or key[0].isdigit():
            parser.error(f"--env '{item}' is not of the form NAME=VALUE")
        env[key] = value
    return env


def train_overrides(run_name: str | None, overrides: list[str]) -> list[str]:
    """The overrides to pass to `mixtral-jax train`: `run.name=RUN` first (when --run-name is
    given), then the user's, so an explicit `run.name=...` override still wins."""
    return ([f"run.name={run_name}"] if run_name else []) + list(overrides)


def run_dir_of(run_name: str | None, overrides: list[str], default_name: str) -> str:
    """Where the run writes, relative to the repo: `<run.out_dir>/<run.name>` as the trainer
    resolves it (the last override of each key wins; defaults `runs` and `default_name`)."""
    values = {"run.name": run_name or default_name, "run.out_dir": "runs"}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in values:
            values[key] = value
    return f"{values['run.out_dir'].rstrip('/')}/{values['run.name']}"


class CommandRunner:
    """Runs external commands, printing each first as `+ cmd` (shell-quoted, one line).

    With dry_run=True it only prints: nothing is executed, `output()` returns `dry_output`.
    """

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def show(self, argv: list[str]) -> None:
        print(COMMAND_PREFIX + shlex.join(argv), flush=True)

    def run(self, argv: list[str], *, check: bool = True, retries: int = 0, retry_wait_s: float = 20.0) -> int:
        """Run argv with the terminal attached; retry `retries` times on failure (for the first
        ssh into a fresh VM, whose keys may still be propagating). Raises on failure if check."""
        self.show(argv)
        if self.dry_run:
            return 0
        for attempt in range(retries + 1):
            rc = call_or_fail(subprocess.call, argv)
            if rc == 0 or attempt == retries:
                break
            print(f"# exit status {rc}; retrying in {retry_wait_s:g} s ({attempt + 1}/{retries})", flush=True)
            time.sleep(retry_wait_s)
        if rc != 0 and check:
            raise CommandFailed(argv, rc)
        return rc

    def output(self, argv: list[str], *, dry_output: str = "", quiet: bool = False) -> str:
        """Run argv and return its stdout, stripped (stderr passes through)."""
        if not quiet:
            self.show(argv)
        if self.dry_run:
            return dry_output
        result = call_or_fail(subprocess.run, argv, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise CommandFailed(argv, result.returncode)
        return result.stdout.strip()


class LaunchError(RuntimeError):
    """A step that cannot go on (reported as one line, exit status 1)."""


def call_or_fail(function, argv: list[str], **kwargs):
    """function(argv, **kwargs), with a missing program (e.g. gcloud not installed) as a LaunchError."""
    try:
        return function(argv, **kwargs)
    except FileNotFoundError:
        raise LaunchError(f"'{argv[0]}' not found on PATH") from None


class CommandFailed(LaunchError):
    def __init__(self, argv: list[str], returncode: int):
        super().__init__(f"command failed with exit status {returncode}: {shlex.join(argv)}")
        self.returncode = returncode


def fail(prog: str, message: str, status: int = 1) -> None:
    """A one-line error for failures after argument parsing (a command that failed)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(status)
