"""`experiment NAME`: one study end to end (mixtral_jax/experiments)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixtral_jax.config import ConfigError, did_you_mean


def cmd_experiment(args: argparse.Namespace) -> int:
    from mixtral_jax.experiments import EXPERIMENTS, run_experiment

    if args.name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment '{args.name}'{did_you_mean(args.name, EXPERIMENTS)} "
                          f"(one of {', '.join(EXPERIMENTS)})")
    out = Path(args.out or Path("runs") / (args.name + ("_smoke" if args.smoke else "")))
    if args.full and args.name != "router_ablation":
        raise ConfigError("--full applies to router_ablation only (its whole 128-point grid)")
    if args.full and args.smoke:
        raise ConfigError("--full and --smoke exclude each other")
    if args.run and args.name != "routing_analysis":
        raise ConfigError("--run applies to routing_analysis only (the MoE run to analyse)")
    if args.full_scale and args.smoke:
        raise ConfigError("--full-scale and --smoke exclude each other")
    extra = {"full": True} if args.full else {}
    if args.full_scale:
        extra["full_scale"] = True
    if args.run:
        extra["run_dir"] = args.run
    if args.ladder:
        if args.name != "dense_vs_moe":
            raise ConfigError("--ladder applies to dense_vs_moe only (its scaling ladder)")
        extra["ladder"] = True
    report = run_experiment(args.name, out, smoke=args.smoke, overrides=args.overrides, **extra)
    print(f"report: {report}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    from mixtral_jax.experiments import EXPERIMENTS

    experiment = verbs.add_parser(
        "experiment", help="run one study end to end and write its report.md with plots",
        description="Experiments: " + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()) + ". Finished runs "
                    "under --out are reused, so an interrupted experiment resumes.")
    experiment.add_argument("name", metavar="NAME", help=", ".join(EXPERIMENTS))
    experiment.add_argument("--out", help="folder for the runs and report (default runs/NAME)")
    experiment.add_argument("--smoke", action="store_true", help="tiny runs (seconds each): checks the whole "
                                                                 "pipeline, not the science")
    experiment.add_argument("--full", action="store_true", help="router_ablation: the whole grid (192 runs, for a "
                                                                "GPU) instead of one factor at a time")
    experiment.add_argument("--full-scale", action="store_true", help="the accelerator-sized configs in "
                                                                      "experiments/NAME/full_scale/ (GPU / TPU)")
    experiment.add_argument("--ladder", action="store_true", help="dense_vs_moe: the scaling ladder (3 sizes x "
                            "{dense, MoE}; with --full-scale the single-H100-hour variant) instead of the study")
    experiment.add_argument("--run", help="routing_analysis: analyse this trained MoE run dir instead of training one")
    experiment.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    experiment.set_defaults(func=cmd_experiment)
