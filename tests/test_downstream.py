"""Downstream evaluation through lm-eval-harness (mixtral_jax/downstream, `eval --tasks`,
`train.eval_tasks`). References, not saved outputs: lm-eval's own HF backend (HFLM) run on the
`export-hf` output of the same tiny trained MoE run (per-request log-likelihoods within 1e-4 in
float32, the same greedy flags and the same accuracy on a local multiple-choice task), our own
`generate` (greedy, KV cache) for generate_until, and a direct sum of the model's token
log-probabilities for loglikelihood_rolling. The task (YAML + JSON lines) is written here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="downstream evaluation runs through lm-eval-harness")
pytest.importorskip("transformers", reason="the parity reference is lm-eval's HF backend")
pytest.importorskip("torch", reason="the parity reference is lm-eval's HF backend")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from mixtral_jax.cli import main  # noqa: E402
from mixtral_jax.config import ConfigError, load_config  # noqa: E402
from mixtral_jax.downstream.adapter import MixtralLM  # noqa: E402
from mixtral_jax.downstream.batching import bucket_length, group_inputs, pack  # noqa: E402
from mixtral_jax.downstream.harness import TaskSuite  # noqa: E402
from mixtral_jax.downstream.offline import stay_offline  # noqa: E402
from mixtral_jax.generate import generate, load_tokenizer  # noqa: E402
from mixtral_jax.training.cost import DeviceClock  # noqa: E402
from mixtral_jax.training.evaluate import load_run_model  # noqa: E402
from mixtral_jax.training.hooks import DownstreamHook, LoopClock, LoopContext  # noqa: E402
from mixtral_jax.training.metrics import read_metrics  # noqa: E402
from mixtral_jax.training.preemption import StopRequest  # noqa: E402

MAX_LEN = 64  # the model's context: long requests are cut from the left, as HFLM cuts them
TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "model.hidden_dim=128", "model.moe.num_experts=4", "model.moe.top_k=2", "model.sliding_window=24",
    f"model.max_seq_len={MAX_LEN}", "data.seq_len=64", "data.batch_size=8", "optim.warmup_steps=0", "optim.lr=1e-2",
    "logging.progress=false", "logging.wandb=off", "train.eval_batches=1",
]
WORDS = ["def", "return", "self", "import", "os", "class", "for", "in", "range", "(", ")", ":", "x", "=", "1",
         "None", "print", "if", "else", "while", "éte", "🙂", "\n", "    "]
TASK = "tiny_mc"


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A 20-item multiple-choice task: lm-eval's `json` loader over a local file. Half the items
    have one-token choices (the rows HFLM and we share between choices)."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    with open(folder / "items.jsonl", "w") as f:
        for i in range(20):
            choices = ([" x", " y", " z", " w"] if i % 2 else
                       [" " + _text(rng, int(rng.integers(1, 5))) for _ in range(4)])
            f.write(json.dumps({"question": _text(rng, int(rng.integers(2, 14))), "choices": choices,
                                "answer": int(rng.integers(0, 4))}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory, corpus_cache) -> Path:
    return tmp_path_factory.mktemp("downstream")


@pytest.fixture(scope="module")
def base_run(root) -> Path:
    from mixtral_jax.training.trainer import Trainer

    cfg = load_config("configs/quickstart.yaml", [f"run.out_dir={root}", "run.name=base", *TINY, "train.steps=8",
                                                  "train.eval_every=8", "train.checkpoint_every=8", "train.log_every=4"])
    Trainer(cfg).fit()
    return cfg.run_dir


@pytest.fixture(scope="module")
def lora_run(root, base_run, task_dir) -> tuple[Path, dict]:
    """A LoRA fine-tune of the base run evaluating the task during training (adapters merged by
    the hook), every 2 of its 4 steps."""
    from mixtral_jax.training.trainer import Trainer

    cfg = load_config("configs/quickstart.yaml", [
        f"run.out_dir={root}", "run.name=lora", *TINY, f"train.init_from={base_run}", "finetune.lora.rank=4",
        "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2",
        f"train.eval_tasks=[{TASK}]", "train.eval_tasks_every=2", f"train.eval_tasks_include_path={task_dir}"])
    return cfg.run_dir, Trainer(cfg).fit()


@pytest.fixture(scope="module")
def ours(base_run):
    model, cfg, _ = load_run_model(base_run)
    return MixtralLM(model, load_tokenizer(base_run, cfg), batch_size=8, model_cfg=cfg.model), model


@pytest.fixture(scope="module")
def hf(base_run, root):
    """lm-eval's HF backend on the run exported through the CLI (float32, CPU)."""
    from lm_eval.models.huggingface import HFLM

    out = root / "exported"
    assert main(["export-hf", "--run", str(base_run), "--out", str(out)]) == 0
    stay_offline()
    return HFLM(pretrained=str(out), device="cpu", dtype="float32", batch_size=8)


