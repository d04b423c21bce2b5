"""save_pretrained -> from_pretrained in a fresh process restores ReaLB (and says what happens without it)."""

import json
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import load_qwen
from safetensors.torch import load_file

import realb_hf
from realb_hf.tiny import qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    {imports}
    from transformers import AutoModelForImageTextToText

    path, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    kwargs = {kwargs}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    with torch.no_grad():
        logits = model(**torch.load(inputs)).logits
    torch.save(logits, out)
    qc = getattr(model.config, "quantization_config", None)
    print(json.dumps({{
        "classes": sorted({{type(m).__name__ for n, m in model.named_modules() if n.endswith("experts")}}),
        "config": qc.to_dict() if hasattr(qc, "to_dict") else qc,
    }}))
    """
)


def run_child(tmp_path, path, imports="import realb_hf", kwargs="{}"):
    """Load `path` in a new interpreter (which imports realb_hf only through `imports`), run the tiny batch."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(imports=imports, kwargs=kwargs))
    inputs, out = tmp_path / "inputs.pt", tmp_path / "logits.pt"
    torch.save(qwen3_vl_image_batch(batch=2, config=tiny_qwen3_vl_moe_config()).kwargs, inputs)
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(inputs), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out), proc.stderr


def test_save_and_reload_in_a_fresh_process(qwen_dir, qwen_batch, tmp_path):
    config = dict(policy="all_low", low_precision="fp8", ep_size=2, modality_threshold=0.9)
    model = load_qwen(qwen_dir, **config)
    with torch.no_grad():
        expected = model(**qwen_batch.kwargs).logits
    saved = tmp_path / "saved"
    model.save_pretrained(saved)

    on_disk = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert on_disk == realb_hf.RealbConfig(**config).to_dict()
    # Weights stay in the model dtype, under transformers' own names: the checkpoint equals the stock one.
    tensors = load_file(saved / "model.safetensors")
    stock = load_file(qwen_dir / "model.safetensors")
    assert tensors.keys() == stock.keys() and all(torch.equal(tensors[k], stock[k]) for k in stock)

    info, logits, _ = run_child(tmp_path, saved)
    assert info["config"] == on_disk
    assert info["classes"] == ["RealbQwen3VLMoeTextExperts"]
    assert torch.equal(logits, expected)


def test_reload_config_overrides_runtime_knobs(qwen_dir, tmp_path):
    """Only the fields the RealbConfig sets change, and the log says so (not transformers' "the rest will be
    ignored", which reads as if the saved settings were lost)."""
    model = load_qwen(qwen_dir, policy="all_low", low_precision="fp8", ep_size=2)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    info, _, stderr = run_child(
        tmp_path,
        saved,
        imports="import logging; logging.basicConfig(level=logging.INFO); import realb_hf",
        kwargs="{'quantization_config': __import__('realb_hf').RealbConfig(policy='off')}",
    )
    assert info["config"]["policy"] == "off"
    assert info["config"]["ep_size"] == 2 and info["config"]["low_precision"] == "fp8"
    assert "will be overwritten" not in stderr and "The rest will be ignored" not in stderr
    assert "reloading with the saved settings; the RealbConfig given to from_pretrained changes policy='off', " in stderr


def test_reload_warns_about_fields_a_saved_model_fixes(qwen_dir, tmp_path, caplog):
    from transformers import AutoModelForImageTextToText

    saved = tmp_path / "saved"
    load_qwen(qwen_dir, policy="all_low", low_precision="fp8").save_pretrained(saved)
    passed = realb_hf.RealbConfig(policy="off", modules_to_not_convert=["layers.1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.bfloat16, quantization_config=passed)
    assert not [w for w in caught if "quantization_config" in str(w.message)]
    config = realb_hf.get_runtime(model).config
    assert config.policy == "off" and config.low_precision == "fp8" and config.modules_to_not_convert is None
    (record,) = [r for r in caplog.records if r.name == "realb_hf.registration" and r.levelno == logging.WARNING]
    assert "modules_to_not_convert=['layers.1']" in record.getMessage()
    assert "a saved model keeps its own (modules_to_not_convert=None)" in record.getMessage()


def test_reload_without_import_falls_back_to_the_stock_model(qwen_dir, qwen_batch, tmp_path):
    """Documented behaviour: without `import realb_hf` transformers warns and loads plain bf16 experts."""
    model = load_qwen(qwen_dir, policy="all_low", low_precision="fp8")
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    info, logits, stderr = run_child(tmp_path, saved, imports="")
    assert info["classes"] == ["Qwen3VLMoeTextExperts"]
    assert "Unknown quantization type, got realb" in stderr
    assert "import realb_hf" not in CHILD.format(imports="", kwargs="{}")
    with torch.no_grad():
        stock = load_qwen(qwen_dir)(**qwen_batch.kwargs).logits
    assert torch.equal(logits, stock)


@pytest.mark.parametrize("how", ["from_pretrained", "apply_realb"])
def test_reload_with_the_loaded_models_own_config(how, tmp_path):
    """`from_pretrained(saved, config=model.config)` (transformers' own mismatched-shapes test does it) works on a
    ReaLB model's config, which holds the RealbConfig object, and keeps ReaLB with the same settings."""
    from transformers import AutoModelForImageTextToText

    from realb_hf.tiny import build_tiny_model, tiny_qwen3_vl_moe_config

    config = realb_hf.RealbConfig(policy="off", ep_size=2)
    stock = build_tiny_model(tiny_qwen3_vl_moe_config())
    if how == "apply_realb":
        model = realb_hf.apply_realb(stock, config)
    else:
        stock.save_pretrained(tmp_path / "stock")
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "stock", quantization_config=config)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", config=model.config)
    assert realb_hf.get_runtime(again).config == config


def test_a_deep_copied_model_counts_its_forwards_in_its_own_telemetry(qwen_dir, qwen_batch):
    """The model hooks are copied with the model: the copy's forwards reach the copy's runtime only."""
    import copy

    model = load_qwen(qwen_dir, ep_size=4)
    twin = copy.deepcopy(model)
    assert realb_hf.get_runtime(twin) is not realb_hf.get_runtime(model)
    with torch.no_grad():
        twin(**qwen_batch.kwargs)
    assert realb_hf.get_telemetry(twin).forwards == 1 and realb_hf.get_telemetry(model).forwards == 0
    assert realb_hf.get_telemetry(twin).records and not realb_hf.get_telemetry(model).records
    with torch.no_grad():
        model(**qwen_batch.kwargs)
    assert realb_hf.get_telemetry(model).forwards == 1 and realb_hf.get_telemetry(twin).forwards == 1
