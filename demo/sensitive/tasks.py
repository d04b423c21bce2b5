"""Questions hard enough that precision shows: the task generator of the precision-sensitive model.

The demo's tasks (`demo/tasks.py`) are solved at ~99% with wide margins, so no precision moves an answer. These
sit near decision boundaries instead, where a model answers right most of the time but not always:

- images (112x112 px, 49 vision tokens): count 1-20 small shapes; read a rendered number (10-999) or word; say
  which of two shapes is bigger (sizes 10-50% apart); say where one shape is relative to another;
- text: two-digit addition and subtraction (operands written digit by digit); recall a value from 6-10 key-value
  pairs in the question.

Every answer is one word or one number (0-999), so one token of the word-level tokenizer. The API is the demo's
(`heldout_set`, `train_example`, `make_example`, `KINDS`, `vocabulary`, `Example`), so `realb_hf.accuracy`,
`realb-hf calibrate` and the lmms-eval task take this module with `--tasks demo.sensitive.tasks`. Seeds are the
demo's: training example `i` and held-out example `i` of set `seed` come from disjoint seed ranges.

Text rendering needs Pillow with FreeType (its built-in scalable font): without it the images would differ from
machine to machine, so drawing one raises instead.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

if __package__ in (None, ""):  # loaded from its path (`--tasks demo/sensitive/tasks.py`): make `demo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# demo/sensitive/ lives in a checkout only (not in the wheel), where `demo` is a top-level package
from demo.tasks import BACKGROUND, COLOURS, LETTERS, SHAPES, Example, draw_shape, task_functions  # noqa: E402

IMAGE_SIZE = 112
MAX_COUNT = 20
NUMBERS = range(10, 1000)  # rendered numbers
WORDS = (
    "cat", "dog", "cow", "pig", "fox", "owl", "bee", "ant", "bat", "hen", "elk", "yak",
    "horse", "mouse", "tiger", "zebra", "camel", "sheep", "goose", "whale", "shark", "snake", "lion", "bear",
)  # fmt: skip
INK = {**COLOURS, "white": (235, 235, 235)}

IMAGE_KINDS = ("count", "number", "word", "bigger", "relation")
TEXT_KINDS = ("add", "sub", "recall")
KINDS = IMAGE_KINDS + TEXT_KINDS
# How often training draws each kind (held-out sets stay balanced): the harder kinds more often.
TRAIN_KIND_WEIGHTS = {"count": 3, "number": 2, "word": 1, "bigger": 2, "relation": 2, "add": 2, "sub": 2, "recall": 2}


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    if not features.check("freetype2"):
        raise RuntimeError(
            "demo.sensitive.tasks renders text with Pillow's built-in scalable font, which needs FreeType; this "
            "Pillow was built without it (install a Pillow wheel from PyPI)"
        )
    return ImageFont.load_default(size=size)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    return image, ImageDraw.Draw(image)


def place(rng: random.Random, placed: list[tuple[float, float, float]], r: float) -> tuple[float, float]:
    """A centre for a shape of radius `r` inside the image, 3 px clear of the shapes in `placed`."""
    for _ in range(500):
        cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2), rng.uniform(r + 2, IMAGE_SIZE - r - 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 3) ** 2 for x, y, q in placed):
            return cx, cy
    raise RuntimeError("could not place a shape")  # cannot happen with the sizes used here


def _count(rng: random.Random) -> Example:
    n = rng.randint(1, MAX_COUNT)
    image, draw = _canvas()
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        r = rng.uniform(3.5, 5.5)
        cx, cy = place(rng, placed, r)
        placed.append((cx, cy, r))
        draw_shape(draw, rng.choice(SHAPES), cx, cy, r, COLOURS[rng.choice(list(COLOURS))])
    return Example(image, "how many shapes ?", str(n), "count")


def _write(rng: random.Random, text: str, sizes: tuple[int, int]) -> Image.Image:
    image, draw = _canvas()
    font = _font(rng.randint(*sizes))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = rng.uniform(2 - left, IMAGE_SIZE - 2 - right)
    y = rng.uniform(2 - top, IMAGE_SIZE - 2 - bottom)
    draw.text((x, y), text, font=font, fill=INK[rng.choice(list(INK))])
    return image


def _number(rng: random.Random) -> Example:
    n = rng.choice(NUMBERS)
    return Example(_write(rng, str(n), (16, 28)), "what number is written ?", str(n), "number")


def _word(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return Example(_write(rng, word, (16, 26)), "what word is written ?", word, "word")


def _pair(rng: random.Random, radii: tuple[float, float], kind: str) -> tuple[Image.Image, str, str, list]:
    """Two shapes of one kind in two colours; returns the image, both colour names and their (cx, cy, r)."""
    first, second = rng.sample(list(COLOURS), 2)
    image, draw = _canvas()
    placed: list[tuple[float, float, float]] = []
    for colour, r in zip((first, second), radii):
        cx, cy = place(rng, placed, r)
        placed.append((cx, cy, r))
        draw_shape(draw, kind, cx, cy, r, COLOURS[colour])
    return image, first, second, placed


def _bigger(rng: random.Random) -> Example:
    small = rng.uniform(8, 14)
    big = small * rng.uniform(1.1, 1.5)
    radii = (big, small) if rng.random() < 0.5 else (small, big)
    image, first, second, _ = _pair(rng, radii, rng.choice(SHAPES))
    answer = first if radii[0] > radii[1] else second
    a, b = (first, second) if rng.random() < 0.5 else (second, first)
    return Example(image, f"which is bigger , the {a} one or the {b} one ?", answer, "bigger")


def _relation(rng: random.Random) -> Example:
    while True:
        image, first, second, placed = _pair(rng, (rng.uniform(6, 10), rng.uniform(6, 10)), rng.choice(SHAPES))
        (x1, y1, _), (x2, y2, _) = placed
        horizontal = rng.random() < 0.5
        gap = (x1 - x2) if horizontal else (y1 - y2)
        if abs(gap) >= 3:  # too close to call otherwise
            break
    if horizontal:
        question, answer = f"is the {first} shape left or right of the {second} shape ?", "left" if gap < 0 else "right"
    else:
        question, answer = f"is the {first} shape above or below the {second} shape ?", "above" if gap < 0 else "below"
    return Example(image, question, answer, "relation")


def digits(n: int) -> str:
    """`47` -> `"4 7"`: operands go digit by digit, so the model sees their place values."""
    return " ".join(str(n))


def _add(rng: random.Random) -> Example:
    x, y = rng.randint(10, 99), rng.randint(10, 99)
    return Example(None, f"{digits(x)} + {digits(y)} =", str(x + y), "add")


def _sub(rng: random.Random) -> Example:
    x = rng.randint(10, 99)
    y = rng.randint(10, x)
    return Example(None, f"{digits(x)} - {digits(y)} =", str(x - y), "sub")


def _recall(rng: random.Random) -> Example:
    keys = rng.sample(LETTERS, rng.randint(6, 10))
    values = [rng.randint(0, 99) for _ in keys]
    pairs = " , ".join(f"{k} {v}" for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return Example(None, f"{pairs} . what is {keys[i]} ?", str(values[i]), "recall")


_MAKERS = {
    "count": _count,
    "number": _number,
    "word": _word,
    "bigger": _bigger,
    "relation": _relation,
    "add": _add,
    "sub": _sub,
    "recall": _recall,
}


make_example, train_example, heldout_set = task_functions(_MAKERS, KINDS, TRAIN_KIND_WEIGHTS)


def vocabulary() -> list[str]:
    """Every word a question or answer can contain, in a fixed order (numbers 0-999 are one word each)."""
    words = [
        "user", "assistant", "system", "how", "many", "shapes", "what", "number", "is", "written", "word",
        "which", "bigger", "the", "one", "or", "shape", "left", "right", "of", "above", "below",
        "+", "-", "=", ",", ".", "?",
    ]  # fmt: skip
    words += list(COLOURS) + list(SHAPES) + list(LETTERS) + list(WORDS) + [str(n) for n in range(1000)]
    return list(dict.fromkeys(words))


__all__ = [
    "IMAGE_KINDS",
    "IMAGE_SIZE",
    "KINDS",
    "TEXT_KINDS",
    "TRAIN_KIND_WEIGHTS",
    "Example",
    "digits",
    "heldout_set",
    "make_example",
    "place",
    "train_example",
    "vocabulary",
]