def _pairs() -> list[tuple[str, str]]:
    """50 (context, continuation) pairs of 1 to ~100 tokens: empty contexts, trailing spaces,
    unicode and byte-fallback text, contexts longer than the model's context, and one-token
    continuations sharing a context."""
    rng = np.random.default_rng(1)
    pairs = [("", "def main():"), ("", " x"), ("x = 1  ", "+ 2"), ("print(", "'héllo 🙂')"),
             ("import", " os"), ("import", " sys"), ("import", " os.path")]
    while len(pairs) < 50:
        context = _text(rng, int(rng.integers(1, 70)))
        pairs.append((context, " " + _text(rng, int(rng.integers(1, 7)))))
    return pairs


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_match_lm_evals_hf_backend(ours, hf):
    lm, _ = ours
    pairs = _pairs()
    for context, continuation in pairs:  # the exported tokenizer encodes as ours (helps read a failure)
        assert lm.tok_encode(context + continuation) == hf.tok_encode(context + continuation)
    got = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    want = hf.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert any(len(lm.tok_encode(c + x)) > MAX_LEN + 1 for c, x in pairs)  # truncation was exercised
    for pair, (logprob, greedy), (ref, ref_greedy) in zip(pairs, got, want):
        assert abs(logprob - ref) <= 1e-4, (pair, logprob, ref)
        assert greedy == ref_greedy, pair


def test_fifty_requests_compile_a_few_shapes(ours):
    lm, model = ours
    fresh = MixtralLM(model, lm.sp, batch_size=8)
    fresh.loglikelihood(_instances("loglikelihood", _pairs()), disable_tqdm=True)
    shapes = {shape for kind, shape in fresh.programs.shapes if kind == "score"}  # (rows, length, heads)
    assert {s[:2] for s in shapes} <= {(8, 16), (8, 32), (8, 64)} and len(shapes) <= 6, shapes
    assert [bucket_length(n, MAX_LEN) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    # Equal inputs share a group (longest first), of at most 3 x head + 1 requests.
    groups = group_inputs([[1, 2], [1, 2, 3], [1, 2], [], [1, 2], [1, 2], [1, 2], [5] * 8], [1, 2, 1, 0, 1, 1, 1, 2])
    assert [(g.inputs, g.members, g.head, g.head_share) for g in groups] == [
        ((5,) * 8, [7], 2, 4), ((1, 2, 3), [1], 2, 1), ((1, 2), [0, 2, 4, 5], 1, 2), ((1, 2), [6], 1, 2)]
    # Packed first-fit decreasing: rows of 16 hold 10 + 6, 9 + 5 + 2, ...; every group once.
    sizes = [10, 9, 6, 5, 2, 2, 1]
    batches = list(pack(group_inputs([[i + 1] * n for i, n in enumerate(sizes)], [1] * 7), 64, batch_size=2))
    rows = [[len(g.inputs) for g in row] for _, row_list in batches for row in row_list]
    assert [length for length, _ in batches] == [16, 16] and rows == [[10, 6], [9, 5, 2], [2, 1]]


def test_multiple_choice_accuracy_matches_hf(ours, hf, task_dir):
    suite = TaskSuite.resolve([TASK], task_dir)
    acc = [suite.evaluate(lm, bootstrap_iters=0)["results"][TASK]["acc,none"] for lm in (ours[0], hf)]
    assert acc[0] == acc[1]


def test_rolling_loglikelihood_is_the_sum_of_token_logprobs(ours, hf):
    lm, model = ours
    short, long = "def add(x, y):\n    return x + y\n", _text(np.random.default_rng(2), 120)
    assert len(lm.tok_encode(long)) > 2 * MAX_LEN  # several windows
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True)
    want = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)
    # Directly: the encoded string (BOS first, as HFLM encodes it) predicted after the prefix token.
    ids = lm.tok_encode(short)
    logits = model(jnp.asarray([[lm.prefix_token_id, *ids[:-1]]]))[0][0]
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert abs(got[0] - float(logprobs[np.arange(len(ids)), ids].sum())) <= 1e-4


