"""Gradio demo of realb_hf: chat with a multimodal MoE model and watch ReaLB pick a precision per layer and rank.

    realb-hf demo                      # or: python -m demo.app   (serves http://127.0.0.1:7860)
    realb-hf demo --model Qwen/Qwen3-VL-30B-A3B-Instruct --device cuda

The default model is the tiny Qwen3-VL-MoE trained on `demo/tasks.py` that ships in `demo/model/`. The page
serves that model (or `--model`) only, unless the operator allows other folders or Hub ids with `--allow-model`
(demo/models.py decides what a client may load). Each request can be replicated
N times in one forward ("batch of N copies") so that a CPU run crosses ReaLB's batch threshold; the answer shown is
row 0's. After every answer the panels show, for the prefill forward, the token load of each (virtual) EP rank per
MoE layer, the precision each rank ran at, balancedness before/after and the predicted layer speedup.

Everything here that does not need a browser (panel builders, upload validation, N-copy batching, the request
engine) is a plain function, tested in tests/test_demo.py; tests/test_browser.py drives the page in Chromium.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .examples import QUESTION_FORMS, example_messages, forms_markdown
from .models import (
    BUNDLED_MODEL,
    BUNDLED_MODEL_DIR,
    LoadedModel,
    ModelAllowlist,
    ModelLoadError,
    ModelStore,
    display_name,
    ep_size_choices,
    load_model,
    resolve_model,
)

# Gradio phones home (analytics, version check) unless told not to; this demo must run offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

logger = logging.getLogger("realb_hf.demo")

MAX_UPLOAD_BYTES = 10 * 2**20  # 10 MB, enforced by the server (gradio's max_file_size) and again here
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
MAX_IMAGES = 4  # per message
MAX_COPIES = 128
MAX_NEW_TOKENS = 256
MAX_QUESTION_CHARS = 4000  # refused before tokenizing, so a huge paste cannot hold the queue
MAX_PROMPT_TOKENS = 1024  # per copy, after the chat template and image tokens (server option --max-prompt-tokens)
# What the server keeps between requests. Gradio holds, per browser session, the last value of every output (the
# chat history and the panels' HTML with the heatmap PNG) for `state_session_capacity` sessions, 10000 by default;
# every page load and API client is a session. Both bounds below keep that memory flat.
MAX_CHAT_MESSAGES = 40  # the chat shows the last 40 messages; every question is answered on its own anyway
MAX_SESSIONS = 64  # sessions whose state gradio keeps; an evicted one keeps working, its state is rebuilt
EXAMPLE_FOLDER = Path(tempfile.gettempdir()) / "realb-demo-examples"  # the examples' images, written at start-up
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")

# Only the policies that need no extra input; "static" needs a per-rank map (use the Python API for it).
DEMO_POLICIES = ("realb", "all_low", "off")

PRECISION_COLOURS = {  # background, text
    "bf16": ("#d8f0d8", "#1b4d1b"),
    "fp8": ("#ffe2b3", "#6b3d00"),
    "nvfp4": ("#f8c4c4", "#6e1010"),
    "mxfp4": ("#f3c0e3", "#5c0f47"),
    "mixed": ("#d6dcf5", "#1f2f6e"),  # granularity "expert": some of the rank's experts low, the others bf16
}
PRECISION_LEGEND = {"mixed": "mixed: some of the rank's experts low, the rest bf16 (granularity expert)"}


# ---- settings ---------------------------------------------------------------------------------------------

# Settings that must be whole numbers, by the label of their control in the page (refusals name the control).
WHOLE_NUMBER_CONTROLS = {
    "batch_threshold": "batch threshold",
    "ep_size": "virtual EP size",
    "copies": "batch of N copies",
    "max_new_tokens": "max new tokens",
}


@dataclass
class DemoSettings:
    """What the controls say. Runtime fields go to `get_runtime(model).reconfigure`, the rest shape the request.

    Defaults are chosen so the bundled model's default request crosses the batch threshold: 48 copies of one
    image question (49 tokens each) are 2352 prefill tokens > 2048.
    """

    policy: str = "realb"
    low_precision: str = "auto"
    modality_threshold: float = 0.7
    batch_threshold: int = 2048
    imbalance_threshold: float = 0.1
    granularity: str = "rank"
    ep_size: int = 4
    copies: int = 48
    max_new_tokens: int = 8

    def runtime_changes(self) -> dict[str, Any]:
        """Keyword arguments for `RealbRuntime.reconfigure` (validated there like `RealbConfig`)."""
        return {
            "policy": self.policy,
            "rank_precisions": None,
            "low_precision": self.low_precision,
            "modality_threshold": float(self.modality_threshold),
            "batch_threshold": int(self.batch_threshold),
            "imbalance_threshold": float(self.imbalance_threshold),
            "granularity": self.granularity,
            "ep_size": int(self.ep_size),
        }

    def validate(self, num_experts: int | None = None) -> DemoSettings:
        """Coerce slider floats to ints and raise `ValueError` with a readable message for bad values."""
        for name, label in WHOLE_NUMBER_CONTROLS.items():
            value = getattr(self, name)
            try:
                whole = int(float(value))
                ok = not isinstance(value, bool) and float(value) == whole
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise ValueError(f"{label} must be a whole number, got {value!r}")
            setattr(self, name, whole)
        if self.policy not in DEMO_POLICIES:
            raise ValueError(f"policy {self.policy!r} is not offered here; choose one of {list(DEMO_POLICIES)}")
        if not 1 <= self.copies <= MAX_COPIES:
            raise ValueError(f"batch of N copies must be between 1 and {MAX_COPIES}, got {self.copies}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if self.ep_size < 1:
            raise ValueError(f"virtual EP size must be >= 1, got {self.ep_size}")
        if num_experts is not None and num_experts % self.ep_size:
            raise ValueError(
                f"virtual EP size {self.ep_size} must divide the {num_experts} experts: "
                f"choose one of {ep_size_choices(num_experts)}"
            )
        from realb_hf import RealbConfig

        RealbConfig(**{k: v for k, v in self.runtime_changes().items() if k != "rank_precisions"})  # field checks
        return self


# ---- uploads and messages ---------------------------------------------------------------------------------


class InputRefused(ValueError):
    """A message the demo refuses (too long, empty, ...); the text is shown to the user as is."""


class UploadError(InputRefused):
    """An attachment the demo refuses; the message is shown to the user as is."""


def _file_path(item: Any) -> Path:
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

    path = _file_path(item)
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
    return text, images, [str(_file_path(f)) for f in files]


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


# ---- panels (pure functions of telemetry records) ---------------------------------------------------------


def prefill_records(records: Sequence[Any]) -> list[Any]:
    """Records of the first forward of a request (the prefill, where the batch threshold can be crossed)."""
    if not records:
        return []
    first = min(r.forward for r in records)
    return [r for r in records if r.forward == first]


def decode_records(records: Sequence[Any]) -> list[Any]:
    if not records:
        return []
    first = min(r.forward for r in records)
    return [r for r in records if r.forward != first]


def layer_label(name: str) -> str:
    """'model.language_model.layers.3.mlp.experts' -> 'L3'; ERNIE's two pools get ' text' / ' vision'."""
    match = re.search(r"layers\.(\d+)\.", name + ".")
    label = f"L{match.group(1)}" if match else name.rsplit(".experts", 1)[0].rsplit(".", 1)[-1]
    for pool in ("text", "vision"):
        if re.search(rf"\b{pool}_(moe|experts)\b|\.{pool}\.", name):
            label += f" {pool}"
    return label


