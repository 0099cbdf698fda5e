"""Input pipeline vs train step: tokens/s that `make_train_iterator` delivers (embedded
python_source corpus, quickstart data config, packing on, seq 256) with num_workers 0 and 2 at
batch 8 and 16, against tokens/s the compiled train step consumes (the quickstart model, and the
dense trunk of benchmarks/train_step.py), measured in the same run. Target: pipeline >= 10x step.
Also (not in --smoke) the same pipeline reading a token cache of the corpus (`mixtral-jax tokenize`,
built once under $MIXTRAL_JAX_CACHE/token_caches/) against the on-the-fly one, same batches;
target: cache >= 5x on the fly.

    python -m benchmarks.data_pipeline            # ~2 minutes on 2 cores
    python -m benchmarks.data_pipeline --smoke    # seq 64, batch 4, tiny consumer (the test suite)

Each pipeline is timed after its first batch (tokenizer training, corpus build and worker
start-up excluded). Rounds alternate the contenders: every pipeline reads batches for about
--window seconds, every consumer runs one step; figures are medians over rounds, ratios medians
of per-round ratios. grain's
mp_prefetch buffers one row per worker (per_worker_buffer_size=1, before batching), so a worker
pipeline cannot bank more than a row or two while the others are timed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

from benchmarks.train_step import SMOKE, TRUNK, OurStep, make_config, paired, ratio_line, threads
from mixtral_jax.config import CONFIG_DIR, Config, MeshConfig, load_config, validate
from mixtral_jax.data.pipeline import make_train_iterator
from mixtral_jax.data.tokenizer import load_or_train_tokenizer

TARGET = 10.0
CACHE_TARGET = 5.0  # token cache vs on-the-fly tokenization, same batches


def cached_corpus(cfg: Config) -> Config:
    """`cfg` reading a token cache of its source (built once, keyed by source and tokenizer)."""
    import hashlib

    from mixtral_jax.data.cache import cache_dir, file_lock
    from mixtral_jax.data.sources import source_fingerprint
    from mixtral_jax.data.token_cache import MANIFEST
    from mixtral_jax.data.tokenize import build_cache

    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    key = hashlib.sha256(f"{source_fingerprint(cfg.data)}|{tokenizer.fingerprint}".encode()).hexdigest()[:16]
    out = cache_dir() / "token_caches" / key
    if not (out / MANIFEST).is_file():
        with file_lock(out.with_suffix(".lock")):
            if not (out / MANIFEST).is_file():
                build_cache(cfg.data, tokenizer, out)
    cached = copy.deepcopy(cfg)
    cached.data.source = f"tokens:{out}"
    cached.data.tokenizer.path = str(out / "tokenizer.model")
    validate(cached)
    return cached


class PipelineReader:
    """A train iterator timed in windows: each call reads batches for about `window` seconds and
    returns tokens/s (batch x seq positions: packing fills every row, so that is what the step
    consumes)."""

    def __init__(self, cfg: Config, window: float):
        tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
        start = time.perf_counter()
        self.it = make_train_iterator(cfg.data, tokenizer, seed=cfg.run.seed)
        first = next(self.it)  # worker start-up and the first documents' tokenization, excluded
        self.first_batch_s = time.perf_counter() - start
        self.tokens_per_batch = first["inputs"].size
        self.window = window
        self.fill = float(first["segment_ids"].astype(bool).mean())  # share of non-padding positions

    def __call__(self) -> float:
        batches, start = 0, time.perf_counter()
        while True:
            next(self.it)
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= self.window:
                return batches * self.tokens_per_batch / elapsed

    def close(self) -> None:
        self.it.close()


class StepRate:
    """One train step per call, as tokens/s."""

    def __init__(self, cfg: Config):
        self.step = OurStep(cfg)
        self.tokens = cfg.data.batch_size * cfg.data.seq_len

    def __call__(self) -> float:
        start = time.perf_counter()
        self.step()
        return self.tokens / (time.perf_counter() - start)


def quickstart(seq: int, batch: int, workers: int) -> Config:
    """configs/quickstart.yaml with the sequence length, batch and worker count under test, on one device."""
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"data.seq_len={seq}", f"data.batch_size={batch}",
                                                       f"data.num_workers={workers}"])
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq)
    cfg.mesh = MeshConfig(data=1)
    validate(cfg)
    return cfg


def measure(contenders: dict[str, Callable[[], float]], rounds: int,
            say: Callable[[str], None]) -> dict[str, list[float]]:
    """Tokens/s per contender and round; each round visits them in alternating order."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(0.05)  # let the previous contender's worker threads go idle
            samples[name].append(contenders[name]())
        say(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.0f}" for n in names))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="seq 64, batch 4, tiny consumer")
    parser.add_argument("--rounds", type=int, default=None, help="default 5, smoke 2")
    parser.add_argument("--window", type=float, default=None, help="seconds per pipeline reading (default 3, smoke 0.5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 8 16, smoke 4")
    parser.add_argument("--no-cache", action="store_true", help="skip the token-cache rows (always skipped in --smoke)")
    args = parser.parse_args()
    seq = 64 if args.smoke else 256
    batches = args.batches or ([4] if args.smoke else [8, 16])
    rounds = args.rounds or (2 if args.smoke else 5)
    window = args.window or (0.5 if args.smoke else 3.0)

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"# data pipeline vs train step on {jax.devices()[0].device_kind}, {threads()} threads; python_source, "
        f"quickstart data config, packed, seq {seq}, batch {'/'.join(map(str, batches))}, workers "
        f"{'/'.join(map(str, args.workers))}; {rounds} rounds, {window:g} s per pipeline reading")
    readers: dict[str, PipelineReader] = {}
    for batch in batches:
        for workers in args.workers:
            name = f"pipeline b{batch} w{workers}"
            readers[name] = PipelineReader(quickstart(seq, batch, workers), window)
            say(f"  {name}: first batch after {readers[name].first_batch_s:.1f} s (excluded), "
                f"{readers[name].fill:.1%} of positions are tokens")
    cache_pairs = []  # (cache reader, the on-the-fly reader it is compared with)
    if not (args.smoke or args.no_cache):
        for batch in batches:
            name = f"cache b{batch} w0"
            readers[name] = PipelineReader(cached_corpus(quickstart(seq, batch, 0)), window)
            cache_pairs.append((name, f"pipeline b{batch} w0"))
            say(f"  {name}: first batch after {readers[name].first_batch_s:.1f} s (excluded)")
    # Consumers: the quickstart model at the largest batch; and the train_step dense trunk (smoke:
    # its tiny trunk), random tokens, as benchmarks/train_step.py times it.
    consumers: dict[str, StepRate] = {}
    qs = quickstart(seq, max(batches), 0)
    if args.smoke:  # the quickstart model's compile alone would take most of the smoke budget
        consumers["step smoke trunk"] = StepRate(make_config(SMOKE, None, max(batches), seq))
    else:
        consumers[f"step quickstart b{max(batches)}"] = StepRate(qs)
        consumers["step dense trunk b4"] = StepRate(make_config(TRUNK, None, 4, seq))
    for consumer in consumers.values():
        consumer()  # warm-up
    samples = measure({**readers, **consumers}, rounds, say)
    for reader in readers.values():
        reader.close()

    say("\n| contender | tokens/s |")
    say("|---|---:|")
    for name, values in samples.items():
        say(f"| {name} | {statistics.median(values):,.0f} |")
    say("")
    for cache, live in cache_pairs:
        if live in samples:
            value = paired(samples[cache], samples[live])
            say(ratio_line(f"{cache} / {live}", value, f"target >= {CACHE_TARGET:g}x", value >= CACHE_TARGET))
    for consumer in consumers:
        for reader in readers:
            value = paired(samples[reader], samples[consumer])
            say(ratio_line(f"{reader} / {consumer}", value, f"target >= {TARGET:g}x", value >= TARGET))


if __name__ == "__main__":
    main()
