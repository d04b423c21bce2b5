"""Saving and pushing ReaLB models with a model card, with no network: uploads are intercepted at HfApi."""

import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import load_qwen
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

import realb_hf
from realb_hf import cli
from realb_hf.card_inputs import CardInputError, read_accuracy_file, telemetry_document
from realb_hf.hub import (
    accuracy_markdown,
    build_model_card,
    folder_operations,
    push_with_card,
    save_telemetry,
    save_with_card,
)
from realb_hf.tiny import qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"
SETTINGS = dict(policy="all_low", low_precision="fp8", ep_size=2, modality_threshold=0.9)
ACCURACY = [{"benchmark": "tiny held-out", "bf16": 0.97, "ReaLB": 0.96}]
MODEL_FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors"]
BASE = "me/tiny-qwen3-vl-base"  # a Hub model with the tiny model's architecture (its config is faked below)
REAL = "Qwen/Qwen3-VL-30B-A3B-Instruct"


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Offline, as CI is: a config the fakes do not answer for cannot be read, and nothing reaches the Hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import transformers.utils.hub as tf_hub

    monkeypatch.setattr(tf_hub, "_hf_api", None)


@pytest.fixture(autouse=True)
def hub_configs(monkeypatch):
    """AutoConfig answers for BASE (the tiny architecture) and REAL (the real one's numbers); any other id is read
    offline (`no_hub`) and is not found."""
    from transformers import AutoConfig

    configs = {
        BASE: tiny_qwen3_vl_moe_config(),
        REAL: tiny_qwen3_vl_moe_config(num_experts=128, top_k=8, layers=48, hidden=2048),
    }
    original = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if name in configs:
            return configs[name]
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(from_pretrained))
    return configs


