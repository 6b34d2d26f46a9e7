"""The distilled student as a model anyone can load: a ``save_pretrained`` folder with its tokenizer and chat template.

``lightning-ctx export`` writes it from a Lightning checkpoint or an MLflow run; :class:`ModelExport` (the CLI's
``--export.*`` knobs) writes it at the end of a fit. A LoRA student is merged into its base weights by default
(``adapter_only`` writes the peft adapter instead). The folder loads with ``AutoModelForCausalLM.from_pretrained``,
vLLM, or as the next ``--model.student``.

In MLflow the folder is a plain artifact directory ``model/`` of the run, not MLflow's ``transformers`` flavour: that
flavour stores the weights in its own layout (``model/`` plus ``components/tokenizer/`` and an ``MLmodel`` file), which
``from_pretrained`` and ``--model.student`` cannot open as a folder; it resolves pip requirements while logging; in
MLflow 3 it keeps the model as a logged-model entity outside the run's artifact folder; and it has no form for a peft
adapter alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ctx.errors import ModelError

MODEL_ARTIFACT = "model"  # the run's artifact folder holding the export
EXPORT_INFO = "lightning_ctx_export.json"  # what the folder was made from (run, step, merged or adapter, base)
CHECKPOINT_TAG = "checkpoint.last"  # run tag: the run's last checkpoint (absolute path), for `export --run-id`


def is_lora(student) -> bool:
    return hasattr(student, "peft_config") and hasattr(student, "get_base_model")


def merged_lora_state_dict(student) -> dict[str, torch.Tensor]:
    """The base model's weights with the LoRA adapter merged in (``W + scale * B @ A`` per adapted layer), under the
    base model's own names. Computed out of place: the training model keeps its adapter (no merge/unmerge round
    trip, which would change its weights by rounding)."""
    from peft.tuners.lora import LoraLayer

    base = student.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if any(module.use_dora.get(a, False) for a in adapters) or not isinstance(module.get_base_layer(),
                                                                                   torch.nn.Linear):
            raise ModelError(f"export: layer {name!r} is not a plain LoRA linear layer, which cannot be merged "
                             f"here; export the adapter alone (--adapter-only)")
        weight = module.get_base_layer().weight.detach()
        delta = sum(module.get_delta_weight(a) for a in adapters)
        merged[f"{name}.weight"] = (weight + delta).to(weight.dtype)
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        state[clean] = merged.get(clean, value)
    return state


def check_export_dir(out_dir: str | os.PathLike, knob: str = "--out") -> Path:
    """``out_dir`` may be written: missing, empty, or an earlier export (its files are replaced); anything else is
    refused, so an export never mixes its files into another folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_INFO).exists())):
        raise ModelError(f"{knob}: {out} exists and is not an earlier export; give a new or empty folder")
    return out


def save_student(student, tokenizer, out_dir: str | os.PathLike, *, adapter_only: bool = False,
                 info: Optional[dict[str, Any]] = None) -> Path:
    """Write ``student`` (merged when it carries a LoRA adapter, or the adapter alone) and ``tokenizer`` (with its chat
    template) to ``out_dir`` as a ``save_pretrained`` folder; ``info`` goes to ``lightning_ctx_export.json``."""
    out = check_export_dir(out_dir)
    if adapter_only and not is_lora(student):
        raise ModelError("export: --adapter-only needs a LoRA student (model.lora); this one was fully fine-tuned")
    out.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        student.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json naming the base
    elif is_lora(student):
        base = student.get_base_model()
        base.save_pretrained(out, state_dict=merged_lora_state_dict(student))
    else:
        student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"format": "peft adapter" if adapter_only else "merged" if is_lora(student) else "full", **(info or {})}
    (out / EXPORT_INFO).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    return out


