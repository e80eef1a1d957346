"""The typed config tree (`sections`) and how a run's config is built from a preset plus dotted
overrides (`loading`). The command line over it is `generalmodel.cli`."""

from generalmodel.config.loading import (
    dump_config,
    field_types,
    flatten,
    load_config,
    read_mapping,
    read_preset,
    section_class,
)
from generalmodel.config.sections import (
    Config,
    ConfigError,
    DataConfig,
    DpoConfig,
    MixtureConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RayConfig,
    RlConfig,
    Section,
    StorageConfig,
    Strings,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DpoConfig",
    "MixtureConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RayConfig",
    "RlConfig",
    "Section",
    "StorageConfig",
    "Strings",
    "TrackingConfig",
    "TrainConfig",
    "dump_config",
    "field_types",
    "flatten",
    "load_config",
    "read_mapping",
    "read_preset",
    "section_class",
]
