#!/usr/bin/env python3
"""Train mixtral_jax on a Cloud TPU VM or pod slice, from a laptop, with `gcloud`.

    python tpu_scripts/tpu_launch.py all --name mx --zone us-east5-a --project my-proj \\
        --accelerator v5p-64 --spot --config configs/model/mixtral_8x7b.yaml \\
        --run-name mixtral train.steps=10

Steps (each is also a subcommand; `all` runs them in order):
  create  queue a slice (`gcloud compute tpus queued-resources create`) and wait until ACTIVE
  setup   copy this repo (or clone --git-url) to every worker and `pip install -e ".[tpu]"`
  train   start `mixtral-jax train` on every worker under nohup, logging to logs/RUN.log
  logs    stream worker 0's log until its training process exits
  fetch   copy worker 0's run directory (and its log) back here
  delete  delete the queued resource and its slice (`--force`)

`--dry-run` prints every command (`+ gcloud ...`, shell-quoted, one per line) and runs none.
Every worker runs the same command: on TPU, `jax.distributed` finds its peers by itself,
so no coordinator variables are set.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

from common import (REPO_ROOT, CommandRunner, LaunchError, OneLineErrorParser, check_overrides, fail,
                    parse_env, run_dir_of, train_overrides)

PROG = "tpu_launch.py"

# Default TPU VM image per generation (the accelerator type's prefix). The v5e/v5p/v6e
# images are the ones Google recommends for JAX; older generations use the plain base image.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Queued-resource states that will never become ACTIVE without a new request.
DEAD_STATES = {"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"}

# Where `setup` leaves the source tarball on each worker (relative to the home directory).
REMOTE_TARBALL = "mixtral_jax_src.tar.gz"


def default_runtime_version(accelerator: str) -> str | None:
    generation = accelerator.split("-", 1)[0].lower()
    return RUNTIME_VERSIONS.get(generation)


# ---------------------------------------------------------------- the gcloud commands


def location_flags(args) -> list[str]:
    """--zone, and --project when given (otherwise gcloud uses its configured project)."""
    return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def ssh(args, worker: str, remote_command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, f"--worker={worker}",
            *location_flags(args), "--command", remote_command]


def scp(args, sources: list[str], dest: str, worker: str, recurse: bool = False) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []), *sources, dest,
            f"--worker={worker}", *location_flags(args)]


def log_path(args) -> str:
    """The training log on each worker, relative to the remote repo directory."""
    return f"logs/{args.run_name}.log"


# ---------------------------------------------------------------- steps


def step_create(args, runner: CommandRunner, wait: bool = True) -> None:
    runtime = args.runtime_version or default_runtime_version(args.accelerator)
    runner.run(["gcloud", "compute", "tpus", "queued-resources", "create", args.name, "--node-id", args.name,
                *location_flags(args), "--accelerator-type", args.accelerator, "--runtime-version", runtime,
                *(["--spot"] if args.spot else [])])
    if wait and not args.no_wait:
        wait_until_active(args, runner)


def wait_until_active(args, runner: CommandRunner) -> None:
    """Poll the queued resource until ACTIVE (a spot request can wait a long time)."""
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *location_flags(args),
                "--format=value(state.state)"]
    runner.show(describe)
    if runner.dry_run:
        return
    deadline = time.monotonic() + args.wait_timeout
    last = None
    while True:
        state = runner.output(describe, quiet=True)
        if state != last:
            print(f"# queued resource {args.name}: {state}", flush=True)
            last = state
        if state == "ACTIVE":
            return
        if state in DEAD_STATES:
            raise LaunchError(f"queued resource {args.name} is {state}; it will not become ACTIVE")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {args.name} not ACTIVE after {args.wait_timeout:g} s (last: {state})")
        time.sleep(args.poll_interval)


def install_script(args) -> str:
    """Shell run on every worker: get the source into --remote-dir, then install it.

    The TPU VM images ship Python 3.10 and the project needs >= 3.11, so uv provides the
    interpreter (a standalone build it downloads) and the virtual environment.
    """
    d = shlex.quote(args.remote_dir)
    if args.git_url:
        url = shlex.quote(args.git_url)
        get_source = [f"if [ ! -d {d}/.git ]; then git clone --quiet {url} {d}; fi"]
        if args.git_ref:
            ref = shlex.quote(args.git_ref)
            get_source += [f"git -C {d} fetch --quiet origin {ref}", f"git -C {d} checkout --quiet FETCH_HEAD"]
        else:
            get_source += [f"git -C {d} pull --quiet --ff-only"]
    else:
        get_source = [f"mkdir -p {d}", f"tar -xzf {REMOTE_TARBALL} -C {d}", f"rm -f {REMOTE_TARBALL}"]
    extras = f".[{args.extras}]" if args.extras else "."
    install = [
        f"cd {d}",
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"[ -x .venv/bin/python ] || uv venv --quiet --python {shlex.quote(args.python_version)} .venv",
        f"uv pip install --quiet --python .venv/bin/python -e {shlex.quote(extras)}",
        '.venv/bin/mixtral-jax --help >/dev/null && echo "mixtral_jax installed on $(hostname)"',
    ]
    return "; ".join(["set -e", *get_source, *install])


def step_setup(args, runner: CommandRunner) -> None:
    if not args.git_url:
        # Ship the working tree as it is (uncommitted edits included), minus local artifacts.
        tarball = os.path.join(tempfile.gettempdir(), f"mixtral_jax-{args.name}.tar.gz")
        runner.run(["tar", "-czf", tarball, "--exclude=.git", "--exclude=.venv", "--exclude=runs",
                    "--exclude=logs", "--exclude=wandb", "--exclude=__pycache__", "--exclude=*.egg-info",
                    "--exclude=.pytest_cache", "-C", str(REPO_ROOT), "."])
        # The first contact with a fresh VM can fail while its ssh keys propagate: retry.
        try:
            runner.run(scp(args, [tarball], f"{args.name}:{REMOTE_TARBALL}", "all"), retries=3)
        finally:
            if not runner.dry_run and os.path.exists(tarball):
                os.remove(tarball)
    # With --git-url this ssh is the first contact, so it gets the retries instead.
    runner.run(ssh(args, "all", install_script(args)), retries=3 if args.git_url else 0)


def train_script(args) -> str:
    """Shell run on every worker: start training in the background (nohup: it survives the
    ssh session), log stdout+stderr to logs/RUN.log and record the pid for `logs`."""
    command = [".venv/bin/mixtral-jax", "train", "--config", args.config,
               *train_overrides(args.run_name, args.overrides)]
    cache = shlex.quote(args.cache_dir) if args.cache_dir else '"$HOME/.cache/mixtral_jax"'
    exports = [f"export MIXTRAL_JAX_CACHE={cache}"]
    exports += [f"export {key}={shlex.quote(value)}" for key, value in args.env.items()]
    log = log_path(args)
    pid_file = log[: -len(".log")] + ".pid"
    return "; ".join([
        "set -e", f"cd {shlex.quote(args.remote_dir)}", "mkdir -p logs", *exports,
        f"nohup {shlex.join(command)} > {shlex.quote(log)} 2>&1 < /dev/null & echo $! > {shlex.quote(pid_file)}",
        f'echo "training started on $(hostname): pid $(cat {shlex.quote(pid_file)}), log {args.remote_dir}/{log}"',
    ])


def step_train(args, runner: CommandRunner) -> None:
    runner.run(ssh(args, "all", train_script(args)))


def step_logs(args, runner: CommandRunner, retries: int = 0) -> None:
    """Follow worker 0's log from the start; tail exits when the training process does."""
    log = shlex.quote(log_path(args))
    pid_file = shlex.quote(log_path(args)[: -len(".log")] + ".pid")
    remote = f'cd {shlex.quote(args.remote_dir)} && tail -n +1 -F --pid="$(cat {pid_file})" {log}'
    runner.run(ssh(args, "0", remote), retries=retries)


