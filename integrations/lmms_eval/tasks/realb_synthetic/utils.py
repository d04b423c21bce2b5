"""Prompt, visuals, choices and scoring of the realb_synthetic tasks (loaded by lmms-eval from this file's path)."""

from __future__ import annotations

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHOICES = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "count": [str(n) for n in range(1, 5)],
    "position": ["left", "right"],
    "add": [str(n) for n in range(19)],
    "sub": [str(n) for n in range(10)],
    "next": list(LETTERS),
    "prev": list(LETTERS),
}


def doc_to_visual(doc):
    image = doc.get("image")
    return [] if image is None else [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc):
    """The demo's kinds have fixed answer sets; other task modules' questions are for realb_synthetic only."""
    if doc["kind"] not in CHOICES:
        raise ValueError(
            f"realb_synthetic_mc has answer choices for the demo's kinds {sorted(CHOICES)} only, not {doc['kind']!r}: "
            "score data written from another task module with the generative task realb_synthetic"
        )
    return CHOICES[doc["kind"]]


def normalise(text: str) -> str:
    """First line, lower case, without surrounding spaces and trailing full stops."""
    lines = (text or "").strip().splitlines()
    return lines[0].strip().lower().rstrip(".").strip() if lines else ""


def process_results(doc, results):
    hit = float(normalise(results[0]) == doc["answer"])
    image = doc["modality"] == "image"
    return {
        "exact_match": hit,
        "image_exact_match": hit if image else None,
        "text_exact_match": None if image else hit,
    }


def mean_ignoring_none(items):
    values = [x for x in items if x is not None]
    return sum(values) / len(values) if values else float("nan")
