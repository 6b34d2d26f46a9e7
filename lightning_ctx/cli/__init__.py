"""The ``lightning-ctx`` command (:mod:`lightning_ctx.cli.app`), config composition (:mod:`~lightning_ctx.cli.compose`)
and config error location (:mod:`~lightning_ctx.cli.locate`). Nothing in the package imports this one."""

from lightning_ctx.cli.app import ContextCLI, main
from lightning_ctx.cli.compose import expand_configs, resolve_config
from lightning_ctx.cli.locate import check_knobs, locate_config_error

__all__ = ["ContextCLI", "check_knobs", "expand_configs", "locate_config_error", "main", "resolve_config"]