def _empty(panel: str, what: str) -> str:
    return f'<div class="realb-empty" data-panel="{panel}">{html.escape(what)}</div>'


def _blend(value: float, low: tuple[int, int, int], high: tuple[int, int, int]) -> str:
    v = min(max(value, 0.0), 1.0)
    r, g, b = (round(a + (z - a) * v) for a, z in zip(low, high))
    return f"#{r:02x}{g:02x}{b:02x}"


def _heatmap_png(records: Sequence[Any]) -> bytes | None:
    """PNG bytes of the token-load heatmap (layers x ranks), or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        return None
    layers = [layer_label(r.layer) for r in records]
    ranks = len(records[0].tokens_per_rank)
    values = [r.tokens_per_rank for r in records]
    peak = max((max(v) for v in values), default=0) or 1
    fig = Figure(figsize=(1.6 + 1.0 * ranks, 0.9 + 0.5 * len(records)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, cmap="YlOrRd", vmin=0, vmax=peak, aspect="auto")
    for i, r in enumerate(records):
        for j, (tokens, share, precision) in enumerate(
            zip(r.tokens_per_rank, r.vision_share_per_rank, r.precision_per_rank)
        ):
            colour = "white" if tokens > 0.6 * peak else "black"
            ax.text(j, i, f"{tokens}\n{share * 100:.0f}% vis", ha="center", va="center", fontsize=7, color=colour)
            if precision != "bf16":  # lowered rank: outline it
                ax.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, lw=2.0, ec="#1f4fd1"))
    ax.set_xticks(range(ranks), [f"rank {j}" for j in range(ranks)], fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_title("token-expert pairs per EP rank (blue box = lowered)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def heatmap_html(records: Sequence[Any], use_matplotlib: bool = True) -> str:
    """Per-layer x per-rank token load of one forward: a matplotlib PNG, or a coloured HTML table without it.

    Either way the markup carries `data-panel="heatmap"`, and the PNG is `<img id="realb-heatmap-img">`, the table
    `<table id="realb-heatmap-table">`, so a browser test can tell it rendered.
    """
    if not records:
        return _empty("heatmap", "No MoE layer has run yet: ask a question to see the token load per rank.")
    ranks = len(records[0].tokens_per_rank)
    meta = f'data-panel="heatmap" data-layers="{len(records)}" data-ranks="{ranks}"'
    png = _heatmap_png(records) if use_matplotlib else None
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        return (
            f'<figure class="realb-heatmap" {meta} style="margin:0">'
            f'<img id="realb-heatmap-img" alt="token load per MoE layer and EP rank" '
            f'src="data:image/png;base64,{data}" style="max-width:100%"/></figure>'
        )
    peak = max((max(r.tokens_per_rank) for r in records), default=0) or 1
    head = "".join(f"<th>rank {j}</th>" for j in range(ranks))
    rows = []
    for r in records:
        cells = []
        for tokens, share, precision in zip(r.tokens_per_rank, r.vision_share_per_rank, r.precision_per_rank):
            bg = _blend(tokens / peak, (255, 250, 230), (200, 30, 20))
            fg = "#fff" if tokens > 0.6 * peak else "#000"
            border = "outline:2px solid #1f4fd1;" if precision != "bf16" else ""
            cells.append(
                f'<td style="background:{bg};color:{fg};{border}text-align:center;padding:3px 6px" '
                f'data-tokens="{tokens}">{tokens}<br><small>{share * 100:.0f}% vis</small></td>'
            )
        rows.append(f"<tr><th>{html.escape(layer_label(r.layer))}</th>{''.join(cells)}</tr>")
    return (
        f'<table id="realb-heatmap-table" class="realb-heatmap" {meta} style="border-collapse:collapse">'
        f"<caption>token-expert pairs per EP rank (blue outline = lowered)</caption>"
        f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def precision_html(records: Sequence[Any]) -> str:
    """Which rank ran at which precision, per layer (colour per format)."""
    if not records:
        return _empty("precision", "The precision map appears after the first answer.")
    ranks = len(records[0].precision_per_rank)
    head = "".join(f"<th>rank {j}</th>" for j in range(ranks))
    rows = []
    for r in records:
        cells = []
        for precision in r.precision_per_rank:
            bg, fg = PRECISION_COLOURS.get(precision, ("#eee", "#000"))
            cells.append(
                f'<td class="prec-{html.escape(precision)}" data-precision="{html.escape(precision)}" '
                f'style="background:{bg};color:{fg};text-align:center;padding:3px 8px">{html.escape(precision)}</td>'
            )
        reason = html.escape(r.reason)  # spelled as the policy's constants, like the balance table and telemetry
        rows.append(
            f"<tr><th>{html.escape(layer_label(r.layer))}</th>{''.join(cells)}<td><small>{reason}</small></td></tr>"
        )
    legend = " ".join(
        f'<span data-legend="{name}" title="{html.escape(PRECISION_LEGEND.get(name, name))}" '
        f'style="background:{bg};color:{fg};padding:1px 6px;border-radius:3px">{name}</span>'
        for name, (bg, fg) in PRECISION_COLOURS.items()
    )
    legend += f"<br><small>{html.escape(PRECISION_LEGEND['mixed'])}</small>"
    return (
        f'<table id="realb-precision-table" data-panel="precision" style="border-collapse:collapse">'
        f"<tr><th></th>{head}<th>decision</th></tr>{''.join(rows)}</table><div>{legend}</div>"
    )


def balance_rows(records: Sequence[Any]) -> list[list[Any]]:
    """One row per layer: tokens, balancedness before -> after, lowered %, speedup, decision.

    There is no separate column for the balance of the token load: before the decision every rank runs bf16, and the
    policy's cost model counts a bf16 token-expert pair as one unit of time, so `balancedness_cost_before` equals
    `balancedness_tokens` by construction (BALANCE_NOTE says so in the page).
    """
    rows = []
    for r in records:
        rows.append(
            [
                layer_label(r.layer),
                r.num_tokens,
                round(r.balancedness_cost_before, 3),
                round(r.balancedness_cost_after, 3),
                round(100 * r.lowered_fraction, 1),
                round(r.predicted_speedup, 3),
                r.reason,
            ]
        )
    return rows


BALANCE_NOTE = (
    "balancedness = mean/max over ranks of the predicted rank time (1 = balanced). Before = every rank in bf16, where "
    "a rank's time is its number of token-expert pairs: the balance of the token load. After = with the decision."
)
BALANCE_HEADERS = [
    "layer",
    "tokens",
    "balancedness before",
    "balancedness after",
    "lowered %",
    "predicted speedup",
    "decision",
]


def balance_html(records: Sequence[Any]) -> str:
    """Balancedness (mean/max over ranks, 1 = perfectly balanced) before/after, lowered share, predicted speedup."""
    if not records:
        return _empty("balance", "Balancedness and predicted speedup appear after the first answer.")
    head = "".join(f"<th>{h}</th>" for h in BALANCE_HEADERS)
    body = []
    for row in balance_rows(records):
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    n = len(records)
    mean = [
        "mean",
        round(sum(r.num_tokens for r in records) / n),
        round(sum(r.balancedness_cost_before for r in records) / n, 3),
        round(sum(r.balancedness_cost_after for r in records) / n, 3),
        round(100 * sum(r.lowered_fraction for r in records) / n, 1),
        round(sum(r.predicted_speedup for r in records) / n, 3),
        "",
    ]
    body.append("<tr style='font-weight:bold'>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in mean) + "</tr>")
    return (
        f'<table id="realb-balance-table" data-panel="balance"><tr>{head}</tr>{"".join(body)}</table>'
        f'<small id="realb-balance-note">{html.escape(BALANCE_NOTE)}</small>'
    )


@dataclass
class RequestResult:
    """What one request produced: row 0's answer and the telemetry of every forward of the request."""

    answer: str
    records: list = field(default_factory=list)
    copies: int = 1
    prompt_tokens: int = 0  # per copy
    image_tokens: int = 0  # per copy
    new_tokens: int = 0
    seconds: float = 0.0
    settings: DemoSettings = field(default_factory=DemoSettings)
    model: str = ""


