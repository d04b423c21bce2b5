"""Which models the demo serves, and loading them.

By default a client of the page gets the bundled model (and the one the server was started with) and nothing
else: other local folders or Hub ids must be allowed by whoever starts the server (`--allow-model`). A client's
refusal never says what exists on the server's disk: an unknown spec, a missing folder and a folder that is not a
model all get the same message, and a load failure reports only its kind (the reason goes to the server log).
A failed load keeps the model that was loaded before it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("realb_hf.demo")

DEMO_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL_DIR = DEMO_DIR / "model"
BUNDLED_MODEL = "demo/model"  # what the model box shows; resolves to BUNDLED_MODEL_DIR
BUNDLED_ALIASES = ("", "bundled", BUNDLED_MODEL, "demo/model/", "./demo/model")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(RuntimeError):
    """A model the demo could not load or will not serve.

    `str(err)` is the full reason, for the operator's console; `err.public` is what a client of the page may see
    (no server paths, no library messages that could quote them).
    """

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = message if public is None else public


def ep_size_choices(num_experts: int) -> list[int]:
    """Virtual EP sizes the model allows (divisors of its per-layer expert count)."""
    return [d for d in range(1, num_experts + 1) if num_experts % d == 0]


def display_name(source: str) -> str:
    """How a resolved source is named in the page: the bundled model by its short name, anything else as given."""
    return BUNDLED_MODEL if source == str(BUNDLED_MODEL_DIR) else source


def resolve_model(spec: str | None) -> str:
    """The operator's `--model`/`--allow-model` value as the bundled model's folder, an absolute folder or a Hub id.

    For the person starting the server only: its errors name what is on the disk. Clients go through
    `ModelAllowlist.admit`.
    """
    spec = (spec or "").strip()
    if spec in BUNDLED_ALIASES:
        return str(BUNDLED_MODEL_DIR)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{spec!r} is a folder without config.json: not a transformers model folder")
        return str(local.resolve())
    if spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"there is no model folder at {spec}")
    if not _HUB_ID.match(spec) or spec.count("/") > 1:
        raise ModelLoadError(f"{spec!r} is neither a local model folder nor a Hub repo id (like 'org/name')")
    return spec


class ModelAllowlist:
    """The models a client may ask for: the bundled one, Hub ids named exactly, and model folders inside folders.

    Entries are the operator's (`--allow-model`, repeatable): a Hub id allows that id; a folder allows every model
    folder (one with config.json) at or below it, after resolving symlinks and `..`.
    """

    def __init__(self, entries: Iterable[str] = ()):
        self.hub_ids: list[str] = []
        self.folders: list[Path] = []
        self.shown: list[str] = []
        for entry in entries:
            self.allow(entry)

    def allow(self, entry: str) -> None:
        """Add an operator entry; raises `ModelLoadError` naming the entry when it is neither folder nor Hub id."""
        spec = (entry or "").strip()
        if spec in BUNDLED_ALIASES:
            return
        local = Path(spec).expanduser()
        if local.is_dir():
            folder = local.resolve()
            if folder == BUNDLED_MODEL_DIR:
                return
            if folder not in self.folders:
                self.folders.append(folder)
                self.shown.append(f"model folders under {spec}")
        elif spec.startswith((".", "/", "~")) or local.exists():
            raise ModelLoadError(f"--allow-model {spec}: there is no folder at {spec}")
        elif _HUB_ID.match(spec) and spec.count("/") <= 1:
            if spec not in self.hub_ids:
                self.hub_ids.append(spec)
                self.shown.append(spec)
        else:
            raise ModelLoadError(
                f"--allow-model {spec!r} is neither a local folder nor a Hub repo id (like 'org/name')"
            )

    @property
    def only_bundled(self) -> bool:
        return not (self.hub_ids or self.folders)

    def describe(self) -> str:
        """What a client may load, in words (used in refusals and the model box's help)."""
        offered = [f"{BUNDLED_MODEL} (bundled)", *self.shown]
        return ", ".join(offered)

    def refusal(self, spec: str) -> ModelLoadError:
        """The one message for every spec that is not served, so that refusals say nothing about the disk."""
        hint = (
            "; the server's operator can allow others with `realb-hf demo --allow-model FOLDER_OR_HUB_ID`"
            if self.only_bundled
            else ""
        )
        return ModelLoadError(f"{spec!r} is not a model this demo serves. It serves: {self.describe()}{hint}")

    def admit(self, spec: str | None) -> str:
        """The source to load for a client's `spec`, or the refusal; Hub ids must match an entry exactly."""
        spec = (spec or "").strip()
        if spec in BUNDLED_ALIASES:
            return str(BUNDLED_MODEL_DIR)
        if spec in self.hub_ids:
            return spec
        if self.folders and "\0" not in spec and len(spec) <= 4096:
            try:
                real = Path(os.path.realpath(Path(spec).expanduser()))
                inside = any(real == folder or folder in real.parents for folder in self.folders)
                if inside and (real / "config.json").is_file():
                    return str(real)
            except OSError:  # a name the filesystem cannot even look up: refused like any other
                pass
        raise self.refusal(spec)


@dataclass
class LoadedModel:
    source: str
    model: Any
    processor: Any
    num_experts: int
    moe_layers: int
    is_vlm: bool
    device: str

    def describe(self) -> str:
        kind = getattr(self.model.config, "model_type", "?")
        return (
            f"Loaded **{display_name(self.source)}** ({kind}): {self.moe_layers} MoE expert modules with "
            f"{self.num_experts} experts each, on `{self.device}`; "
            f"virtual EP sizes: {ep_size_choices(self.num_experts)}."
        )


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA GPU")
    return device


class _DropKnownNotice(logging.Filter):
    """Drops one transformers notice that is expected and harmless here, re-logging it at debug level.

    The bundled processor is transformers' own `PaddleOCRVLProcessor` (demo/train.py says why), whose class
    attribute transformers itself flags as deprecated on every load; a user can do nothing about it.
    """

    NOTICE = "`PaddleOCRVLProcessor` defines `image_processor_class"

    def filter(self, record: logging.LogRecord) -> bool:
        if self.NOTICE in record.getMessage():
            logger.debug("transformers: %s", record.getMessage())
            return False
        return True


_NOTICE_FILTER = _DropKnownNotice()


def load_model(source: str, device: str = "auto") -> LoadedModel:
    """Load `source` (resolved or admitted) with ReaLB, and its processor; raise `ModelLoadError` with advice."""
    from realb_hf.experts import RealbExperts
    from realb_hf.hub import load_with_realb

    name = display_name(source)
    if source == str(BUNDLED_MODEL_DIR) and not (BUNDLED_MODEL_DIR / "config.json").is_file():
        raise ModelLoadError(
            "the bundled model is not in demo/model yet: build it with `python -m demo.train` "
            "(about 15 minutes on 2 CPU cores), or start the demo with another model (--model)"
        )
    device = _pick_device(device)
    logging.getLogger("transformers.processing_utils").addFilter(_NOTICE_FILTER)  # adding it twice is a no-op
    try:
        # Knobs come per request through reconfigure; a model saved with ReaLB keeps its saved settings meanwhile.
        model, processor = load_with_realb(source, device="auto" if device == "cuda" else device)
    except Exception as err:  # OSError for missing/offline repos, ValueError for unknown or unsupported models
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load {source!r} with ReaLB: {first}",
            public=f"it did not load with ReaLB ({type(err).__name__}; the server's log says why)",
        ) from err
    if processor is None:
        raise ModelLoadError(f"{name!r} has no processor or tokenizer files", public="it has no processor files")
    experts = [m for m in model.modules() if isinstance(m, RealbExperts)]
    if not experts:
        raise ModelLoadError(
            f"{name!r} has no fused-MoE experts that ReaLB can drive", public="it has no experts ReaLB can drive"
        )
    return LoadedModel(
        source=source,
        model=model,
        processor=processor,
        num_experts=int(experts[0].num_experts),
        moe_layers=len(experts),
        is_vlm=hasattr(model.config, "vision_config"),
        device=str(getattr(model, "device", device)),
    )


