"""`python -m realb_hf.accuracy`: which task generator it runs, and its refusals (no model is evaluated here)."""

import sys

import pytest

from realb_hf import accuracy, bundled

EVIL = """
from pathlib import Path
Path(__file__).with_name("executed").write_text("tasks.py next to the model ran")
def heldout_set(n, seed=0):
    raise SystemExit("tasks.py next to the model ran")
"""


@pytest.fixture
def model_beside_tasks(tmp_path):
    """A model folder whose parent holds a tasks.py that leaves a mark when it runs."""
    (tmp_path / "tasks.py").write_text(EVIL)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_a_tasks_file_next_to_the_model_is_never_run(model_beside_tasks, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "demo.tasks", None)  # the bundled generator cannot be imported
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(["--model", str(model_beside_tasks), "--n", "4"])
    assert exit_info.value.code == 2
    assert not (model_beside_tasks.parent / "executed").exists()
    err = capsys.readouterr().err
    assert "no task generator" in err and "--tasks" in err


def test_without_tasks_the_bundled_generator_is_used():
    module = accuracy.load_tasks()
    assert module.__file__.startswith(str(bundled.demo_dir()))
    assert len(module.heldout_set(4, seed=0)) == 4


def test_bad_arguments_are_named(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit):
        accuracy.main(["--model", str(tmp_path / "model")])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--tasks", str(tmp_path / "missing.py")])
    err = capsys.readouterr().err
    assert "--tasks" in err and "missing.py: no such file" in err
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(["--model", str(tmp_path / "not_a_model")])
    assert exit_info.value.code == 2 and "its config.json is not a model's" in capsys.readouterr().err
