"""ReaLB on remote-code MoE blocks with per-expert nn.ModuleList experts (realb_hf/modulelist.py).

Two tiny models written for these tests in the layout of the remote code that users load with
`trust_remote_code=True` (tests/remote_code, never the upstream files or weights): a DeepSeek-VL2 (`language`
= DeepSeek-V2 MoE text model, softmax/greedy routing, images marked by the top-level `images_seq_mask`) and a
Kimi-VL (`language_model` = DeepSeek-V3 MoE text model, sigmoid/noaux_tc routing, images marked by
`config.media_placeholder_token_id` in input_ids). Each is saved once per module as a Hub-style folder
(config.json with `auto_map` + the .py files + safetensors) and loaded from there through
`from_pretrained(..., trust_remote_code=True, quantization_config=RealbConfig(...))`.

Measured relative error of the logits with every expert lowered (policy="all_low"), CPU, torch 2.13 +
torchao 0.18, seed 0 (bounds asserted: measured x1.25, at least +0.002):

| model        | fp8    | nvfp4  | mxfp4  |
| ------------ | ------ | ------ | ------ |
| deepseek_vl2 | 0.44%  | 0.72%  | 0.88%  |
| kimi_vl      | 1.19%  | 2.44%  | 2.56%  |
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import realb_hf
from realb_hf import formats as formats_mod
from realb_hf.experts.modulelist import RealbModuleListExperts, check_modulelist_layout
from realb_hf.formats import Bf16Format

pytestmark = pytest.mark.filterwarnings("ignore::realb_hf.formats.emulation.EmulationWarning")  # fp4 off Blackwell

REMOTE = Path(__file__).parent / "remote_code"
IMAGE_TOKEN_ID = 5  # the image placeholder id of both tiny models (Kimi-VL: media_placeholder_token_id)
TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=96,  # 2 * 96 != 64, and both GEMMs' K dims (64, 96) are multiples of 32
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,  # layer 0 dense, layers 1 and 2 MoE
    moe_layer_freq=1,
)
MOE_LAYERS = 2

MEASURED = {
    "deepseek_vl2": {"fp8": 0.0044, "nvfp4": 0.0072, "mxfp4": 0.0088},
    "kimi_vl": {"fp8": 0.0119, "nvfp4": 0.0244, "mxfp4": 0.0256},
}
ERROR_BOUNDS = {m: {f: max(e * 1.25, e + 0.002) for f, e in per.items()} for m, per in MEASURED.items()}


@dataclass
class Variant:
    name: str
    files: tuple[str, ...]
    config: dict
    language: str  # attribute holding the text model
    source: str  # where ReaLB reads the modality from

    def batch(self, batch: int = 2, seed: int = 0, text_tokens: int = 8) -> tuple[dict, int]:
        """Model inputs with one image per row, and the number of image tokens in the batch."""
        gen = torch.Generator().manual_seed(seed)
        if self.name == "deepseek_vl2":
            # 16x16 tiles, 4x4 patches -> 4x4 features; global view + one 1x1 local tile: 4*5 + 1 + 4*5 = 41 tokens
            n_img = 41
            ids = torch.randint(10, 128, (batch, 1 + n_img + text_tokens), generator=gen)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, 1 : 1 + n_img] = True
            ids[mask] = IMAGE_TOKEN_ID
            inputs = dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                images=torch.randn(batch, 2, 3, 16, 16, generator=gen),
                images_seq_mask=mask,
                images_spatial_crop=torch.tensor([[[1, 1]]] * batch),
            )
        else:
            # 8x8 patches of 4x4 pixels per image, merged 2x2 -> 16 placeholder tokens between start (3) and end (4)
            n_img = 16
            ids = torch.randint(10, 128, (batch, 2 + n_img + text_tokens), generator=gen)
            ids[:, 0], ids[:, 1 : 1 + n_img], ids[:, 1 + n_img] = 3, IMAGE_TOKEN_ID, 4
            inputs = dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(batch * 64, 3, 4, 4, generator=gen),
                image_grid_hws=torch.tensor([[8, 8]] * batch),
            )
        return inputs, batch * n_img


VARIANTS = {
    "deepseek_vl2": Variant(
        "deepseek_vl2",
        ("configuration_deepseek.py", "modeling_deepseek.py", "modeling_deepseek_vl_v2.py"),
        {
            "model_type": "deepseek_vl_v2",
            "architectures": ["DeepseekVLV2ForCausalLM"],
            "auto_map": {
                "AutoConfig": "modeling_deepseek_vl_v2.DeepseekVLV2Config",
                "AutoModelForCausalLM": "modeling_deepseek_vl_v2.DeepseekVLV2ForCausalLM",
            },
            "language_config": {**TEXT, "topk_method": "greedy", "scoring_func": "softmax"},
            "vision_config": {"image_size": 16, "patch_size": 4, "width": 32},
            "projector_config": {"projector_type": "mlp_gelu", "input_dim": 32, "n_embed": 64, "depth": 2},
            "tile_tag": "2D",
            "global_view_pos": "head",
        },
        language="language",
        source="images_seq_mask",
    ),
    "kimi_vl": Variant(
        "kimi_vl",
        ("configuration_deepseek.py", "modeling_deepseek.py", "configuration_kimi_vl.py", "modeling_kimi_vl.py"),
        {
            "model_type": "kimi_vl",
            "architectures": ["KimiVLForConditionalGeneration"],
            "auto_map": {
                "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
            },
            "text_config": {**TEXT, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True},
            "vision_config": {"patch_size": 4, "hidden_size": 32, "merge_kernel_size": [2, 2]},
            "media_placeholder_token_id": IMAGE_TOKEN_ID,
        },
        language="language_model",
        source="input_ids",
    ),
}


class Stock:
    """A variant saved as a Hub-style remote-code folder, its batch, and the stock model's logits."""

    def __init__(self, variant: Variant, root: Path):
        self.variant = variant
        self.path = root / f"realb_tiny_{variant.name}"
        self.path.mkdir()
        for name in variant.files:  # what a Hub repo holds next to its config: the modeling code
            shutil.copy(REMOTE / name, self.path / name)
        (self.path / "config.json").write_text(json.dumps(variant.config))
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=torch.bfloat16)
        model.save_pretrained(self.path)
        self.inputs, self.num_image_tokens = variant.batch()
        stock = self.load()
        self.logits = self.run(stock)
        self.classes = {n: type(m).__name__ for n, m in stock.named_modules()}
        self.shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
        self.storage_bytes = storage_bytes(stock)
        self.experts = [n for n, m in stock.named_modules() if n.endswith("mlp.experts")]

    def load(self, path: Path | None = None, **realb_kwargs):
        extra = {"quantization_config": realb_hf.RealbConfig(**realb_kwargs)} if realb_kwargs else {}
        return AutoModelForCausalLM.from_pretrained(
            path or self.path, trust_remote_code=True, dtype=torch.bfloat16, **extra
        ).eval()

    def run(self, model, **inputs):
        with torch.no_grad():
            return model(**(inputs or self.inputs)).logits


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters (shared storage counted once)."""
    seen = {}
    for p in model.parameters():
        storage = p.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def lists_of(model) -> list[RealbModuleListExperts]:
    return [m for m in model.modules() if isinstance(m, RealbModuleListExperts)]


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """`stock(name)`: each variant is built, saved and run once per module, on first use."""
    root = tmp_path_factory.mktemp("remote_code_models")
    return functools.cache(lambda name: Stock(VARIANTS[name], root))


NAMES = list(VARIANTS)


# ---- conversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_experts_patched_names_and_memory_unchanged(stock, name):
    s = stock(name)
    assert s.experts == [f"{s.variant.language}.model.layers.{i}.mlp.experts" for i in (1, 2)]
    model = s.load(policy="off")
    modules = dict(model.named_modules())
    assert set(modules) == set(s.classes), "ReaLB must not add, drop or rename modules"
    for n, m in modules.items():
        if n in s.experts:
            assert type(m) is RealbModuleListExperts and m.realb_runtime is model.realb and m.realb_name == n
            assert m.realb_is_stacked()
            assert m.gate_up_proj.shape == (8, 2 * 96, 64) and m.down_proj.shape == (8, 64, 96)
            block = modules[n.rsplit(".", 1)[0]]
            assert "moe_infer" in vars(block)  # the block's moe_infer now goes through the experts list
        else:
            assert type(m).__name__ == s.classes[n], f"{n}: {s.classes[n]} became {type(m).__name__}"
    # state_dict keys and shapes of the stock model; each weight held once (the experts are views of the stacks).
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == s.shapes
    assert storage_bytes(model) == s.storage_bytes
    experts = lists_of(model)[0]
    assert experts[3].up_proj.weight.data_ptr() == experts.gate_up_proj[3, 96:].data_ptr()
    assert torch.equal(experts.gate_up_proj[5, :96], experts[5].gate_proj.weight)
    assert torch.equal(experts.down_proj[7], experts[7].down_proj.weight)


def test_layout_and_ep_checks_raise_before_weights_load(stock):
    s = stock("deepseek_vl2")
    with pytest.raises(ValueError, match="ep_size=3 must divide the number of experts"):
        s.load(ep_size=3)
    with pytest.raises(ValueError, match="matched modules_to_not_convert"):
        s.load(modules_to_not_convert=["mlp.experts"])

    class Mlp(torch.nn.Module):
        def __init__(self, bias=False):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(64, 96, bias=bias), torch.nn.Linear(64, 96)
            self.down_proj, self.act_fn = torch.nn.Linear(96, 64, bias=False), torch.nn.SiLU()

    with pytest.raises(ValueError, match="bias-free nn.Linear experts"):
        check_modulelist_layout("x.experts", torch.nn.ModuleList([Mlp(), Mlp(bias=True)]))
    with pytest.raises(ValueError, match="own expert parallelism"):
        check_modulelist_layout("x.experts", torch.nn.ModuleList([Mlp(), None]))


def test_apply_realb_converts_a_loaded_model_the_same_way(stock):
    s = stock("deepseek_vl2")
    model = realb_hf.apply_realb(s.load(), realb_hf.RealbConfig(policy="all_low", low_precision="fp8"))
    assert len(lists_of(model)) == MOE_LAYERS and all(m.realb_is_stacked() for m in lists_of(model))
    assert storage_bytes(model) == s.storage_bytes
    assert torch.equal(s.run(model), s.run(s.load(policy="all_low", low_precision="fp8")))


def test_a_model_without_moe_still_says_nothing_to_convert():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match="nothing to convert.*no per-expert nn.ModuleList MoE block"):
        realb_hf.apply_realb(LlamaForCausalLM(config))


# ---- bf16 path -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs", [dict(policy="off"), dict(ep_size=4), dict(policy="static", ep_size=2, rank_precisions={0: "high"})]
)
def test_bf16_path_is_bit_identical(stock, name, kwargs):
    """Nothing lowered (policy off, a batch under the threshold, a static map of high ranks): the stock loop."""
    s = stock(name)
    model = s.load(**kwargs)
    assert torch.equal(s.run(model), s.logits)
    records = realb_hf.get_telemetry(model).records
    assert len(records) == MOE_LAYERS
    assert all(set(r.precision_per_rank) == {"bf16"} and r.lowered_experts == 0 for r in records)


@pytest.mark.parametrize("name", NAMES)
def test_grouped_path_reproduces_the_stock_loop(stock, name, monkeypatch):
    """With the low format swapped for bf16, the stacked grouped-GEMM path gives the stock result."""
    monkeypatch.setitem(formats_mod.FORMATS, "fp8", Bf16Format())
    s = stock(name)
    model = s.load(policy="static", ep_size=4, rank_precisions={1: "low", 3: "low"}, low_precision="fp8")
    out = s.run(model)
    assert all(r.lowered_experts == 4 for r in realb_hf.get_telemetry(model).records)
    assert rel_err(out, s.logits) < 2e-3


# ---- low precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "mxfp4"])
def test_all_low_error_is_bounded(stock, name, fmt):
    s = stock(name)
    model = s.load(policy="all_low", low_precision=fmt)
    err = rel_err(s.run(model), s.logits)
    assert 0.0 < err < ERROR_BOUNDS[name][fmt], f"{name} {fmt}: relative logits error {err:.4%}"
    records = realb_hf.get_telemetry(model).records
    assert len(records) == MOE_LAYERS
    assert all(r.lowered_fraction == 1.0 and r.precision_per_rank == [fmt] for r in records)


@pytest.mark.parametrize("name", NAMES)
def test_virtual_ep_ranks_and_dynamic_policy(stock, name):
    s = stock(name)
    model = s.load(policy="all_low", low_precision="fp8", ep_size=4)
    logits = s.run(model)
    for r in realb_hf.get_telemetry(model).records:
        assert len(r.tokens_per_rank) == 4 and r.precision_per_rank == ["fp8"] * 4
        assert sum(r.tokens_per_rank) == r.num_tokens * 2
    runtime = realb_hf.get_runtime(model)
    runtime.reconfigure(ep_size=1)
    assert torch.equal(s.run(model), logits)  # fp8 scales are per row and per expert: EP-invariant
    # The paper's policy on this batch: everything eligible (no thresholds), only ranks that shorten the layer lowered.
    runtime.reconfigure(policy="realb", ep_size=4, batch_threshold=0, modality_threshold=0.0, imbalance_threshold=0.0)
    runtime.telemetry.reset()
    s.run(model)
    records = runtime.telemetry.records
    assert len(records) == MOE_LAYERS
    for r in records:  # on this batch every layer lowers some ranks and keeps others in bf16 (mixed groups)
        assert r.reason == "lowered" and {"fp8", "bf16"} == set(r.precision_per_rank), r
        assert r.predicted_speedup > 1.0 and r.balancedness_cost_after > r.balancedness_cost_before


# ---- modality ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_modality_reaches_every_layer(stock, name):
    s = stock(name)
    model = s.load(policy="off")
    s.run(model)
    tokens = s.inputs["input_ids"].numel()
    share = round(s.num_image_tokens / tokens, 6)
    records = realb_hf.get_telemetry(model).records
    assert [r.layer for r in records] == s.experts
    for r in records:
        assert r.modality_source == s.variant.source and r.vision_share_per_rank == [share], r
    # A text-only forward (e.g. a decode step): modality from input_ids, no vision.
    telemetry = realb_hf.get_telemetry(model)
    telemetry.reset()
    ids = torch.randint(10, 128, (2, 3))
    s.run(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert [(r.modality_source, r.vision_share_per_rank) for r in telemetry.records] == [("input_ids", [0.0])] * 2


def test_deepseek_vl2_modality_comes_from_images_seq_mask_not_token_ids(stock):
    """DeepSeek-VL2's config names no image token id: without images_seq_mask ReaLB sees only text."""
    s = stock("deepseek_vl2")
    model = s.load(policy="off")
    inputs = dict(s.inputs)
    mask = inputs["images_seq_mask"].clone()
    mask[0] = False  # the first row's image is not marked (its features are not scattered either)
    s.run(model, **{**inputs, "images_seq_mask": mask})
    expected = round(s.num_image_tokens / 2 / inputs["input_ids"].numel(), 6)
    assert [r.vision_share_per_rank for r in realb_hf.get_telemetry(model).records] == [[expected]] * 2


