"""Experiment `routing_analysis`: the Mixtral paper's section 5 on our corpus, for a trained MoE.

Mixtral's routing analysis found no clear domain specialisation of experts, but strong syntactic
regularities (e.g. Python's `self`, indentation) and that consecutive tokens often go to the same
expert, more so in deeper layers. Here, on held-out Python source: the expert-assignment
distribution per layer by token kind, consecutive-token expert sharing against its chance level
from the marginal loads, and a code snippet coloured by top-1 expert.

Without `--run`, it trains its MoE first (experiments/routing_analysis/model.yaml, reused once
finished).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import ConfigError
from mixtral_jax.experiments import report
from mixtral_jax.experiments.routing_stats import (
    CATEGORIES,
    chance_rates,
    char_categories,
    consecutive_rates,
    token_categories,
)
from mixtral_jax.experiments.runner import SMOKE, experiment_config, train_run

NAME = "routing_analysis"
WINDOWS, SMOKE_WINDOWS = 96, 4  # held-out windows of seq_len tokens analysed
SNIPPET_LINES, SNIPPET_COLUMNS = 24, 88


def _documents(cfg, tokenizer, windows: int, seq_len: int):
    """Held-out sources that Python's tokenizer accepts, cut into windows of seq_len tokens:
    (token ids [W, T], token kinds [W, T], (text, spans) of each window)."""
    from mixtral_jax.data.sources import load_documents

    ids_out, kinds_out, texts = [], [], []
    for text in load_documents(cfg.data, "validation"):
        chars = char_categories(text)
        if chars is None:
            continue
        ids, spans = tokenizer.encode_with_spans(text)
        kinds = token_categories(spans, chars, text)
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            ids_out.append(ids[start:start + seq_len])
            kinds_out.append(kinds[start:start + seq_len])
            texts.append((text, spans[start:start + seq_len]))
            if len(ids_out) == windows:
                return np.asarray(ids_out, np.int32), np.asarray(kinds_out, np.int8), texts
    if not ids_out:
        raise ConfigError("no held-out document long enough to analyse")
    return np.asarray(ids_out, np.int32), np.asarray(kinds_out, np.int8), texts


def _route(model, tokens: np.ndarray) -> np.ndarray:
    """[layers, W, T, k] expert ids of every token (score order), eval mode (no jitter)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch, capture_routing=True)[1]["top_experts"]

    return np.concatenate([np.asarray(forward(state, jnp.asarray(tokens[i:i + 8])))
                           for i in range(0, len(tokens), 8)], axis=1)


def _category_shares(experts: np.ndarray, kinds: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, categories, E]: share of each kind's token-slots (all k) on each expert."""
    layers = experts.shape[0]
    shares = np.full((layers, len(CATEGORIES), num_experts), np.nan)
    for layer in range(layers):
        for c in range(len(CATEGORIES)):
            chosen = experts[layer][kinds == c].reshape(-1)
            if chosen.size:
                shares[layer, c] = np.bincount(chosen, minlength=num_experts) / chosen.size
    return shares


