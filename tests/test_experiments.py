"""Experiments: the routing statistics on hand-made inputs, and each experiment end to end at
smoke size, with the report's figures traced back to the runs' own metrics files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from meshes import one_device_trainers_with_compile_cache

from mixtral_jax.experiments.routing_stats import (
    IDENTIFIER,
    KEYWORD,
    PUNCTUATION,
    STRING,
    WHITESPACE,
    chance_rates,
    char_categories,
    consecutive_rates,
    token_categories,
)


@pytest.fixture(scope="module", autouse=True)
def _one_device_and_compile_cache(tmp_path_factory):
    # the smoke studies train many runs of a few shapes: each program compiles once
    with one_device_trainers_with_compile_cache(str(tmp_path_factory.mktemp("xla_cache_experiments"))):
        yield


def test_consecutive_rates_and_chance_on_a_hand_made_sequence():
    # top-2 ids per token; pairs: ({0,1},{0,2}) same top-1, overlap; ({0,2},{3,1}) neither;
    # ({3,1},{3,4}) same top-1, overlap. A second sequence adds no pairs across the boundary.
    seq = np.array([[0, 1], [0, 2], [3, 1], [3, 4]])
    assert consecutive_rates([seq]) == pytest.approx((2 / 3, 2 / 3))
    assert consecutive_rates([seq, np.array([[5, 6]])]) == pytest.approx((2 / 3, 2 / 3))
    # marginals: top-1 is 0 or 3, half each -> 0.5; four equally likely sets, of the 16 ordered
    # pairs 4 are a set with itself and 6 are {0,1}-{0,2}, {0,1}-{1,3}, {1,3}-{3,4} both ways -> 10/16
    assert chance_rates([seq]) == pytest.approx((0.5, 10 / 16))


def test_token_kinds_from_python_tokenize():
    source = "def f(x):\n    return 'a'  # note\n"
    cats = char_categories(source)
    assert cats[source.index("def")] == KEYWORD and cats[source.index("f(")] == IDENTIFIER
    assert cats[source.index("(")] == PUNCTUATION and cats[source.index("'a'")] == STRING
    assert cats[source.index("# note")] == STRING and cats[source.index("    return")] == WHITESPACE
    spans = [(0, 3), (3, 5), (5, 6), (9, 14), (14, 20)]  # "def", " f", "(", "\n    ", "return"
    assert token_categories(spans, cats, source) == [KEYWORD, IDENTIFIER, PUNCTUATION, WHITESPACE, KEYWORD]
    assert char_categories("def broken(:\n  'unterminated") is None


def _cell(report: str, row_label: str, column: str, section: str | None = None) -> str:
    """The cell of the first table (of the section whose heading starts with `section`)."""
    if section is not None:
        report = report[report.index(f"## {section}"):]
        report = report[:report.find("\n## ", 3)] if "\n## " in report[3:] else report
    lines = [line for line in report.splitlines() if line.startswith("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == row_label:
            return cells[headers.index(column)]
    raise AssertionError(f"no row {row_label}")


def test_dense_vs_moe_smoke(tmp_path, corpus_cache):
    from mixtral_jax.cli import main
    from mixtral_jax.experiments.paired_stats import paired_gap

    assert main(["experiment", "dense_vs_moe", "--smoke", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    for png in ("loss_curves.png", "gap_over_training.png", "load_heatmaps.png"):
        assert png in results["figures"] and (tmp_path / png).stat().st_size > 10_000
    assert results["primary"] == {"dense": "dense", "moe": "moe"}
    arms = {(r["arm"], r["seed"]): tmp_path / r["dir"] for r in results["runs"]}
    assert {a for a, _ in arms} == {"dense", "moe", "dense_wide", "upcycled"}
    final = {k: json.loads((d / "summary.json").read_text())["eval_loss"] for k, d in arms.items()}
    # the paired interval in the report is the one recomputed from the runs' own summaries
    gap = paired_gap([final[("dense", s)] for s in (0, 1)], [final[("moe", s)] for s in (0, 1)])
    assert f"{gap.mean:+.4f} [{gap.low:+.4f}, {gap.high:+.4f}]" in report
    assert results["paired_gap"]["mean"] == pytest.approx(gap.mean)
    assert _cell(report, "(b) 16 experts x 256, top-2", "seeds") == "2"
    # (d) continues from (a) seed 0's halfway checkpoint; its curve starts at that point
    upcycled = next(r for r in results["runs"] if r["arm"] == "upcycled")
    assert upcycled["init_from"] == "dense_seed0" and upcycled["init_step"] == 2
    assert results["curves"]["upcycled_seed0"]["steps"][0] == 2
    meta = [f.read_text() for f in (tmp_path / "upcycled_init_seed0" / "checkpoints").rglob("*")
            if f.is_file() and "meta" in f.parts[-2:][0] + f.name]
    assert any(re.search(r'"granular":\s*true', m) for m in meta), meta  # experiments narrower than the FFN
    assert re.search(r"paired gap \(b\) - \(a\) = [+-]\d", results["verdict"])
    # the shipped downstream task per arm: the report's accuracy is each run's own lm-eval score
    from mixtral_jax.experiments.dense_vs_moe import SMOKE_TASK_ITEMS
    from mixtral_jax.experiments.downstream_scores import FILE

    scored = {k: json.loads((d / FILE).read_text()) for k, d in arms.items()}
    assert all(x["items"] == SMOKE_TASK_ITEMS and 0.0 <= x["acc"] <= 1.0 for x in scored.values())
    assert results["arms"]["moe"]["downstream"]["acc"] == [scored[("moe", s)]["acc"] for s in (0, 1)]
    acc_gap = paired_gap([scored[("dense", s)]["acc"] for s in (0, 1)], [scored[("moe", s)]["acc"] for s in (0, 1)])
    assert results["downstream_gap"]["mean"] == pytest.approx(acc_gap.mean)
    assert _cell(report, "(c) dense, FFN 4096 (= (b)'s total)", "acc", "Downstream") == f"{scored[('dense_wide', 0)]['acc']:.3f} (1 seed)"
    assert "python_next_line" in results["verdict"]
    # a restart reuses every finished run (nothing retrains: no new metrics lines)
    before = {k: (d / "metrics.jsonl").stat().st_mtime for k, d in arms.items()}
    assert main(["experiment", "dense_vs_moe", "--smoke", "--out", str(tmp_path)]) == 0
    assert before == {k: (d / "metrics.jsonl").stat().st_mtime for k, d in arms.items()}


def test_dense_vs_moe_ladder_smoke(tmp_path, corpus_cache):
    from mixtral_jax.cli import main

    assert main(["experiment", "dense_vs_moe", "--ladder", "--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "ladder"
    results = json.loads((out / "results.json").read_text())
    assert [r["size"] for r in results["sizes"]] == ["s", "m", "l"]
    assert (out / "ladder_multiplier.png").stat().st_size > 10_000
    assert len(results["runs"]) == 6 and all((out / r["dir"] / "summary.json").is_file() for r in results["runs"])
    dims = [r["dim"] for r in results["sizes"]]
    assert dims == sorted(dims) and "compute multiplier" in (out / "report.md").read_text().lower()
    assert main(["experiment", "router_ablation", "--ladder", "--smoke", "--out", str(tmp_path)]) == 2


def test_router_ablation_smoke(tmp_path, corpus_cache):
    from mixtral_jax.experiments import run_experiment
    from mixtral_jax.training.metrics import read_metrics

    report = run_experiment("router_ablation", tmp_path, smoke=True).read_text()
    for png in ("load_heatmaps.png", "loss_vs_imbalance.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    for point in ("aux0", "capacity1.0"):
        records = [r["moe/load_max_over_mean"] for r in read_metrics(tmp_path / point) if "moe/load_max_over_mean" in r]
        assert _cell(report, point, "load max/mean") == f"{np.mean(records[-5:]):.4g}"
    dropped = [r["moe/dropped_fraction"] for r in read_metrics(tmp_path / "capacity1.0") if "moe/dropped_fraction" in r]
    assert float(_cell(report, "capacity1.0", "dropped fraction")) == pytest.approx(np.mean(dropped[-5:]), rel=1e-3)
    assert float(_cell(report, "expert_choice", "load max/mean")) == pytest.approx(1.0)
    assert re.search(r"imbalance is (NOT )?higher without the loss", report)


def test_routing_analysis_smoke(tmp_path, corpus_cache):
    from mixtral_jax.experiments import run_experiment

    report = run_experiment("routing_analysis", tmp_path, smoke=True).read_text()
    for png in ("experts_by_token_kind.png", "consecutive_tokens.png", "snippet_by_expert.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert "| identifier |" in report and "| layer | same top-1 | chance |" in report


def test_unknown_experiment_names_the_closest(capsys):
    from mixtral_jax.cli import main

    assert main(["experiment", "dense_vs_mo"]) == 2
    assert "did you mean 'dense_vs_moe'" in capsys.readouterr().err


def test_full_scale_configs_are_the_published_models():
    from mixtral_jax.config import load_config
    from mixtral_jax.experiments.runner import experiment_config
    from mixtral_jax.models.params import param_counts

    counts = {m: param_counts(load_config(experiment_config("dense_vs_moe", f"{m}.yaml", full_scale=True)).model)
              for m in ("dense", "moe", "dense_wide")}
    assert counts["dense"]["total"] == 7_241_732_096  # Mistral 7B
    assert (counts["moe"]["total"], counts["moe"]["active"]) == (46_702_792_704, 12_879_925_248)  # Mixtral 8x7B
    # (c) matches (b)'s active FFN: 2 x 14336 hidden units; the router's weights are the difference
    assert abs(counts["dense_wide"]["total"] - counts["moe"]["active"]) == counts["moe"]["router"]
    for name, file in (("router_ablation", "base.yaml"), ("routing_analysis", "model.yaml")):
        cfg = load_config(experiment_config(name, file, full_scale=True))
        assert cfg.model.is_moe and cfg.mesh.expert == 8 and cfg.data.seq_len == 2048
