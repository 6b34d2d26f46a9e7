"""The task contract held by the one DataModule: knobs live once, the retention term's contexts come from the task,
and the renamed evaluation knobs keep their old names for one release, with a warning."""

import inspect
import warnings

import pytest

from lightning_ctx.data.datamodule import TaskDataModule
from lightning_ctx.data.task import JSONLTask, Task
from lightning_ctx.errors import ConfigError, DataError
from lightning_ctx.tasks.world import WorldTask
from lightning_ctx.tasks.world import rules as world
from tests.helpers import make_records

SHIPPED_TASKS = ("lightning_ctx.data.task.JSONLTask", "lightning_ctx.tasks.world.WorldTask",
                 "lightning_ctx.tasks.mcqa.MCQATask", "lightning_ctx.tasks.mcqa.SysMCQATask",
                 "lightning_ctx.tasks.safety.SafetyTask", "lightning_ctx.tasks.frozenlake.FrozenLakeTask",
                 "lightning_ctx.tasks.games.GamesTask")


def _cls(path):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", SHIPPED_TASKS)
def test_a_task_never_restates_a_loader_knob(path):
    """Batch sizes, lengths, the template, the retention term's contexts, the eval cap, workers, shuffling and the seed
    are the DataModule's, once; a task's knobs are its own."""
    loader = set(inspect.signature(TaskDataModule.__init__).parameters) - {"self", "task"}
    own = set(inspect.signature(_cls(path).__init__).parameters) - {"self"}
    assert not own & loader, own & loader


def test_retain_others_takes_the_tasks_other_contexts(jsonl_file, tiny_dirs):
    from lightning_ctx.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_dirs["qwen2"])
    # the world's train split holds the target only: its other in-distribution contexts are retained
    data = TaskDataModule(WorldTask(n_train=8, n_val=0, n_test=0), retain_others=True, max_prompt_length=64)
    data.connect(tok)
    assert data.retain_contexts == world.other_contexts("SHOW") and "SHOW" not in data.retain_contexts
    # JSONL: every context of the train split (each record then draws one that is not its own), after the listed ones
    train = jsonl_file(make_records(3, "ADD1") + make_records(3, "REV", prefix="b"))
    data = TaskDataModule(JSONLTask(train_file=train), retain_contexts=["SHOW"], retain_others=True)
    data.connect(tok)
    assert data.retain_contexts == ["SHOW", "ADD1", "REV"]
    batch = data.task.collator(data, retain=True)(list(enumerate(data.records("train"))))
    assert all(c != own for c, own in zip(batch.retain_contexts, batch.contexts))
    single = TaskDataModule(JSONLTask(train_file=jsonl_file(make_records(3, "ADD1"), "one.jsonl")), retain_others=True)
    with pytest.raises(DataError, match="one.jsonl, field 'data.retain_others': the train split has a single"):
        single.connect(tok)


def test_a_task_without_splits_and_a_missing_task_are_refused():
    class Empty(Task):
        def load(self, split):
            return None

    with pytest.raises(DataError, match="field 'data.task': Empty has no split"):
        TaskDataModule(Empty(), tokenizer="builtin:world").validate()
    with pytest.raises(ConfigError, match="field 'data.task': must name a task"):
        TaskDataModule(None)
    with pytest.raises(DataError, match="field 'data.task.train_file': no data"):
        TaskDataModule(JSONLTask(), tokenizer="builtin:world").validate()


def test_the_worlds_renamed_evaluation_knobs_still_work_with_a_warning():
    with pytest.warns(FutureWarning) as said:
        old = WorldTask(retention_contexts=3, retention_items=4)
    assert sorted(str(w.message).split(";")[0] for w in said) == [  # one warning per old name
        "data.task.retention_contexts is renamed data.task.eval_other_contexts",
        "data.task.retention_items is renamed data.task.eval_other_items"]
    assert (old.eval_other_contexts, old.eval_other_items) == (3, 4)
    new = WorldTask(eval_other_contexts=3, eval_other_items=4)
    assert [r.id for r in old.eval_other_records("val")] == [r.id for r in new.eval_other_records("val")]
    assert len(new.eval_other_records("val")) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WorldTask(eval_other_contexts=3)  # the new names: no warning
    with pytest.raises(ConfigError, match="field 'data.task.retention_items': is the old name of"):
        WorldTask(retention_items=4, eval_other_items=5)
    with pytest.raises(ConfigError, match="data.task.retention_contexts"):  # the old name keeps its range
        WorldTask(retention_contexts=0)
    data = TaskDataModule(new)
    with pytest.warns(FutureWarning, match="retention_records is renamed eval_other_records"):
        assert data.retention_records("val") == data.eval_other_records("val")


def test_the_old_names_reach_the_task_from_a_config(capsys):
    from lightning_ctx.cli import ContextCLI

    with pytest.warns(FutureWarning, match="eval_other_items"):
        cli = ContextCLI(args=["--config", "builtin:world.yaml", "--data.task.retention_items", "3"], run=False)
    assert cli.datamodule.task.eval_other_items == 3