@pytest.fixture
def hub_calls(monkeypatch):
    """Fake HfApi.create_repo / create_commit that record what an upload would send (file contents included)."""
    calls = {"create_repo": [], "create_commit": [], "tokens": []}

    def create_repo(self, repo_id, *args, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        calls["tokens"].append(self.token)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def create_commit(self, repo_id, operations, *args, **kwargs):
        files = {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else bytes(source)
        calls["create_commit"].append(
            {"repo_id": repo_id, "paths": [op.path_in_repo for op in operations], "files": files, **kwargs}
        )
        calls["tokens"].append(self.token)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0123",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid="0123",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


@pytest.fixture(scope="module")
def realb_model(qwen_dir):
    """The tiny model loaded with ReaLB, after one image+text forward (so telemetry has records)."""
    model = load_qwen(qwen_dir, **SETTINGS)
    with torch.no_grad():
        model(**qwen3_vl_image_batch(batch=2, config=tiny_qwen3_vl_moe_config()).kwargs)
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "hello": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def check_card(text: str, *, repo_id: str | None = None) -> ModelCard:
    card = ModelCard(text)
    assert {"realb", "moe", "multimodal"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    body = card.text
    assert "import realb_hf  # must come first" in body
    assert "Unknown quantization type, got realb" in body and "plain bf16 experts" in body
    assert "AutoModelForImageTextToText.from_pretrained" in body
    assert body.index("import realb_hf") < body.index("from transformers import")
    if repo_id:
        assert f'from_pretrained("{repo_id}"' in body
    assert "| `policy` | `all_low` |" in body and "| `ep_size` | `2` |" in body
    assert "| `modality_threshold` | `0.9` |" in body and "| `low_precision` | `fp8` |" in body
    assert FAKE_TOKEN not in text
    return card


# ---- save -------------------------------------------------------------------------------------------------


def test_save_with_card_and_reload(realb_model, qwen_batch, tmp_path):
    telemetry = realb_hf.get_telemetry(realb_model)
    out = save_with_card(
        realb_model,
        tiny_tokenizer(),
        tmp_path / "saved",
        base_model=BASE,
        telemetry=telemetry,
        accuracy_table=ACCURACY,
    )
    names = sorted(p.name for p in out.iterdir())
    assert set(MODEL_FILES) <= set(names) and "tokenizer.json" in names
    on_disk = json.loads((out / "config.json").read_text())["quantization_config"]
    assert on_disk == realb_hf.RealbConfig(**SETTINGS).to_dict()

    text = (out / "README.md").read_text()
    card = check_card(text)
    assert card.data.base_model == BASE
    assert card.text.splitlines()[1] == "# tiny-qwen3-vl-base with ReaLB"
    assert f"This is [{BASE}](https://huggingface.co/{BASE})" in card.text
    assert "AutoProcessor.from_pretrained" in card.text
    summary = telemetry.summary()
    assert f"| token-expert pairs in low precision | {100 * summary['lowered_token_fraction']:.1f}% |" in text
    assert f"| mean predicted MoE-layer speedup (cost model) | {summary['predicted_speedup']:.2f}x |" in text
    assert "| benchmark | bf16 | ReaLB |" in text and "| tiny held-out | 0.97 | 0.96 |" in text

    reloaded = load_qwen(out, realb=False)  # no quantization_config passed: the saved one is restored
    assert realb_hf.get_runtime(reloaded).config == realb_hf.RealbConfig(**SETTINGS)
    with torch.no_grad():
        assert torch.equal(reloaded(**qwen_batch.kwargs).logits, realb_model(**qwen_batch.kwargs).logits)


def test_card_without_telemetry_or_accuracy(realb_model):
    card = build_model_card(realb_model, repo_id="me/tiny-realb", has_processor=False)
    check_card(str(card), repo_id="me/tiny-realb")
    assert "## Telemetry" not in card.text and "## Accuracy" not in card.text
    assert "AutoProcessor" not in card.text and card.data.base_model is None  # a local path is not a base model


def test_save_refuses_a_model_without_realb(qwen_dir, tmp_path):
    with pytest.raises(ValueError, match="does not run ReaLB"):
        save_with_card(load_qwen(qwen_dir), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_card_inputs(realb_model, tmp_path):
    assert accuracy_markdown(None) is None and accuracy_markdown("| a |\n|---|") == "| a |\n|---|"
    assert accuracy_markdown({"MMMU": {"bf16": 50.1, "ReaLB": 49.8}}).splitlines() == [
        "|  | bf16 | ReaLB |",
        "|---|---|---|",
        "| MMMU | 50.1 | 49.8 |",
    ]
    assert accuracy_markdown([{"a": "x|y"}]).splitlines()[-1] == "| x\\|y |"
    for bad in ("no table here", [], [1, 2], {"model": "x"}, 3):
        with pytest.raises(CardInputError, match="accuracy_table"):
            accuracy_markdown(bad)
    document = telemetry_document(realb_model)
    assert document["model"]["model_type"] == "qwen3_vl_moe" and document["summary"] == document["summary"]
    assert document["model"]["moe_layers"] == {f"model.language_model.layers.{i}.mlp.experts": 8 for i in range(2)}
    assert json.loads(save_telemetry(realb_model, tmp_path / "t.json").read_text()) == json.loads(json.dumps(document))


# ---- push -------------------------------------------------------------------------------------------------


def test_push_with_card_sends_one_commit_and_never_shows_the_token(realb_model, hub_calls, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    info = push_with_card(
        realb_model,
        "me/tiny-realb",
        base_model=BASE,
        telemetry=realb_hf.get_telemetry(realb_model),
        accuracy_table=ACCURACY,
        token=FAKE_TOKEN,
        private=True,
    )
    assert info.oid == "0123"
    assert hub_calls["create_repo"] == [
        {"repo_id": "me/tiny-realb", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    (commit,) = hub_calls["create_commit"]
    assert commit["repo_id"] == "me/tiny-realb" and commit["paths"] == MODEL_FILES
    assert commit["commit_message"] == "Upload ReaLB model with realb_hf" and commit["create_pr"] is False
    config = json.loads(commit["files"]["config.json"])
    assert config["quantization_config"] == realb_hf.RealbConfig(**SETTINGS).to_dict()
    card_text = commit["files"]["README.md"].decode()
    check_card(card_text, repo_id="me/tiny-realb")
    assert hub_calls["tokens"] == [FAKE_TOKEN, FAKE_TOKEN]  # the token reached HfApi ...

    out = capsys.readouterr()  # ... and nothing else
    seen = out.out + out.err + caplog.text + "".join(str(r.args) for r in caplog.records)
    assert FAKE_TOKEN not in seen and FAKE_TOKEN not in card_text
    assert all(FAKE_TOKEN.encode() not in content for content in commit["files"].values())


def test_plain_push_to_hub_keeps_quantization_config(realb_model, hub_calls, monkeypatch):
    """transformers' own `model.push_to_hub` uploads config.json with quant_method "realb" (verified offline)."""
    from huggingface_hub.errors import EntryNotFoundError

    def no_remote_card(cls, *args, **kwargs):
        raise EntryNotFoundError("no README.md on the (fake) Hub")

    monkeypatch.setattr(ModelCard, "load", classmethod(no_remote_card))
    realb_model.push_to_hub("me/plain-push", token=FAKE_TOKEN)
    (commit,) = hub_calls["create_commit"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(commit["paths"])
    config = json.loads(commit["files"]["config.json"])
    assert config["quantization_config"]["quant_method"] == "realb"
    assert config["quantization_config"] == realb_hf.RealbConfig(**SETTINGS).to_dict()


def test_folder_operations_skip_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("a.json", "sub/b.bin", ".cache/x", ".hidden"):
        (tmp_path / name).write_text("x")
    assert [op.path_in_repo for op in folder_operations(tmp_path)] == ["a.json", "sub/b.bin"]


# ---- CLI --------------------------------------------------------------------------------------------------


def test_cli_save_and_push(qwen_dir, realb_model, hub_calls, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    telemetry = save_telemetry(realb_model, tmp_path / "realb.json")  # recorded on this model, these settings
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps(ACCURACY))
    knobs = ["--policy", "all_low", "--low-precision", "fp8", "--ep-size", "2", "--modality-threshold", "0.9"]
    out = tmp_path / "out"
    assert (
        cli.main(
            ["save", str(qwen_dir), str(out), *knobs, "--telemetry", str(telemetry), "--accuracy-table", str(accuracy)]
        )
        == 0
    )
    check_card((out / "README.md").read_text())
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]
        == realb_hf.RealbConfig(**SETTINGS).to_dict()
    )

    # `push` of the saved folder: its saved settings come back without flags; the token comes from HF_TOKEN.
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert (
        cli.main(["push", str(out), "me/tiny-realb", "--private", "--base-model", BASE])
        == 0
    )
    (commit,) = hub_calls["create_commit"]
    assert commit["paths"] == MODEL_FILES and hub_calls["create_repo"][0]["private"] is True
    card = check_card(commit["files"]["README.md"].decode(), repo_id="me/tiny-realb")
    assert card.data.base_model == BASE
    printed = capsys.readouterr()
    assert "pushed" in printed.out
    assert FAKE_TOKEN not in printed.out + printed.err + caplog.text


# ---- the card states only what is true of the saved model ---------------------------------------------------


def test_a_real_models_name_is_refused_for_other_weights(realb_model, tmp_path):
    with pytest.raises(CardInputError, match=r"do not come from Qwen/Qwen3-VL-30B-A3B-Instruct .*num_hidden_layers 2 here, 48"):
        save_with_card(realb_model, None, tmp_path / "out", base_model=REAL)
    with pytest.raises(CardInputError, match="could not be read"):  # offline: cannot be checked, so not claimed
        save_with_card(realb_model, None, tmp_path / "out", base_model="someone/unreachable")
    assert not (tmp_path / "out").exists()


def test_the_card_describes_the_weight_cache_and_policy_it_was_saved_with(qwen_dir):
    persistent = build_model_card(load_qwen(qwen_dir, weight_cache="persistent", ep_size=2), has_processor=False).text
    assert "kept in memory" in persistent and "on the fly" not in persistent
    on_the_fly = build_model_card(load_qwen(qwen_dir, ep_size=2), has_processor=False).text
    assert "made on the fly for each lowered layer" in on_the_fly and "kept in memory" not in on_the_fly
    off = build_model_card(load_qwen(qwen_dir, policy="off"), has_processor=False).text
    assert "every expert runs in bf16, as in the stock model" in off and "ReaLB lowers" not in off
    assert off.splitlines()[1] == "# qwen3_vl_moe model with ReaLB"  # no base model given: no name borrowed
    assert "(`qwen3_vl_moe`, 2 decoder layers, 8 experts per MoE layer, top-2, hidden size 64)" in off


def test_telemetry_from_another_model_or_other_settings_is_refused(realb_model, qwen_dir, qwen_batch, tmp_path):
    run_json = tmp_path / "run.json"  # what `realb-hf run --help` used to suggest: a different, tiny model
    assert cli.main(["run", "--num-experts", "16", "--batch", "1", "--grid", "4", "--json", str(run_json)]) == 0
    with pytest.raises(CardInputError, match=r"recorded on another model or with other settings: .*16 experts there"):
        save_with_card(realb_model, None, tmp_path / "out", telemetry=run_json)
    with pytest.raises(CardInputError, match="not the model's own"):
        save_with_card(realb_model, None, tmp_path / "out", telemetry=realb_hf.Telemetry())
    plain = tmp_path / "plain.json"
    realb_hf.get_telemetry(realb_model).to_json(plain)  # no provenance: cannot be checked
    with pytest.raises(CardInputError, match="does not say which model recorded it"):
        save_with_card(realb_model, None, tmp_path / "out", telemetry=plain)

    other = load_qwen(qwen_dir, policy="all_low", low_precision="fp8", ep_size=4, modality_threshold=0.9)
    with torch.no_grad():
        other(**qwen_batch.kwargs)
    other.realb.reconfigure(ep_size=2)  # records of EP=4 next to a saved ep_size of 2
    with pytest.raises(CardInputError, match=r"records have \[4\] ranks, the model is saved with ep_size=2"):
        save_with_card(other, None, tmp_path / "out", telemetry=realb_hf.get_telemetry(other))
    assert not (tmp_path / "out").exists()


def test_an_accuracy_reports_title_does_not_become_a_second_h1(realb_model, tmp_path):
    report = tmp_path / "accuracy.md"
    report.write_text("# Accuracy of the model\n\n## Batching: mixed\n\n| config | overall |\n|---|---|\n| bf16 | 99 |\n")
    card = build_model_card(realb_model, accuracy_table=read_accuracy_file(report), has_processor=False).text
    lines = card.splitlines()
    assert "# Accuracy of the model" not in lines and "## Batching: mixed" not in lines
    assert "### Accuracy of the model" in card and "#### Batching: mixed" in card
