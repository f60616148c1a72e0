"""Moved to :mod:`train.cloc.config` (the shared loader and :class:`ConfigError`: :mod:`train.config`); this module
only re-exports them, so that imports from ``train.cloc_config`` keep working."""

from train.cloc.config import CLOCTrainConfig, load_config
from train.config import ConfigError

__all__ = ["CLOCTrainConfig", "ConfigError", "load_config"]
