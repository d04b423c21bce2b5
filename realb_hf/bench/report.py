"""Benchmark results -> environment record, markdown tables, JSON/markdown/plot files."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device | str, argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a result was produced: GPU name, versions, date, the exact command line."""
    import transformers

    from .. import __version__

    device = torch.device(device)
    env: dict[str, Any] = {
        "device": str(device),
        "gpu": None,
        "gpu_capability": None,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "realb_hf": __version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = None
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


SAME_MODE = (
    "Ratios compare like with like: an eager row against eager stock, a compiled row (torch.compile of stock and "
    "of ReaLB, each on its own) against compiled stock of its mode. 'vs ReaLB nothing lowered' is against ReaLB's "
    "own bf16 pipeline of the same mode (realb_nothing_lowered): the precision lever's own gain, where 'vs stock' "
    "is the total gain."
)


def _header(result: dict[str, Any], title: str, notes: list[str]) -> list[str]:
    """Title, machine line, command and notes of a markdown report (CPU runs flagged as smoke tests)."""
    env = result.get("env", {})
    lines = [
        title,
        "",
        f"{env.get('gpu') or env.get('cpu', '?')} | torch {env.get('torch')} | transformers {env.get('transformers')} "
        f"| {env.get('date')}",
        "",
        f"Command: `{env.get('command', '')}`",
        "",
    ]
    for note in notes:
        lines += [note, ""]
    if result.get("device", "").startswith("cpu"):
        lines += ["**CPU run: timings are a smoke test only, not performance numbers.**", ""]
    return lines


def layer_markdown(result: dict[str, Any]) -> str:
    preset = result["preset"]
    lines = _header(
        result,
        f"# Layer benchmark: {preset['name']} (hidden {preset['hidden']}, moe_intermediate {preset['intermediate']}, "
        f"{preset['num_experts']} experts, top-{preset['top_k']})",
        [
            f"**Latency model.** {result['latency_model']}",
            f"**A ReaLB rank's call.** {result.get('realb_rank_call', '')}",
        ],
    )
    for wl in result["workloads"]:
        w = wl["workload"]
        lines.append(
            f"## {wl['label']}: {w['tokens']} tokens, vision share {w['vision_share']:.2f}, source {w['source']}"
            + (f", concentration {wl['concentration']:.4f}" if wl.get("concentration") is not None else "")
        )
        lines.append("")
        lines.append(
            "| EP | max/mean load | mode | variant | layer ms (max over ranks) | vs stock | vs ReaLB nothing lowered "
            "| per-rank ms | rank precision | lowered pairs | predicted | peak MB/rank | cache MB/rank |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for ep in wl["eps"]:
            for name, v in ep["variants"].items():
                if v.get("error"):
                    lines.append(
                        f"| {ep['ep']} | {ep['max_over_mean']:.2f} | {v['mode']} | {name} | failed: {v['error']} "
                        "| - | - | - | - | - | - | - | - |"
                    )
                    continue
                ranks = " / ".join(_ms(r["ms"]) for r in v["ranks"]) if name != "oracle_bf16" else "balanced"
                precision = " ".join(v["rank_precision"])
                predicted = f"{v['predicted_speedup']:.2f}x" if v.get("predicted_speedup") else "-"
                lines.append(
                    f"| {ep['ep']} | {ep['max_over_mean']:.2f} | {v.get('mode', 'eager')} | {name} | "
                    f"{v['layer_ms']:.3f} | {_x(v['speedup_vs_stock'])} | {_x(v.get('speedup_vs_nothing_lowered'))} "
                    f"| {ranks} | {precision} | {v['lowered_fraction'] * 100:.1f}% | "
                    f"{predicted} | {_mb(v['peak_mem_bytes'])} | {_mb(v['cache_bytes_per_rank'])} |"
                )
        lines.append("")
    lines.append(SAME_MODE)
    lines.append(
        "vs stock = stock layer latency / variant layer latency. predicted = ReaLB's cost-model layer speedup "
        "(policy.low_cost_ratio). lowered pairs = share of token-expert pairs run in low precision. "
        "peak MB/rank = max over ranks of torch.cuda.max_memory_allocated above the level before the rank's calls."
    )
    return "\n".join(lines) + "\n"


def model_markdown(result: dict[str, Any]) -> str:
    cfg = result["model"]
    lines = _header(
        result,
        f"# Model prefill benchmark: {cfg['preset']} ({cfg['layers']} decoder layers, {cfg['num_experts']} experts, "
        f"top-{cfg['top_k']})",
        [f"**What this measures.** {result['measures']}", f"**Routing.** {result['routing']['description']}"],
    )
    b = result["batch"]
    lines.append(
        f"Batch: {b['requests']} requests x {b['request_tokens']} tokens = {b['tokens']} tokens, "
        f"vision share {b['vision_share']:.2f}; mean max/mean rank load at EP={result['routing']['ep']} over layers: "
        f"{result['routing'].get('mean_max_over_mean', float('nan')):.2f}"
    )
    lines.append("")
    lines.append(
        "| mode | variant | prefill ms | tokens/s | vs stock | vs ReaLB nothing lowered | lowered pairs "
        "| layers lowered | extra memory MB | note |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, v in result["variants"].items():
        mode = v.get("mode", "eager")
        if v.get("skipped") or v.get("error"):
            note = f"skipped: {v['skipped']}" if v.get("skipped") else f"failed: {v['error']}"
            lines.append(f"| {mode} | {name} | - | - | - | - | - | - | - | {note} |")
            continue
        lines.append(
            f"| {mode} | {name} | {v['ms']:.1f} | {v['tokens_per_s']:.0f} | {_x(v.get('speedup_vs_stock'))} | "
            f"{_x(v.get('speedup_vs_nothing_lowered'))} | {v.get('lowered_fraction', 0.0) * 100:.1f}% | "
            f"{v.get('layers_lowered', '-')} | {_mb(v.get('extra_memory_bytes'))} | {v.get('note', '')} |"
        )
    lines.append("")
    lines.append(SAME_MODE.replace("realb_nothing_lowered", "the realb_nothing_lowered variant"))
    lines.append("")
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any], out_dir: str | Path, stem: str, plot_png: bool = True) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and, with matplotlib and `plot_png`, `<stem>.png` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = layer_markdown(result) if result["kind"] == "layer" else model_markdown(result)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown)
    png = plot(result, out / f"{stem}.png") if plot_png else None
    if png is not None:
        paths["plot"] = png
    return paths


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Speedup vs stock per variant (bars) per EP size; one panel per workload. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot (pip install matplotlib to get one)")
        return None
    if result["kind"] == "layer":
        panels = result["workloads"]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, wl in zip(axes[0], panels):
            names = [n for n, v in wl["eps"][0]["variants"].items() if not v.get("error")]
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                xs = [j + i * width for j in range(len(wl["eps"]))]
                speedups = [ep["variants"].get(name, {}).get("speedup_vs_stock") or 0.0 for ep in wl["eps"]]
                ax.bar(xs, speedups, width, label=name)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(wl["eps"]))])
            ax.set_xticklabels([f"EP={ep['ep']}\n{ep['max_over_mean']:.2f}" for ep in wl["eps"]])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("layer speedup vs stock bf16")
            ax.set_title(wl["label"])
        axes[0][0].legend(fontsize=7)
    else:
        names = [n for n, v in result["variants"].items() if not v.get("skipped") and not v.get("error")]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(names, [result["variants"][n]["tokens_per_s"] for n in names])
        ax.set_ylabel("prefill tokens/s")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"{result.get('env', {}).get('gpu') or 'cpu'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["environment", "layer_markdown", "model_markdown", "plot", "save"]
