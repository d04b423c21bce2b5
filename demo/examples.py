"""The questions the bundled model knows, as clickable examples for the demo page.

The bundled model was trained on the exact phrasings of `demo/tasks.py` and nothing else: "3 + 4 =" gives 7,
"What is 3 + 4?" does not. The page shows these forms and one held-out example of each, drawn with fixed seeds;
tests/test_demo.py checks that the bundled model answers every example right under the demo's default settings.
"""

from __future__ import annotations

import random
from pathlib import Path

from .tasks import Example, heldout_seed, make_example

# The forms, as the bundled model was trained on them: lower case, words and "?" separated by spaces.
QUESTION_FORMS = {  # kind -> (form, what varies)
    "colour": ("what colour is the shape ?", "or `color`; an image with one shape"),
    "shape": ("what shape is it ?", "or `what shape is this ?`; circle, square or triangle"),
    "count": ("how many shapes ?", "1 to 4 shapes"),
    "position": ("is the circle left or right ?", "name the shape that is in the image"),
    "add": ("3 + 4 =", "one-digit numbers"),
    "sub": ("7 - 2 =", "one-digit numbers, the result is not negative"),
    "next": ("what comes after c ?", "any letter but z"),
    "prev": ("what comes before d ?", "any letter but a"),
}

EXAMPLE_SET = 7  # held-out set the examples come from (never used in training, see demo/tasks.py)
EXAMPLE_DRAWS = {  # kind -> index in EXAMPLE_SET; picked for variety among examples the model gets right
    "colour": 1,
    "shape": 1,
    "count": 2,
    "position": 0,
    "add": 0,
    "sub": 1,
    "next": 0,
    "prev": 0,
}


def examples() -> list[Example]:
    """One held-out example per question form, in the order of QUESTION_FORMS."""
    return [make_example(random.Random(heldout_seed(EXAMPLE_DRAWS[k], EXAMPLE_SET)), k) for k in QUESTION_FORMS]


def example_messages(folder: Path) -> list[dict]:
    """The examples as input-box values ({"text", "files"}), their images written as PNGs into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ex in examples():
        files = []
        if ex.image is not None:
            path = folder / f"{ex.kind}.png"
            ex.image.save(path)
            files.append(str(path))
        out.append({"text": ex.question, "files": files})
    return out


def forms_markdown() -> str:
    """The question forms as a short markdown list (shown above the examples in the page)."""
    return "\n".join(f"- `{form}` ({varies})" for form, varies in QUESTION_FORMS.values())


__all__ = ["EXAMPLE_DRAWS", "EXAMPLE_SET", "QUESTION_FORMS", "example_messages", "examples", "forms_markdown"]