def _plot_categories(shares: np.ndarray, counts: np.ndarray, out: Path) -> str:
    layers, _, experts = shares.shape
    fig, axes = report.figure(ncols=layers, size=(3.4, 3.2))
    for layer in range(layers):
        ax = axes[0][layer]
        image = ax.imshow(shares[layer], cmap="viridis", vmin=0, vmax=np.nanmax(shares), aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(CATEGORIES)))
        ax.set_yticklabels([f"{c} ({n:,})" for c, n in zip(CATEGORIES, counts)] if layer == 0 else [], fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the kind's token-slots")
    fig.suptitle(f"expert assignment by token kind (uniform = {1 / experts:.3f})")
    return report.save(fig, out / "experts_by_token_kind.png")


def _plot_consecutive(rates: list[dict], out: Path) -> str:
    fig, axes = report.figure(size=(6.5, 4.0))
    ax = axes[0][0]
    x = np.arange(len(rates))
    for offset, key, label in ((-0.3, "same_top1", "same top-1"), (-0.1, "chance_top1", "same top-1, chance"),
                               (0.1, "any_topk", "share any of top-k"), (0.3, "chance_any", "share any, chance")):
        ax.bar(x + offset, [r[key] for r in rates], width=0.2, label=label,
               hatch="//" if "chance" in key else None, alpha=0.6 if "chance" in key else 1.0)
    ax.set_xticks(x)
    ax.set_xticklabels([f"layer {r['layer']}" for r in rates])
    ax.set_ylabel("rate over consecutive token pairs")
    ax.legend(fontsize=7)
    ax.set_title("consecutive tokens routed alike vs chance")
    return report.save(fig, out / "consecutive_tokens.png")


def _plot_snippet(text: str, spans: list[tuple[int, int]], experts: np.ndarray, layers: Sequence[int],
                  num_experts: int, out: Path) -> str:
    """The first SNIPPET_LINES lines the spans cover, each token's background = its top-1 expert.

    experts: [layers, tokens] top-1 ids aligned with spans. Characters are laid out on a grid of
    monospace cells (width 0.6 em), so the figure is sized from the font, not the other way round."""
    import matplotlib.pyplot as plt

    font, cols = 8, SNIPPET_COLUMNS
    cell_w, cell_h = 0.6 * font / 72, 1.45 * font / 72  # inches
    start = spans[0][0]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(layers), squeeze=False, layout="constrained",
                             figsize=(len(layers) * (cols * cell_w + 0.2), SNIPPET_LINES * cell_h + 0.9))
    for ax, layer in zip(axes[0], layers):
        ax.set_axis_off()
        ax.set_xlim(0, cols)
        ax.set_ylim(SNIPPET_LINES, -0.5)
        for (a, b), expert in zip(spans, experts[layer]):
            prefix = text[start:a]
            row, col = prefix.count("\n"), len(prefix) - (prefix.rfind("\n") + 1)
            for k, part in enumerate(text[a:b].split("\n")):  # a token spanning lines: one box per line
                r, c = row + k, (col if k == 0 else 0)
                if r >= SNIPPET_LINES or c >= cols or not part:
                    continue
                ax.text(c, r + 0.5, part.replace(" ", "\u00b7")[: cols - c], family="monospace", fontsize=font,
                        va="center", ha="left", bbox=dict(boxstyle="square,pad=0.1", linewidth=0, alpha=0.55,
                                                          facecolor=colors(int(expert) % 10)))
        ax.set_title(f"top-1 expert per token, layer {layer} (\u00b7 = space)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(e % 10), alpha=0.55) for e in range(num_experts)]
    fig.legend(handles, [f"expert {e}" for e in range(num_experts)], loc="outside lower center",
               ncol=min(num_experts, 4), fontsize=7)
    return report.save(fig, out / "snippet_by_expert.png")


def _snippet(texts: list, experts: np.ndarray) -> tuple[str, list, np.ndarray]:
    """The first document's consecutive windows joined: (text, spans, top-1 ids [layers, tokens])."""
    first = texts[0][0]
    windows = [w for w, (text, _) in enumerate(texts) if text is first]
    spans = [span for w in windows for span in texts[w][1]]
    return first, spans, np.concatenate([experts[:, w, :, 0] for w in windows], axis=1)


def run(out: Path, smoke: bool = False, overrides: Sequence[str] = (), run_dir: str | None = None,
        full_scale: bool = False) -> Path:
    from mixtral_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
    from mixtral_jax.training.evaluate import load_run_model

    out.mkdir(parents=True, exist_ok=True)
    if run_dir is None:
        trained = train_run(experiment_config(NAME, "model.yaml", full_scale), [*(SMOKE if smoke else []), *overrides],
                            out, "model")
        run_dir = str(trained.run_dir)
    model, cfg, step = load_run_model(Path(run_dir))
    if not cfg.model.is_moe:
        raise ConfigError(f"{run_dir} is a dense model: routing analysis needs an MoE run")
    tokenizer_file = Path(run_dir) / "tokenizer.model"
    tokenizer = (Tokenizer.from_file(tokenizer_file) if tokenizer_file.is_file()
                 else load_or_train_tokenizer(cfg.data, cfg.model.vocab_size))
    tokens, kinds, texts = _documents(cfg, tokenizer, SMOKE_WINDOWS if smoke else WINDOWS, cfg.data.seq_len)
    experts = _route(model, tokens)  # [L, W, T, k]
    e, layers = cfg.model.moe.num_experts, cfg.model.n_layers
    shares = _category_shares(experts, kinds, e)
    counts = np.array([int(np.sum(kinds == c)) for c in range(len(CATEGORIES))])
    rates = []
    for layer in range(layers):
        seqs = list(experts[layer])
        same, any_k = consecutive_rates(seqs)
        chance_same, chance_any = chance_rates(seqs)
        rates.append(dict(layer=layer, same_top1=same, chance_top1=chance_same, any_topk=any_k, chance_any=chance_any))
    plots = [_plot_categories(shares, counts, out), _plot_consecutive(rates, out),
             _plot_snippet(*_snippet(texts, experts), sorted({0, layers - 1}), e, out)]
    top = [[CATEGORIES[c], f"{counts[c]:,}"] + [
        f"{int(np.nanargmax(shares[l, c]))} ({np.nanmax(shares[l, c]):.2f})" if counts[c] else "n/a"
        for l in range(layers)] for c in range(len(CATEGORIES))]
    rate_rows = [[r["layer"], r["same_top1"], r["chance_top1"], r["same_top1"] / r["chance_top1"], r["any_topk"],
                  r["chance_any"]] for r in rates]
    sections = [
        f"# routing_analysis{' (smoke)' if smoke else ''}",
        f"Model: `{run_dir}` at step {step} ({e} experts, top-{cfg.model.moe.top_k}, {layers} layers). "
        f"Data: {tokens.size:,} held-out tokens ({len(tokens)} windows of {cfg.data.seq_len}) of the embedded "
        "corpus, token kinds from Python's `tokenize` (a token takes the kind of its first non-space character).",
        "## Experts by token kind\n\nMost used expert per layer (its share of the kind's token-slots; uniform = "
        f"{1 / e:.3f}):\n\n" + report.table(["kind", "tokens", *[f"layer {l}" for l in range(layers)]], top),
        "## Consecutive tokens\n\nShare of adjacent token pairs (within a window) with the same top-1 expert, and "
        "whose top-k sets intersect, against the chance levels implied by the marginal loads (sum of squared top-1 "
        "shares; intersecting pairs of independently drawn top-k sets):\n\n"
        + report.table(["layer", "same top-1", "chance", "ratio", "share any top-k", "chance"], rate_rows),
        "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return report.write_report(out / "report.md", sections)