class ModelStore:
    """Loads one model at a time, lazily, and keeps it: asking again for the same model is free.

    Clients name models through `get`, which serves only what `allowlist` admits. The current model stays loaded
    until its successor has loaded, so a failed load leaves it in place (and both must fit in memory meanwhile).
    """

    def __init__(
        self,
        device: str = "auto",
        loader: Callable[[str, str], LoadedModel] = load_model,
        allowlist: ModelAllowlist | None = None,
    ):
        self.device = device
        self.allowlist = allowlist or ModelAllowlist()
        self._loader = loader
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()
        self.run_lock = threading.Lock()  # one generation at a time: the runtime's knobs are per model

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def offer(self, spec: str | None) -> str:
        """Allow the operator's model (`--model`) for clients; its errors are precise (this is not a client)."""
        source = resolve_model(spec)
        self.allowlist.allow(spec or "")
        return source

    def get(self, spec: str | None) -> LoadedModel:
        """A client's model: admitted by the allowlist, loaded once; raises `ModelLoadError` (see `.public`).

        The public message names the model as the client wrote it, never the folder it resolved to.
        """
        source = self.allowlist.admit(spec)
        with self._lock:
            if self._current is not None and self._current.source == source:
                return self._current
            try:
                loaded = self._loader(source, self.device)
            except ModelLoadError as err:
                logger.warning("loading %s failed: %s", source, err)
                shown = (spec or "").strip() or BUNDLED_MODEL
                raise ModelLoadError(str(err), public=f"could not load {shown!r}: {err.public}") from err
            self._current = loaded
            return loaded


__all__ = [
    "BUNDLED_MODEL",
    "BUNDLED_MODEL_DIR",
    "LoadedModel",
    "ModelAllowlist",
    "ModelLoadError",
    "ModelStore",
    "display_name",
    "ep_size_choices",
    "load_model",
    "resolve_model",
]
