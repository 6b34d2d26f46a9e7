"""``lightning-ctx``: LightningCLI (``fit``, ``validate``, ``test``) plus ``compare`` and ``pretrain-world``.

Configs are YAML (``parser_mode="omegaconf"``, so values can be shared with ``${...}``).
User errors (bad data, missing model, vocab mismatch) print one line and exit with status 2 before
any training or tracking starts.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from lightning_ctx.data.datamodule import ContextPairDataModule
from lightning_ctx.data.records import DataError
from lightning_ctx.models.loading import ModelError
from lightning_ctx.module import OnPolicyDistillation
from lightning_ctx.tracking import MLflowConfigCallback

USER_ERRORS = (DataError, ModelError)


class ContextCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("trainer_defaults", {
            "logger": {"class_path": "lightning_ctx.tracking.MLflowLogger"},
            "log_every_n_steps": 1,
            "max_steps": 50,
        })
        super().__init__(
            OnPolicyDistillation,
            ContextPairDataModule,
            subclass_mode_data=True,
            save_config_callback=MLflowConfigCallback,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_ctx.data.datamodule.ContextPairDataModule"}})

    def _prepare(self) -> None:
        """Validate data against the model before a logger creates any run."""
        dm, model = self.datamodule, self.model
        if dm is None:
            return
        if getattr(dm, "tokenizer", None) is None:
            dm.set_tokenizer(model.tokenizer)
        dm.validate()
        model.check_data(dm)

    def before_fit(self) -> None:
        self._prepare()

    def before_validate(self) -> None:
        self._prepare()

    def before_test(self) -> None:
        self._prepare()


# Subcommands outside LightningCLI: name -> "module:function" taking argv (imported lazily).
EXTRA_COMMANDS = {
    "compare": "lightning_ctx.tracking:compare_main",
    "pretrain-world": "lightning_ctx.models.world:main",
}


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        module_name, func = EXTRA_COMMANDS[argv[0]].split(":")
        try:
            result = getattr(importlib.import_module(module_name), func)(argv[1:])
        except USER_ERRORS as err:
            print(f"lightning-ctx {argv[0]}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        raise SystemExit(result if isinstance(result, int) else 0)
    try:
        ContextCLI(args=argv)
    except USER_ERRORS as err:
        print(f"lightning-ctx: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
