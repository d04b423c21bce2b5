"""One place for "this feature needs an optional package" errors (realb_hf's extras: serve, prometheus, ...)."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise ImportError naming the realb_hf extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this feature needs `{module}`, which is not installed; install it with "
            f"`pip install 'realb_hf[{extra}]'` (or `pip install -e '.[{extra}]'` in a checkout)"
        ) from err
