"""What the stacked layer weights cost the unrolled CPU train step: our step (every layer's
weights in one [n_layers, ...] array per parameter, sliced per layer; the weight gradients
concatenated back) against a prototype that holds each layer's weights as arrays of their own,
starting from the same weights, paired round by round.

    python -m benchmarks.layer_layout            # dense and MoE, ~4 minutes on 2 cores
    python -m benchmarks.layer_layout --only moe --rounds 5
    python -m benchmarks.layer_layout --smoke     # tiny MoE trunk, 2 rounds (the test suite)

XLA:CPU copies a static slice of a stacked array (the layer's weights) and builds the stacked
gradient by concatenation: both are memory-bound passes over the weights, several times the
MoE's size. The prototype bounds what removing them could gain. It is a measurement, not a
supported model: the stacked layout is shared by the layer scan, the sharding rules, the
checkpoints, the converters and generation. Both steps are the Trainer's own (`build_program`),
the prototype passed in as its model factory.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mixtral_jax.host_allocator import reexec_with_tunables  # noqa: E402

reexec_with_tunables()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.tree_util import keystr, tree_flatten_with_path, tree_unflatten  # noqa: E402

from benchmarks.train_step import (MOE, SMOKE, SMOKE_SHAPE, TRUNK, TRUNK_SHAPE, OurStep, interleave,  # noqa: E402
                                   make_config, paired, ratio_line)
from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.kernels.backend import Kernels  # noqa: E402
from mixtral_jax.models import transformer  # noqa: E402

# The stacked axis of each one-layer stack is named "layers" like the model's (transformer.py).
LAYER_METADATA = transformer.LAYER_METADATA


class PerLayerTransformer(transformer.Transformer):
    """The same model with `blocks` a list of one-layer stacks: slicing a [1, ...] stack is a
    bitcast, so no layer's weights are copied and no gradient is concatenated."""

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels | None = None, rngs: nnx.Rngs):
        super().__init__(cfg, kernels=kernels, rngs=rngs)
        if cfg.remat != "none":
            raise ValueError("the prototype runs without remat")
        one = dataclasses.replace(cfg, n_layers=1)

        @nnx.split_rngs(splits=1)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_METADATA)
        def one_layer(layer_rngs: nnx.Rngs) -> transformer.Block:
            return transformer.Block(one, sparse=cfg.is_moe, kernels=self.kernels, rngs=layer_rngs)

        self.blocks = nnx.List([one_layer(rngs) for _ in range(cfg.n_layers)])

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 router_rng: jax.Array | None = None, capture_routing: bool = False) -> transformer.ModelOutput:
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
        segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        rngs = None if router_rng is None else jax.random.split(router_rng, self.n_layers)
        stats = []
        for i, stack in enumerate(self.blocks):
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata=LAYER_METADATA)
            def run(x: jax.Array, block: transformer.Block, rng: jax.Array | None):
                return block(x, positions, segment_ids, rng, capture_routing)

            x, layer_stats = run(x, stack, None if rngs is None else rngs[i:i + 1])
            stats.append(layer_stats)
        stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
        return transformer.ModelOutput(self._head(x).astype(jnp.float32), self._aux(stats, capture_routing))


def copy_state(stacked: Any, per_layer: Any) -> Any:
    """per_layer's tree holding stacked's values: layer i of `.../blocks/...` goes to `.../blocks[i]/...`."""
    source = {keystr(path): leaf for path, leaf in tree_flatten_with_path(stacked)[0]}
    leaves, treedef = tree_flatten_with_path(per_layer)
    out = []
    for path, leaf in leaves:
        key = keystr(path)
        if m := re.match(r"(.*\['blocks'\])\[(\d+)\](.*)", key):
            i = int(m.group(2))
            value = source[m.group(1) + m.group(3)][i:i + 1]
        else:
            value = source[key]
        if value.shape != leaf.shape:
            raise ValueError(f"{key}: stacked {value.shape} vs per-layer {leaf.shape}")
        out.append(jnp.array(value, copy=True))  # its own buffers: both steps donate their state
    return tree_unflatten(treedef, out)


def compare(name: str, moe: Any, rounds: int, smoke: bool) -> float:
    cfg = make_config(SMOKE, moe, *SMOKE_SHAPE) if smoke else make_config(TRUNK, moe, *TRUNK_SHAPE)
    stacked = OurStep(cfg, model_factory=transformer.Transformer)
    separate = OurStep(cfg, model_factory=PerLayerTransformer)
    separate.state = copy_state(stacked.state, separate.state)
    samples = interleave({"stacked": stacked, "per-layer": separate}, rounds, warmup=2)
    ratio = paired(samples["per-layer"], samples["stacked"])
    print(f"{name}: stacked {statistics.median(samples['stacked']) * 1e3:.0f} ms, per-layer "
          f"{statistics.median(samples['per-layer']) * 1e3:.0f} ms; per-layer / stacked {ratio:.3f}x; "
          f"losses {stacked.loss:.5f} / {separate.loss:.5f}", flush=True)
    if abs(stacked.loss - separate.loss) > 1e-4 * max(1.0, abs(stacked.loss)):
        raise SystemExit(f"{name}: the two layouts diverged ({stacked.loss} vs {separate.loss}): not the same model")
    print(ratio_line(f"{name} per-layer/stacked step time", ratio, "info: the most that removing the slices and the "
                     "concatenation could gain", True), flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny MoE trunk only, 2 rounds (~30 s)")
    parser.add_argument("--only", choices=("dense", "moe"), default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.smoke else 7)
    trunk = "smoke" if args.smoke else "benchmark"
    print(f"# {trunk} trunk of train_step.py, {jax.devices()[0].device_kind}, {rounds} rounds", flush=True)
    for name, moe in (("dense", None), ("moe", MOE)):
        if args.only in (None, name) and not (args.smoke and moe is None):
            compare(name, moe, rounds, args.smoke)


if __name__ == "__main__":
    main()
