"""Records, rendering with/without context, generic verifiers and the base paired-context DataModule.

Task-specific data lives in ``lightning_ctx.tasks.<task>``. Import from the submodules
(``lightning_ctx.data.records``, ``.render``, ``.verifiers``, ``.datamodule``): this package file stays
empty so that importing one of them never drags in the others.
"""
