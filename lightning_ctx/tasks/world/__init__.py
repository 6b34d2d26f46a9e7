"""The built-in rule world (docs/design.md, "The rule world"): rules, data, tokenizer, base model."""

from lightning_ctx.tasks.world.model import WORLD_BASE_DIR, load_world_base
from lightning_ctx.tasks.world.rules import world_verifier
from lightning_ctx.tasks.world.task import WorldTask

__all__ = ["WORLD_BASE_DIR", "WorldTask", "load_world_base", "world_verifier"]
