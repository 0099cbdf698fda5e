"""A dense_vs_moe report from a study that has not finished (cut off, or still training):

    python -m mixtral_jax.experiments.dense_vs_moe_partial --out runs/dense_vs_moe

Every run is cut at the last eval step that ALL runs of the primary arms have reached, so the
paired gap compares equal tokens; other arms' runs are shown only if they got that far (an
upcycled run only when finished and the cut is its parent's last step). Figures for an unfinished run come from its metrics.jsonl
(eval losses, clock) and from its config (parameter and FLOP counts), never from a guess. The
report says where it was cut; rerunning the experiment command finishes the study.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Sequence

from mixtral_jax.config import load_config
from mixtral_jax.experiments.dense_vs_moe_arms import ARMS, PRIMARY, UPCYCLE_AT, ArmRun
from mixtral_jax.experiments.runner import RunResult


def _load(run_dir: Path, cut: int | None = None) -> RunResult | None:
    from mixtral_jax.models.params import param_counts
    from mixtral_jax.training.cost import flops_per_token
    from mixtral_jax.training.metrics import read_metrics

    if not (run_dir / "config.yaml").is_file():
        return None
    cfg = copy.deepcopy(load_config(run_dir / "config.yaml"))
    metrics = read_metrics(run_dir)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if cut is not None:
        metrics = [r for r in metrics if r["step"] <= cut]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if not evals or (cut is not None and evals[-1][0] != cut):
        return None
    counts = param_counts(cfg.model)
    step, loss = evals[-1]
    if step != summary.get("steps"):  # unfinished, or cut short of its end: the figures at `step`
        summary = {**{k: summary[k] for k in ("hardware", "peak_tflops", "peak_source") if k in summary},
                   "steps": step, "eval_loss": loss, "params_total": counts["total"],
                   "params_active": counts["active"],
                   "train_flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len).train}
        cfg.train.steps = step
    return RunResult(run_dir.name, cfg, summary, metrics)


def partial_runs(out: Path) -> tuple[list[ArmRun], int | None]:
    """The runs under `out` cut at the last eval step common to every seed whose primary pair
    (dense and MoE) has begun evaluating, and that step. ([], None) when no pair has."""
    arms = {a.name: a for a in ARMS}
    dense, moe = arms[PRIMARY["dense"]], arms[PRIMARY["moe"]]
    reached = {}
    for seed in dense.seeds:
        pair = [_load(out / f"{a.name}_seed{seed}") for a in (dense, moe)]
        if all(pair):
            reached[seed] = min(r.series("eval_loss")[0][-1] for r in pair)
    if not reached:
        return [], None
    cut = min(reached.values())
    runs: list[ArmRun] = []
    loaded: dict[tuple[str, int], RunResult] = {}
    for arm in ARMS:
        for seed in arm.seeds:
            if arm in (dense, moe) and seed not in reached:
                continue
            if arm.upcycle_from:
                # only finished, and only when the cut is its parent's end: its curve spans the second half
                parent = loaded.get((arm.upcycle_from, seed))
                result = _load(out / f"{arm.name}_seed{seed}")
                done = result is not None and (out / f"{arm.name}_seed{seed}" / "summary.json").is_file()
                if parent is not None and done and cut == parent.cfg.train.steps == load_config(
                        parent.run_dir / "config.yaml").train.steps:
                    start = max(1, round(cut * UPCYCLE_AT))
                    runs.append(ArmRun(arm, seed, result, parent, start))
                continue
            result = _load(out / f"{arm.name}_seed{seed}", cut)
            if result is not None:
                runs.append(ArmRun(arm, seed, result))
                loaded[(arm.name, seed)] = result
    return runs, cut


def main(argv: Sequence[str] | None = None) -> None:
    from mixtral_jax.experiments import dense_vs_moe_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dense_vs_moe")
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs, cut = partial_runs(out)
    if not runs:
        raise SystemExit(f"{out}: no seed has both primary runs evaluated yet")
    missing = [f"{a.name}_seed{s}" for a in ARMS for s in a.seeds
               if not any(r.arm.name == a.name and r.seed == s for r in runs)]
    note = (f"PARTIAL: every run cut at step {cut} (the last eval step all included primary runs reached); "
            f"not included (not trained that far): {', '.join(missing) or 'none'}.")
    print(dense_vs_moe_report.write(out, runs, PRIMARY, note=note))


if __name__ == "__main__":
    main()