def student_from_checkpoint(ckpt_path: str | os.PathLike, student: Optional[str] = None):
    """``(student, tokenizer, info)`` from a Lightning checkpoint of ``OnPolicyDistillation``, without the teacher.

    The student is rebuilt from its source (``model.student`` of the checkpoint, or ``student`` when that folder has
    moved), wrapped in the same LoRA adapter when there was one, and the checkpoint's student weights are loaded.
    """
    from lightning_ctx.checkpointing import MLFLOW_RUN_KEY
    from lightning_ctx.models.loading import apply_lora, load_causal_lm, load_tokenizer

    path = Path(ckpt_path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hp = ckpt.get("hyper_parameters") or {}
    source = student or hp.get("student")
    if not source:
        raise ModelError(f"{path}: not a checkpoint of lightning-ctx fit (no model.student in its hyperparameters)")
    kwargs = {"trust_remote_code": hp.get("trust_remote_code", False),
              "local_files_only": hp.get("local_files_only", True)}
    tokenizer = load_tokenizer(source, knob="--student" if student else "model.student (in the checkpoint)",
                               **kwargs)
    model = load_causal_lm(source, hp.get("dtype", "float32"), **kwargs)
    if hp.get("lora") is not None:
        model = apply_lora(model, hp["lora"])
    weights = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied output embeddings are stored once; anything else missing means another model than the checkpoint's
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ModelError(f"{path}: the student weights do not fit {source} ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); pass the folder "
                         f"the run started from with --student")
    model.eval()
    info = {"checkpoint": str(path.resolve()), "step": ckpt.get("global_step"), "run_id": ckpt.get(MLFLOW_RUN_KEY),
            "base": source}
    return model, tokenizer, info


def _tied_keys(model) -> set[str]:
    names = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is not None and inp is not None and out.weight is inp.weight:
        names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is out.weight}
    return names


def log_export(folder: str | os.PathLike, run_id: str, tracking_uri: Optional[str] = None) -> str:
    """Log ``folder`` as the artifact directory ``model/`` of ``run_id``; returns its artifact URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"


class ModelExport(Callback):
    """At the end of fit: the student as a ``save_pretrained`` folder, and the run's last checkpoint as a run tag.

    Args:
        dir: write the folder here (None: no folder outside MLflow).
        log_model: log the folder as the run's artifact ``model/``. None = only when the run keeps no checkpoint
            (``trainer.enable_checkpointing: false``, as in the world configs): every run then leaves something that
            ``lightning-ctx export --run-id`` turns into a model, without a second copy of large checkpointed ones.
        adapter_only: a LoRA student's adapter alone (default: merged into the base weights).
    """

    def __init__(self, dir: Optional[str] = None, log_model: Optional[bool] = None, adapter_only: bool = False):
        super().__init__()
        self.dir, self.log_model, self.adapter_only = dir, log_model, adapter_only
        self.exported_to: Optional[Path] = None
        self.artifact_uri: Optional[str] = None

    @staticmethod
    def _mlflow_runs(trainer) -> list[tuple[str, str]]:
        from lightning.pytorch.loggers import MLFlowLogger

        return [(lg.run_id, lg._tracking_uri) for lg in trainer.loggers if isinstance(lg, MLFlowLogger) and lg.run_id]

    @staticmethod
    def last_checkpoint(trainer) -> Optional[str]:
        for cb in trainer.checkpoint_callbacks:
            path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
            if path and os.path.exists(path):
                return os.path.realpath(path)
        return None

    def on_fit_start(self, trainer, pl_module) -> None:
        """What would fail at the end of fit fails before training instead."""
        if self.adapter_only and pl_module.hparams.get("lora") is None:
            raise ModelError("export.adapter_only needs a LoRA student (model.lora); this one is fully fine-tuned")
        if self.dir and trainer.is_global_zero:
            check_export_dir(self.dir, "export.dir")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from mlflow.tracking import MlflowClient

        runs = self._mlflow_runs(trainer)
        checkpoint = self.last_checkpoint(trainer)
        if checkpoint:
            for run_id, uri in runs:
                MlflowClient(uri).set_tag(run_id, CHECKPOINT_TAG, checkpoint)
        log = self.log_model if self.log_model is not None else checkpoint is None
        if not (self.dir or (log and runs)):
            return
        from lightning_ctx.distributed import is_sharded

        if trainer.world_size > 1 and is_sharded(trainer):
            rank_zero_warn("export: the student is sharded over ranks (FSDP) and is not exported at the end of fit; "
                           "export its last checkpoint with `lightning-ctx export --ckpt PATH`")
            return
        info = {"run_id": runs[0][0] if runs else None, "step": trainer.global_step, "base": pl_module.hparams.student}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(self.dir) if self.dir else Path(tmp) / MODEL_ARTIFACT
            save_student(pl_module.student, pl_module.tokenizer, folder, adapter_only=self.adapter_only, info=info)
            if self.dir:
                self.exported_to = folder.resolve()
                rank_zero_info(f"exported the student to {self.exported_to}")
            if log:
                for run_id, uri in runs:
                    self.artifact_uri = log_export(folder, run_id, uri)


# -- lightning-ctx export ----------------------------------------------------------------------------------------


def build_export_parser():
    import argparse

    from lightning_ctx.console import PlainHelpFormatter

    p = argparse.ArgumentParser(
        prog="lightning-ctx export", formatter_class=PlainHelpFormatter,
        description="Write the distilled student as a save_pretrained folder (weights, config, tokenizer, chat "
                    "template) that transformers, vLLM or the next --model.student load; a LoRA student merged "
                    "into its base weights unless --adapter-only. From a checkpoint (--ckpt) or an MLflow run "
                    "(--run-id: its logged model/ artifact, else its last checkpoint). The folder is also logged "
                    "to the run as the artifact model/.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a Lightning checkpoint of lightning-ctx fit (e.g. checkpoints/last.ckpt)")
    source.add_argument("--run-id", help="an MLflow run of lightning-ctx fit")
    p.add_argument("--out", default=None, help="the folder to write (default: exports/RUN_ID, or exports/CKPT_NAME)")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA student's peft adapter alone instead of the merged weights")
    p.add_argument("--student", default=None,
                   help="the folder the run started from, when it has moved since (default: model.student as "
                        "recorded in the checkpoint)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the run (default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns/mlflow.db)")
    p.add_argument("--no-log", dest="log", action="store_false",
                   help="do not log the folder to the run as the artifact model/")
    return p


def _download_logged(client, run_id: str, out: Path) -> Optional[Path]:
    """The run's ``model/`` artifact copied to ``out``, or None when the run has none."""
    if MODEL_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    check_export_dir(out)
    with tempfile.TemporaryDirectory() as tmp:
        got = Path(client.download_artifacts(run_id, MODEL_ARTIFACT, tmp))
        shutil.copytree(got, out, dirs_exist_ok=True)
    return out


