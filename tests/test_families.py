"""ReaLB on every tiny family of `realb_hf.tiny.TINY_FAMILIES` (5 multimodal, 4 text-only), loaded through
`from_pretrained(..., quantization_config=RealbConfig(...))` from a stock checkpoint saved once per module.

Measured relative error of the logits, ||ReaLB - stock|| / ||stock|| over the whole tiny batch (2 rows), with
policy="all_low" (every expert of every MoE layer lowered), CPU, torch 2.13 + torchao 0.18, seed 0.
The bound asserted is the measured value plus a margin (about 25%, at least 0.002).

| family          | fp8    | nvfp4  | mxfp4  |
| --------------- | ------ | ------ | ------ |
| qwen3_vl_moe    | 0.90%  | 2.79%  | 2.70%  |
| glm4v_moe       | 1.83%  | 3.63%  | 3.98%  |
| ernie4_5_vl_moe | 0.54%  | 1.95%  | 2.39%  |
| kimi_k25        | 1.68%  | 7.59%  | 8.02%  |
| deepseek_ocr2   | 0.29%  | 0.44%  | 0.48%  |
| qwen3_moe       | 1.28%  | 2.63%  | 2.96%  |
| deepseek_v3     | 3.19%  | 8.25%  | 9.07%  |
| mixtral         | 0.82%  | 2.70%  | 3.39%  |
| gpt_oss         | 6.42%  | 15.17% | 19.76% |

(The logits error is smaller than the per-GEMM error of tests/test_formats.py because the experts are only
part of each layer's output: residuals, attention, shared experts and the vision tower stay bf16.
DeepSeek-OCR-2's batch is 95% image tokens whose features come from the bf16 vision tower, hence its low
numbers; gpt_oss has no shared expert and biased, clamped experts, hence its high ones.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

import realb_hf
from realb_hf.experts import is_fused_experts
from realb_hf.formats.emulation import EmulationWarning
from realb_hf.tiny import TINY_FAMILIES, TinyBatch

FAMILIES = list(TINY_FAMILIES)
VLM_FAMILIES = [n for n, f in TINY_FAMILIES.items() if f.is_vlm]
LOW_FORMATS = ("fp8", "nvfp4", "mxfp4")

# Measured relative logits error (see the table above) per family and format; the bounds sit a little above.
MEASURED = {
    "qwen3_vl_moe": {"fp8": 0.0090, "nvfp4": 0.0279, "mxfp4": 0.0270},
    "glm4v_moe": {"fp8": 0.0183, "nvfp4": 0.0363, "mxfp4": 0.0398},
    "ernie4_5_vl_moe": {"fp8": 0.0054, "nvfp4": 0.0195, "mxfp4": 0.0239},
    "kimi_k25": {"fp8": 0.0168, "nvfp4": 0.0759, "mxfp4": 0.0802},
    "deepseek_ocr2": {"fp8": 0.0029, "nvfp4": 0.0044, "mxfp4": 0.0048},
    "qwen3_moe": {"fp8": 0.0128, "nvfp4": 0.0263, "mxfp4": 0.0296},
    "deepseek_v3": {"fp8": 0.0319, "nvfp4": 0.0825, "mxfp4": 0.0907},
    "mixtral": {"fp8": 0.0082, "nvfp4": 0.0270, "mxfp4": 0.0339},
    "gpt_oss": {"fp8": 0.0642, "nvfp4": 0.1517, "mxfp4": 0.1976},
}
ERROR_BOUNDS = {
    name: {fmt: round(max(err * 1.25, err + 0.002), 4) for fmt, err in per_format.items()}
    for name, per_format in MEASURED.items()
}

# Where the modality of each multimodal family comes from: the processor's type ids where the model takes
# them, else the image placeholder ids in input_ids.
EXPECTED_SOURCE = {
    "qwen3_vl_moe": "mm_token_type_ids",
    "glm4v_moe": "mm_token_type_ids",
    "ernie4_5_vl_moe": "mm_token_type_ids",
    "kimi_k25": "input_ids",
    "deepseek_ocr2": "input_ids",
}

@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmulationWarning)
        yield


class Stock:
    """One family's stock checkpoint on disk, its batch, and the stock model's logits and module classes."""

    def __init__(self, name: str, root):
        self.name = name
        self.family = TINY_FAMILIES[name]
        model = self.family.build()
        self.path = root / name
        model.save_pretrained(self.path)
        self.batch: TinyBatch = self.family.batch(model.config)
        stock = self.load()
        with torch.no_grad():
            self.logits = stock(**self.batch.kwargs).logits
        self.classes = {n: type(m).__name__ for n, m in stock.named_modules()}
        self.experts = [n for n, m in stock.named_modules() if is_fused_experts(m)]

    def auto_class(self):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        return AutoModelForImageTextToText if self.family.is_vlm else AutoModelForCausalLM

    def load(self, **realb_kwargs):
        """The saved model; converted by ReaLB (through the quantizer) when any RealbConfig field is given."""
        extra = {"quantization_config": realb_hf.RealbConfig(**realb_kwargs)} if realb_kwargs else {}
        return self.auto_class().from_pretrained(self.path, dtype=torch.bfloat16, **extra).eval()

    def run(self, model, **overrides):
        with torch.no_grad():
            return model(**{**self.batch.kwargs, **overrides}).logits


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """`stock(name)`: each family is built, saved and run once per module, on first use."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, Stock] = {}

    def get(name: str) -> Stock:
        if name not in cache:
            cache[name] = Stock(name, root)
        return cache[name]

    return get


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- conversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_experts_replaced_everything_else_unchanged(stock, name):
    s = stock(name)
    pools = 2 if name == "ernie4_5_vl_moe" else 1
    assert len(s.experts) == 2 * pools, f"expected every one of the 2 layers to be MoE: {s.experts}"
    model = s.load(policy="off")
    modules = dict(model.named_modules())
    assert set(modules) == set(s.classes), "ReaLB must not add, drop or rename modules"
    for n, m in modules.items():
        if n in s.experts:
            assert isinstance(m, realb_hf.RealbExperts), n
            assert type(m).__name__ == "Realb" + s.classes[n], n
            assert m.realb_runtime is model.realb
        else:
            assert not isinstance(m, realb_hf.RealbExperts), n
            assert type(m).__name__ == s.classes[n], f"{n}: {s.classes[n]} became {type(m).__name__}"
    if name == "ernie4_5_vl_moe":
        pools_seen = {modules[n].realb_pool for n in s.experts}
        assert pools_seen == {"text", "vision"}
        assert all((".text_moe." in n) == (modules[n].realb_pool == "text") for n in s.experts)


