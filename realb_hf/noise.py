"""Log lines that `import realb_hf` triggers in its dependencies although nothing is wrong: moved to DEBUG.

- torchao loads its optional compiled extensions (`torchao/_C*.so`) when imported and logs a warning for each that
  cannot load on this machine (CPU-only torch, another GPU architecture, another Python ABI). realb_hf calls none
  of them: its fp8 path is Triton plus `torch._scaled_mm`, and nvfp4/mxfp4 use torchao's Python tensor classes.
- torch warns that torchao registers two of its Enum classes as pytree constants, a deprecation inside torchao.

Only those exact messages change level; every other warning of these loggers is left as it is. They are still
logged at DEBUG, so a DEBUG-level logging setup shows them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

_TORCHAO_EXTENSION = re.compile(r"Failed to load \S*torchao[/\\]_C[^/\\\s]*\.so\b")
_ENUM_CONSTANT = "is an Enum subclass and is now natively supported by torch.compile"


def _torchao_extension(record: logging.LogRecord) -> bool:
    return bool(_TORCHAO_EXTENSION.match(record.getMessage()))


def _torchao_enum_constant(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    owner = getattr(args[0], "__module__", "") if args else ""
    return _ENUM_CONSTANT in str(record.msg) and owner.split(".")[0] == "torchao"


class DemoteToDebug(logging.Filter):
    """A logger filter: records that `matches` are handled as DEBUG records (dropped unless DEBUG is enabled)."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not self.matches(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


HARMLESS = {"torchao": _torchao_extension, "torch.utils._pytree": _torchao_enum_constant}


def demote_harmless_import_warnings() -> None:
    """Install the filters (idempotent). Must run before torchao is first imported to affect its import lines."""
    for name, matches in HARMLESS.items():
        logger = logging.getLogger(name)
        # compared by name: a reloaded realb_hf must not stack a second copy of the same filter
        if not any(
            type(f).__name__ == DemoteToDebug.__name__ and f.matches.__name__ == matches.__name__
            for f in logger.filters
        ):
            logger.addFilter(DemoteToDebug(matches))


__all__ = ["HARMLESS", "DemoteToDebug", "demote_harmless_import_warnings"]
