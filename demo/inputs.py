"""What a user sends: the message and its attachments, checked and refused with a reason the page shows, then
turned into chat-template messages and replicated into a batch of N copies."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_UPLOAD_BYTES = 10 * 2**20  # 10 MB, enforced by the server (gradio's max_file_size) and again here
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
MAX_IMAGES = 4  # per message
MAX_QUESTION_CHARS = 4000  # refused before tokenizing, so a huge paste cannot hold the queue


class InputRefused(ValueError):
    """A message the demo refuses (too long, empty, ...); the text is shown to the user as is."""


class UploadError(InputRefused):
    """An attachment the demo refuses; the message is shown to the user as is."""


def file_path(item: Any) -> Path:
    """A gradio file value (a path string, or a dict/FileData with `path`) as a Path."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    path = item.get("path") if isinstance(item, dict) else getattr(item, "path", None)
    if not path:
        raise UploadError(f"could not read the attachment {item!r}")
    return Path(path)


def validate_upload(item: Any, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open an uploaded file as an RGB PIL image, or raise `UploadError` saying why it is refused.

    The content decides, not the name: a text file renamed .png is refused, and so is anything over `max_bytes`
    or `max_pixels` (checked from the header, before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    path = file_path(item)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise UploadError(f"{name}: the upload could not be read; please attach it again") from None
    if size > max_bytes:
        raise UploadError(f"{name} is {size / 2**20:.1f} MB; attachments are limited to {max_bytes / 2**20:.0f} MB")
    not_image = f"{name} is not an image: attach a PNG, JPEG, GIF, BMP, WebP or TIFF picture"
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise UploadError(
                    f"{name} is {width}x{height} pixels; images are limited to {max_pixels / 1e6:.0f} megapixels"
                )
            probe.verify()
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UploadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        raise UploadError(not_image) from None


def parse_message(message: Any) -> tuple[str, list, list[str]]:
    """(question text, PIL images, their paths) from a MultimodalTextbox value; raises `InputRefused` when refused."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    message = message or {}
    text = (message.get("text") or "").strip()
    if len(text) > MAX_QUESTION_CHARS:
        raise InputRefused(f"the question is {len(text)} characters long; this demo takes at most {MAX_QUESTION_CHARS}")
    files = list(message.get("files") or [])
    if len(files) > MAX_IMAGES:
        raise UploadError(f"attach at most {MAX_IMAGES} images to one message (got {len(files)})")
    images = [validate_upload(f) for f in files]
    if not text and not images:
        raise InputRefused("type a question (and optionally attach an image)")
    return text, images, [str(file_path(f)) for f in files]


def build_messages(text: str, images: Sequence[Any]) -> list[dict]:
    """One user turn in the chat-template format (images first, as the bundled model was trained)."""
    content: list[dict] = [{"type": "image", "image": image} for image in images]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def replicate_batch(inputs: dict[str, Any], copies: int) -> dict[str, Any]:
    """The processor output of ONE request, replicated `copies` times into one batch.

    Every tensor repeats along dim 0: per-row tensors (input_ids, attention_mask, mm_token_type_ids: (1, S)) become
    (N, S), and per-image tensors (pixel_values: (patches, D), image_grid_thw: (images, 3)) become N copies
    concatenated, which is exactly what the processor returns for N identical requests. Rows stay identical, so
    row 0's answer is the answer to the request.
    """
    import torch

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    ids = inputs.get("input_ids")
    if ids is not None and ids.shape[0] != 1:
        raise ValueError(f"replicate_batch takes one request (batch 1), got batch {ids.shape[0]}")
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            out[key] = value.repeat(copies, *([1] * (value.dim() - 1)))
        elif isinstance(value, list):
            out[key] = value * copies
        else:
            out[key] = value
    return out


__all__ = [
    "MAX_IMAGES",
    "MAX_IMAGE_PIXELS",
    "MAX_QUESTION_CHARS",
    "MAX_UPLOAD_BYTES",
    "InputRefused",
    "UploadError",
    "build_messages",
    "file_path",
    "parse_message",
    "replicate_batch",
    "validate_upload",
]
