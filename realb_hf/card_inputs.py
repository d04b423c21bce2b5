"""What a model card may say about a saved ReaLB model, checked before anything is written.

A card states only what is true of the model it is saved with:
- `base_model` must be the model these weights come from: the source itself, or a Hub model with the same
  architecture (model type, layers, hidden size, experts);
- telemetry must have been recorded on this model: a file written by `save_telemetry` carries the model type, the
  ReaLB layers with their expert counts and the ReaLB settings, and every record must have this model's EP size;
- an accuracy table is markdown with a table in it, or JSON rows; its headings sit under the card's own section.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .apply import get_runtime
from .quantizer import realb_modules
from .telemetry import Telemetry

TELEMETRY_MODEL_KEY = "model"  # the provenance block of a telemetry file written by `save_telemetry`


class CardInputError(ValueError):
    """A card input that would make the card say something untrue; `field` names the argument."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


# ---- base model -------------------------------------------------------------------------------------------


def looks_like_hub_id(name: str | None) -> bool:
    """'org/name' that is not an existing local path."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists():
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts)


def architecture(config) -> dict[str, Any]:
    """The numbers two configs of the same model share, whatever the fine-tuning."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = {"model_type": getattr(config, "model_type", None)}
    for key in ("num_hidden_layers", "hidden_size", "num_experts_per_tok"):
        out[key] = getattr(text, key, None)
    out["num_experts"] = next(
        (getattr(text, k) for k in ("num_experts", "num_local_experts", "n_routed_experts") if hasattr(text, k)), None
    )
    return {k: v for k, v in out.items() if v is not None}


def check_base_model(model, base_model: str) -> None:
    """Raise CardInputError unless `base_model` is a Hub id whose architecture is this model's."""
    if not looks_like_hub_id(base_model):
        raise CardInputError("base_model", f"{base_model!r} is not a Hub repo id like 'org/name'")
    if base_model == getattr(model.config, "_name_or_path", None):
        return  # loaded from it
    from transformers import AutoConfig

    try:
        base = AutoConfig.from_pretrained(base_model)
    except Exception as err:  # offline and not cached, no such repo, gated, unknown model type
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CardInputError(
            "base_model",
            f"the config of {base_model} could not be read ({first}), so the card cannot check that these weights "
            "come from it; make it reachable (online, or in the Hugging Face cache) or leave the base model out",
        ) from err
    ours, theirs = architecture(model.config), architecture(base)
    differ = [f"{k} {ours[k]} here, {theirs[k]} there" for k in ours if k in theirs and ours[k] != theirs[k]]
    if differ:
        raise CardInputError(
            "base_model", f"these weights do not come from {base_model} ({'; '.join(differ)}); name the right one or leave it out"
        )


# ---- telemetry --------------------------------------------------------------------------------------------


def model_provenance(model) -> dict[str, Any]:
    """What telemetry must match to describe `model`: model type, ReaLB layers and their experts, ReaLB settings."""
    runtime = get_runtime(model)
    layers = {m.realb_name: int(m.num_experts) for m in realb_modules(model) if m.realb_runtime is runtime}
    return {
        "model_type": getattr(model.config, "model_type", None),
        "moe_layers": dict(sorted(layers.items())),
        "realb_config": runtime.config.to_dict(),
    }


def telemetry_document(model) -> dict[str, Any]:
    """`get_telemetry(model).to_dict()` plus the provenance block that lets a card check it."""
    return {TELEMETRY_MODEL_KEY: model_provenance(model), **get_runtime(model).telemetry.to_dict()}


def save_telemetry(model, path: str | Path) -> Path:
    """Write `telemetry_document(model)` as JSON (the file `realb-hf save --telemetry` accepts)."""
    path = Path(path)
    path.write_text(json.dumps(telemetry_document(model), indent=1))
    return path


def read_telemetry_file(path: str | Path) -> dict[str, Any]:
    """A telemetry JSON document, checked for shape only (the model check is `checked_telemetry_summary`)."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CardInputError("telemetry", f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardInputError("telemetry", f"{path} is not a JSON file ({err})") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("records"), list):
        raise CardInputError("telemetry", f"{path} is not a telemetry file (no records)")
    if not isinstance(document.get(TELEMETRY_MODEL_KEY), Mapping):
        raise CardInputError(
            "telemetry",
            f"{path} does not say which model recorded it; write it with realb_hf.hub.save_telemetry(model, path) "
            "on the model you save",
        )
    return dict(document)


def checked_telemetry_summary(model, telemetry: Telemetry | Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The summary to print in `model`'s card, after checking the telemetry was recorded on this model."""
    if isinstance(telemetry, Telemetry):
        if telemetry is not get_runtime(model).telemetry:
            raise CardInputError("telemetry", "this Telemetry is not the model's own (pass get_telemetry(model))")
        document = telemetry_document(model)
    elif isinstance(telemetry, (str, Path)):
        document = read_telemetry_file(telemetry)
    elif isinstance(telemetry, Mapping) and isinstance(telemetry.get(TELEMETRY_MODEL_KEY), Mapping):
        document = dict(telemetry)
    else:
        raise CardInputError(
            "telemetry", "pass get_telemetry(model), or a document or file written by save_telemetry(model, path)"
        )
    recorded, here = document[TELEMETRY_MODEL_KEY], model_provenance(model)
    differ = _differences(recorded, here)
    if differ:
        raise CardInputError(
            "telemetry", f"it was recorded on another model or with other settings: {'; '.join(differ)}"
        )
    records = document.get("records") or []
    if not records:
        raise CardInputError("telemetry", "it holds no records (run the model before recording it)")
    ep_size = here["realb_config"]["ep_size"]
    ranks = sorted({len(r.get("tokens_per_rank", ())) for r in records})
    if ranks != [ep_size]:
        raise CardInputError("telemetry", f"its records have {ranks} ranks, the model is saved with ep_size={ep_size}")
    return dict(document["summary"])


