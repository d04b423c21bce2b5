"""Procedurally generated multimodal questions for the bundled demo model (`demo/model/`).

Image questions ask about simple PIL-drawn scenes (96x96 px, dark background): the colour of a shape, its kind
(circle, square, triangle), how many shapes there are (1-4), and whether the shape is in the left or right half. Text questions are
one-digit arithmetic and alphabet order. Every answer is a single word or number.

API (stable; the Gradio demo and `realb_hf.accuracy` use it):

    from demo.tasks import make_example, heldout_set, train_example, KINDS
    ex = make_example(random.Random(7), "colour")   # Example(image=<PIL.Image>, question=..., answer="red", kind=...)
    ex.messages()                                    # chat messages for processor.apply_chat_template
    exs = heldout_set(300, seed=0)                   # balanced over KINDS, seeds disjoint from training

Seeds: training example `i` is drawn from `random.Random(train_seed(i))`, held-out example `i` of set `seed`
from `random.Random(heldout_seed(i, seed))`; the two seed ranges never overlap (`TRAIN_SEEDS`, `HELDOUT_SEEDS`).
The text tasks' question spaces are small (one-digit sums, 26 letters), so held-out *text* questions repeat
training questions; held-out *images* are new drawings (other seeds, continuous positions and sizes).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

IMAGE_SIZE = 96
BACKGROUND = (24, 24, 24)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
    "purple": (165, 70, 215),
}
SHAPES = ("circle", "square", "triangle")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_COUNT = 4

IMAGE_KINDS = ("colour", "shape", "count", "position")
TEXT_KINDS = ("add", "sub", "next", "prev")
KINDS = IMAGE_KINDS + TEXT_KINDS
# How often training draws each kind (held-out sets stay balanced): the harder image kinds more often.
TRAIN_KIND_WEIGHTS = {"colour": 1, "shape": 3, "count": 2, "position": 2, "add": 1, "sub": 1, "next": 1, "prev": 1}

# Seed ranges: training examples use [0, 10**9), held-out sets [10**9, 2 * 10**9).
TRAIN_SEEDS = range(0, 10**9)
HELDOUT_SEEDS = range(10**9, 2 * 10**9)
_HELDOUT_SET_STRIDE = 10**6  # held-out set `seed` owns [10**9 + seed * 10**6, ... + 10**6)


@dataclass(frozen=True)
class Example:
    """One question. `image` is None for text questions; `answer` is one lower-case word or number."""

    image: Image.Image | None
    question: str
    answer: str
    kind: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def modality(self) -> str:
        """Either "image" or "text"."""
        return "text" if self.image is None else "image"

    def messages(self) -> list[dict]:
        """Chat messages for `processor.apply_chat_template(..., add_generation_prompt=True)`."""
        content: list[dict] = []
        if self.image is not None:
            content.append({"type": "image", "image": self.image})
        content.append({"type": "text", "text": self.question})
        return [{"role": "user", "content": content}]


# ---- drawing ---------------------------------------------------------------------------------------------


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    """A filled shape centred at (cx, cy) with "radius" r (half the side of a square)."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")


def draw_scene(shapes: list[tuple[str, str, float, float, float]], size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB image of `shapes`, each (kind, colour name, cx, cy, r)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for kind, colour, cx, cy, r in shapes:
        draw_shape(draw, kind, cx, cy, r, COLOURS[colour])
    return image


def _place(rng: random.Random, placed: list[tuple[float, float, float]], r: float, x_range: tuple[float, float]):
    """A centre for a shape of radius r inside x_range, not touching the shapes already placed."""
    for _ in range(200):
        cx = rng.uniform(*x_range)
        cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 3) ** 2 for x, y, q in placed):
            return cx, cy
    raise RuntimeError("could not place a shape")  # never happens with the sizes below


# ---- the tasks -------------------------------------------------------------------------------------------


def _single(rng: random.Random) -> tuple[str, str, Image.Image]:
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    r = rng.uniform(14, 22)
    cx, cy = _place(rng, [], r, (r + 2, IMAGE_SIZE - r - 2))
    return kind, colour, draw_scene([(kind, colour, cx, cy, r)])


def _colour(rng: random.Random) -> Example:
    kind, colour, image = _single(rng)
    word = rng.choice(("colour", "color"))
    return Example(image, f"what {word} is the shape ?", colour, "colour", {"shape": kind})


def _shape(rng: random.Random) -> Example:
    kind, colour, image = _single(rng)
    question = rng.choice(("what shape is it ?", "what shape is this ?"))
    return Example(image, question, kind, "shape", {"colour": colour})