def step_fetch(args, runner: CommandRunner) -> None:
    run_dir = run_dir_of(args.run_name, args.overrides, "run")
    dest = args.dest
    if not runner.dry_run:
        os.makedirs(dest, exist_ok=True)
    remote = args.remote_dir.rstrip("/")
    runner.run(scp(args, [f"{args.name}:{remote}/{run_dir}"], dest, "0", recurse=True))
    # Worker 0's log goes next to the run's files.
    local_run = os.path.join(dest, os.path.basename(run_dir))
    runner.run(scp(args, [f"{args.name}:{remote}/{log_path(args)}"], os.path.join(local_run, "train_worker0.log"),
                   "0"), check=False)
    print(f"# results in {local_run}", flush=True)


def step_delete(args, runner: CommandRunner) -> None:
    runner.run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *location_flags(args),
                "--force", "--quiet"])


def step_all(args, runner: CommandRunner) -> None:
    """Every step in order. Once the slice is requested it is always deleted at the end, even
    if a step fails or Ctrl-C is pressed (billing stops), unless --keep is given."""
    # If the request itself fails (e.g. the name is taken), there is nothing of ours to delete.
    step_create(args, runner, wait=False)
    try:
        if not args.no_wait:
            wait_until_active(args, runner)  # Ctrl-C while queued also withdraws the request
        step_setup(args, runner)
        step_train(args, runner)
        step_logs(args, runner, retries=3)
        step_fetch(args, runner)
    finally:
        if args.keep:
            print(f"# --keep: slice {args.name} left running; delete it with: {PROG} delete --name {args.name} "
                  f"--zone {args.zone}", flush=True)
        else:
            step_delete(args, runner)