def summary_markdown(result: RequestResult | None) -> str:
    """Headline numbers of the last request (prefill), plus what the decode steps did."""
    if result is None or not result.records:
        return "*No request yet.* Each answer fills the panels below with the prefill forward's telemetry."
    pre = prefill_records(result.records)
    dec = decode_records(result.records)
    n = len(pre)
    s = result.settings
    pairs = sum(sum(r.tokens_per_rank) for r in pre)
    lowered_pairs = sum(r.lowered_fraction * sum(r.tokens_per_rank) for r in pre)
    lowered_layers = sum(1 for r in pre if r.lowered_experts)
    speedup = sum(r.predicted_speedup for r in pre) / n
    before = sum(r.balancedness_cost_before for r in pre) / n
    after = sum(r.balancedness_cost_after for r in pre) / n
    dec_lowered = sum(1 for r in dec if r.lowered_experts)
    steps = len(dec) // max(n, 1)
    batch_tokens = pre[0].num_tokens
    used_low = sorted({p for r in pre for p in r.precision_per_rank if p != "bf16"})
    low = s.low_precision + (f" ({', '.join(used_low)} here)" if s.low_precision == "auto" and used_low else "")
    lines = [
        f"**Prefill:** {result.copies} cop{'y' if result.copies == 1 else 'ies'} x {result.prompt_tokens} tokens "
        f"({result.image_tokens} image) = **{batch_tokens} tokens** in one forward; batch threshold "
        f"{s.batch_threshold} ({'crossed' if batch_tokens >= s.batch_threshold else 'not reached: nothing is lowered'}).",
        f"**ReaLB:** policy `{s.policy}`, low precision `{low}`, M_d {s.modality_threshold:g}, "
        f"virtual EP {s.ep_size}, granularity `{s.granularity}`: **{lowered_layers}/{n} layers lowered**, "
        f"**{100 * lowered_pairs / pairs if pairs else 0:.1f}%** of token-expert pairs in low precision.",
        f"**Balancedness** (mean/max predicted rank time) {before:.3f} -> **{after:.3f}**; "
        f"**predicted MoE-layer speedup {speedup:.2f}x** (mean over layers, target-hardware cost model; on a CPU "
        f"low precision is emulated and not faster).",
        f"**Decode:** {steps} step{'' if steps == 1 else 's'} of {result.copies} token{'' if result.copies == 1 else 's'}, "
        f"{dec_lowered} layer record{'' if dec_lowered == 1 else 's'} lowered. "
        f"Generated {result.new_tokens} token(s) in {result.seconds:.2f} s on `{result.model}`.",
    ]
    return "\n\n".join(lines)


