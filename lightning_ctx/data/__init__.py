"""Records, rendering with/without context, generic verifiers, batches, the task contract and the one DataModule.

Task-specific data lives in ``lightning_ctx.tasks.<task>``. Import from the submodules
(``lightning_ctx.data.records``, ``.render``, ``.verifiers``, ``.batches``, ``.task``, ``.datamodule``): this
package file stays empty so that importing one of them never drags in the others.
"""
