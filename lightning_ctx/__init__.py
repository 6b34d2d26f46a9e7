"""lightning-ctx: on-policy context distillation that stays robust when the context returns."""

__version__ = "0.1.0"
