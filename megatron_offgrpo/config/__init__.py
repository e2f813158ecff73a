"""NeMo-style YAML configuration: typed sections, OmegaConf loading with ``a.b=c`` overrides, validation."""

from megatron_offgrpo.config.loader import (
    ConfigError,
    config_to_yaml,
    load_and_validate_config,
    load_config,
    validate_config,
)
from megatron_offgrpo.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    ValidationConfig,
)

__all__ = [
    "ConfigError",
    "config_to_yaml",
    "load_config",
    "load_and_validate_config",
    "validate_config",
    "TrainConfig",
    "ModelConfig",
    "ParallelConfig",
    "DataConfig",
    "LossConfig",
    "OptimizerConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ValidationConfig",
]