# ---- save and reload -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_through_trust_remote_code(stock, name, tmp_path):
    s = stock(name)
    config = dict(policy="all_low", low_precision="fp8", ep_size=2, modality_threshold=0.9)
    model = s.load(**config)
    expected = s.run(model)
    saved = tmp_path / f"realb_saved_{name}"
    model.save_pretrained(saved)

    assert {p.name for p in saved.iterdir()} >= set(s.variant.files)  # the remote code travels with the weights
    on_disk = json.loads((saved / "config.json").read_text())
    assert on_disk["quantization_config"] == realb_hf.RealbConfig(**config).to_dict()
    assert on_disk["auto_map"]["AutoModelForCausalLM"] == s.variant.config["auto_map"]["AutoModelForCausalLM"]
    tensors, stock_tensors = load_file(saved / "model.safetensors"), load_file(s.path / "model.safetensors")
    assert tensors.keys() == stock_tensors.keys() and all(torch.equal(tensors[k], stock_tensors[k]) for k in tensors)

    reloaded = s.load(path=saved)  # no quantization_config given: restored from config.json
    assert realb_hf.get_runtime(reloaded).config.to_dict() == realb_hf.RealbConfig(**config).to_dict()
    assert [n for n, m in reloaded.named_modules() if isinstance(m, RealbModuleListExperts)] == s.experts
    assert all(m.realb_is_stacked() for m in lists_of(reloaded))
    assert torch.equal(s.run(reloaded), expected)
    sd, sd_reloaded = model.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd_reloaded.keys() and all(torch.equal(sd[k], sd_reloaded[k]) for k in sd)

    # Saving unstacked the experts (own storage each); the next lowered forward stacks them again.
    assert not any(m.realb_is_stacked() for m in lists_of(model))
    assert torch.equal(s.run(model), expected)
    assert all(m.realb_is_stacked() for m in lists_of(model))
    assert storage_bytes(model) == s.storage_bytes