def _layers_text(layers: Any) -> str:
    if not isinstance(layers, Mapping):
        return repr(layers)
    experts = sorted(set(layers.values()))
    return f"{len(layers)} ReaLB layers of {'/'.join(map(str, experts))} experts"


def _differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Readable "X there, Y here" items for every provenance field that differs."""
    out = []
    if recorded.get("model_type") != here["model_type"]:
        out.append(f"model type {recorded.get('model_type')} there, {here['model_type']} here")
    theirs, ours = recorded.get("moe_layers"), here["moe_layers"]
    if theirs != ours:
        same_shape = _layers_text(theirs) == _layers_text(ours)
        out.append("other layer names" if same_shape else f"{_layers_text(theirs)} there, {_layers_text(ours)} here")
    theirs, ours = recorded.get("realb_config") or {}, here["realb_config"]
    out += [f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]
    return out


# ---- accuracy table ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def demote_headings(markdown: str, levels: int = 2) -> str:
    """Every ATX heading `levels` deeper (at most ######), outside fenced code: a table's own title then sits
    under the card's "## Accuracy" instead of next to the card's title."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else re.match(r"^(#{1,6})(\s|$)", line)
        if match:
            depth = min(6, len(match.group(1)) + levels)
            line = "#" * depth + line[len(match.group(1)) :]
        out.append(line)
    return "\n".join(out)


def accuracy_markdown(table: str | Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None) -> str | None:
    """Markdown for the card from markdown text (headings moved under the card's section), a list of rows, or
    {row name: {column: value}}. Raises CardInputError for anything else, and for a table with no rows."""
    if table is None:
        return None
    if isinstance(table, str):
        text = table.strip()
        if not any(line.lstrip().startswith("|") for line in text.splitlines()):
            raise CardInputError("accuracy_table", "the markdown has no table (no line starts with '|')")
        return demote_headings(text)
    if isinstance(table, Mapping):
        not_rows = [str(k) for k, v in table.items() if not isinstance(v, Mapping)]
        if not_rows:
            raise CardInputError(
                "accuracy_table",
                "a JSON object must map row names to {column: value} objects; these keys do not: "
                + ", ".join(not_rows[:5])
                + ". A `python -m realb_hf.accuracy` report is not a table: pass its Markdown file instead",
            )
        rows = [{"": name, **dict(values)} for name, values in table.items()]
    elif isinstance(table, Sequence) and all(isinstance(r, Mapping) for r in table):
        rows = [dict(r) for r in table]
    else:
        raise CardInputError(
            "accuracy_table", "expected markdown text, a list of row objects or {row name: {column: value}}"
        )
    if not rows:
        raise CardInputError("accuracy_table", "the table has no rows")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def read_accuracy_file(path: str | Path) -> str | list | dict:
    """An accuracy table file: .json (rows or {row: {column: value}}) or .md/.markdown; validated."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".md", ".markdown"):
        raise CardInputError("accuracy_table", f"{path} must be a .json or .md file")
    try:
        text = path.read_text()
        value = json.loads(text) if path.suffix.lower() == ".json" else text
        accuracy_markdown(value)
    except FileNotFoundError:
        raise CardInputError("accuracy_table", f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CardInputError("accuracy_table", f"{path} is not a text file") from None
    except json.JSONDecodeError as err:
        raise CardInputError("accuracy_table", f"{path} is not valid JSON ({err})") from None
    except CardInputError as err:
        raise CardInputError("accuracy_table", f"{path}: {err.reason}") from None
    return value


__all__ = [
    "CardInputError",
    "accuracy_markdown",
    "architecture",
    "check_base_model",
    "checked_telemetry_summary",
    "demote_headings",
    "looks_like_hub_id",
    "model_provenance",
    "read_accuracy_file",
    "read_telemetry_file",
    "save_telemetry",
    "telemetry_document",
]
