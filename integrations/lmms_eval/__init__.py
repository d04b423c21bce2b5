"""ReaLB inside lmms-eval: any supported Hugging Face VLM, loaded with a `RealbConfig`, run on lmms-eval benchmarks,
with ReaLB telemetry written next to lmms-eval's results.

    # ReaLB (fp8, 8 virtual EP ranks); telemetry lands in ./logs/<model>/<stamp>_realb_*.json|md
    python -m integrations.lmms_eval --model realb --tasks mmmu_val,ai2d --batch_size 8 --output_path ./logs \\
        --model_args pretrained=Qwen/Qwen3-VL-30B-A3B-Instruct,policy=realb,low_precision=fp8,ep_size=8

`python -m integrations.lmms_eval` is lmms-eval's own CLI (every lmms-eval flag works) with the model `realb`
registered and this package's tasks (`realb_synthetic`, `realb_synthetic_mc`) on the include path. Plain
`lmms-eval` finds the model through lmms-eval's plugin variable (the repository root must be importable):
`PYTHONPATH=$PWD LMMS_EVAL_PLUGINS=integrations.lmms_eval lmms-eval --model realb --include_path
integrations/lmms_eval/tasks ...` (that route gives the "simple" model: requests carry a text context and a
list of visuals).

Model args: every `RealbConfig` field (`low_precision`, `policy`, `modality_threshold`, `ep_size`, ...), plus
`pretrained` (required), `realb` (false: the stock model, no ReaLB), `dtype`, `device`, `device_map`,
`batch_size`, `max_new_tokens`, `system_prompt`, `trust_remote_code`, `attn_implementation`, `revision`,
`processor_kwargs` (JSON), `min_pixels`/`max_pixels` (Qwen-VL processors), `telemetry_path` (folder; default:
lmms-eval's results folder) and `telemetry_records` (`prefill`, `all` or `none`).

lmms-eval is an optional dependency with a heavy dependency list (torchvision, wandb, opencv, ...) that would
replace a CPU torch; `integrations/lmms_eval/requirements.txt` says how to install what this integration needs.
Nothing here imports lmms-eval until a model class or the launcher is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

MODEL_NAME = "realb"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
SIMPLE_CLASS_PATH = "integrations.lmms_eval.models.realb.Realb"
CHAT_CLASS_PATH = "integrations.lmms_eval.models.realb.RealbChat"


def require_lmms_eval(module: str = "lmms_eval") -> ModuleType:
    """Import `module` from lmms-eval, or raise ImportError saying how to install this integration's dependencies."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this integration needs `{module}` (lmms-eval 0.7.3 and a few of its dependencies), which could not be "
            f"imported ({err}); install them with `pip install --no-deps lmms-eval==0.7.3 && pip install -r "
            f"integrations/lmms_eval/requirements.txt` (see that file: lmms-eval's full dependency list would "
            f"replace a CPU torch, so it is installed with --no-deps)"
        ) from err


def manifests():
    """lmms-eval `ModelManifest`s for `realb` (chat class by default, `--force_simple` for the simple one).

    Usable as a Python entry point of group `lmms_eval.models` where `integrations` is importable.
    """
    registry_v2 = require_lmms_eval("lmms_eval.models.registry_v2")
    return [
        registry_v2.ModelManifest(
            model_id=MODEL_NAME,
            simple_class_path=SIMPLE_CLASS_PATH,
            chat_class_path=CHAT_CLASS_PATH,
            aliases=("realb_hf",),
        )
    ]


def register() -> None:
    """Register `realb` with lmms-eval's model registry in this process (idempotent)."""
    models = require_lmms_eval("lmms_eval.models")
    for manifest in manifests():
        models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
        models.AVAILABLE_MODELS[manifest.model_id] = CHAT_CLASS_PATH.rsplit(".", 1)[-1]


__all__ = [
    "CHAT_CLASS_PATH",
    "MODEL_NAME",
    "REQUIREMENTS",
    "SIMPLE_CLASS_PATH",
    "TASKS_DIR",
    "manifests",
    "register",
    "require_lmms_eval",
]
