#!/usr/bin/env python3
"""Write (and with --submit, sbatch) a SLURM batch script that trains mixtral_jax on GPU nodes.

    python tpu_scripts/slurm_launch.py --nodes 2 --gpus-per-node 8 --mode per-gpu \\
        --partition gpu --time 04:00:00 --config configs/model/mixtral_8x7b.yaml \\
        --run-name mixtral train.steps=10 --submit

Process layout (--mode):
  per-gpu   one process per GPU: ntasks-per-node = G, and each task sees only its own GPU
            (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID)
  per-node  one process per node: ntasks-per-node = 1, seeing all G GPUs of its node

Inside the job, the script exports what mixtral_jax reads to call jax.distributed.initialize():
JAX_COORDINATOR_ADDRESS (the first host of the job's nodelist, on a port derived from the job
id), JAX_NUM_PROCESSES ($SLURM_NTASKS) and, per task, JAX_PROCESS_ID ($SLURM_PROCID).

`--dry-run` prints the script and the sbatch command; it writes and submits nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from common import CommandRunner, LaunchError, OneLineErrorParser, check_overrides, fail, parse_env, train_overrides

PROG = "slurm_launch.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("job shape")
    g.add_argument("--nodes", type=int, required=True, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    g.add_argument("--mode", choices=["per-gpu", "per-node"], default="per-gpu",
                   help="one process per GPU or one per node (default: %(default)s)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per process (default: SLURM's)")
    g.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G (default: SLURM's)")
    g = p.add_argument_group("scheduling")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--time", help="time limit, e.g. 04:00:00")
    g.add_argument("--account", help="SLURM account to charge")
    g.add_argument("--job-name", help="job name (default: the run name)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    g = p.add_argument_group("training")
    g.add_argument("--config", required=True, help="config file (relative to --workdir)")
    g.add_argument("--run-name", help="run.name (the run directory is runs/RUN_NAME)")
    g.add_argument("--workdir", help="directory to cd into on the nodes: the repo (default: where sbatch runs)")
    g.add_argument("--venv", help="virtual environment to activate on the nodes, e.g. .venv")
    g.add_argument("--cache-dir", help="MIXTRAL_JAX_CACHE (default: the framework's, ~/.cache/mixtral_jax)")
    g.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra environment (repeatable)")
    g.add_argument("--port", type=int, help="coordinator port (default: 20000 + SLURM_JOB_ID %% 10000, "
                   "so jobs sharing a node do not collide)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, last on the line")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="where to write the script (default: slurm/JOB_NAME.sbatch)")
    g.add_argument("--log", help="job's stdout/stderr (default: slurm/%%x-%%j.out)")
    g.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    g.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    return p


def sbatch_lines(args) -> list[str]:
    tasks_per_node = args.gpus_per_node if args.mode == "per-gpu" else 1
    lines = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--gpus-per-node={args.gpus_per_node}",
    ]
    if args.cpus_per_task:
        lines.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.mem:
        lines.append(f"--mem={args.mem}")
    if args.partition:
        lines.append(f"--partition={args.partition}")
    if args.time:
        lines.append(f"--time={args.time}")
    if args.account:
        lines.append(f"--account={args.account}")
    lines.append(f"--output={args.log}")
    lines.extend(args.sbatch_arg)
    return [f"#SBATCH {line}" for line in lines]


def batch_script(args) -> str:
    """The batch script. It runs once, on the first node; `srun` then starts the tasks."""
    per_gpu = args.mode == "per-gpu"
    train = ["mixtral-jax", "train", "--config", args.config, *train_overrides(args.run_name, args.overrides)]
    port = str(args.port) if args.port else "$((20000 + SLURM_JOB_ID % 10000))"

    # Per-task environment: SLURM_PROCID / SLURM_LOCALID differ between the tasks of one srun,
    # so they are read inside each task (single quotes keep them from expanding here).
    per_task = ["export JAX_PROCESS_ID=$SLURM_PROCID"]
    if per_gpu:
        per_task.append("export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID")
    task_shell = "; ".join(per_task + ['exec "$@"'])

    out = ["#!/bin/bash", f"# Written by tpu_scripts/{PROG}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), "
           f"mode {args.mode}.", *sbatch_lines(args), "", "set -euo pipefail"]
    if args.workdir:
        out += [f"cd {shlex.quote(args.workdir)}"]
    if args.venv:
        out += [f"source {shlex.quote(args.venv)}/bin/activate"]
    if args.cache_dir:
        out += [f"export MIXTRAL_JAX_CACHE={shlex.quote(args.cache_dir)}"]
    out += [f"export {key}={shlex.quote(value)}" for key, value in args.env.items()]
    out += [
        "",
        "# jax.distributed: the coordinator (process 0) runs on the first node of the allocation.",
        'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"COORDINATOR_PORT={port}",
        'export JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:$COORDINATOR_PORT"',
        'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
        "",
        'echo "job $SLURM_JOB_ID: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST),'
        ' coordinator $JAX_COORDINATOR_ADDRESS"',
        "",
        "# One task per " + ("GPU; each sees only its own GPU." if per_gpu else "node; each sees all its node's GPUs."),
        "# Each task sets its own process id, then execs the training command given after '_'.",
        "# --kill-on-bad-exit: if one process dies, stop the rest instead of hanging in a collective.",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task_shell)} _ {shlex.join(train)}",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be >= 1")
    check_overrides(parser, args.overrides)
    args.env = parse_env(parser, args.env)
    args.job_name = args.job_name or args.run_name or Path(args.config).stem
    if not re.fullmatch(r"[\w.+-]+", args.job_name):
        parser.error(f"job name '{args.job_name}' may only hold letters, digits, and . _ + -")
    args.log = args.log or "slurm/%x-%j.out"
    script_path = args.output or os.path.join("slurm", f"{args.job_name}.sbatch")
    script = batch_script(args)

    runner = CommandRunner(dry_run=args.dry_run)
    if args.dry_run:
        print(f"# ---- {script_path} ----")
        print(script, end="")
        print("# ---- end ----")
    else:
        os.makedirs(os.path.dirname(script_path) or ".", exist_ok=True)
        log_dir = os.path.dirname(args.log)
        if log_dir and "%" not in log_dir:
            os.makedirs(log_dir, exist_ok=True)  # sbatch does not create the log's folder
        Path(script_path).write_text(script)
        print(f"wrote {script_path}")
    sbatch = ["sbatch", script_path]
    if args.submit or args.dry_run:
        try:
            runner.run(sbatch)
        except (LaunchError, FileNotFoundError) as err:
            fail(PROG, str(err))
    else:
        print(f"submit with: {shlex.join(sbatch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
