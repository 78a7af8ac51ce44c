"""Configuration: YAML -> typed dataclasses, validated before any compute.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` with one line
naming the dotted key. ``--set a.b=value`` overrides are parsed as YAML scalars/lists.
``schema`` holds the dataclasses and their checks, ``load`` the YAML and override parsing.
"""
from .load import apply_override, flatten, from_dict, load_config, refuse_mismatch, section
from .schema import (EVAL_MODES, RUN_NAME, Config, DataConfig, DistillConfig, ELFConfig, EvalConfig, KDConfig,
                     ModeArchs, PoolConfig, RayConfig, Resources, ServiceConfig, TeachersConfig)

__all__ = ["load_config", "from_dict", "apply_override", "section", "flatten", "refuse_mismatch",
           "Config", "DataConfig", "RayConfig", "TeachersConfig", "PoolConfig", "ServiceConfig", "DistillConfig",
           "KDConfig", "ELFConfig", "ModeArchs", "EvalConfig", "Resources", "EVAL_MODES", "RUN_NAME"]
