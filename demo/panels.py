"""The panels under the chat, as pure functions of a request's telemetry records: which (virtual) EP rank carried
how many token-expert pairs, the precision each rank ran at, and the balance before and after the decision."""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .settings import DemoSettings

PRECISION_COLOURS = {  # background, text
    "bf16": ("#d8f0d8", "#1b4d1b"),
    "fp8": ("#ffe2b3", "#6b3d00"),
    "nvfp4": ("#f8c4c4", "#6e1010"),
    "mxfp4": ("#f3c0e3", "#5c0f47"),
    "mixed": ("#d6dcf5", "#1f2f6e"),  # granularity "expert": some of the rank's experts low, the others bf16
}
PRECISION_LEGEND = {"mixed": "mixed: some of the rank's experts low, the rest bf16 (granularity expert)"}


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


__all__ = [
    "BALANCE_HEADERS",
    "BALANCE_NOTE",
    "PRECISION_COLOURS",
    "PRECISION_LEGEND",
    "RequestResult",
    "balance_html",
    "balance_rows",
    "decode_records",
    "heatmap_html",
    "layer_label",
    "precision_html",
    "prefill_records",
    "render_panels",
    "summary_markdown",
]
