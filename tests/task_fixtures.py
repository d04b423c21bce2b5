"""A task module that is not the bundled demo's, for the accuracy tool and the lmms-eval task: its own kinds
("hue", "plus") over demo questions, so the bundled model's word-level tokenizer knows every word."""

from pathlib import Path

OTHER_TASKS = """
import dataclasses
from realb_hf.bundled import demo_module

_demo = demo_module("tasks")
IMAGE_KINDS = ("hue",)
TEXT_KINDS = ("plus",)
KINDS = IMAGE_KINDS + TEXT_KINDS
_RENAME = {"colour": "hue", "add": "plus"}


def heldout_set(n, seed=0):
    return [dataclasses.replace(ex, kind=_RENAME[ex.kind]) for ex in _demo.heldout_set(n, seed, kinds=("colour", "add"))]
"""


def write_other_tasks(folder: Path) -> Path:
    """`folder/my_tasks.py`: the stand-in task module, loaded by path (`--tasks folder/my_tasks.py`)."""
    path = folder / "my_tasks.py"
    path.write_text(OTHER_TASKS)
    return path
