"""The model that ships in demo/model/: loads offline, is small, answers held-out questions, in bf16 and fp8."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "demo" / "model"
if str(ROOT) not in sys.path:  # `demo` is not an installed package
    sys.path.insert(0, str(ROOT))

from demo import tasks  # noqa: E402

# Two fixed held-out questions of every kind (held-out set 1: not the set the accuracy table uses).
FIXED = tasks.heldout_set(2 * len(tasks.KINDS), seed=1)


def _load(**kwargs):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        MODEL_DIR, dtype=torch.bfloat16, local_files_only=True, **kwargs
    ).eval()


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return _load()


def _answers(model, processor, examples) -> list[str]:
    inputs = processor.apply_chat_template(
        [ex.messages() for ex in examples],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def test_files_and_size():
    names = {p.name for p in MODEL_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert required in names
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 25 * 10**6, f"demo/model is {total / 1e6:.1f} MB"
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only


def test_loads_offline(model, processor):
    from transformers import Qwen3VLMoeForConditionalGeneration

    assert isinstance(model, Qwen3VLMoeForConditionalGeneration)
    assert model.dtype == torch.bfloat16
    text = model.config.text_config
    assert text.num_experts >= 8 and text.num_experts_per_tok == 2
    assert text.hidden_size % 32 == 0 and text.moe_intermediate_size % 32 == 0
    assert 2 * text.moe_intermediate_size != text.hidden_size
    tok = processor.tokenizer
    for special in (
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|video_pad|>",
        "<|im_start|>",
        "<|im_end|>",
    ):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_chat_template_and_generate_one_image(model, processor):
    """The exact call sequence the demo uses, one question at a time."""
    ex = next(e for e in FIXED if e.kind == "colour")
    inputs = processor.apply_chat_template(
        ex.messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 16 <= image_tokens <= 64  # a few dozen tokens per image
    assert int(inputs["mm_token_type_ids"].sum()) == image_tokens
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == ex.answer


def test_answers_fixed_heldout_questions_bf16(model, processor):
    answers = _answers(model, processor, FIXED)
    wrong = [(ex.question, ex.answer, a) for ex, a in zip(FIXED, answers) if a != ex.answer]
    assert not wrong, wrong


def test_answers_with_fp8_everywhere():
    from transformers import AutoProcessor

    import realb_hf

    processor = AutoProcessor.from_pretrained(MODEL_DIR, local_files_only=True)
    model = _load(quantization_config=realb_hf.RealbConfig(policy="all_low", low_precision="fp8"))
    answers = _answers(model, processor, FIXED)
    wrong = [(ex.question, ex.answer, a) for ex, a in zip(FIXED, answers) if a != ex.answer]
    assert not wrong, wrong
    summary = realb_hf.get_telemetry(model).summary()
    assert summary["lowered_token_fraction"] == 1.0  # every expert really ran in fp8


def _same(a: tasks.Example, b: tasks.Example) -> bool:
    same_image = (a.image is None and b.image is None) or (
        a.image is not None and b.image is not None and a.image.tobytes() == b.image.tobytes()
    )
    return same_image and (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)


def test_tasks_deterministic():
    for kind in tasks.KINDS:
        assert _same(tasks.make_example(random.Random(5), kind), tasks.make_example(random.Random(5), kind))
    assert all(_same(a, b) for a, b in zip(tasks.heldout_set(16), tasks.heldout_set(16)))
    assert all(_same(tasks.train_example(i), tasks.train_example(i)) for i in range(8))
    counts = {k: sum(ex.kind == k for ex in tasks.heldout_set(80)) for k in tasks.KINDS}
    assert set(counts.values()) == {10}  # balanced


def test_tasks_answers_are_single_words():
    vocab = set(tasks.vocabulary())
    for i in range(200):
        ex = tasks.train_example(i)
        assert ex.answer in vocab and " " not in ex.answer
        assert all(w in vocab for w in ex.question.split())
        assert (ex.image is None) == (ex.kind in tasks.TEXT_KINDS)


def test_train_and_heldout_seeds_disjoint():
    assert tasks.TRAIN_SEEDS.stop <= tasks.HELDOUT_SEEDS.start
    assert tasks.train_seed(len(tasks.TRAIN_SEEDS) - 1) < tasks.heldout_seed(0, 0)
    assert tasks.heldout_seed(999_999, 0) < tasks.heldout_seed(0, 1)
    with pytest.raises(ValueError):
        tasks.train_seed(len(tasks.TRAIN_SEEDS))
    # held-out images are not training images
    train = [tasks.train_example(i) for i in range(400)]
    train_images = {ex.image.tobytes() for ex in train if ex.image is not None}
    assert not any(ex.image is not None and ex.image.tobytes() in train_images for ex in tasks.heldout_set(80))