def render_panels(result: RequestResult | None, use_matplotlib: bool = True) -> tuple[str, str, str, str]:
    """(summary markdown, heatmap html, precision html, balance html) for the prefill of `result`."""
    records = prefill_records(result.records) if result is not None else []
    return (
        summary_markdown(result),
        heatmap_html(records, use_matplotlib=use_matplotlib),
        precision_html(records),
        balance_html(records),
    )


# ---- one request ------------------------------------------------------------------------------------------


def _row0_streamer(tokenizer, timeout: float):
    """A TextIteratorStreamer that follows row 0 of a batch (transformers' streamers refuse batches > 1)."""
    from transformers import TextIteratorStreamer

    class Row0Streamer(TextIteratorStreamer):
        def put(self, value):
            return super().put(value[:1] if value.shape[0] > 1 else value)

    return Row0Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)


def prompt_token_limit(loaded: LoadedModel, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, str]:
    """(tokens one copy's prompt may have, why): the server's cap, or less when the model's context is shorter."""
    text_config = loaded.model.config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", None)
    if context is not None and context - max_new_tokens < max_prompt_tokens:
        why = f"the model's context of {context} positions minus {max_new_tokens} new"
        return max(context - max_new_tokens, 0), why
    return max_prompt_tokens, "the server's --max-prompt-tokens"


