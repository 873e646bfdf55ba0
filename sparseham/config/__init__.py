"""The training application's configuration: the YAML schema (``schema``), typed fields with
one-line errors (``fields``), and loading with ``base:`` chains and ``--set`` overrides (``load``)."""

from sparseham.config.fields import ConfigError
from sparseham.config.load import (
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    help_text,
    load_config,
    method_options,
    parse_override,
    shipped_configs,
)

__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "help_text",
    "load_config",
    "method_options",
    "parse_override",
    "shipped_configs",
]