def test_generate_until_is_greedy_generate_cut_at_the_stop_sequence(ours):
    lm, model = ours
    prompts = ["def fib(n):\n    ", "import os\nimport"]
    texts = []
    for prompt in prompts:
        new = generate(model, lm.tok_encode(prompt), max_new_tokens=12, eos_id=lm.eot_token_id, max_len=MAX_LEN)
        texts.append(lm.tok_decode(new))
    assert all(len(t) >= 4 for t in texts), texts
    stop = texts[0][2:4]  # stops inside the first generation
    args = [(prompts[0], {"until": [stop], "max_gen_toks": 12}),
            (prompts[1], {"until": ["\x00never"], "max_gen_toks": 12}),
            (prompts[1], {"until": ["\x00never"], "max_gen_toks": 5})]  # its own group: fewer tokens
    got = lm.generate_until(_instances("generate_until", args), disable_tqdm=True)
    five = lm.tok_decode(generate(model, lm.tok_encode(prompts[1]), max_new_tokens=5, eos_id=lm.eot_token_id,
                                  max_len=MAX_LEN))
    assert got == [texts[0].split(stop)[0], texts[1], five]
    # Both groups (12 and 5 new tokens) ran the same two programs: a power-of-two cache of 32.
    assert sorted(kind for kind, _ in lm.programs.shapes if kind != "score") == ["prefill", "step"]


def test_training_logs_downstream_metrics_and_eval_agrees(lora_run, task_dir, capsys):
    run, summary = lora_run
    key = f"downstream/{TASK}/acc"
    logged = [(r["step"], r[key]) for r in read_metrics(run) if key in r]
    assert [step for step, _ in logged] == [2, 4]
    assert summary[key] == logged[-1][1] == json.loads((run / "summary.json").read_text())[key]
    # `eval --tasks` on the saved LoRA run (adapters merged on restore) finds the hook's final figure.
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--tasks", TASK, "--include-path", str(task_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON document, nothing else
    results = json.loads(out)
    assert results["results"][TASK]["acc,none"] == summary[key]
    assert results["config"]["step"] == 4 and results["n-samples"][TASK]["effective"] == 20


def test_downstream_hook_is_off_the_device_clock():
    clock = LoopClock(DeviceClock(1))
    clock.start()
    seen = []

    def evaluate(state):
        before = clock.device.running_seconds
        time.sleep(0.2)
        seen.append(clock.device.running_seconds - before)
        return {f"downstream/{TASK}/acc": 0.5}

    hook = DownstreamHook(0, evaluate, clock)
    ctx = LoopContext(done=0, last_step=2, state={}, stop=StopRequest())
    ctx.finish_step({}, {})
    assert not hook.due(ctx)  # every 0: only at the last step
    ctx.finish_step({}, {})
    assert hook.due(ctx)
    hook.run(ctx)
    assert seen == [0.0] and ctx.record == hook.metrics == {f"downstream/{TASK}/acc": 0.5}
    assert clock.window_seconds() < 0.2


def test_mistakes_are_one_line(base_run, task_dir, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(base_run), "--tasks", "tiny_mcq", "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'tiny_mcq'" in err and TASK in err
    assert main(["eval", "--run", str(base_run), "--limit", "3"]) == 2
    assert "--limit applies to downstream tasks" in capsys.readouterr().err
    for override, key in (("train.eval_tasks_limit=0", "train.eval_tasks_limit"),
                          ("train.eval_tasks=a,b", "train.eval_tasks"),
                          ("train.eval_tasks_every=-1", "train.eval_tasks_every")):
        with pytest.raises(ConfigError, match=key):
            load_config("configs/quickstart.yaml", [override])
