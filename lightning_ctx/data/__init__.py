"""Task records, rendering with/without context, verifiers and the paired-context DataModule."""

from lightning_ctx.data.datamodule import ContextPairBatch, ContextPairDataModule
from lightning_ctx.data.records import DataError, TaskRecord, load_jsonl, write_jsonl

__all__ = ["ContextPairBatch", "ContextPairDataModule", "DataError", "TaskRecord", "load_jsonl", "write_jsonl"]
