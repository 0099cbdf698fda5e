"""Downstream-evaluation throughput: the same lm-eval loglikelihood requests scored by our
adapter (`MixtralLM`, mixtral_jax/downstream) and by lm-eval's own HF backend (`HFLM`, torch) on
the `export-hf` output of the same model, in one run.

    python -m benchmarks.downstream              # 2000 requests, 3 rounds (~4 minutes on 2 cores)
    python -m benchmarks.downstream --smoke      # 24 requests, a 2-layer model, 1 round (the test suite)

The model is the quickstart's shape (configs/quickstart.yaml: 4 layers, dim 128, 8 experts
top-2, vocab 4096, window 96) with freshly initialised weights (speed does not depend on what
the weights learned), float32, on one device, exported with `export-hf`. The requests are those
of the shipped task `python_next_line` (mixtral_jax/downstream/tasks.py): per item, a context of
up to 8 lines of a held-out Python file and 4 candidate next lines, 2000 requests of ~10 to ~230
tokens, scored as lm-eval scores the task (`loglikelihood`).

Ours is timed twice: its first pass ("compiles included": one XLA compile per batch shape,
paid once per process and model) and the passes after it (warm, compiled programs reused, as in
the rest of a task or of a training run's later evaluations). HFLM's first pass is timed apart
from its later ones too. Warm passes alternate ours / HF round by round; the warm ratio is the
median over rounds of ours / HF requests/s within a round. Both score with batch size
`--batch-size`; torch gets as many threads as this process may use. The log-likelihoods of the
two are compared as they come (max |difference| printed; over 1e-3 fails the run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mixtral_jax.host_allocator import reexec_with_tunables  # noqa: E402

reexec_with_tunables()  # the heap settings `mixtral-jax eval` runs under
# One CPU device, as `mixtral-jax eval` runs on a laptop (the test suite forces 8 host devices).
os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's workers: see benchmarks/README.md

import numpy as np  # noqa: E402

from benchmarks.train_step import ratio_line, threads  # noqa: E402

TARGET = 1.0


def build_model(root: Path, smoke: bool) -> tuple[Path, Path]:
    """A quickstart-shaped run dir with fresh weights, and its export-hf directory."""
    from flax import nnx

    from mixtral_jax.config import load_config
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer
    from mixtral_jax.interop.convert import export_hf, write_weights_run
    from mixtral_jax.models.transformer import Transformer

    overrides = [f"run.out_dir={root}", "run.name=downstream_bench", "mesh.data=1"]
    if smoke:
        overrides += ["model.n_layers=2", "model.dim=64", "model.head_dim=16", "model.hidden_dim=128"]
    cfg = load_config("configs/quickstart.yaml", overrides)
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    _, params, rest = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    write_weights_run(cfg.run_dir, cfg, params, rest, {"made_by": "benchmarks/downstream.py"}, Path(tokenizer.path))
    return cfg.run_dir, export_hf(cfg.run_dir, root / "exported")


def make_requests(n_items: int) -> list[tuple[str, str]]:
    """The (context, choice) requests of the shipped task's first `n_items` items
    (python_next_line: 4 candidate next lines after up to 8 lines of a held-out file)."""
    from mixtral_jax.downstream.tasks import TASK, shipped_task_dir

    lines = (shipped_task_dir() / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()[:n_items]
    return [(item["context"], choice) for item in map(json.loads, lines) for choice in item["choices"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500, help="python_next_line items (4 requests each; "
                                                               "default 500, all of them)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch, both backends (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds (default 3)")
    parser.add_argument("--smoke", action="store_true", help="6 items, a 2-layer model, 1 round")
    args = parser.parse_args()
    items, rounds = (6, 1) if args.smoke else (args.items, args.rounds)

    import jax
    import lm_eval
    import torch
    import transformers
    from lm_eval.api.instance import Instance

    from mixtral_jax.downstream.adapter import MixtralLM
    from mixtral_jax.downstream.offline import stay_offline
    from mixtral_jax.generate import load_tokenizer
    from mixtral_jax.training.evaluate import load_run_model

    stay_offline()
    torch.set_num_threads(threads())
    from lm_eval.models.huggingface import HFLM

    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"lm-eval {lm_eval.__version__}; {threads()} threads; batch size {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        run, exported = build_model(Path(tmp), args.smoke)
        pairs = make_requests(items)
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
        model, cfg, _ = load_run_model(run)
        ours = MixtralLM(model, load_tokenizer(run, cfg), batch_size=args.batch_size, model_cfg=cfg.model)
        hf = HFLM(pretrained=str(exported), device="cpu", dtype="float32", batch_size=args.batch_size)
        lengths = [len(ours.tok_encode(c + x)) for c, x in pairs]
        print(f"{len(pairs)} requests of {min(lengths)}-{max(lengths)} tokens (median {int(np.median(lengths))}), "
              f"{cfg.model.n_layers} layers, dim {cfg.model.dim}, {cfg.model.moe.num_experts} experts top-"
              f"{cfg.model.moe.top_k}")

        def timed(lm) -> tuple[float, list]:
            start = time.perf_counter()
            out = lm.loglikelihood(requests, disable_tqdm=True)
            return len(requests) / (time.perf_counter() - start), out

        ours_cold, got = timed(ours)
        hf_cold, want = timed(hf)
        diff = max(abs(a[0] - b[0]) for a, b in zip(got, want))
        flags = sum(a[1] != b[1] for a, b in zip(got, want))
        ours_warm, hf_warm = [], []
        for r in range(rounds):
            for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                (ours_warm if name == "ours" else hf_warm).append(timed(ours if name == "ours" else hf)[0])
    shapes = sorted(shape for kind, shape in ours.programs.shapes if kind == "score")
    print(f"max |log-likelihood difference| {diff:.2e}, greedy flags differing {flags}; our programs: "
          f"{len(shapes)} {shapes}")
    print(f"{'':<28}{'first pass':>14}{'warm (median)':>16}")
    print(f"{'ours (jax, requests/s)':<28}{ours_cold:>14.1f}{statistics.median(ours_warm):>16.1f}")
    print(f"{'HFLM (torch, requests/s)':<28}{hf_cold:>14.1f}{statistics.median(hf_warm):>16.1f}")
    warm = statistics.median(o / h for o, h in zip(ours_warm, hf_warm))
    print(ratio_line("ours/HF requests/s (warm)", warm, f"target >= {TARGET:g}", warm >= TARGET))
    cold = ours_cold / hf_cold
    print(ratio_line("ours/HF requests/s (compiles included)", cold, f"target >= {TARGET:g}", cold >= TARGET))
    if diff > 1e-3:
        sys.exit(f"the two backends disagree: max |log-likelihood difference| {diff:.2e}")


if __name__ == "__main__":
    main()