def _count(rng: random.Random) -> Example:
    n = rng.randint(1, MAX_COUNT)
    placed: list[tuple[float, float, float]] = []
    shapes = []
    for _ in range(n):
        r = rng.uniform(8, 12)
        cx, cy = _place(rng, placed, r, (r + 2, IMAGE_SIZE - r - 2))
        placed.append((cx, cy, r))
        shapes.append((rng.choice(SHAPES), rng.choice(list(COLOURS)), cx, cy, r))
    return Example(draw_scene(shapes), "how many shapes ?", str(n), "count")


def _position(rng: random.Random) -> Example:
    """One shape, clearly in the left or the right half; the question names it."""
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    r = rng.uniform(10, 16)
    half = IMAGE_SIZE / 2
    answer = rng.choice(("left", "right"))
    x_range = (r + 2, half - r - 4) if answer == "left" else (half + r + 4, IMAGE_SIZE - r - 2)
    cx, cy = _place(rng, [], r, x_range)
    return Example(draw_scene([(kind, colour, cx, cy, r)]), f"is the {kind} left or right ?", answer, "position")


def _add(rng: random.Random) -> Example:
    x, y = rng.randint(0, 9), rng.randint(0, 9)
    return Example(None, f"{x} + {y} =", str(x + y), "add")


def _sub(rng: random.Random) -> Example:
    x = rng.randint(0, 9)
    y = rng.randint(0, x)
    return Example(None, f"{x} - {y} =", str(x - y), "sub")


def _next(rng: random.Random) -> Example:
    i = rng.randrange(len(LETTERS) - 1)
    return Example(None, f"what comes after {LETTERS[i]} ?", LETTERS[i + 1], "next")


def _prev(rng: random.Random) -> Example:
    i = rng.randrange(1, len(LETTERS))
    return Example(None, f"what comes before {LETTERS[i]} ?", LETTERS[i - 1], "prev")


_MAKERS = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "position": _position,
    "add": _add,
    "sub": _sub,
    "next": _next,
    "prev": _prev,
}


def train_seed(i: int) -> int:
    if not 0 <= i < len(TRAIN_SEEDS):
        raise ValueError(f"training example index {i} out of range")
    return TRAIN_SEEDS[i]


def heldout_seed(i: int, seed: int = 0) -> int:
    if not 0 <= i < _HELDOUT_SET_STRIDE or not 0 <= seed < len(HELDOUT_SEEDS) // _HELDOUT_SET_STRIDE:
        raise ValueError(f"held-out example {i} of set {seed} out of range")
    return HELDOUT_SEEDS[seed * _HELDOUT_SET_STRIDE + i]


def task_functions(makers: dict[str, Callable[[random.Random], Example]], kinds: tuple[str, ...], weights: dict):
    """`make_example`, `train_example` and `heldout_set` over `makers` (kind -> maker): the API every task module
    of the demo offers, so the accuracy tool, calibrate and lmms-eval take any of them."""

    def make_example(rng: random.Random, kind: str | None = None) -> Example:
        """One example of `kind` (one of the kinds; None draws a kind uniformly from `rng`)."""
        if kind is None:
            kind = rng.choice(kinds)
        if kind not in makers:
            raise ValueError(f"unknown kind {kind!r}; choose one of {kinds}")
        return makers[kind](rng)

    def train_example(i: int, kind: str | None = None) -> Example:
        """Training example number `i` (deterministic); its kind is drawn with `weights` unless given."""
        rng = random.Random(train_seed(i))
        if kind is None:
            kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        return make_example(rng, kind)

    def heldout_set(n: int, seed: int = 0, kinds: tuple[str, ...] = kinds) -> list[Example]:
        """`n` held-out examples cycling through `kinds` (balanced), drawn from seeds no training example uses."""
        return [make_example(random.Random(heldout_seed(i, seed)), kinds[i % len(kinds)]) for i in range(n)]

    return make_example, train_example, heldout_set


make_example, train_example, heldout_set = task_functions(_MAKERS, KINDS, TRAIN_KIND_WEIGHTS)


def vocabulary() -> list[str]:
    """Every word a question or answer can contain (the tokenizer's ordinary vocabulary), in a fixed order."""
    words = [
        "user", "assistant", "system",
        "what", "colour", "color", "is", "the", "shape", "it", "this", "how", "many", "shapes",
        "left", "or", "right", "comes", "after", "before", "+", "-", "=", "?",
    ]  # fmt: skip
    words += list(COLOURS) + list(SHAPES) + list(LETTERS) + [str(n) for n in range(19)]
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


__all__ = [
    "COLOURS",
    "IMAGE_KINDS",
    "IMAGE_SIZE",
    "KINDS",
    "SHAPES",
    "TEXT_KINDS",
    "TRAIN_KIND_WEIGHTS",
    "Example",
    "draw_scene",
    "heldout_seed",
    "heldout_set",
    "make_example",
    "task_functions",
    "train_example",
    "train_seed",
    "vocabulary",
]