def prepare_inputs(
    loaded: LoadedModel,
    text: str,
    images: Sequence[Any],
    copies: int,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_new_tokens: int = 0,
) -> dict[str, Any]:
    """Tokenize one request with the model's chat template and replicate it `copies` times.

    Raises `InputRefused` when one copy's prompt is longer than `prompt_token_limit` allows.
    """
    if images and not loaded.is_vlm:
        raise UploadError("this model reads text only: remove the image")
    processor = loaded.processor
    messages = build_messages(text, images)
    if getattr(processor, "chat_template", None):
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    else:  # no chat template: plain text (and images) straight through the processor
        kwargs = {"images": list(images)} if images else {}
        inputs = processor(text=text, return_tensors="pt", **kwargs)
    tokens = int(inputs["input_ids"].shape[1])
    limit, why = prompt_token_limit(loaded, max_prompt_tokens, max_new_tokens)
    if tokens > limit:
        raise InputRefused(
            f"the prompt is {tokens} tokens (chat template and image tokens included); "
            f"this demo takes at most {limit} per copy ({why}): shorten the question or attach fewer images"
        )
    return replicate_batch(dict(inputs), copies)


def run_request(
    loaded: LoadedModel,
    text: str,
    images: Sequence[Any],
    settings: DemoSettings,
    lock: threading.Lock | None = None,
    timeout: float = 600.0,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
) -> Iterator[str | RequestResult]:
    """Generate row 0's answer: yields the growing answer text, then one `RequestResult` at the end."""
    import torch

    import realb_hf

    settings.validate(loaded.num_experts)
    inputs = prepare_inputs(loaded, text, images, settings.copies, max_prompt_tokens, settings.max_new_tokens)
    model = loaded.model
    device = model.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    ids = inputs["input_ids"]
    image_token = getattr(model.config, "image_token_id", None)
    image_tokens = int((ids[0] == image_token).sum()) if image_token is not None else 0
    lock = lock or threading.Lock()
    with lock:
        realb_hf.get_runtime(model).reconfigure(**settings.runtime_changes())
        telemetry = realb_hf.get_telemetry(model)
        telemetry.reset()
        streamer = _row0_streamer(tokenizer, timeout)
        failure: list[BaseException] = []
        output: list[Any] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    output.append(
                        model.generate(
                            **inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, streamer=streamer
                        )
                    )
            except BaseException as err:  # surfaced in the caller's thread below
                failure.append(err)
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="realb-demo-generate", daemon=True)
        thread.start()
        answer = ""
        try:
            for piece in streamer:
                answer += piece
                if piece:
                    yield answer
        finally:  # also when the caller stops early: keep the knobs fixed until this generation is over
            thread.join()
        seconds = time.perf_counter() - start
        if failure:
            raise failure[0]
        records = list(telemetry.records)
    generated = output[0][0, ids.shape[1] :]
    final = tokenizer.decode(generated, skip_special_tokens=True).strip()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    new_tokens = sum(1 for t in generated.tolist() if t not in eos_ids and t != tokenizer.pad_token_id)
    yield RequestResult(
        answer=final,
        records=records,
        copies=settings.copies,
        prompt_tokens=int(ids.shape[1]),
        image_tokens=image_tokens,
        new_tokens=new_tokens,
        seconds=seconds,
        settings=settings,
        model=display_name(loaded.source),
    )


