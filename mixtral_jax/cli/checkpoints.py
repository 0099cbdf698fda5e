"""The verbs that write or check checkpoints and caches: `import-hf`, `export-hf`, `upcycle`, `verify`, `tokenize`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from mixtral_jax.cli.common import add_config_arguments, add_new_run_argument, add_run_argument, stdout_to_stderr
from mixtral_jax.config import load_config


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
            stack.enter_context(stdout_to_stderr())  # orbax / JAX logs must not mix into the JSON
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


def register(verbs: argparse._SubParsersAction) -> None:
    import_hf = verbs.add_parser(
        "import-hf", help="convert a Mistral / Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE / Dots1 checkpoint (Hugging Face or original release layout) "
                          "into a run directory",
        description="DIR is either a Hugging Face directory (config.json + *.safetensors, single or sharded) or "
                    "Mistral's original release (params.json + consolidated.safetensors or consolidated.NN.pth, "
                    "read with weights_only=True). Writes RUN/config.yaml, a step-0 weights checkpoint and "
                    "RUN/tokenizer.model (if DIR has one). Use the run with eval, generate, export-hf or "
                    "train.init_from=RUN.")
    import_hf.add_argument("dir", metavar="DIR", help="model directory (save_pretrained output or a raw Mistral release)")
    add_new_run_argument(import_hf)
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
    add_new_run_argument(up)
    up.add_argument("--noise", type=float, default=0.0, metavar="STD",
                    help="add Gaussian noise of std STD x (the std of that layer's dense matrix) to every expert "
                         "weight, independently per expert (relative; default 0: exact copies)")
    up.add_argument("overrides", nargs="*", metavar="key=value",
                    help="on top of the dense run's config: the MoE shape (model.moe.*), execution keys "
                         "(model.dtype, remat, scan_unroll, attention_impl, grouped_kernel, fp8) and other sections' keys")
    up.set_defaults(func=cmd_upcycle)

    export_hf = verbs.add_parser(
        "export-hf", help="write a run's latest weights as a Hugging Face directory",
        description="Write config.json + model.safetensors that transformers' from_pretrained loads "
                    "(MistralForCausalLM or MixtralForCausalLM), plus tokenizer.model if the run has one.")
    add_run_argument(export_hf)
    export_hf.add_argument("--out", required=True, metavar="DIR", help="output directory (no safetensors in it yet)")
    export_hf.set_defaults(func=cmd_export_hf)

    verify = verbs.add_parser(
        "verify", help="check a run's checkpoint steps against the digests saved with them (offline)",
        description="Restore every checkpoint step (or --step N) and compare each array and JSON item with the "
                    "digests written when it was saved. Prints one verdict per step: ok, damaged (the files and "
                    "arrays) or unverifiable (saved before digests existed). Exit status 1 if any step is damaged.")
    add_run_argument(verify)
    verify.add_argument("--step", type=int, help="check this step only")
    verify.add_argument("--json", action="store_true", help="print one JSON object (ok, damaged steps, a verdict "
                                                            "per step) and nothing else on stdout")
    verify.set_defaults(func=cmd_verify)

    tok = verbs.add_parser(
        "tokenize", help="tokenize data.source (or each data.mixture source) once into a cache: data.source=tokens:DIR",
        description="Tokenize both splits of the config's data source (a mixture: each source into DIR/NAME) into "
                    "ArrayRecord shards of token ids with a manifest; train from it with data.source=tokens:DIR. "
                    "The tokenizer is the config's (trained once if it has no data.tokenizer.path) and is copied in.")
    add_config_arguments(tok, "YAML file (or preset name such as quickstart)")
    tok.add_argument("--out", required=True, help="the cache folder (replaced if it exists)")
    tok.set_defaults(func=cmd_tokenize)
