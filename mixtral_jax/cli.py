"""`mixtral-jax VERB`: one thin function per verb; user mistakes print one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterator, NoReturn

from mixtral_jax.config import ConfigError, did_you_mean, load_config
from mixtral_jax.config.choices import CHOICE_KEYS, SOURCE_FORMS
from mixtral_jax.hardware import ACCELERATORS, HARDWARE_CHOICES


def _choices_epilog() -> str:
    """The values every choice key takes, read from the registries (config/choices.py)."""
    lines = [f"  {key}: {', '.join(registry.names)}" for key, registry in CHOICE_KEYS.items()]
    lines.append(f"  data.source: {SOURCE_FORMS}")
    lines.append(f"  cost.hardware: {', '.join(HARDWARE_CHOICES)}")
    return "choice keys:\n" + "\n".join(lines) + "\nevery key, its default and meaning: docs/configs.md"


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


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
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
    with _stdout_to_stderr():
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
    with _stdout_to_stderr() if args.json else contextlib.nullcontext():
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


def _request_host_devices(needed: int) -> None:
    """Ask XLA for `needed` host CPU devices: effective only if JAX's backend has not started yet
    (the `compile` verb calls it first thing; otherwise the device check reports the shortfall).
    The environment is restored once the backend is up, so child processes never inherit it."""
    before = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if match and int(match.group(1)) >= needed:
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.devices()  # starts the backend with these settings (a no-op if it already runs)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def cmd_compile(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mixtral_jax.training.memory import parse_mesh, usable_bytes

    sizes = parse_mesh(args.mesh)
    if args.device is not None:
        usable_bytes(args.device)  # an unknown device name fails before the compile
    _request_host_devices(math.prod(sizes.values()))  # before JAX starts its backend
    from mixtral_jax.training.aot import compile_report, format_compile_report

    report = compile_report(cfg, sizes)
    if args.device:
        report["device"] = args.device
        report["fits"] = report["xla"]["total"] <= usable_bytes(args.device)
    print(json.dumps(report, indent=2) if args.json else format_compile_report(report, args.device))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mixtral_jax.models.params import param_counts

    counts = param_counts(cfg.model)
    plan = None
    if args.mesh is not None or args.device is not None:
        from mixtral_jax.training.memory import format_plan, parse_mesh, plan_memory, usable_bytes

        if args.device is not None:
            usable_bytes(args.device)  # an unknown device name fails before any work
        plan = plan_memory(cfg, parse_mesh(args.mesh or ""))
    if args.json:
        memory = {"memory": {**plan.as_dict(), **({"device": args.device, "fits": plan.fits(args.device)}
                                                   if args.device else {})}} if plan else {}
        print(json.dumps({**counts, **memory}))
        return 0
    width = max(len(k) for k in counts)
    for name, value in counts.items():
        if name not in ("total", "active"):
            print(f"{name:<{width}}  {value:>18,}")
    print("-" * (width + 20))
    print(f"{'total':<{width}}  {counts['total']:>18,}")
    print(f"{'active':<{width}}  {counts['active']:>18,}  (per token)")
    if plan:
        print()
        print(format_plan(plan, args.device))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from mixtral_jax.training import cost

    cfg = load_config(args.config, args.overrides)
    # Every flag is checked before any work (hardware detection, a CPU peak measurement).
    if (args.tokens is None) == (args.device_hours is None):
        raise ConfigError("give exactly one of --tokens (forward: what they cost) or --device-hours (reverse)")
    for flag, value, options in (("--tokens", args.tokens, {}), ("--device-hours", args.device_hours, {}),
                                 ("--peak-tflops", args.peak_tflops, {}), ("--mfu", args.mfu, {"at_most": 1.0}),
                                 ("--price", args.price, {"allow_zero": True}), ("--seq-len", args.seq_len, {}),
                                 ("--devices", args.devices, {"at_most": cost.MAX_DEVICES})):
        if value is not None:
            cost.check_number(flag, value, **options)
    hardware = args.hardware or cfg.cost.hardware
    override = args.peak_tflops if args.peak_tflops is not None else cfg.cost.peak_tflops
    if hardware not in HARDWARE_CHOICES and override is None:  # with a peak given it is a label
        raise ConfigError(f"--hardware '{hardware}' is not one of {', '.join(HARDWARE_CHOICES)}"
                          f"{did_you_mean(hardware, HARDWARE_CHOICES)}")
    if hardware == "auto":
        hardware = cost.detect_hardware()
    peak, source = cost.peak_tflops(hardware, override, cfg.model.dtype)
    price = cfg.cost.price_per_device_hour if args.price is None else args.price
    seq_len = min(args.seq_len, cfg.model.max_seq_len)
    if args.tokens is not None:
        plan = cost.plan_tokens(cfg.model, seq_len, args.tokens, peak, args.mfu, price, args.devices)
    else:
        plan = cost.plan_hours(cfg.model, seq_len, args.device_hours, peak, args.mfu, price, args.devices)
    figures = {"config": str(args.config), "hardware": hardware, "peak_source": source, "seq_len": seq_len,
               **plan.as_dict()}
    if args.json:
        print(json.dumps(figures))
        return 0
    rows = [
        ("hardware", f"{hardware} ({peak:g} TFLOP/s per device, {source})"),
        ("sequence length", f"{seq_len}"),
        ("training FLOPs / token", f"{plan.train_flops_per_token:.4g}"),
        ("inference FLOPs / token", f"{plan.inference_flops_per_token:.4g}"),
        ("tokens", f"{plan.tokens:.4g}"),
        ("total training FLOPs", f"{plan.total_flops:.4g}"),
        ("assumed MFU", f"{plan.mfu:.0%}"),
        ("device-hours", f"{plan.device_hours:,.0f}"),
        (f"days on {plan.devices} devices", f"{plan.days:,.1f}"),
        ("price per device-hour", f"${plan.price_per_device_hour:,.2f}"),
        ("cost", f"${plan.cost_usd:,.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from mixtral_jax.interop.convert import import_hf

    run_dir = import_hf(Path(args.dir), Path(args.out))
    print(f"imported {args.dir} -> run directory {run_dir} (fine-tune with train.init_from={run_dir})")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from mixtral_jax.interop.upcycle import exactness_issue, upcycle

    run_dir = upcycle(Path(args.run), Path(args.out), args.overrides, args.noise)
    model = load_config(run_dir / "config.yaml").model  # the written config, as train will read it
    issue = exactness_issue(model.moe)
    if issue:
        print(f"mixtral-jax upcycle: note: the upcycled model does not compute the dense model's function at "
              f"step 0: {issue}", file=sys.stderr)
    print(f"upcycled {args.run} -> run directory {run_dir}: {model.moe.num_experts} experts, top-{model.moe.top_k}, "
          f"{model.n_sparse_layers} of {model.n_layers} layers sparse (continue training with "
          f"train.init_from={run_dir})")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from mixtral_jax.interop.convert import export_hf

    out = export_hf(Path(args.run), Path(args.out))
    print(f"exported {args.run} -> Hugging Face directory {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mixtral_jax.training.integrity import verify_run

    with contextlib.ExitStack() as stack:
        if args.json:
            stack.enter_context(_stdout_to_stderr())  # orbax / JAX logs must not mix into the JSON
        verdicts = verify_run(Path(args.run), args.step)
    damaged = [v.step for v in verdicts if v.status == "damaged"]
    if args.json:
        print(json.dumps({"run": str(args.run), "ok": not damaged, "damaged": damaged,
                          "steps": [{"step": v.step, "status": v.status, "detail": v.detail, "arrays": v.arrays}
                                    for v in verdicts]}))
    else:
        for verdict in verdicts:
            print(verdict.line())
    return 1 if damaged else 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mixtral_jax.data.tokenize import build_cache
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer

    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    build_cache(cfg.data, tokenizer, args.out)
    if not cfg.data.mixture:
        print(f"train from it with: data.source=tokens:{args.out}")
    return 0


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

    train = verbs.add_parser("train", help="pretrain or fine-tune from a config; resumes the run dir if it has checkpoints",
                             description="Train from a YAML config. Extra arguments override keys, e.g. "
                                         "train.steps=100 model.moe.top_k=1. A run dir with checkpoints resumes.",
                             epilog=_choices_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", required=True, help="YAML file (or preset name such as quickstart)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser(
        "eval", help="held-out loss / perplexity of a run's latest checkpoint, or downstream tasks (--tasks)",
        description="Without --tasks: held-out loss and perplexity over the run's data. With --tasks: "
                    "lm-eval-harness tasks on the latest weights (trained, imported, upcycled or LoRA-merged), "
                    "offline unless --online; task data must be on disk (docs/evaluation.md).")
    evaluate.add_argument("--run", required=True, help="run directory (runs/NAME)")
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

    params = verbs.add_parser("params", help="parameter counts per component and, with --mesh, memory per device; "
                                             "nothing allocated")
    params.add_argument("--config", required=True, help="YAML file or preset name (e.g. mixtral_8x7b)")
    params.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    params.add_argument("--mesh", help="also estimate memory per device on this mesh, e.g. fsdp=8,expert=8 "
                                       "(axes data, fsdp, expert, tensor; unnamed axes 1)")
    params.add_argument("--device", help=f"say whether the estimate fits one of: {', '.join(ACCELERATORS)}")
    params.add_argument("--json", action="store_true", help="print one JSON object (keys include total, active "
                                                            "and, with --mesh, memory)")
    params.set_defaults(func=cmd_params)

    comp = verbs.add_parser(
        "compile", help="compile the real train step for a mesh on host CPU devices and report XLA's memory per "
                        "device (nothing is allocated)",
        description="Ahead-of-time lowering + compiling of the training step exactly as `train` runs it, from "
                    "abstract shapes, over MESH host devices: check that a config fits before renting the pod.")
    comp.add_argument("--config", required=True, help="YAML file or preset name (e.g. pretrain/mixtral_8x7b)")
    comp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    comp.add_argument("--mesh", required=True, help="target mesh, e.g. fsdp=4,expert=2 (axes data, fsdp, expert, "
                                                    "tensor; unnamed axes 1)")
    comp.add_argument("--device", help=f"say whether it fits one of: {', '.join(ACCELERATORS)}")
    comp.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    comp.set_defaults(func=cmd_compile)

    plan = verbs.add_parser(
        "cost", help="FLOPs per token, device-hours and dollars for a token budget, or the tokens some hours buy",
        description="Plan a run: --tokens N gives FLOPs, device-hours, days and dollars; --device-hours H gives "
                    "the tokens those hours buy. Model FLOPs per token follow PaLM appendix B.")
    plan.add_argument("--config", required=True, help="YAML file or preset name (e.g. mistral_7b)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    plan.add_argument("--tokens", type=float, help="training tokens (e.g. 2e12)")
    plan.add_argument("--device-hours", type=float, help="device-hours to spend (reverse mode)")
    plan.add_argument("--hardware", help=f"one of {', '.join(HARDWARE_CHOICES)} "
                                         "(default: the config's cost.hardware)")
    plan.add_argument("--peak-tflops", type=float, help="override the per-device peak")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    plan.add_argument("--price", type=float, help="dollars per device-hour (default: cost.price_per_device_hour)")
    plan.add_argument("--devices", type=int, default=1, help="devices, for the days figure (default 1)")
    plan.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096, capped "
                                                                "at model.max_seq_len)")
    plan.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    plan.set_defaults(func=cmd_cost)

    import_hf = verbs.add_parser(
        "import-hf", help="convert a Mistral / Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE / Dots1 checkpoint (Hugging Face or original release layout) "
                          "into a run directory",
        description="DIR is either a Hugging Face directory (config.json + *.safetensors, single or sharded) or "
                    "Mistral's original release (params.json + consolidated.safetensors or consolidated.NN.pth, "
                    "read with weights_only=True). Writes RUN/config.yaml, a step-0 weights checkpoint and "
                    "RUN/tokenizer.model (if DIR has one). Use the run with eval, generate, export-hf or "
                    "train.init_from=RUN.")
    import_hf.add_argument("dir", metavar="DIR", help="model directory (save_pretrained output or a raw Mistral release)")
    import_hf.add_argument("--out", required=True, metavar="RUN", help="new run directory (runs/NAME); must have "
                                                                      "no checkpoints")
    import_hf.set_defaults(func=cmd_import_hf)

    up = verbs.add_parser(
        "upcycle", help="sparse upcycling: an MoE run dir whose experts start as copies of a dense run's FFN",
        description="Write RUN from the dense run DENSE_RUN's latest weights and the MoE shape given as overrides "
                    "(e.g. model.moe.num_experts=8 model.moe.top_k=2): attention, norms, embeddings and LM head "
                    "copied; every expert of a sparse layer a copy of that layer's dense FFN; a fresh router; "
                    "layers the MoE config keeps dense keep their FFN. Without --noise, and with routing weights "
                    "that sum to 1 (topk_softmax), the new model computes the dense model's function. Continue "
                    "training with train.init_from=RUN.")
    up.add_argument("--run", required=True, metavar="DENSE_RUN", help="the trained dense run directory")
    up.add_argument("--out", required=True, metavar="RUN", help="new run directory (runs/NAME); must have no "
                                                                "checkpoints")
    up.add_argument("--noise", type=float, default=0.0, metavar="STD",
                    help="add Gaussian noise of std STD x (the std of that layer's dense matrix) to every expert "
                         "weight, independently per expert (relative; default 0: exact copies)")
    up.add_argument("overrides", nargs="*", metavar="key=value",
                    help="on top of the dense run's config: the MoE shape (model.moe.*), execution keys "
                         "(model.dtype, remat, scan_unroll, attention_impl) and other sections' keys")
    up.set_defaults(func=cmd_upcycle)

    export_hf = verbs.add_parser(
        "export-hf", help="write a run's latest weights as a Hugging Face directory",
        description="Write config.json + model.safetensors that transformers' from_pretrained loads "
                    "(MistralForCausalLM or MixtralForCausalLM), plus tokenizer.model if the run has one.")
    export_hf.add_argument("--run", required=True, help="run directory (runs/NAME)")
    export_hf.add_argument("--out", required=True, metavar="DIR", help="output directory (no safetensors in it yet)")
    export_hf.set_defaults(func=cmd_export_hf)

    verify = verbs.add_parser(
        "verify", help="check a run's checkpoint steps against the digests saved with them (offline)",
        description="Restore every checkpoint step (or --step N) and compare each array and JSON item with the "
                    "digests written when it was saved. Prints one verdict per step: ok, damaged (the files and "
                    "arrays) or unverifiable (saved before digests existed). Exit status 1 if any step is damaged.")
    verify.add_argument("--run", required=True, help="run directory (runs/NAME)")
    verify.add_argument("--step", type=int, help="check this step only")
    verify.add_argument("--json", action="store_true", help="print one JSON object (ok, damaged steps, a verdict "
                                                            "per step) and nothing else on stdout")
    verify.set_defaults(func=cmd_verify)
    tok = verbs.add_parser(
        "tokenize", help="tokenize data.source (or each data.mixture source) once into a cache: data.source=tokens:DIR",
        description="Tokenize both splits of the config's data source (a mixture: each source into DIR/NAME) into "
                    "ArrayRecord shards of token ids with a manifest; train from it with data.source=tokens:DIR. "
                    "The tokenizer is the config's (trained once if it has no data.tokenizer.path) and is copied in.")
    tok.add_argument("--config", required=True, help="YAML file (or preset name such as quickstart)")
    tok.add_argument("--out", required=True, help="the cache folder (replaced if it exists)")
    tok.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    tok.set_defaults(func=cmd_tokenize)
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


if __name__ == "__main__":
    entry()