def test_moving_or_replacing_weights_restacks(stock):
    s = stock("kimi_vl")
    model = s.load(policy="all_low", low_precision="fp8")
    expected = s.run(model)
    experts = lists_of(model)
    stacks = [m.gate_up_proj for m in experts]
    # What model.to(device) does to every parameter (`param.data = converted copy`; a CPU-only test machine has
    # no other device, and transformers refuses dtype casts of quantized models): the lists stack again at once.
    model.to("cpu")  # already there: nothing moves, the stacks stay
    assert all(m.gate_up_proj is old for m, old in zip(experts, stacks))
    model._apply(lambda t: t.clone())
    assert all(m.realb_is_stacked() and m.gate_up_proj is not old for m, old in zip(experts, stacks))
    assert storage_bytes(model) == s.storage_bytes
    assert torch.equal(s.run(model), expected)
    # Weights replaced behind ReaLB's back: the next lowered forward notices and stacks again.
    for m in experts:
        for mlp in m:
            mlp.gate_proj.weight.data = mlp.gate_proj.weight.data.clone()
    assert not any(m.realb_is_stacked() for m in experts)
    assert torch.equal(s.run(model), expected)
    assert all(m.realb_is_stacked() for m in experts) and storage_bytes(model) == s.storage_bytes
    # Weights that are not in memory (meta, e.g. offloaded) cannot be stacked: a clear error.
    with pytest.raises(ValueError, match="not loaded"):
        experts[0].to("meta").realb_stack()
