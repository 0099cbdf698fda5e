"""Sparse upcycling (Komatsuzaki et al. 2022): a trained dense run -> an MoE run directory whose
experts start as copies of the dense FFN (`mixtral-jax upcycle`).

What the new run holds:
- attention, norms, embeddings and the LM head: the dense run's, unchanged;
- every routed expert of a sparse layer: that layer's dense w_gate / w_up / w_down, plus optional
  Gaussian noise of std `noise` x the std of that layer's dense matrix (relative, so one value
  means the same perturbation for every weight and model size);
- the router (and a loss-free-balancing bias, zeros): exactly what a fresh MoE run with this
  run.seed would initialise, since the MoE model's own init produces them here;
- layers the MoE config keeps dense (first_dense_layers, sparse_every, dense_layers): their
  dense FFN, unchanged.

Why this is exact: every expert of a layer computes the dense FFN f(x), so the layer outputs
sum_k w_k f(x) = f(x) whenever the k routing weights sum to 1 and no token is dropped
(`exactness_issue` says when a config breaks that). With no noise the upcycled model is the
dense model's function, whatever the fresh router picks.

Granular mode (`granular=True`, fine-grained experts narrower than the dense FFN; approximate):
with expert width w = hidden_dim / G, expert e starts as slice (e mod G) of the dense FFN's hidden
units (columns of w_gate / w_up, rows of w_down) with its w_down scaled by G. The dense FFN is the
sum of its G slices, f(x) = sum_s f_s(x), so a token whose k = G chosen experts cover every slice
once with equal weights 1/G computes G * sum_s f_s(x) / G = f(x) exactly; any other choice (two
experts of one slice, unequal weights, k != G) computes something else, so the upcycled model only
approximates the dense function until training fits the router. This is the fine-grained
upcycling Qwen1.5-MoE-A2.7B used (its experts are partitions of Qwen-1.8B's FFN, replicated).

The run directory is written as `import-hf` writes one (convert.py): config.yaml, the tokenizer,
a weights-only step-0 checkpoint. So eval, generate, export-hf and `train.init_from=RUN` read it,
and `train` refuses to "resume" it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import (Config, ConfigError, MeshConfig, ModelConfig, MoEConfig, load_config,
                                validate)
from mixtral_jax.interop.convert import TOKENIZER, check_new_run_dir, write_weights_run
from mixtral_jax.models.layer_plan import stack_index
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.parallel.rules import state_shardings

# Model keys that change how the model is computed, not its weights: the only non-MoE model
# keys an upcycle may change. Everything else (shapes, norms, RoPE, window, dtype of storage)
# is the trunk being copied, and must stay the dense run's.
EXECUTION_KEYS = ("dtype", "remat", "scan_unroll", "attention_impl", "grouped_kernel", "fp8")
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# Overrides that would make the written config describe something other than this checkpoint.
_FIXED_KEYS = {
    "run.name": "the run directory is --out",
    "run.out_dir": "the run directory is --out",
    "train.init_from": "the upcycled weights are the run's own step-0 checkpoint",
    "finetune.lora": "the checkpoint holds plain weights; set LoRA in the run that fine-tunes from it",
}
# A stream of random numbers apart from the model init's (nnx.Rngs folds in stream names).
_NOISE_STREAM = 0x5C5C


def exactness_issue(moe: MoEConfig) -> str | None:
    """Why an upcycled model with these MoE settings would not compute the dense model's
    function at step 0 (None when it does): the k routing weights must sum to 1, and every
    token must reach its experts."""
    if moe.router == "expert_choice":
        return "expert_choice routing gives a token any number of experts (weights need not sum to 1)"
    if moe.router != "topk_softmax" and not moe.renormalize:
        return f"router {moe.router} without model.moe.renormalize: the k weights do not sum to 1"
    if moe.routed_scaling != 1.0:
        return f"model.moe.routed_scaling={moe.routed_scaling} scales the expert output"
    if moe.dispatch == "capacity":
        return "capacity dispatch drops the tokens over an expert's capacity"
    return None


def upcycle_config(dense_run: Path, overrides: list[str], run_dir: Path, granular: bool = False) -> Config:
    """The MoE run's config: the dense run's, with `overrides` (the MoE shape, and any other
    section) applied, checked to keep the dense trunk. ConfigError (one line) otherwise.
    granular: the experts may be narrower than the dense FFN (see the module docstring)."""
    dense_cfg = load_config(dense_run / "config.yaml")
    if dense_cfg.model.is_moe:
        raise ConfigError(f"{dense_run} is already an MoE run (model.moe.num_experts="
                          f"{dense_cfg.model.moe.num_experts}); upcycle starts from a dense run")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for fixed, why in _FIXED_KEYS.items():
            if key == fixed or key.startswith(fixed + "."):
                raise ConfigError(f"config key '{key}' cannot be set by upcycle: {why}")
    # The dense run's resolved config.yaml is the base, so every key it did not change stays. A
    # LoRA dense run is loaded merged, and the new run starts from its own checkpoint.
    cfg = load_config(dense_run / "config.yaml", [*overrides, "finetune.lora.rank=0", "train.init_from=null"])
    model, dense = cfg.model, dense_cfg.model
    if not model.is_moe:
        raise ConfigError("give the MoE shape, e.g. model.moe.num_experts=8 model.moe.top_k=2")
    for f in dataclasses.fields(ModelConfig):
        if f.name == "moe" or f.name in EXECUTION_KEYS:
            continue
        before, after = getattr(dense, f.name), getattr(model, f.name)
        if before != after:
            raise ConfigError(f"config key 'model.{f.name}': {before} -> {after} changes the dense trunk, which "
                              f"upcycle copies unchanged (only model.moe.* and model.{{{','.join(EXECUTION_KEYS)}}} "
                              "may differ)")
    if granular:
        _check_granular(model, dense.hidden_dim)
    elif model.expert_width != dense.hidden_dim:
        raise ConfigError(f"config key 'model.moe.expert_hidden_dim': {model.moe.expert_hidden_dim} differs from the "
                          f"dense FFN width model.hidden_dim={dense.hidden_dim}; experts are copies of the dense FFN "
                          "(leave it null)")
    if model.moe.shared_experts:
        raise ConfigError(f"config key 'model.moe.shared_experts': {model.moe.shared_experts}; upcycle defines no "
                          "initialisation of shared experts from the dense FFN (use 0)")
    cfg.run.name, cfg.run.out_dir = run_dir.name, str(run_dir.parent)  # as Config.run_dir joins them
    if (dense_run / TOKENIZER).is_file():
        # Continuing from this run must tokenize as the dense run did, not train a new tokenizer.
        cfg.data.tokenizer.path = str((run_dir / TOKENIZER).resolve())
    validate(cfg)
    return cfg


def _check_granular(model: ModelConfig, hidden_dim: int) -> None:
    """Granular mode's shape rule: the dense FFN splits into G whole slices of the expert width,
    and the experts cycle through the slices a whole number of times (every slice equally often)."""
    width, experts = model.expert_width, model.moe.num_experts
    if hidden_dim % width:
        raise ConfigError(f"config key 'model.moe.expert_hidden_dim': {width} does not divide the dense FFN width "
                          f"model.hidden_dim={hidden_dim}; granular upcycling cuts the FFN into equal slices")
    if experts % (hidden_dim // width):
        raise ConfigError(f"config key 'model.moe.num_experts': {experts} is not a multiple of the "
                          f"{hidden_dim // width} slices of width {width}; every slice needs as many copies")


def upcycle_state(dense_params: nnx.State, cfg: ModelConfig, seed: int, noise: float,
                  mesh: jax.sharding.Mesh | None = None, granular: bool = False) -> tuple[nnx.State, nnx.State]:
    """(params, model_state) of the MoE model `cfg` built from a dense model's params.
    granular: experts are slices of the dense FFN (module docstring), else whole copies.

    One jitted function: the MoE model's own init (so the router is bit-identical to a fresh
    run's with `seed`; XLA drops the init of every weight that is then overwritten) with the
    dense weights written in. With a mesh, each output lands on its shards (FSDP layout).
    """
    # Per stack (True: the sparse `blocks`, False: `dense_blocks`), the global layer of each of
    # its entries in order: the dense weights to gather into it.
    layers: dict[bool, list[int]] = {True: [], False: []}
    for i, (is_sparse, j) in enumerate(stack_index(cfg.sparse_layers)):
        assert j == len(layers[is_sparse])
        layers[is_sparse].append(i)
    experts = cfg.moe.num_experts

    def build(dense: nnx.State) -> tuple[nnx.State, nnx.State]:
        _, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        source = dict(nnx.to_flat_state(dense))
        noise_key = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
        out = []
        for n, (path, var) in enumerate(nnx.to_flat_state(params)):
            stack, rest_path = path[0], tuple(path[1:])
            if path == ("blocks", "ffn", "router"):
                out.append((path, var))  # the fresh router
                continue
            if stack in ("blocks", "dense_blocks"):
                is_sparse = stack == "blocks"  # an MoE model's `blocks` are its sparse layers
                value = source[("blocks", *rest_path)].get_value()[jnp.asarray(layers[is_sparse])]
                if is_sparse and rest_path[0] == "ffn":
                    key = jax.random.fold_in(noise_key, n)
                    value = (_granular_experts(value, rest_path[-1], experts, cfg.expert_width, noise, key)
                             if granular else _experts(value, experts, noise, key))
            else:
                value = source[path].get_value()
            if value.shape != var.get_value().shape:
                raise ValueError(f"upcycle: {'/'.join(map(str, path))} would be {value.shape}, "
                                 f"the MoE model needs {var.get_value().shape}")
            out.append((path, var.replace(value.astype(var.get_value().dtype))))
        return nnx.from_flat_state(out), rest

    shardings = None
    if mesh is not None:
        # The dense weights go to their own shards on the same mesh first (jit takes inputs and
        # outputs on one set of devices); the MoE weights come out on theirs.
        dense_params = jax.device_put(dense_params, state_shardings(dense_params, mesh))
        shardings = state_shardings(jax.eval_shape(build, dense_params), mesh)
    return jax.jit(build, out_shardings=shardings)(dense_params)


def _experts(weight: jax.Array, experts: int, noise: float, key: jax.Array) -> jax.Array:
    """A dense FFN matrix stacked [layers, in, out] -> [layers, E, in, out]: E copies, each plus
    independent N(0, (noise * std of that layer's matrix)^2) noise when noise > 0."""
    copies = jnp.broadcast_to(weight[:, None], (weight.shape[0], experts, *weight.shape[1:]))
    if noise == 0:
        return copies
    std = jnp.std(weight.astype(jnp.float32), axis=(-2, -1), keepdims=True)[:, None]  # [layers, 1, 1, 1]
    return (copies.astype(jnp.float32) + noise * std * jax.random.normal(key, copies.shape)).astype(weight.dtype)


def _granular_experts(weight: jax.Array, name: str, experts: int, width: int, noise: float,
                      key: jax.Array) -> jax.Array:
    """A dense FFN matrix [layers, in, out] -> [layers, E, ., .]: expert e is hidden-unit slice
    (e mod G) of width `width` (w_gate / w_up: columns; w_down: rows, times G so that G equally
    weighted experts covering every slice sum to the dense output), plus noise as in _experts
    with each expert's own std."""
    layers = weight.shape[0]
    hidden = weight.shape[1] if name == "w_down" else weight.shape[2]
    slices = hidden // width
    if name == "w_down":  # [L, H, D] -> [L, G, w, D], scaled by G
        parts = weight.reshape(layers, slices, width, weight.shape[-1]) * slices
    else:  # [L, D, H] -> [L, D, G, w] -> [L, G, D, w]
        parts = jnp.moveaxis(weight.reshape(layers, weight.shape[1], slices, width), 2, 1)
    picked = parts[:, jnp.arange(experts) % slices]
    if noise == 0:
        return picked
    std = jnp.std(picked.astype(jnp.float32), axis=(-2, -1), keepdims=True)  # [L, E, 1, 1]
    return (picked.astype(jnp.float32) + noise * std * jax.random.normal(key, picked.shape)).astype(weight.dtype)


def _load_dense(dense_run: Path, step: int | None):
    """The dense run's model and the checkpoint step it holds: the latest, or `step` (e.g. an
    intermediate checkpoint to upcycle part-way through the dense run's budget)."""
    from mixtral_jax.training.checkpoint import Checkpointer
    from mixtral_jax.training.evaluate import load_run_model  # pulls in the data pipeline: only when used

    if step is None:
        model, _, latest = load_run_model(dense_run)
        return model, latest
    cfg = load_config(dense_run / "config.yaml")
    checkpointer = Checkpointer(dense_run / "checkpoints", keep=1000)
    try:
        if step not in checkpointer.manager.all_steps():
            raise ConfigError(f"{dense_run} has no checkpoint at step {step} "
                              f"(it has {sorted(checkpointer.manager.all_steps())})")
        abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
        graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
        weights = checkpointer.restore_merged(step, {"params": params, "model_state": model_state},
                                              cfg.finetune.lora, cfg.model.is_moe)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, weights["params"], weights["model_state"]), step


def upcycle(dense_run: str | Path, run_dir: str | Path, overrides: list[str] | None = None,
            noise: float = 0.0, granular: bool = False, step: int | None = None) -> Path:
    """Write an upcycled MoE run directory at run_dir from the dense run dense_run; returns run_dir.
    granular: fine-grained experts cut from the dense FFN (approximate; module docstring);
    step: the dense checkpoint to start from (default: the latest).

    Refuses (ConfigError / ValueError, one line) before loading any weight: a dense_run that is not
    a run or is already MoE, overrides that change the trunk or the expert width, shared experts,
    a run_dir with checkpoints, negative noise.
    """
    dense_run, run_dir = Path(dense_run), Path(run_dir)
    if not (dense_run / "config.yaml").is_file():
        raise FileNotFoundError(f"{dense_run} is not a run directory (no config.yaml)")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"--noise {noise}: must be a finite std >= 0 (relative to each weight's std)")
    check_new_run_dir(run_dir)
    cfg = upcycle_config(dense_run, list(overrides or []), run_dir, granular)

    dense_model, step = _load_dense(dense_run, step)
    dense_params = nnx.state(dense_model, nnx.Param)
    params, model_state = upcycle_state(dense_params, cfg.model, cfg.run.seed, noise,
                                        mesh=make_mesh(MeshConfig(data=1, fsdp=-1)), granular=granular)
    del dense_model, dense_params

    meta = {"upcycled_from": str(dense_run.resolve()), "dense_step": step, "noise": noise, "format": "upcycle",
            "granular": granular}
    return write_weights_run(run_dir, cfg, params, model_state, meta, dense_run / TOKENIZER)
