"""Save and push ReaLB models with a model card (README.md) written from `model_card_template.md`.

`model.save_pretrained` / `model.push_to_hub` already keep `quantization_config` (`quant_method: "realb"`) in
`config.json`; what they do not write is a card that says how to load the model with ReaLB. `save_with_card` and
`push_with_card` do both, through huggingface_hub's `ModelCard` / `ModelCardData`:

    from realb_hf.hub import save_with_card, push_with_card
    save_with_card(model, processor, "out/", base_model="Qwen/Qwen3-VL-30B-A3B-Instruct", telemetry=telemetry)
    push_with_card(model, "me/qwen3-vl-realb", processor=processor, private=True)   # token: HF_TOKEN or login

A token is only ever handed to `huggingface_hub.HfApi`; nothing here prints, logs or writes it.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .apply import get_runtime
from .card_inputs import (
    CardInputError,
    accuracy_markdown,
    architecture,
    check_base_model,
    checked_telemetry_summary,
    looks_like_hub_id,
    save_telemetry,
)
from .config import QUANT_METHOD
from .telemetry import Telemetry

logger = logging.getLogger(__name__)

CARD_TAGS = ("realb", "moe", "multimodal")
TEMPLATE_NAME = "model_card_template.md"

SETTING_MEANINGS = {
    "low_precision": 'precision of lowered ranks ("auto": fp8 below sm100 and on CPU, nvfp4 on sm100+)',
    "high_precision": "precision of ranks that are not lowered (the model's own dtype)",
    "policy": "realb = the paper's dynamic decision; static = fixed map; all_low = FP4-everywhere baseline; off = telemetry only",
    "rank_precisions": "fixed per-rank precisions (policy static)",
    "modality_threshold": "M_d: minimum vision share of a rank's load for it to be lowered",
    "batch_threshold": "below this many tokens per forward nothing is lowered",
    "imbalance_threshold": "a rank is overloaded when its load exceeds the mean by this fraction",
    "granularity": "lower whole ranks (paper) or only an overloaded rank's hottest vision-dominated experts",
    "weight_cache": "on_the_fly: convert lowered weights per forward (no extra memory); persistent: keep copies",
    "ep_size": "expert-parallel size the policy plans for (virtual EP in one process)",
    "low_cost_ratio": "predicted low-precision time relative to bf16 (None: the format's default)",
    "conversion_cost": "per-call weight conversion of a lowered expert, in token-expert pairs (0: not counted)",
    "modules_to_not_convert": "experts modules left untouched",
}

# Files whose presence in a local folder means it has a processor or tokenizer worth saving again.
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
)

TELEMETRY_ROWS = (  # (summary key, label, formatter)
    ("forwards", "forward passes", lambda v: f"{int(v)}"),
    ("records", "MoE layer records", lambda v: f"{int(v)}"),
    ("layers_lowered", "layer records with a lowered rank", lambda v: f"{int(v)}"),
    ("lowered_token_fraction", "token-expert pairs in low precision", lambda v: f"{100 * v:.1f}%"),
    # the cost model charges every bf16 pair the same, so "before" is also the balancedness of the token load
    ("balancedness_cost_before", "balancedness before ReaLB (mean/max rank load, 1 = balanced)", lambda v: f"{v:.3f}"),
    ("balancedness_cost_after", "balancedness with ReaLB (mean/max predicted rank time)", lambda v: f"{v:.3f}"),
    ("predicted_speedup", "mean predicted MoE-layer speedup (cost model)", lambda v: f"{v:.2f}x"),
    ("extra_memory_bytes", "persistent low-precision weight copies", lambda v: f"{int(v) / 2**20:.1f} MiB"),
)


# ---- card contents ----------------------------------------------------------------------------------------


def find_template(template_path: str | Path | None = None) -> Path:
    """The card template: `template_path`, else the one packaged with realb_hf, else the source checkout's."""
    if template_path is not None:
        path = Path(template_path)
        if not path.is_file():
            raise FileNotFoundError(f"model card template {path} does not exist")
        return path
    here = Path(__file__).resolve().parent
    for candidate in (here / TEMPLATE_NAME, here.parent / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{TEMPLATE_NAME} is neither packaged with realb_hf nor next to it; pass template_path=...")


def _is_vlm(model) -> bool:
    return hasattr(getattr(model, "config", None), "vision_config")


def _low_text(low: str) -> str:
    return "FP8 (NVFP4 on sm100+ GPUs)" if low == "auto" else low.upper()


def behaviour_text(config) -> str:
    """What ReaLB does to this model's experts under `config`, in one or two sentences for the card."""
    low = _low_text(config.low_precision)
    if config.policy == "off":
        return "every expert runs in bf16, as in the stock model; ReaLB only records telemetry."
    if config.policy == "all_low":
        text = f"every expert runs in {low} (the low-precision-everywhere baseline)."
    elif config.policy == "static":
        text = f"the ranks named in `rank_precisions` run at their fixed precision ({low} for \"low\"), the others in bf16."
    else:
        what = (
            "the compute precision of the overloaded, vision-dominated expert-parallel ranks"
            if config.granularity == "rank"
            else "the precision of the hottest vision-dominated experts of an overloaded expert-parallel rank"
        )
        text = (
            f"per MoE layer and per batch of at least {config.batch_threshold} tokens, ReaLB lowers {what} to {low} "
            "and keeps text-heavy ranks in bf16."
        )
    if config.weight_cache == "persistent":
        cache = "low-precision copies of every expert are made when the model loads and kept in memory"
    else:
        cache = "low-precision weights are made on the fly for each lowered layer and not kept"
    return f"{text} No experts are moved between ranks; {cache}."


def architecture_text(model) -> str:
    arch = architecture(model.config)
    parts = [f"`{arch.get('model_type', type(model).__name__)}`"]
    if "num_hidden_layers" in arch:
        parts.append(f"{arch['num_hidden_layers']} decoder layers")
    if "num_experts" in arch:
        top_k = f", top-{arch['num_experts_per_tok']}" if "num_experts_per_tok" in arch else ""
        parts.append(f"{arch['num_experts']} experts per MoE layer{top_k}")
    if "hidden_size" in arch:
        parts.append(f"hidden size {arch['hidden_size']}")
    return ", ".join(parts)


def build_model_card(
    model,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    telemetry: Telemetry | Mapping[str, Any] | str | Path | None = None,
    accuracy_table: Any = None,
    has_processor: bool = True,
    license: str | None = None,
    model_name: str | None = None,
    template_path: str | Path | None = None,
):
    """The `huggingface_hub.ModelCard` of a ReaLB model (not saved anywhere)."""
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    runtime = get_runtime(model)  # raises for a model that does not run ReaLB
    config = runtime.config
    source = getattr(model.config, "_name_or_path", None)
    if base_model is None:
        base_model = source if looks_like_hub_id(source) else None
    else:
        check_base_model(model, base_model)
    is_vlm = _is_vlm(model)
    tags = list(CARD_TAGS)
    model_type = getattr(model.config, "model_type", None)
    if model_type and model_type not in tags:
        tags.append(model_type)
    card_data = ModelCardData(
        base_model=base_model,
        tags=tags,
        library_name="transformers",
        pipeline_tag="image-text-to-text" if is_vlm else "text-generation",
        license=license,
    )
    telemetry_rows = None
    if telemetry is not None:
        summary = checked_telemetry_summary(model, telemetry)
        telemetry_rows = [
            {"name": label, "value": fmt(summary[key])} for key, label, fmt in TELEMETRY_ROWS if key in summary
        ]
    settings = [
        {"name": name, "value": json.dumps(value) if not isinstance(value, str) else value, "meaning": meaning}
        for name, value in config.to_dict().items()
        if (meaning := SETTING_MEANINGS.get(name)) is not None
    ]
    dtype = str(getattr(model, "dtype", "bfloat16")).replace("torch.", "")
    if model_name is None:
        if repo_id:
            model_name = repo_id.split("/")[-1]
        elif base_model:
            model_name = f"{base_model.split('/')[-1]} with ReaLB"
        else:
            model_name = f"{model_type or 'MoE'} model with ReaLB"
    return ModelCard.from_template(
        card_data,
        template_path=str(find_template(template_path)),
        model_name=model_name,
        repo_id=repo_id or "path/to/this/folder",
        base_model=base_model,
        architecture=architecture_text(model),
        behaviour=behaviour_text(config),
        dtype=dtype,
        auto_class="AutoModelForImageTextToText" if is_vlm else "AutoModelForCausalLM",
        has_processor=has_processor,
        settings=settings,
        telemetry=telemetry_rows,
        telemetry_note=(
            "Recorded on this model by `realb_hf.get_telemetry(model)` with these settings (means over MoE layer "
            "records; predicted speedups come from the policy's cost model of the target hardware, not from "
            "wall-clock time)."
        ),
        accuracy_table=accuracy_markdown(accuracy_table),
        realb_version=__version__,
        realb_version_note=f"this card was written with realb_hf {__version__}",
        transformers_version=transformers.__version__,
    )


# ---- save / push ------------------------------------------------------------------------------------------


def _check_saved_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != QUANT_METHOD:
        raise RuntimeError(f"{path}/config.json has quant_method {method!r}, expected {QUANT_METHOD!r}")


def save_with_card(
    model,
    processor=None,
    path: str | Path = "realb_model",
    *,
    base_model: str | None = None,
    telemetry: Telemetry | Mapping[str, Any] | str | Path | None = None,
    accuracy_table: Any = None,
    repo_id: str | None = None,
    license: str | None = None,
    template_path: str | Path | None = None,
    **save_kwargs: Any,
) -> Path:
    """`save_pretrained` the model (and processor) into `path` and write README.md; returns the folder.

    The folder reloads as a ReaLB model in any process that has run `import realb_hf`.
    """
    # The card first: every check (ReaLB, base model, telemetry, accuracy table) runs before anything is written.
    card = build_model_card(
        model,
        repo_id=repo_id,
        base_model=base_model,
        telemetry=telemetry,
        accuracy_table=accuracy_table,
        has_processor=processor is not None,
        license=license,
        template_path=template_path,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    if processor is not None:
        processor.save_pretrained(path)
    _check_saved_config(path)
    card.save(path / "README.md")
    return path


def folder_operations(folder: str | Path) -> list:
    """One `CommitOperationAdd` per file under `folder` (sorted; hidden files and folders left out)."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push_with_card(
    model,
    repo_id: str,
    processor=None,
    *,
    base_model: str | None = None,
    telemetry: Telemetry | Mapping[str, Any] | str | Path | None = None,
    accuracy_table: Any = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload ReaLB model with realb_hf",
    license: str | None = None,
    template_path: str | Path | None = None,
    **save_kwargs: Any,
):
    """Save with a card into a temporary folder and upload it as one commit; returns huggingface_hub's CommitInfo.

    `token=None` uses `HF_TOKEN` or the token stored by `hf auth login`. The repo is created if needed
    (`private` applies only then). The token goes to `HfApi` and nowhere else.
    """
    from huggingface_hub import HfApi

    # every card check runs before the repo is created
    build_model_card(
        model,
        repo_id=repo_id,
        base_model=base_model,
        telemetry=telemetry,
        accuracy_table=accuracy_table,
        has_processor=processor is not None,
        license=license,
        template_path=template_path,
    )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory(prefix="realb_push_") as tmp:
        folder = save_with_card(
            model,
            processor,
            tmp,
            base_model=base_model,
            telemetry=telemetry,
            accuracy_table=accuracy_table,
            repo_id=repo_id,
            license=license,
            template_path=template_path,
            **save_kwargs,
        )
        operations = folder_operations(folder)
        logger.info("uploading %d files to %s", len(operations), repo_id)
        return api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


# ---- loading for the CLI ----------------------------------------------------------------------------------


def check_source(source: str) -> str:
    """`source` as a model folder or a Hub id. Anything that looks like a path (or exists) is a path, and must be
    a folder with config.json; raises FileNotFoundError or ValueError saying which."""
    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such folder")
        if not path.is_dir():
            raise ValueError(f"{source} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"{source} has no config.json: not a transformers model folder")
        return str(path)
    if not (looks_like_hub_id(source) or re.fullmatch(r"[\w.-]+", source)):
        raise ValueError(f"{source!r} is neither a model folder nor a Hub repo id like 'org/name'")
    return source


def load_with_realb(source: str, config=None, device: str = "cpu"):
    """(model, processor or None) of `source` loaded with ReaLB.

    `config` (a RealbConfig) overrides the runtime knobs it sets explicitly; a source saved with ReaLB keeps its
    saved settings otherwise, and any other model gets the defaults. `device` is the `device_map` ("cpu", "cuda",
    "auto", ...).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from .config import RealbConfig

    source = check_source(source)
    try:
        model_config = AutoConfig.from_pretrained(source)
    except OSError as err:  # offline, no such repo, gated repo: one line, not transformers' whole story
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(f"could not load {source} from the Hub ({first}); there is no local folder {source} either") from err
    saved = getattr(model_config, "quantization_config", None)
    saved_method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
    kwargs = {}
    if saved_method != QUANT_METHOD:
        kwargs["quantization_config"] = config or RealbConfig()
    elif config is not None and config.get_loading_attributes():
        kwargs["quantization_config"] = config
    auto = AutoModelForImageTextToText if hasattr(model_config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=torch.bfloat16, device_map=device, **kwargs).eval()
    local = Path(source)
    if local.is_dir() and not any((local / name).exists() for name in PROCESSOR_FILES):
        return model, None  # transformers would invent an empty tokenizer for a folder without one
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return model, loader.from_pretrained(source)
        except Exception:  # no processor/tokenizer files: the card then omits the processor line
            continue
    return model, None


__all__ = [
    "CARD_TAGS",
    "CardInputError",
    "accuracy_markdown",
    "behaviour_text",
    "build_model_card",
    "check_source",
    "find_template",
    "folder_operations",
    "load_with_realb",
    "push_with_card",
    "save_telemetry",
    "save_with_card",
]
