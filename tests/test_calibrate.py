"""`realb-hf calibrate`: per-layer and per-expert sensitivity on the bundled model, its data, and its refusals."""

import json

import pytest
import torch
from PIL import Image
from task_fixtures import write_other_tasks

from realb_hf import accuracy, bundled, cli
from realb_hf.calibrate import calibrate, experts_modules, load_model, load_samples, table

MODEL = str(bundled.bundled_model_dir())


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def test_cli_on_the_bundled_model_and_tasks(tmp_path, capsys):
    out = tmp_path / "cal.json"
    argv = ["calibrate", MODEL, "--batches", "1", "--batch-size", "4", "--formats", "fp8", "mxfp4"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["samples"] == 4 and report["data"] == "bundled" and report["formats"] == ["fp8", "mxfp4"]
    assert len(report["layers"]) == 4  # the bundled model's MoE layers
    for row in report["layers"]:
        assert row["layer"] in printed
        fp8, mxfp4 = row["fp8"], row["mxfp4"]
        assert 0 < fp8["relative_error"] < mxfp4["relative_error"] < 1  # 4-bit errs more than 8-bit
        assert fp8["experts"] and all(0 < e["relative_error"] < 1 for e in fp8["experts"].values())
        assert fp8["nll_cost"]["n"] == 4 and fp8["nll_cost"]["low"] <= fp8["nll_cost"]["diff"] <= fp8["nll_cost"]["high"]
    assert set(report["all_layers"]) == {"fp8", "mxfp4"}
    assert "| all layers |" in printed and f"wrote {out}" in printed


def test_expert_rows_add_up_to_the_routed_pairs(loaded):
    model, processor = loaded
    samples = load_samples("bundled", 4)
    report = calibrate(model, processor, samples, ("fp8",), batch_size=4, progress=False, n_resamples=100)
    inputs = processor.apply_chat_template(
        [s.messages for s in samples], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"},
    )  # fmt: skip
    pairs = int(inputs["attention_mask"].sum()) * model.config.text_config.num_experts_per_tok
    for row in report["layers"]:
        assert sum(e["rows"] for e in row["fp8"]["experts"].values()) == pairs  # padding rows left out


def test_bf16_nll_is_the_accuracy_tables_answer_nll(loaded):
    model, processor = loaded
    samples = load_samples(None, 4)
    report = calibrate(model, processor, samples, ("fp8",), batch_size=4, progress=False, n_resamples=100)
    examples = accuracy.load_tasks().heldout_set(4, seed=0)
    result = accuracy.evaluate(model, processor, examples, accuracy.EvalConfig("bf16", None), batch_size=4)
    assert report["bf16_nll"] == pytest.approx(sum(result.question_nll) / 4, rel=1e-3, abs=1e-5)


def test_a_folder_of_prompts_with_and_without_images(loaded, tmp_path):
    model, processor = loaded
    (tmp_path / "a.txt").write_text("What colour is the shape?")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("What is 3 plus 4?")
    (tmp_path / "notes.md").write_text("ignored: only NAME.txt prompts and their images are data")
    samples = load_samples(str(tmp_path), 10)
    assert len(samples) == 2 and samples[0].answer is None
    assert [p["type"] for p in samples[0].messages[0]["content"]] == ["image", "text"]
    report = calibrate(model, processor, samples, ("nvfp4",), batch_size=2, progress=False, n_resamples=100)
    assert report["samples"] == 2 and torch.isfinite(torch.tensor(report["bf16_nll"])) and report["bf16_nll"] > 0
    assert "nvfp4 Δ NLL [95% CI]" in table(report)


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        (lambda p: None, lambda p: [str(p / "nope")], "no such model folder"),
        (lambda p: (p / "m").mkdir(), lambda p: [str(p / "m")], "not a model folder (no config.json)"),
        (lambda p: None, lambda p: [MODEL, "--data", str(p / "missing")], "no such folder"),
        (lambda p: (p / "d").mkdir(), lambda p: [MODEL, "--data", str(p / "d")], "no prompts (NAME.txt files)"),
        (
            lambda p: ((p / "d").mkdir(), (p / "d" / "x.txt").write_text("  \n")),
            lambda p: [MODEL, "--data", str(p / "d")],
            "x.txt is empty",
        ),
        (
            lambda p: ((p / "d").mkdir(), Image.new("RGB", (8, 8)).save(p / "d" / "cat.png")),
            lambda p: [MODEL, "--data", str(p / "d")],
            "image cat.png has no prompt cat.txt",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make, argv, message):
    make(tmp_path)
    assert cli.main(["calibrate", *argv(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("realb-hf calibrate: error: ") and message in err


def test_tasks_choose_the_held_out_questions(tmp_path, capsys):
    """--tasks: another task module's questions (here only colour and sum questions), never with a folder."""
    tasks = write_other_tasks(tmp_path)
    out = tmp_path / "cal.json"
    argv = ["calibrate", MODEL, "--tasks", str(tasks), "--batches", "1", "--batch-size", "4", "--formats", "nvfp4"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == str(tasks) and report["samples"] == 4
    samples = load_samples(None, 4, tasks=str(tasks))
    assert [s.answer for s in samples] == [ex.answer for ex in accuracy.load_tasks(str(tasks)).heldout_set(4)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("what colour is the shape ?")
    capsys.readouterr()
    assert cli.main(["calibrate", MODEL, "--data", str(tmp_path / "d"), "--tasks", str(tasks), "--no-progress"]) == 2
    assert "it cannot go with --data" in capsys.readouterr().err
    assert cli.main(["calibrate", MODEL, "--tasks", "no_such_tasks_module", "--no-progress"]) == 2
    assert "--tasks no_such_tasks_module: No module named 'no_such_tasks_module'" in capsys.readouterr().err


def test_unknown_format_and_counts_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", MODEL, "--formats", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["calibrate", MODEL, "--batches", "0"])
    assert "--batches: must be a whole number >= 1" in capsys.readouterr().err


def test_library_refusals(loaded):
    model, processor = loaded
    with pytest.raises(ValueError, match="unknown low format 'int3'"):
        calibrate(model, processor, load_samples(None, 1), ("int3",), progress=False)
    with pytest.raises(ValueError, match="no calibration samples"):
        calibrate(model, processor, [], ("fp8",), progress=False)
    with pytest.raises(ValueError, match="no MoE experts layers"):
        experts_modules(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def text_moe_dir(tmp_path_factory):
    """A tiny text-only Qwen3-MoE folder with the bundled word-level tokenizer and its chat template."""
    from transformers import AutoTokenizer

    from realb_hf.tiny import build_tiny_model, tiny_qwen3_moe_config

    path = tmp_path_factory.mktemp("text_moe")
    build_tiny_model(tiny_qwen3_moe_config()).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.chat_template = (bundled.bundled_model_dir() / "chat_template.jinja").read_text()
    tokenizer.save_pretrained(path)
    return path


def test_a_text_only_moe_reads_prompts_with_its_tokenizer(text_moe_dir, tmp_path):
    (tmp_path / "a.txt").write_text("what is 3 + 4 ?")
    (tmp_path / "b.txt").write_text("what comes after b ?")
    model, tokenizer = load_model(text_moe_dir)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and not hasattr(tokenizer, "image_processor")
    report = calibrate(model, tokenizer, load_samples(str(tmp_path), 10), ("fp8",), batch_size=2, progress=False)
    assert [row["layer"] for row in report["layers"]] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert report["bf16_nll"] > 0 and all(row["fp8"]["relative_error"] > 0 for row in report["layers"])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="the data holds images but the model folder has no image processor"):
        calibrate(model, tokenizer, load_samples(str(tmp_path), 10), ("fp8",), progress=False)
