"""The precision-sensitive model's tasks, trainer and shipped weights (demo/sensitive/)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from demo.sensitive import tasks
from demo.sensitive import train as sensitive_train
from demo.train import build_tokenizer

MODEL_DIR = sensitive_train.DEFAULT_OUT
# printed by `python -m demo.sensitive.train --steps 1600 --batch 256` on the H200 that trained demo/sensitive/model
SHIPPED_FINGERPRINT = "36bae36741a11ebf"


def test_examples_are_deterministic_and_every_answer_is_one_token():
    tokenizer = build_tokenizer(tasks.vocabulary())
    for kind in tasks.KINDS:
        for seed in range(20):
            ex = tasks.make_example(random.Random(seed), kind)
            again = tasks.make_example(random.Random(seed), kind)
            assert (ex.question, ex.answer, ex.kind) == (again.question, again.answer, kind)
            if ex.image is not None:
                assert ex.image.size == (tasks.IMAGE_SIZE, tasks.IMAGE_SIZE)
                assert ex.image.tobytes() == again.image.tobytes()
            assert ex.modality == ("image" if kind in tasks.IMAGE_KINDS else "text")
            ids = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, (kind, ex.answer)
            words = tokenizer(ex.question, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in words, (kind, ex.question)


def test_answers_follow_the_drawing_and_the_arithmetic():
    ex = tasks.make_example(random.Random(3), "add")
    x, y = (int(part.replace(" ", "")) for part in ex.question.rstrip(" =").split(" + "))
    assert int(ex.answer) == x + y
    recall = tasks.make_example(random.Random(4), "recall")
    pairs = dict(p.split() for p in recall.question.split(" . ")[0].split(" , "))
    key = re.search(r"what is (\w) \?", recall.question).group(1)
    assert pairs[key] == recall.answer
    assert tasks.digits(407) == "4 0 7"


def test_heldout_sets_are_balanced_and_disjoint_from_training():
    held = tasks.heldout_set(16, seed=0)
    assert [ex.kind for ex in held] == list(tasks.KINDS) * 2
    other = tasks.heldout_set(16, seed=1)
    assert [ex.question for ex in held] != [ex.question for ex in other]
    with pytest.raises(ValueError, match="unknown kind 'colour'"):
        tasks.make_example(random.Random(0), "colour")


def test_text_rendering_without_freetype_says_what_is_missing(monkeypatch):
    tasks._font.cache_clear()
    monkeypatch.setattr(tasks.features, "check", lambda name: False)
    with pytest.raises(RuntimeError, match="needs FreeType"):
        tasks.make_example(random.Random(0), "number")
    tasks._font.cache_clear()


def test_batched_vision_attention_equals_the_per_image_loop():
    torch.manual_seed(0)
    heads, images, length, dim = 2, 3, 5, 4
    q, k, v = (torch.randn(1, heads, images * length, dim) for _ in range(3))
    cu = torch.arange(images + 1) * length
    out, _ = sensitive_train.equal_images_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=cu, max_length_q=length)
    for i in range(images):
        s = slice(i * length, (i + 1) * length)
        ref = torch.softmax(q[0, :, s] @ k[0, :, s].transpose(-1, -2) * 0.5, -1) @ v[0, :, s]
        torch.testing.assert_close(out[0, s], ref.transpose(0, 1))
    with pytest.raises(ValueError, match="same number of patches"):
        sensitive_train.equal_images_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=cu, max_length_q=length + 1)


def test_the_trainer_is_seeded_and_checks_its_arguments(tmp_path, capsys):
    prints = []
    for run in range(2):
        argv = ["--steps", "2", "--batch", "4", "--workers", "0", "--check-every", "2", "--check-n", "8"]
        assert sensitive_train.main([*argv, "--device", "cpu", "--out", str(tmp_path / f"m{run}")]) == 0
        prints.append(capsys.readouterr().out)
    fingerprints = [re.search(r"weights fingerprint (\w+)", p).group(1) for p in prints]
    assert fingerprints[0] == fingerprints[1]
    assert "nvfp4 everywhere" in prints[0] and (tmp_path / "m0" / "config.json").is_file()
    with pytest.raises(SystemExit):
        sensitive_train.main(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sensitive_train.main(["--device", "tpu"])
    assert "choose cuda, cuda:N, cpu or auto" in capsys.readouterr().err


@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="demo/sensitive/model is not trained")
def test_the_shipped_weights_are_the_trained_ones():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)
    assert sensitive_train.fingerprint(model) == SHIPPED_FINGERPRINT
    assert model.config.text_config.num_experts == 16 and model.config.text_config.num_hidden_layers == 6


@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="demo/sensitive/model is not trained")
def test_positions_from_the_data_workers_are_the_models_own():
    """Training passes M-RoPE positions built on the CPU; the model computes the same ones itself."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    collate = sensitive_train.FastCollator(processor, tasks.IMAGE_SIZE)
    batches = sensitive_train.Batches(collate, sensitive_train.build_config(processor.tokenizer), 6)
    batch = batches[7]
    with torch.no_grad():
        given = model(**batch).logits
        own = model(**{k: v for k, v in batch.items() if k != "position_ids"}).logits
    torch.testing.assert_close(given, own)