# ---- bf16 path -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("policy", ["off", "realb"])
def test_bf16_path_is_bit_identical(stock, name, policy):
    s = stock(name)
    model = s.load(policy=policy)
    logits = s.run(model)
    assert torch.equal(logits, s.logits)
    records = realb_hf.get_telemetry(model).records
    assert len(records) == len(s.experts)
    for r in records:
        assert r.lowered_fraction == 0.0 and r.lowered_experts == 0, (r.layer, r.reason)
        assert set(r.precision_per_rank) == {"bf16"}


# ---- low precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fmt", LOW_FORMATS)
def test_all_low_error_is_bounded(stock, name, fmt):
    s = stock(name)
    model = s.load(policy="all_low", low_precision=fmt)
    err = _rel_err(s.run(model), s.logits)
    assert 0.0 < err < ERROR_BOUNDS[name][fmt], f"{name} {fmt}: relative logits error {err:.4%}"
    records = realb_hf.get_telemetry(model).records
    assert len(records) == len(s.experts)
    for r in records:
        assert r.lowered_fraction == 1.0, (r.layer, r.reason)
        assert set(r.precision_per_rank) == {fmt}


@pytest.mark.parametrize("name", FAMILIES)
def test_ep_size_4_gives_four_ranks(stock, name):
    s = stock(name)
    model = s.load(policy="all_low", low_precision="fp8", ep_size=4)
    logits = s.run(model)
    top_k = 2
    records = realb_hf.get_telemetry(model).records
    assert len(records) == len(s.experts)
    for r in records:
        assert len(r.tokens_per_rank) == 4
        assert len(r.vision_share_per_rank) == 4
        assert r.precision_per_rank == ["fp8"] * 4
        assert sum(r.tokens_per_rank) == r.num_tokens * top_k
    # fp8 scales are per expert row, so splitting the experts into ranks changes nothing numerically.
    one_rank = s.run(s.load(policy="all_low", low_precision="fp8"))
    assert torch.equal(logits, one_rank)