STEPS = {"create": step_create, "setup": step_setup, "train": step_train, "logs": step_logs,
         "fetch": step_fetch, "delete": step_delete, "all": step_all}


# ---------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    target = argparse.ArgumentParser(add_help=False)
    g = target.add_argument_group("slice")
    g.add_argument("--name", required=True, help="queued-resource and TPU node name")
    g.add_argument("--zone", required=True, help="e.g. us-east5-a")
    g.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    g.add_argument("--remote-dir", default="mixtral_jax", help="repo directory on each worker, relative to home "
                   "(default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="print the commands (`+ cmd`), run nothing")

    create = argparse.ArgumentParser(add_help=False)
    g = create.add_argument_group("create")
    g.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-64, v5litepod-16, v6e-8")
    g.add_argument("--runtime-version", help="TPU VM image (default per generation: "
                   + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    g.add_argument("--spot", action="store_true", help="spot capacity (cheaper, preemptible)")
    g.add_argument("--no-wait", action="store_true", help="return once queued instead of waiting for ACTIVE")
    g.add_argument("--wait-timeout", type=float, default=6 * 3600, help="seconds to wait for ACTIVE")
    g.add_argument("--poll-interval", type=float, default=30.0, help=argparse.SUPPRESS)

    setup = argparse.ArgumentParser(add_help=False)
    g = setup.add_argument_group("setup")
    g.add_argument("--git-url", help="clone this repository on the workers instead of copying the local tree")
    g.add_argument("--git-ref", help="branch, tag or commit to check out with --git-url")
    g.add_argument("--extras", default="tpu", help='pip extras to install (default: %(default)s, i.e. ".[tpu]")')
    g.add_argument("--python-version", default="3.11", help="Python for the workers' venv (default: %(default)s)")

    run = argparse.ArgumentParser(add_help=False)
    g = run.add_argument_group("run")
    g.add_argument("--run-name", required=True, help="run.name: the run directory is runs/RUN_NAME, "
                   "the log logs/RUN_NAME.log")

    train = argparse.ArgumentParser(add_help=False)
    g = train.add_argument_group("train")
    g.add_argument("--config", required=True, help="config file, relative to the repo root")
    g.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra environment for training "
                   "(repeatable), e.g. WANDB_API_KEY=..., LIBTPU_INIT_ARGS=...")
    g.add_argument("--cache-dir", help="MIXTRAL_JAX_CACHE on the workers (default: ~/.cache/mixtral_jax)")
    g.add_argument("--no-config-check", action="store_true",
                   help="do not check that --config exists in the local repo (e.g. with --git-url)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, last on the line")

    fetch = argparse.ArgumentParser(add_help=False)
    fetch.add_argument_group("fetch").add_argument("--dest", default="runs",
                                                   help="local folder for the run directory (default: %(default)s)")

    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(STEPS) + "}")
    parents = {
        "create": [target, create],
        "setup": [target, setup],
        "train": [target, run, train],
        "logs": [target, run],
        "fetch": [target, run, fetch],
        "delete": [target],
        "all": [target, create, setup, run, train, fetch],
    }
    helps = {"create": "queue a slice and wait until it is ACTIVE", "setup": "install the project on every worker",
             "train": "start training on every worker", "logs": "stream worker 0's training log",
             "fetch": "copy the run directory back from worker 0", "delete": "delete the slice",
             "all": "create, setup, train, logs, fetch, delete"}
    parser.subcommands = {}  # name -> its parser, so later checks report errors under its name
    for name, parent_list in parents.items():
        p = sub.add_parser(name, parents=parent_list, help=helps[name], description=helps[name])
        if name == "all":
            p.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
        parser.subcommands[name] = p
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.subcommands[args.command]
    if hasattr(args, "accelerator") and not (args.runtime_version or default_runtime_version(args.accelerator)):
        sub.error(f"no default runtime version for accelerator '{args.accelerator}'; pass --runtime-version")
    if hasattr(args, "overrides"):
        check_overrides(sub, args.overrides)
        args.env = parse_env(sub, args.env)
        config_here = REPO_ROOT / args.config
        if os.path.isabs(args.config):
            sub.error(f"--config must be relative to the repo root (the workers' copy), not '{args.config}'")
        if not (args.no_config_check or getattr(args, "git_url", None)) and not config_here.is_file():
            sub.error(f"config '{args.config}' not found under {REPO_ROOT}")
    if getattr(args, "git_ref", None) and not args.git_url:
        sub.error("--git-ref needs --git-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = CommandRunner(dry_run=args.dry_run)
    try:
        STEPS[args.command](args, runner)
    except LaunchError as err:
        fail(f"{PROG} {args.command}", str(err))
    except KeyboardInterrupt:
        print(f"\n{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
