"""The typed run configuration: schema (schema.py), loading (loading.py), validation
(checks.py), the named choices of every key (choices.py), and its generated reference
(reference.py). What the rest of the package imports is re-exported here."""

from mixtral_jax.config.errors import ConfigError, did_you_mean
from mixtral_jax.config.loading import (CONFIG_DIR, from_dict, load_config, parse_overrides, resolve_config_path,
                                        save_config, to_yaml)
from mixtral_jax.config.checks import validate
from mixtral_jax.config.schema import (Config, CostConfig, DataConfig, FinetuneConfig, LoggingConfig, LoRAConfig,
                                       MeshConfig, ModelConfig, MoEConfig, OptimConfig, RunConfig, TokenizerConfig,
                                       TrainConfig)

__all__ = [
    "CONFIG_DIR", "Config", "ConfigError", "CostConfig", "DataConfig", "FinetuneConfig", "LoRAConfig", "LoggingConfig",
    "MeshConfig", "ModelConfig", "MoEConfig", "OptimConfig", "RunConfig", "TokenizerConfig", "TrainConfig",
    "did_you_mean", "from_dict", "load_config", "parse_overrides", "resolve_config_path", "save_config", "to_yaml",
    "validate",
]
