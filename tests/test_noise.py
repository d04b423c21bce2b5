"""Expected, harmless dependency warnings at `import realb_hf` go to DEBUG; every other warning keeps its level."""

import enum
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import realb_hf  # noqa: F401  (installs the filters)
from realb_hf.noise import demote_harmless_import_warnings

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load it"
ENUM = (
    "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. Calling "
    "register_constant() on Enum subclasses is deprecated and will be an error in a future release."
)


@contextmanager
def captured(name: str, level: int):
    """Records that reach a handler of logger `name` set to `level` (torch's loggers do not propagate to root)."""
    logger = logging.getLogger(name)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.NOTSET)
    handler.emit = records.append
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_torchao_extension_lines_are_debug_other_warnings_stay():
    demote_harmless_import_warnings()  # idempotent
    assert len(logging.getLogger("torchao").filters) == 1
    log = logging.getLogger("torchao")
    with captured("torchao", logging.WARNING) as records:
        log.warning(EXTENSION)
        log.warning("Skipping import of cpp extensions due to incompatible torch version")
        log.warning("Failed to load /somewhere/else/libfoo.so: not torchao's")
    assert [r.levelname for r in records] == ["WARNING", "WARNING"] and "Skipping" in records[0].getMessage()
    with captured("torchao", logging.DEBUG) as records:
        log.warning(EXTENSION)
    assert [(r.levelname, r.getMessage()) for r in records] == [("DEBUG", EXTENSION)]


def test_only_torchaos_enum_deprecation_is_debug():
    theirs = enum.Enum("KernelPreference", "AUTO")
    theirs.__module__ = "torchao.quantization.quantize_.common"
    ours = enum.Enum("Mine", "A")
    ours.__module__ = "somebody.else"
    log = logging.getLogger("torch.utils._pytree")
    with captured("torch.utils._pytree", logging.WARNING) as records:
        log.warning(ENUM, theirs)
        log.warning(ENUM, ours)
    assert [r.args[0] for r in records] == [ours]


def test_cli_help_prints_no_dependency_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "realb_hf.cli", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "usage: realb-hf" in proc.stdout
    assert "Failed to load" not in proc.stderr and "Enum subclass" not in proc.stderr, proc.stderr