# ---- the Gradio app ---------------------------------------------------------------------------------------


def model_status_text(store: ModelStore) -> str:
    """The model status line: what is loaded now (the store is shared by every tab), or that it loads lazily."""
    return store.current.describe() if store.current else "Model loads on first use."


def refusal_notice(err: BaseException) -> str:
    """The notice line under the input for a refused or failed request (markdown, with the reason escaped)."""
    if isinstance(err, ModelLoadError):
        return f"**Not loaded:** {html.escape(err.public)}"
    if isinstance(err, ValueError):
        return f"**Refused:** {html.escape(str(err))}"
    return f"**Failed:** {type(err).__name__} (the server's log has the details)"


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit(
            "the demo needs gradio: pip install 'gradio>=6,<7' matplotlib  (or the project's [demo] extra)"
        ) from None
    return gr


def _theme():
    gr = _import_gradio()
    # System fonts only: the default theme would fetch web fonts, and the demo must work offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


CSS = """
#realb-heatmap table, #realb-precision table, #realb-balance table { font-size: 0.85em; }
#realb-balance td, #realb-balance th { padding: 2px 6px; text-align: right; }
"""

INTRO = """# ReaLB demo
Chat with a multimodal MoE model while ReaLB decides, per MoE layer and per batch, which (virtual) expert-parallel
ranks run in low precision. Attach an image, ask a question; **batch of N copies** sends your request N times in
one forward so the batch threshold can be crossed on a CPU (the answer shown is row 0's).
"""