# ---- modality ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VLM_FAMILIES)
def test_vlm_modality_reaches_every_layer(stock, name):
    s = stock(name)
    model = s.load(policy="off")
    s.run(model)
    records = realb_hf.get_telemetry(model).records
    assert len(records) == len(s.experts)
    for r in records:
        assert r.modality_source == EXPECTED_SOURCE[name], r.layer
        if name != "ernie4_5_vl_moe" or ".vision_moe." in r.layer:
            assert max(r.vision_share_per_rank) > 0.0, r.layer


def _check_ernie_pools(records, num_experts_modules: int):
    assert len(records) == num_experts_modules
    text = [r for r in records if ".text_moe." in r.layer]
    vision = [r for r in records if ".vision_moe." in r.layer]
    assert len(text) == len(vision) == num_experts_modules // 2
    for r in text:
        assert r.modality_source == "mm_token_type_ids" and r.vision_share_per_rank == [0.0], r
    for r in vision:
        assert r.modality_source == "mm_token_type_ids" and r.vision_share_per_rank == [1.0], r


def test_ernie_pools_see_their_modality_with_processor_type_ids(stock):
    """The batch as ERNIE's processor builds it: image start/end are vision for the MoE only."""
    s = stock("ernie4_5_vl_moe")
    kw = s.batch.kwargs
    assert not torch.equal(kw["mm_token_type_ids"], kw["moe_mm_token_type_ids"])
    model = s.load(policy="off")
    s.run(model)
    _check_ernie_pools(realb_hf.get_telemetry(model).records, len(s.experts))


def test_ernie_pools_see_their_modality_when_type_ids_agree(stock):
    """With both type-id tensors equal, every pool's rows line up with the captured modality."""
    s = stock("ernie4_5_vl_moe")
    model = s.load(policy="off")
    s.run(model, moe_mm_token_type_ids=s.batch.kwargs["mm_token_type_ids"])
    _check_ernie_pools(realb_hf.get_telemetry(model).records, len(s.experts))


# ---- generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VLM_FAMILIES)
def test_generate_with_image_under_realb(stock, name):
    s = stock(name)
    model = s.load(policy="all_low", low_precision="fp8")
    telemetry = realb_hf.get_telemetry(model)
    telemetry.reset()
    prompt = s.batch.kwargs["input_ids"]
    # A random model may emit the image placeholder id (5), which ReaLB rightly counts as an image token:
    # keep the new tokens to ordinary text by suppressing the tiny vocabulary's special ids (0-9).
    with torch.no_grad():
        out = model.generate(
            **s.batch.kwargs, max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=list(range(10))
        )
    assert out.shape == (prompt.shape[0], prompt.shape[1] + 3)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert (out[:, prompt.shape[1] :] >= 10).all()
    assert telemetry.forwards == 3
    by_forward: dict[int, list] = {}
    for r in telemetry.records:
        by_forward.setdefault(r.forward, []).append(r)
    assert sorted(by_forward) == [1, 2, 3]
    assert sum(r.num_tokens for r in by_forward[1]) == prompt.numel() * 2  # prefill: every token, 2 MoE layers
    for step in (2, 3):  # decode: one new (text) token per row, through the text experts only
        records = by_forward[step]
        assert len(records) == 2, [r.layer for r in records]
        for r in records:
            assert r.num_tokens == prompt.shape[0]
            assert r.modality_source in ("mm_token_type_ids", "input_ids"), r
            assert r.vision_share_per_rank == [0.0], r
            assert r.precision_per_rank == ["fp8"]
            assert ".vision_moe." not in r.layer
