"""The demo that ships with realb_hf (Gradio app, task generator, tiny trained model).

In a source checkout it is `demo/` next to `realb_hf/`; a wheel installs the same files as the subpackage
`realb_hf.demo` (pyproject.toml maps the folder), so nothing called `demo` lands in site-packages.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent


def demo_dir() -> Path:
    """The demo's folder: the installed `realb_hf/demo`, else the checkout's `demo/`."""
    for candidate in (PACKAGE_DIR / "demo", CHECKOUT_DIR / "demo"):
        if (candidate / "app.py").is_file():
            return candidate
    raise ImportError(
        "the realb_hf demo is missing: it is neither installed with realb_hf (realb_hf/demo) nor next to it in a "
        "source checkout (demo/); reinstall realb_hf or run from a clone of the repository"
    )


def bundled_model_dir() -> Path:
    """The tiny trained Qwen3-VL-MoE the demo and the accuracy script default to."""
    return demo_dir() / "model"


def demo_module(name: str) -> ModuleType:
    """`app`, `tasks` or `train` of the demo, imported from `demo_dir()` and from nowhere else."""
    where = demo_dir()
    if where.parent == PACKAGE_DIR:
        module = importlib.import_module(f"{__package__}.demo.{name}")
    else:
        if str(CHECKOUT_DIR) not in sys.path:
            sys.path.insert(0, str(CHECKOUT_DIR))
        module = importlib.import_module(f"demo.{name}")
    origin = Path(module.__file__).resolve().parent
    if origin != where:  # another package called `demo` came first on sys.path
        raise ImportError(f"`demo.{name}` was imported from {origin}, not from realb_hf's demo in {where}")
    return module


__all__ = ["bundled_model_dir", "demo_dir", "demo_module"]
