"""The verbs that use a run: `train`, `eval` (held-out loss or downstream tasks) and `generate`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

from mixtral_jax.cli.common import add_config_arguments, add_run_argument, choices_epilog, stdout_to_stderr
from mixtral_jax.config import ConfigError, load_config


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # validate before JAX starts anything
    from mixtral_jax.parallel.mesh import initialize_distributed

    initialize_distributed()  # joins a multi-process job when the launcher's env says so
    from mixtral_jax.training.trainer import Trainer

    summary = Trainer(cfg).fit()
    print(json.dumps(summary, indent=2))
    if summary.get("eval_loss") is not None:
        gap = summary["unigram_entropy"] - summary["eval_loss"]
        print(f"held-out loss {summary['eval_loss']:.3f} nats/token (perplexity {summary['eval_ppl']:.1f}) vs "
              f"unigram entropy {summary['unigram_entropy']:.3f}: {gap:+.3f} nats below token frequencies alone")
    print(f"run directory: {cfg.run_dir}")
    return 130 if summary.get("stopped_by") else 0

_TASK_FLAGS = (("--num-fewshot", "num_fewshot"), ("--limit", "limit"), ("--include-path", "include_path"),
               ("--batch-size", "batch_size"), ("--online", "online"))


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return _eval_tasks(args)
    for flag, key in _TASK_FLAGS:
        if getattr(args, key) not in (None, False):
            raise ConfigError(f"{flag} applies to downstream tasks: give --tasks too")
    if not args.json:
        from mixtral_jax.training.evaluate import evaluate_run

        print(json.dumps(evaluate_run(Path(args.run), args.batches), indent=2))
        return 0
    with stdout_to_stderr():
        from mixtral_jax.training.evaluate import evaluate_run

        result = evaluate_run(Path(args.run), args.batches)
    # `tokens`: the target tokens the loss averages over (the same count as eval_tokens).
    print(json.dumps({**result, "tokens": result["eval_tokens"]}))
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    """`eval --tasks`: lm-eval-harness tasks on the run's latest weights (mixtral_jax/downstream)."""
    if args.batches is not None:
        raise ConfigError("--batches applies to the held-out loss, not to --tasks")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # < 1: a fraction
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        from mixtral_jax.downstream.harness import TaskSuite

        suite = TaskSuite.resolve(args.tasks.split(","), args.include_path, online=args.online)  # before any loading
        from mixtral_jax.downstream.adapter import DEFAULT_BATCH_SIZE, MixtralLM
        from mixtral_jax.generate import load_tokenizer
        from mixtral_jax.training.evaluate import load_run_model

        run = Path(args.run)
        model, cfg, step = load_run_model(run)
        lm = MixtralLM(model, load_tokenizer(run, cfg), batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                       model_cfg=cfg.model)
        results = suite.evaluate(lm, num_fewshot=args.num_fewshot, limit=limit)
        results["config"].update(run=str(run), step=step)
    from lm_eval.utils import handle_non_serializable, make_table

    print(json.dumps(results, default=handle_non_serializable) if args.json else make_table(results))
    return 0

def cmd_generate(args: argparse.Namespace) -> int:
    from mixtral_jax.generate import generate_text

    text = generate_text(Path(args.run), args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system)
    print(text if args.chat else args.prompt + text)
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    train = verbs.add_parser("train", help="pretrain or fine-tune from a config; resumes the run dir if it has checkpoints",
                             description="Train from a YAML config. Extra arguments override keys, e.g. "
                                         "train.steps=100 model.moe.top_k=1. A run dir with checkpoints resumes.",
                             epilog=choices_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(train, "YAML file (or preset name such as quickstart)")
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser(
        "eval", help="held-out loss / perplexity of a run's latest checkpoint, or downstream tasks (--tasks)",
        description="Without --tasks: held-out loss and perplexity over the run's data. With --tasks: "
                    "lm-eval-harness tasks on the latest weights (trained, imported, upcycled or LoRA-merged), "
                    "offline unless --online; task data must be on disk (docs/evaluation.md).")
    add_run_argument(evaluate)
    evaluate.add_argument("--batches", type=int, default=None, help="held-out batches (default: the run's train.eval_batches)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout "
                                                              "(eval_loss, eval_ppl, tokens, step, ...; with --tasks "
                                                              "lm-eval's results object; logs go to stderr)")
    evaluate.add_argument("--tasks", metavar="T1,T2", help="lm-eval task, group or tag names (globs too), "
                                                           "comma-separated")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    evaluate.add_argument("--limit", type=float, help="at most this many documents per task (< 1: a fraction)")
    evaluate.add_argument("--include-path", metavar="DIR", help="a folder (or YAML file) of task configs of your own")
    evaluate.add_argument("--batch-size", type=int, help="rows per device batch (default 16)")
    evaluate.add_argument("--online", action="store_true", help="let lm-eval download task data from the Hugging "
                                                                "Face hub (default: offline)")
    evaluate.set_defaults(func=cmd_eval)

    gen = verbs.add_parser(
        "generate", help="continue a prompt with a run's latest weights (KV cache; rolling under a sliding window)",
        description="Prefill the prompt, then decode token by token until EOS or --max-new-tokens. Prints the "
                    "prompt followed by the continuation (with --chat: the reply only).")
    gen.add_argument("--run", required=True, help="run directory (runs/NAME), trained or imported")
    gen.add_argument("--prompt", required=True, help="text to continue (with --chat: the user message)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this much mass (1 = all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the Mistral instruct template "
                                                         "([INST] ... [/INST])")
    gen.add_argument("--system", help="with --chat: a system message placed before the user message")
    gen.set_defaults(func=cmd_generate)
