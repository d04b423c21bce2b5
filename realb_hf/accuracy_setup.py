"""What a `realb_hf.accuracy` run runs on and which rows it runs: the device, the machine and model facts the
report states, the task module's label, and the configuration rows (one per EP size for every ReaLB row)."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .bundled import CHECKOUT_DIR, demo_dir, demo_module
from .config import RealbConfig
from .formats import FORMATS, LOW_PRECISIONS, resolve_low_precision

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
FILE_MODULE_NAME = "realb_tasks_from_file"  # the name a task module loaded from a .py path is imported under


@dataclass(frozen=True)
class EvalConfig:
    """One row of the table: `realb` None means the stock model (no ReaLB); otherwise RealbConfig runtime fields."""

    name: str
    realb: dict[str, Any] | None


# ---- tasks -----------------------------------------------------------------------------------------------


def load_tasks(tasks: str | Path | None = None) -> ModuleType:
    """The task generator: `tasks` (a .py file or a module name) when given, else the bundled demo's tasks.

    Only code the caller named, or realb_hf's own demo, is ever imported: nothing is looked up next to a model.
    """
    if tasks is None:
        return demo_module("tasks")
    if str(tasks).endswith(".py"):
        return _module_from_file(Path(tasks))
    return importlib.import_module(str(tasks))


def _module_from_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(FILE_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---- device and machine -----------------------------------------------------------------------------------


def parse_device(value: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (cuda when a GPU is visible, else cpu) -> a device this machine has.

    ValueError names what was wrong and what is allowed: an unknown word, or a GPU this machine does not have.
    """
    text = str(value).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"device {value!r}: choose one of {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r}: no CUDA GPU is visible here; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def format_support(device: torch.device) -> dict[str, list[str]]:
    """The low formats with real kernels on `device` ("native") and those emulated there (each format decides)."""
    native = [f for f in LOW_PRECISIONS if FORMATS[f].is_native(device)]
    return {"native": native, "emulated": [f for f in LOW_PRECISIONS if f not in native]}


def describe_machine(device: torch.device) -> str:
    """What really ran: the GPU's name (or the CPU), torch, and which low formats are real kernels there."""
    support = format_support(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (CUDA capability {major}.{minor})"
    else:
        where = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    parts = [f"{where}, torch {torch.__version__}"]
    if support["native"]:
        parts.append(f"{'/'.join(support['native'])} real kernels")
    if support["emulated"]:
        parts.append(f"{'/'.join(support['emulated'])} emulated (quantize-dequantize, bf16 matmul)")
    return "; ".join(parts)


# ---- model and tasks ------------------------------------------------------------------------------------------


def model_facts(config: Any) -> dict[str, Any]:
    """Family, architecture and MoE shape from a model config (the text config of a VLM).

    MoE layers are those Qwen3-MoE-family decoders build with experts: not in `mlp_only_layers`, and every
    `decoder_sparse_step`-th layer (both default to "every layer")."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    dense = set(getattr(text, "mlp_only_layers", None) or ())
    step = getattr(text, "decoder_sparse_step", None) or 1
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "layers": layers,
        "moe_layers": sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0),
        "num_experts": experts,
        "top_k": text.num_experts_per_tok,
    }


def tasks_facts(module: ModuleType) -> dict[str, Any]:
    """How the report names the task module: its import name (when it has one), its path, and whether it is the
    bundled demo's (whose caveats are the demo's own)."""
    name = None if module.__name__ == FILE_MODULE_NAME else module.__name__
    if getattr(module, "__file__", None) is None:  # built in memory by a library user
        return {"module": name, "path": None, "bundled_demo": False}
    path = Path(module.__file__).resolve()
    try:
        bundled = path == (demo_dir() / "tasks.py").resolve()
    except ImportError:
        bundled = False
    try:
        shown = str(path.relative_to(CHECKOUT_DIR))
    except ValueError:
        shown = str(path)
    return {"module": name, "path": shown, "bundled_demo": bundled}


# ---- rows -------------------------------------------------------------------------------------------------------


def ep_sizes_of(ep_size: int | Sequence[int]) -> tuple[int, ...]:
    """One EP size or several -> a tuple of distinct positive ints, in the order given (ValueError otherwise)."""
    sizes = (ep_size,) if isinstance(ep_size, int) else tuple(ep_size)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not sizes or bad:
        raise ValueError(f"ep_size must be one or more positive integers, got {ep_size!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"ep_size {list(sizes)} repeats a size; give each once")
    return sizes


def default_configs(
    batch_threshold: int = 2048, ep_size: int | Sequence[int] = 4, device: torch.device | str = "cpu"
) -> list[EvalConfig]:
    """bf16, policy=off, then per EP size the ReaLB default and rank/expert x M_d 0/0.7/0.9 x fp8/nvfp4, then the
    X-everywhere baselines. Every ReaLB row pins `ep_size` and `batch_threshold`; the rows whose result does not
    depend on the EP size (policy=off, X everywhere) run once, at the first size. With several EP sizes the
    ReaLB rows' names say theirs."""
    sizes = ep_sizes_of(ep_size)
    device = torch.device(device)
    auto = resolve_low_precision("auto", device)
    rows = [
        EvalConfig("bf16 (stock, no ReaLB)", None),
        EvalConfig("ReaLB policy=off (plumbing check)", {"policy": "off", "ep_size": sizes[0]}),
    ]
    for ep in sizes:
        tag = f"ReaLB EP={ep}" if len(sizes) > 1 else "ReaLB"
        rows.append(
            EvalConfig(
                f"{tag} default config (auto = {auto} on {device.type})",
                {"batch_threshold": RealbConfig().batch_threshold, "ep_size": ep},
            )
        )
        for low in ("fp8", "nvfp4"):
            for granularity in ("rank", "expert"):
                for md in (0.0, 0.7, 0.9):
                    rows.append(
                        EvalConfig(
                            f"{tag} {granularity}, M_d={md}, low={low}",
                            {"low_precision": low, "granularity": granularity, "modality_threshold": md, "ep_size": ep},
                        )
                    )
    for low in ("fp8", "nvfp4", "mxfp4"):
        rows.append(EvalConfig(f"{low} everywhere", {"policy": "all_low", "low_precision": low, "ep_size": sizes[0]}))
    return pin(rows, sizes[0], batch_threshold)


def pin(configs: list[EvalConfig], ep_size: int, batch_threshold: int) -> list[EvalConfig]:
    """`configs` with `ep_size` and `batch_threshold` set in every ReaLB row that leaves them out (copies; the
    given rows are not changed), so no row inherits them from the row before it."""
    return [
        c
        if c.realb is None
        else EvalConfig(c.name, {"ep_size": ep_size, "batch_threshold": batch_threshold, **c.realb})
        for c in configs
    ]


def realb_setting(row_realb: dict[str, Any], key: str) -> Any:
    """A row's value of a RealbConfig field: what it sets, else the default every row starts from."""
    return row_realb[key] if key in row_realb else RealbConfig().to_dict()[key]
