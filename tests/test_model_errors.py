"""A model that is not here stops the run with one line that names every knob concerned and says what to do."""

import pytest

from lightning_ctx.cli import main
from lightning_ctx.errors import ModelError
from lightning_ctx.models.loading import check_model_sources, resolve_model_path
from lightning_ctx.models.teachers import check_model_choices


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_student_and_teacher_are_named_together(tmp_path, empty_hf_cache):
    student, teacher = tmp_path / "Qwen2.5-3B-Instruct", tmp_path / "Qwen2.5-7B-Instruct"
    with pytest.raises(ModelError) as info:
        check_model_choices(str(student), str(teacher))
    text = str(info.value)
    assert text.startswith(f"model.student: {student} does not exist; model.teacher: {teacher} does not exist.")
    assert "--model.student /path/to/folder --model.teacher /path/to/folder" in text
    assert "save_pretrained" in text


def test_hub_id_without_local_copy_says_how_to_get_the_folder(empty_hf_cache):
    with pytest.raises(ModelError) as info:
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", knob="model.teacher")
    text = str(info.value)
    assert text.startswith("model.teacher: 'Qwen/Qwen2.5-0.5B-Instruct' is neither a local folder nor in the "
                           f"Hugging Face cache ({empty_hf_cache})")
    assert "never downloads" in text
    assert "`hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir /models/Qwen2.5-0.5B-Instruct`" in text
    assert text.endswith("pass --model.teacher /models/Qwen2.5-0.5B-Instruct.")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", local_files_only=False) == "Qwen/Qwen2.5-0.5B-Instruct"


def test_hub_id_in_the_cache_is_accepted(empty_hf_cache):
    snapshot = empty_hf_cache / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (empty_hf_cache / "models--org--tiny" / "refs").mkdir()
    (empty_hf_cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_model_path("org/tiny") == "org/tiny"
    check_model_sources({"model.student": "org/tiny", "model.teacher": None})  # nothing missing


def test_a_path_and_a_hub_id_each_get_their_fix(tmp_path, empty_hf_cache):
    with pytest.raises(ModelError) as info:
        check_model_sources({"model.student": str(tmp_path / "gone"), "model.teacher": "org/absent"})
    text = str(info.value)
    assert "model.student: " in text and "model.teacher: 'org/absent'" in text
    assert "--model.student /path/to/folder" in text and "pass --model.teacher /models/absent" in text


def test_cli_stops_before_any_run_with_both_knobs(tmp_path, mlflow_uri, empty_hf_cache, capsys):
    import mlflow

    with pytest.raises(SystemExit) as info:
        main(["fit", "--model.student", str(tmp_path / "s"), "--model.teacher", str(tmp_path / "t")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.student: " in err[0] and "model.teacher: " in err[0]
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
