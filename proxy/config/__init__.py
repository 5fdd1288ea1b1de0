"""Config: the typed shape of ``outrigger.yaml`` and its loader."""

from proxy.config.loader import (
    UNROUTED,
    ConfigError,
    ConfigIssue,
    config_hash,
    load_config,
    load_config_file,
    parse_address,
    same_socket,
    to_builtins,
)
from proxy.config.types import *  # noqa: F403
from proxy.config.types import __all__ as _types_all

__all__ = [
    "UNROUTED", "ConfigError", "ConfigIssue", "config_hash", "load_config", "load_config_file", "parse_address",
    "same_socket", "to_builtins", *_types_all,
]