def export_main(argv: Optional[list[str]] = None) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lightning_ctx.tracking import open_store

    args = build_export_parser().parse_args(argv)
    uri = open_store(args.tracking_uri)
    client = MlflowClient(uri)
    ckpt, run_id = args.ckpt, args.run_id
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ModelError(f"export: no run {run_id} in {uri} (pass --tracking-uri for another store)") from None
        out = Path(args.out or Path("exports") / run_id)
        if not args.adapter_only and not args.student:
            logged = _download_logged(client, run_id, out)
            if logged is not None:
                print(f"exported run {run_id}'s logged model/ to {logged.resolve()}")
                return 0
        ckpt = run.data.tags.get(CHECKPOINT_TAG)
        if not ckpt or not Path(ckpt).is_file():
            where = f"its last checkpoint {ckpt} no longer exists" if ckpt else "it recorded no checkpoint"
            raise ModelError(f"export: run {run_id} has no logged model/ and {where}; pass a checkpoint with --ckpt, "
                             f"or fit with --export.log_model true (the default when checkpointing is off)")
    student, tokenizer, info = student_from_checkpoint(ckpt, args.student)
    run_id = run_id or info.get("run_id")
    out = Path(args.out or Path("exports") / (run_id or Path(ckpt).stem))
    save_student(student, tokenizer, out, adapter_only=args.adapter_only, info=info)
    print(f"exported the student of {ckpt} (step {info['step']}) to {out.resolve()}")
    if args.log and run_id:
        try:
            print(f"logged to MLflow run {run_id} as {log_export(out, run_id, uri)}")
        except MlflowException:
            print(f"not logged: run {run_id} is not in {uri} (pass --tracking-uri)")
    return 0
