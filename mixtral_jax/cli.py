"""`mixtral-jax VERB`: one thin function per verb; user mistakes print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixtral_jax.config import ConfigError, load_config


def cmd_train(args: argparse.Namespace) -> int:
    from mixtral_jax.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg).fit()
    print(json.dumps(summary, indent=2))
    if summary.get("eval_loss") is not None:
        gap = summary["unigram_entropy"] - summary["eval_loss"]
        print(f"held-out loss {summary['eval_loss']:.3f} nats/token (perplexity {summary['eval_ppl']:.1f}) vs "
              f"unigram entropy {summary['unigram_entropy']:.3f}: {gap:+.3f} nats below token frequencies alone")
    print(f"run directory: {cfg.run_dir}")
    return 130 if summary.get("stopped_by") else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mixtral_jax.training.evaluate import evaluate_run

    print(json.dumps(evaluate_run(Path(args.run), args.batches), indent=2))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mixtral_jax.models.transformer import param_counts

    counts = param_counts(cfg.model)
    if args.json:
        print(json.dumps(counts))
        return 0
    width = max(len(k) for k in counts)
    for name, value in counts.items():
        if name not in ("total", "active"):
            print(f"{name:<{width}}  {value:>18,}")
    print("-" * (width + 20))
    print(f"{'total':<{width}}  {counts['total']:>18,}")
    print(f"{'active':<{width}}  {counts['active']:>18,}  (per token)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral-jax",
        description="Train and study dense (Mistral) and mixture-of-experts (Mixtral) transformers in JAX.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="pretrain or fine-tune from a config; resumes the run dir if it has checkpoints",
                             description="Train from a YAML config. Extra arguments override keys, e.g. "
                                         "train.steps=100 model.moe.top_k=1. A run dir with checkpoints resumes.")
    train.add_argument("--config", required=True, help="YAML file (or preset name such as quickstart)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser("eval", help="held-out loss / perplexity of a run's latest checkpoint")
    evaluate.add_argument("--run", required=True, help="run directory (runs/NAME)")
    evaluate.add_argument("--batches", type=int, default=None, help="held-out batches (default: the run's train.eval_batches)")
    evaluate.set_defaults(func=cmd_eval)

    params = verbs.add_parser("params", help="total and active parameter counts per component, without allocating")
    params.add_argument("--config", required=True, help="YAML file or preset name (e.g. mixtral_8x7b)")
    params.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    params.add_argument("--json", action="store_true", help="print one JSON object (keys include total, active)")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"mixtral-jax {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"mixtral-jax {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixtral-jax {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