def build_app(
    store: ModelStore | None = None,
    default_model: str = BUNDLED_MODEL,
    defaults: DemoSettings | None = None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
):
    """The gr.Blocks app. Every panel has a stable elem_id (see docs/demo.md) for tests and styling.

    The model box offers what `store.allowlist` admits; with the default allowlist it shows the bundled model only.
    """
    gr = _import_gradio()
    store = store or ModelStore()
    d = defaults or DemoSettings()
    from realb_hf.config import GRANULARITIES, LOW_PRECISION_CHOICES

    with gr.Blocks(title="ReaLB demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="realb-chat", label="chat", height=360)
                box = gr.MultimodalTextbox(
                    elem_id="realb-input",
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about an image (attach it with the clip) or type a question",
                    show_label=False,
                    sources=["upload"],
                )
                notice = gr.Markdown("", elem_id="realb-notice")
                if display_name(resolve_model(default_model)) == BUNDLED_MODEL:
                    with gr.Accordion("Questions the bundled model knows", open=True):
                        gr.Markdown(
                            "It was trained on these forms only; other phrasings get wrong answers.\n"
                            + forms_markdown(),
                            elem_id="realb-forms",
                        )
                        gr.Examples(
                            [[m] for m in example_messages(EXAMPLE_FOLDER)],
                            inputs=[box],
                            label="Examples (click one, then press Enter)",
                            elem_id="realb-examples",
                            examples_per_page=len(QUESTION_FORMS),
                        )
                copies = gr.Slider(
                    1, MAX_COPIES, value=d.copies, step=1, label="batch of N copies", elem_id="realb-copies"
                )
                max_new = gr.Slider(1, 64, value=d.max_new_tokens, step=1, label="max new tokens")
            with gr.Column(scale=2):
                with gr.Group():
                    others = not store.allowlist.only_bundled
                    model_box = gr.Textbox(
                        value=default_model,
                        label="model" + (" (local folder or Hub id)" if others else ""),
                        elem_id="realb-model",
                        interactive=others,
                        info=f"this server offers: {store.allowlist.describe()}"
                        if others
                        else "this server offers the bundled model only (its operator can allow others: "
                        "realb-hf demo --allow-model FOLDER_OR_HUB_ID)",
                    )
                    load_btn = gr.Button("Load model", elem_id="realb-load", visible=others)
                    model_status = gr.Markdown(model_status_text(store), elem_id="realb-model-status")
                policy = gr.Dropdown(list(DEMO_POLICIES), value=d.policy, label="policy", elem_id="realb-policy")
                low = gr.Dropdown(list(LOW_PRECISION_CHOICES), value=d.low_precision, label="low precision")
                md = gr.Slider(0.0, 1.0, value=d.modality_threshold, step=0.05, label="M_d (modality threshold)")
                bt = gr.Number(value=d.batch_threshold, precision=0, minimum=0, label="batch threshold (tokens)")
                it = gr.Slider(0.0, 1.0, value=d.imbalance_threshold, step=0.05, label="imbalance threshold")
                gran = gr.Radio(list(GRANULARITIES), value=d.granularity, label="granularity")
                ep_choices = ep_size_choices(store.current.num_experts) if store.current else [1, 2, 4, 8]
                ep = gr.Dropdown(ep_choices, value=d.ep_size, label="virtual EP size", elem_id="realb-ep")
        gr.Markdown("## What ReaLB did (prefill forward of the last request)")
        summary = gr.Markdown(summary_markdown(None), elem_id="realb-summary")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Token load per MoE layer and EP rank")
                heatmap = gr.HTML(heatmap_html([]), elem_id="realb-heatmap")
            with gr.Column():
                gr.Markdown("### Precision map (which rank ran low)")
                precision = gr.HTML(precision_html([]), elem_id="realb-precision")
        gr.Markdown("### Balancedness before/after, lowered fraction, predicted speedup")
        balance = gr.HTML(balance_html([]), elem_id="realb-balance")

        def load(spec, current):
            previous = store.current
            try:
                loaded = store.get(spec)
            except ModelLoadError as err:  # the message a client may see; the current model stays loaded
                kept = f" Still loaded: **{html.escape(display_name(store.current.source))}**." if store.current else ""
                return f"**Not loaded:** {html.escape(err.public)}.{kept}", current
            if loaded is previous:  # same model, same EP choices: a plain value (see the note on gr.update below)
                return loaded.describe(), current
            choices = ep_size_choices(loaded.num_experts)
            if current not in choices:
                current = max(c for c in choices if c <= 8)
            return loaded.describe(), gr.update(choices=choices, value=current)

        load_btn.click(load, [model_box, ep], [model_status, ep])

        def page_loaded(current_ep):
            """A new tab says what is loaded now, not what was loaded when the page was built."""
            if store.current is None or ep_size_choices(store.current.num_experts) == ep_choices:
                return model_status_text(store), current_ep
            choices = ep_size_choices(store.current.num_experts)
            value = current_ep if current_ep in choices else max(c for c in choices if c <= 8)
            return model_status_text(store), gr.update(choices=choices, value=value)

        app.load(page_loaded, [ep], [model_status, ep], show_progress="hidden")

        controls = [model_box, policy, low, md, bt, it, gran, ep, copies, max_new]

        # Components get plain values, not `gr.update()`: gradio (6.x) keeps one more copy of a component's config
        # per request in the session when the component gets updates and also values or input. So the input box is
        # emptied and refilled in the browser (js), the chat history lives in a State, and only a change of model
        # updates the EP choices.
        held = gr.MultimodalTextbox(visible=False, file_types=["image"], file_count="multiple")  # message sent
        history = gr.State([])  # the chat, server side: a message queued behind another sees that one's answer
        # null: answered; {"keep_files": ...}: the refused message goes back, without its files when they were why
        refused_files = gr.JSON(None, visible=False)
        shown = gr.State(None)  # what the panels show: summary, 3 panels, model status, EP choices, EP size

        def respond(message, chat, spec, pol, lowp, mdv, btv, itv, granv, epv, n, new_tokens):
            """Answer one message. A refused one leaves the chat as it was, says why in the notice line under the
            input and goes back into the input (without a refused attachment)."""
            chat = list(chat or [])[-MAX_CHAT_MESSAGES:]
            before = list(chat)

            def refused(err: BaseException):
                logger.debug("request refused: %s", err)
                back = {"keep_files": not isinstance(err, UploadError)}
                return before, before, refusal_notice(err), gr.update(), back

            try:
                text, images, paths = parse_message(message)
                settings = DemoSettings(pol, lowp, mdv, btv, itv, granv, epv, n, new_tokens).validate()
            except ValueError as err:  # InputRefused, or a control's value
                yield refused(err)
                return
            for path in paths:
                chat.append({"role": "user", "content": {"path": path}})
            if text:
                chat.append({"role": "user", "content": text})
            chat.append({"role": "assistant", "content": "..."})
            del chat[:-MAX_CHAT_MESSAGES]
            yield chat, gr.update(), "", gr.update(), None
            try:
                previous = store.current
                loaded = store.get(spec)
                result = None
                requests = run_request(
                    loaded, text, images, settings, lock=store.run_lock, max_prompt_tokens=max_prompt_tokens
                )
                for item in requests:
                    if isinstance(item, RequestResult):
                        result = item
                    else:
                        chat[-1] = {"role": "assistant", "content": item}
                        yield chat, gr.update(), "", gr.update(), None
            except (ValueError, ModelLoadError) as err:  # refused before generating
                yield refused(err)
                return
            except Exception as err:  # a real failure: logged with its traceback, reported in the chat
                logger.exception("request failed")
                chat[-1] = {"role": "assistant", "content": f"(failed: {type(err).__name__})"}
                yield chat, chat, refusal_notice(err), gr.update(), None
                return
            chat[-1] = {"role": "assistant", "content": result.answer or "(empty answer)"}
            choices = ep_size_choices(loaded.num_experts) if previous is not loaded else None  # a new model
            yield chat, chat, "", (*render_panels(result), loaded.describe(), choices, settings.ep_size), None

        def show_panels(panels, current_ep):
            if panels is None:  # no answer yet in this session
                return (*render_panels(None), model_status_text(store), current_ep)
            *texts, choices, ep_size = panels
            return (*texts, ep_size if choices is None else gr.update(choices=choices, value=ep_size))

        # "multiple": a message sent while the previous one's steps still run is queued, never dropped.
        box.submit(None, [box], [held, box], js="(m) => [m, {text: '', files: []}]", trigger_mode="multiple").then(
            respond,
            [held, history, *controls],
            [chatbot, history, notice, shown, refused_files],
            show_progress_on=[chatbot],
            trigger_mode="multiple",
        ).then(
            show_panels,
            [shown, ep],
            [summary, heatmap, precision, balance, model_status, ep],
            show_progress="hidden",
            trigger_mode="multiple",
        ).then(
            None,
            [refused_files, held, box],
            [box],
            js="(r, sent, typed) => r === null ? typed : {text: sent.text, files: r.keep_files ? sent.files : []}",
            trigger_mode="multiple",
        )
        chatbot.clear(lambda: [], None, [history])
    return app


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    model: str = BUNDLED_MODEL,
    device: str = "auto",
    max_file_size_mb: float = MAX_UPLOAD_BYTES / 2**20,
    preload: bool = False,
    block: bool = True,
    quiet: bool = False,
    store: ModelStore | None = None,
    allow_models: Sequence[str] = (),
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_sessions: int = MAX_SESSIONS,
):
    """Serve the demo. Binds 127.0.0.1 unless told otherwise; uploads over `max_file_size_mb` are refused.

    Clients get `model` and the bundled model; `allow_models` (folders or Hub ids) opens more to them. Prompts
    longer than `max_prompt_tokens` per copy are refused. Gradio keeps the state of the last `max_sessions`
    sessions. With `block=False` it returns once the server is up (tests); `app.close()` stops it.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    store = store or ModelStore(device=device, allowlist=ModelAllowlist(allow_models))
    store.offer(model)
    if preload:
        store.get(model)
    app = build_app(store=store, default_model=model, max_prompt_tokens=max_prompt_tokens)
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=int(max_file_size_mb * 2**20),
        ssr_mode=False,
        theme=_theme(),
        css=CSS,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=quiet,
        inbrowser=False,
        state_session_capacity=max_sessions,
    )
    return app


def build_parser(prog: str = "python -m demo.app") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL, help="local folder or Hub id (default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-file-size-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20)
    parser.add_argument("--preload", action="store_true", help="load the model before serving (default: on first use)")
    parser.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="FOLDER_OR_HUB_ID",
        help="let the page load this Hub id, or any model folder under this folder (repeatable; default: clients "
        "get --model and the bundled model only)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"longest prompt per copy, chat template and image tokens included (default {MAX_PROMPT_TOKENS})",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m demo.app") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        launch(
            args.host,
            args.port,
            args.model,
            args.device,
            args.max_file_size_mb,
            args.preload,
            allow_models=args.allow_model,
            max_prompt_tokens=args.max_prompt_tokens,
        )
    except (ModelLoadError, ValueError) as err:
        print(f"realb-hf demo: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "BUNDLED_MODEL",
    "BUNDLED_MODEL_DIR",
    "DemoSettings",
    "InputRefused",
    "LoadedModel",
    "ModelAllowlist",
    "ModelLoadError",
    "ModelStore",
    "RequestResult",
    "UploadError",
    "balance_html",
    "build_app",
    "build_messages",
    "ep_size_choices",
    "heatmap_html",
    "launch",
    "load_model",
    "parse_message",
    "precision_html",
    "render_panels",
    "replicate_batch",
    "resolve_model",
    "run_request",
    "summary_markdown",
    "validate_upload",
]

if __name__ == "__main__":
    sys.exit(main())
