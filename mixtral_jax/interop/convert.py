"""HF or original Mistral directory <-> run directory (`mixtral-jax import-hf` / `export-hf`).

Import reads either layout, told apart by its config file: an HF directory (config.json +
*.safetensors, see hf.py) or an original Mistral release (params.json + consolidated weights, see
mistral_format.py). Export always writes the HF layout.

An imported run is an ordinary run directory (config.yaml + orbax checkpoint + tokenizer.model)
so everything that reads runs works on it unchanged: `eval`, `generate`, `export-hf`, and
`train.init_from=RUN` for fine-tuning. Its checkpoint holds only the `weights` item (what
fine-tuning and export read): an imported model has no optimizer state, data position or
step to resume, and inventing them would let `train` "resume" a run that never trained.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from mixtral_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, RunConfig, load_config, save_config,
                                validate)
from mixtral_jax.interop import hf, hf_tokenizer
from mixtral_jax.interop import mistral_format
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.training.checkpoint import WEIGHTS, Checkpointer

TOKENIZER = "tokenizer.model"


def has_checkpoints(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.is_dir() and any(ckpt_dir.iterdir())


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse an --out that already has checkpoints (that would mix a converted model into a
    trained run's history) or that names no run directory."""
    if has_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already has checkpoints; choose a new --out run directory")
    if not run_dir.name or run_dir.name == "..":
        raise ValueError(f"--out {run_dir}: give a run directory such as runs/NAME")


def write_weights_run(run_dir: Path, cfg: Config, params: Any, model_state: Any, meta: dict[str, Any],
                      tokenizer: Path | None) -> Path:
    """A run directory holding weights only: a step-0 checkpoint of params and model state
    (with `meta`, the provenance), the tokenizer when given, and config.yaml, written last, since a
    directory with config.yaml is a usable run (eval reads it first). `train.init_from` starts
    from it; there is no optimizer or data state to resume."""
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = {"params": params, "model_state": model_state}  # the layout Checkpointer.split_state saves
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=1, async_save=False)
    # Checkpointer.save always writes all four items; a converted model has only weights, so save
    # that item alone (plus `meta`, and their digests) through the same manager, names and layout.
    checkpointer.manager.save(0, args=ocp.args.Composite(**{
        WEIGHTS: ocp.args.StandardSave(weights), "meta": ocp.args.JsonSave(meta),
        **checkpointer.digest_args({WEIGHTS: weights}, {"meta": meta})}), force=True)
    checkpointer.close()
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, run_dir / TOKENIZER)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_config(model_cfg: ModelConfig, run_dir: Path) -> Config:
    """The resolved Config an imported run records: the imported model, defaults elsewhere.

    name / out_dir are split from run_dir exactly as `Config.run_dir` joins them, so the file
    reads back as this same run. data.seq_len is capped at the model's context, because the
    default (256) could exceed a small model's max_seq_len and fail validation on reload.
    """
    data = DataConfig()
    data.seq_len = min(data.seq_len, model_cfg.max_seq_len)
    cfg = Config(run=RunConfig(name=run_dir.name, out_dir=str(run_dir.parent)), model=model_cfg, data=data)
    validate(cfg)  # the same checks load_config applies, so the written file is loadable
    return cfg


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Convert a model directory (Hugging Face: Mistral, Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE,
    Dots1; or an original Mistral release) into a run directory; returns run_dir.

    The layout is detected: config.json means Hugging Face (wins when both files are present,
    as in hub repos that also carry the raw release, since that path is the one HF users expect);
    params.json means the original mistral-inference release (consolidated.safetensors or
    consolidated.NN.pth). Writes run_dir/config.yaml, a step-0 checkpoint of the weights under
    run_dir/checkpoints, and copies tokenizer.model when the source directory has one. Refuses a
    run_dir that already has checkpoints (that would mix an imported model into a trained run's
    history).
    """
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    # Cheap checks first: loading a large checkpoint only to fail on the destination wastes minutes.
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {hf_dir}")
    if (hf_dir / "config.json").is_file():
        layout, loader = "hf", hf.load
    elif (hf_dir / mistral_format.PARAMS).is_file():
        layout, loader = "mistral", mistral_format.load
    else:
        raise FileNotFoundError(f"{hf_dir} has neither config.json (Hugging Face layout) nor "
                                f"{mistral_format.PARAMS} (original Mistral layout)")
    check_new_run_dir(run_dir)

    # Every parameter goes to its shards over all local devices as it is read (FSDP layout), so
    # no device (and on accelerators, no host) ever holds the whole model twice.
    model, model_cfg = loader(hf_dir, mesh=make_mesh(MeshConfig(data=1, fsdp=-1)))
    cfg = run_config(model_cfg, run_dir)

    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return write_weights_run(run_dir, cfg, params, model_state,
                             {"imported_from": str(hf_dir.resolve()), "format": layout}, hf_dir / TOKENIZER)


def run_tokenizer(run_dir: Path, cfg: Config) -> Path | None:
    """The run's sentencepiece model: run_dir/tokenizer.model, else the file data.tokenizer.path names."""
    if (run_dir / TOKENIZER).is_file():
        return run_dir / TOKENIZER
    named = Path(cfg.data.tokenizer.path).expanduser() if cfg.data.tokenizer.path else None
    return named if named is not None and named.is_file() else None


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a run's latest weights as an HF directory (config.json + model.safetensors) and its
    tokenizer as one `AutoTokenizer` loads and that encodes exactly as ours (tokenizer.model,
    tokenizer.json, tokenizer_config.json; see hf_tokenizer.save_tokenizer)."""
    from mixtral_jax.training.evaluate import load_run_model  # pulls in the data pipeline: only when used

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    # Check HF can express the model before restoring (possibly large) weights.
    try:
        hf.config_to_hf(load_config(config_file).model)
    except ValueError as err:
        raise ValueError(f"{run_dir} cannot be exported to HF: {err}") from None
    # Stale shards or an index.json left in out_dir would be read alongside the new file.
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors*")):
        raise ValueError(f"{out_dir} already holds safetensors weights; choose an empty --out directory")

    model, cfg, _ = load_run_model(run_dir)
    hf.save(model, cfg.model, out_dir)
    tokenizer = run_tokenizer(run_dir, cfg)
    if tokenizer is not None:
        hf_tokenizer.save_tokenizer(tokenizer, out_dir, model_max_length=cfg.model.max_seq_len)
    return out_dir
