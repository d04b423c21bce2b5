"""The demo's plain functions, without a browser: panels from telemetry, upload checks, N-copy batching, requests."""

import io
import socket
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import realb_hf  # noqa: E402
from demo import app as demo_app  # noqa: E402
from demo import inputs as demo_inputs  # noqa: E402
from demo import models as demo_models  # noqa: E402
from demo import request as demo_request  # noqa: E402
from demo.inputs import InputRefused, UploadError, parse_message, replicate_batch, validate_upload  # noqa: E402
from demo.models import ModelAllowlist, ModelLoadError, ModelStore, resolve_model  # noqa: E402
from demo.panels import (  # noqa: E402
    PRECISION_COLOURS,
    RequestResult,
    balance_html,
    balance_rows,
    heatmap_html,
    layer_label,
    precision_html,
    prefill_records,
    render_panels,
)
from demo.settings import DemoSettings  # noqa: E402
from realb_hf.tiny import build_tiny_model, qwen3_vl_image_batch, tiny_qwen3_vl_moe_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_records():
    """Records of two forwards of the tiny random Qwen3-VL-MoE (16 experts, virtual EP 4, everything lowered)."""
    config = tiny_qwen3_vl_moe_config(num_experts=16)
    model = realb_hf.apply_realb(
        build_tiny_model(config), realb_hf.RealbConfig(policy="all_low", low_precision="fp8", ep_size=4)
    )
    batch = qwen3_vl_image_batch(batch=2, config=config)
    with torch.no_grad():
        model(**batch.kwargs)
        model(**batch.kwargs)
    return list(realb_hf.get_telemetry(model).records)


def png_bytes(size=(32, 24), colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


# ---- panels -----------------------------------------------------------------------------------------------


def test_prefill_records_are_the_first_forward(tiny_records):
    pre = prefill_records(tiny_records)
    assert len(pre) == 2 and {r.forward for r in pre} == {min(r.forward for r in tiny_records)}
    assert prefill_records([]) == []


def test_heatmap_renders_every_layer_and_rank(tiny_records):
    pre = prefill_records(tiny_records)
    img = heatmap_html(pre)
    assert 'id="realb-heatmap-img"' in img and "data:image/png;base64," in img
    assert 'data-layers="2"' in img and 'data-ranks="4"' in img
    table = heatmap_html(pre, use_matplotlib=False)  # the fallback without matplotlib
    assert 'id="realb-heatmap-table"' in table
    cells = [int(c.split('"')[0]) for c in table.split('data-tokens="')[1:]]
    assert cells == [t for r in pre for t in r.tokens_per_rank]
    assert table.count("outline:2px") == sum(p != "bf16" for r in pre for p in r.precision_per_rank)


def test_precision_map_and_balance_table_match_the_records(tiny_records):
    pre = prefill_records(tiny_records)
    prec = precision_html(pre)
    shown = [c.split('"')[0] for c in prec.split('data-precision="')[1:]]
    assert shown == [p for r in pre for p in r.precision_per_rank] and set(shown) == {"fp8"}
    rows = balance_rows(pre)
    assert [row[0] for row in rows] == ["L0", "L1"]
    for row, r in zip(rows, pre):
        assert row[1] == r.num_tokens and row[4] == round(100 * r.lowered_fraction, 1)
        assert row[2] == round(r.balancedness_cost_before, 3) and row[3] == round(r.balancedness_cost_after, 3)
        assert row[5] == round(r.predicted_speedup, 3) and row[6] == r.reason
    table = balance_html(pre)
    assert 'id="realb-balance-table"' in table and ">mean<" in table


def test_panels_show_mixed_ranks_one_reason_spelling_and_one_balancedness_before(tiny_records):
    """A "mixed" rank (granularity expert) has a legend entry; reasons are spelled as the policy's constants in
    every panel; the token balance is not shown next to the identical balancedness before."""
    from dataclasses import replace

    from realb_hf.policy import REASON_LOWERED, REASON_SMALL_BATCH

    pre = prefill_records(tiny_records)
    mixed = [replace(pre[0], precision_per_rank=["mixed", "bf16", "fp8", "bf16"], reason=REASON_LOWERED)]
    small = [replace(r, reason=REASON_SMALL_BATCH) for r in pre]
    prec = precision_html(mixed)
    assert 'data-precision="mixed"' in prec and 'data-legend="mixed"' in prec
    assert "some of the rank&#x27;s experts low" in prec
    bg, _ = PRECISION_COLOURS["mixed"]
    assert f"background:{bg}" in prec.split('data-precision="mixed"')[1].split("</td>")[0]
    for panel in (precision_html(small), balance_html(small)):
        assert REASON_SMALL_BATCH in panel and REASON_SMALL_BATCH.replace("_", " ") not in panel
    table = balance_html(pre)
    assert "balancedness (tokens)" not in table and table.count("balancedness before") == 1
    assert "the balance of the token load" in table  # the note says why one column shows both
    # The note's claim, by construction: before any lowering, a rank's predicted time is its token-expert pairs.
    assert all(r.balancedness_tokens == r.balancedness_cost_before for r in tiny_records)


def test_summary_and_panels_of_a_request(tiny_records):
    settings = DemoSettings(policy="all_low", low_precision="fp8", batch_threshold=16, ep_size=4, copies=2)
    result = RequestResult(
        answer="red", records=tiny_records, copies=2, prompt_tokens=24, image_tokens=16, new_tokens=1, settings=settings
    )
    summary, heat, prec, bal = render_panels(result, use_matplotlib=False)
    pre = prefill_records(tiny_records)
    assert f"{pre[0].num_tokens} tokens" in summary and "crossed" in summary
    assert "2/2 layers lowered" in summary and "100.0%" in summary
    assert "realb-heatmap-table" in heat and "realb-precision-table" in prec and "realb-balance-table" in bal
    empty = render_panels(None)
    assert "No request yet" in empty[0] and all('class="realb-empty"' in p for p in empty[1:])


def test_layer_labels():
    assert layer_label("model.language_model.layers.3.mlp.experts") == "L3"
    assert layer_label("model.language_model.layers.1.mlp.vision_moe.experts") == "L1 vision"
    assert layer_label("model.layers.0.mlp.text_moe.experts") == "L0 text"
    assert layer_label("experts") == "experts"


# ---- uploads ----------------------------------------------------------------------------------------------


def test_upload_accepts_images_by_content(tmp_path):
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif"), ("WEBP", ".webp")):
        path = tmp_path / f"x{suffix}"
        path.write_bytes(png_bytes(fmt=fmt))
        image = validate_upload(str(path))
        assert image.mode == "RGB" and image.size == (32, 24)
    assert validate_upload({"path": str(path)}).size == (32, 24)  # gradio FileData-style dicts too


def test_upload_rejects_non_images(tmp_path):
    text = tmp_path / "notes.png"  # the name lies; the content decides
    text.write_text("not an image at all")
    with pytest.raises(UploadError, match="notes.png is not an image"):
        validate_upload(str(text))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes()[:40])
    with pytest.raises(UploadError, match="not an image"):
        validate_upload(str(truncated))
    with pytest.raises(UploadError, match="could not be read"):
        validate_upload(str(tmp_path / "missing.png"))


def test_upload_rejects_oversize_files_and_images(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(size=(64, 64)))
    with pytest.raises(UploadError, match=r"limited to 0 MB|attachments are limited"):
        validate_upload(str(path), max_bytes=100)
    assert demo_inputs.MAX_UPLOAD_BYTES == 10 * 2**20
    padded = tmp_path / "padded.png"
    padded.write_bytes(png_bytes() + b"\0" * (demo_inputs.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(UploadError, match="10 MB"):
        validate_upload(str(padded))
    with pytest.raises(UploadError, match="64x64 pixels"):
        validate_upload(str(path), max_pixels=1000)


def test_parse_message(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    text, images, paths = parse_message({"text": "  what colour is the shape ? ", "files": [str(img)]})
    assert text == "what colour is the shape ?" and len(images) == 1 and paths == [str(img)]
    assert parse_message("2 + 3 =")[0] == "2 + 3 ="
    with pytest.raises(InputRefused, match="type a question"):
        parse_message({"text": " ", "files": []})
    with pytest.raises(UploadError, match="at most 4 images"):
        parse_message({"text": "x", "files": [str(img)] * 5})
    bad = tmp_path / "b.txt"
    bad.write_text("hello")
    with pytest.raises(UploadError, match="b.txt is not an image"):
        parse_message({"text": "x", "files": [str(bad)]})


# ---- N copies ---------------------------------------------------------------------------------------------


def test_replicate_batch_repeats_rows_and_images():
    one = qwen3_vl_image_batch(batch=1, config=tiny_qwen3_vl_moe_config()).kwargs
    many = replicate_batch(one, 3)
    assert many["input_ids"].shape == (3, one["input_ids"].shape[1])
    assert all(torch.equal(many["input_ids"][i], one["input_ids"][0]) for i in range(3))
    assert torch.equal(many["mm_token_type_ids"][2], one["mm_token_type_ids"][0])
    assert torch.equal(many["pixel_values"], torch.cat([one["pixel_values"]] * 3))
    assert torch.equal(many["image_grid_thw"], torch.cat([one["image_grid_thw"]] * 3))
    assert replicate_batch(one, 1)["input_ids"].shape == one["input_ids"].shape
    with pytest.raises(ValueError):
        replicate_batch(many, 2)
    with pytest.raises(ValueError):
        replicate_batch(one, 0)


def test_replicate_batch_matches_the_processor_on_n_identical_requests():
    """N copies of one request == what the processor returns for N identical requests (bundled model's processor)."""
    train = pytest.importorskip("demo.train", reason="demo/train.py (the bundled model's builders) is not here")
    from demo.tasks import heldout_set

    processor = train.build_processor(train.build_tokenizer())
    ex = heldout_set(1)[0]

    def encode(conversations):
        return processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )

    ours = replicate_batch(dict(encode(ex.messages())), 3)
    ref = encode([ex.messages()] * 3)
    assert set(ours) == set(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


# ---- settings, models, requests ---------------------------------------------------------------------------


def test_settings_validation():
    s = DemoSettings(batch_threshold=512.0, ep_size=4.0, copies=8.0, max_new_tokens=4.0).validate(num_experts=8)
    assert (s.batch_threshold, s.ep_size, s.copies, s.max_new_tokens) == (512, 4, 8, 4)
    assert isinstance(s.copies, int)
    with pytest.raises(ValueError, match="must divide the 8 experts"):
        DemoSettings(ep_size=3).validate(num_experts=8)
    with pytest.raises(ValueError, match="between 1 and 128"):
        DemoSettings(copies=0).validate()
    with pytest.raises(ValueError, match="batch of N copies must be a whole number, got 2.5"):
        DemoSettings(copies=2.5).validate()
    with pytest.raises(ValueError, match="batch threshold must be a whole number"):
        DemoSettings(batch_threshold=None).validate()  # an emptied number box
    with pytest.raises(ValueError, match="modality_threshold"):
        DemoSettings(modality_threshold=1.5).validate()
    with pytest.raises(ValueError, match="not offered"):
        DemoSettings(policy="static").validate()


def test_runtime_changes_apply_through_reconfigure():
    model = realb_hf.apply_realb(build_tiny_model(tiny_qwen3_vl_moe_config()), realb_hf.RealbConfig())
    settings = DemoSettings(policy="all_low", low_precision="mxfp4", modality_threshold=0.9, batch_threshold=7)
    realb_hf.get_runtime(model).reconfigure(**settings.validate(num_experts=8).runtime_changes())
    config = realb_hf.get_runtime(model).config
    assert (config.policy, config.low_precision, config.modality_threshold, config.batch_threshold) == (
        "all_low",
        "mxfp4",
        0.9,
        7,
    )


def test_resolve_model(tmp_path):
    assert resolve_model("") == resolve_model("demo/model") == str(demo_models.BUNDLED_MODEL_DIR)
    assert resolve_model("Qwen/Qwen3-VL-30B-A3B-Instruct") == "Qwen/Qwen3-VL-30B-A3B-Instruct"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model(str(tmp_path.parent))
    with pytest.raises(ModelLoadError, match="no model folder at ./no/such/folder"):
        resolve_model("./no/such/folder")
    with pytest.raises(ModelLoadError, match="neither a local model folder nor a Hub repo id"):
        resolve_model("a/b/c d")
    with pytest.raises(ModelLoadError, match="could not load"):
        demo_models.load_model(str(tmp_path))  # an empty config.json is not a model


def recording_loader(calls, failing=()):
    """A loader that records what it was asked for and fails (like load_model does) for the sources in `failing`."""

    def loader(source, device):
        calls.append(source)
        if source in failing:
            raise ModelLoadError(f"could not load {source!r} with ReaLB: OSError at {source}", public="it did not load")
        return demo_models.LoadedModel(source, object(), object(), 8, 2, True, device)

    return loader


def test_model_store_is_lazy_and_caches():
    calls = []
    store = ModelStore(device="cpu", loader=recording_loader(calls), allowlist=ModelAllowlist(["org/a", "org/b"]))
    assert store.current is None and calls == []
    first = store.get("org/a")
    assert store.get("org/a") is first and calls == ["org/a"]
    store.get("org/b")
    assert calls == ["org/a", "org/b"] and store.current.source == "org/b"


def test_clients_get_only_the_bundled_model_by_default(tmp_path):
    """Without --allow-model no client spec reaches the disk or the Hub, and every refusal reads the same."""
    calls = []
    store = ModelStore(device="cpu", loader=recording_loader(calls))
    assert store.get("").source == store.get("demo/model").source == str(demo_models.BUNDLED_MODEL_DIR)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    probes = [str(tmp_path / "model"), str(tmp_path / "plain"), str(tmp_path / "missing"), "org/name", "/etc", "../x"]
    messages = []
    for spec in probes:
        with pytest.raises(ModelLoadError, match="is not a model this demo serves") as err:
            store.get(spec)
        assert err.value.public == str(err.value)
        messages.append(str(err.value).replace(repr(spec), "SPEC"))
    assert len(set(messages)) == 1, messages  # a model folder, a plain folder, nothing, a Hub id: one message
    assert "--allow-model" in messages[0]
    assert calls == [str(demo_models.BUNDLED_MODEL_DIR)]


def test_allowlist_admits_hub_ids_exactly_and_model_folders_inside_allowed_folders(tmp_path):
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    (root / "a" / "config.json").write_text("{}")
    (root / "empty").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "link").symlink_to(outside)  # resolves outside the allowed folder
    allow = ModelAllowlist([str(root), "org/name"])
    assert allow.admit(str(root / "a")) == str((root / "a").resolve())
    assert allow.admit("org/name") == "org/name"
    refused = [root / "empty", root / "missing", root / "link", outside, root / "a" / ".." / "..",
               "org/name2", "ORG/name", "demo/model/../../etc"]  # fmt: skip
    for spec in refused:
        with pytest.raises(ModelLoadError, match="is not a model this demo serves. It serves: demo/model"):
            allow.admit(str(spec))
    with pytest.raises(ModelLoadError, match="--allow-model ./no/such: there is no folder"):
        ModelAllowlist(["./no/such"])
    with pytest.raises(ModelLoadError, match="neither a local folder nor a Hub repo id"):
        ModelAllowlist(["a/b/c d"])


def test_a_failed_load_keeps_the_current_model_and_hides_the_reason_from_clients(tmp_path):
    calls = []
    store = ModelStore(device="cpu", loader=recording_loader(calls, failing={"org/bad"}))
    store.allowlist.allow("org/bad")
    good = store.get("demo/model")
    with pytest.raises(ModelLoadError) as err:
        store.get("org/bad")
    assert store.current is good and calls == [str(demo_models.BUNDLED_MODEL_DIR), "org/bad"]
    assert err.value.public == "could not load 'org/bad': it did not load" and "OSError" in str(err.value)
    assert store.get("demo/model") is good and len(calls) == 2  # still loaded, not reloaded

    # The real loader: the operator's message names the folder, the client's does not.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        demo_models.load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value) and str(tmp_path) not in err.value.public
    assert "server's log" in err.value.public


def test_demo_options_reach_launch_through_the_cli(capsys):
    """`realb-hf demo` forwards its arguments whole to the demo's parser, so the demo's flags are the CLI's."""
    from realb_hf import cli

    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    shown = capsys.readouterr().out
    assert "--allow-model" in shown and "--max-prompt-tokens" in shown
    args = demo_app.build_parser().parse_args(["--allow-model", "org/a", "--allow-model", "./models"])
    assert args.allow_model == ["org/a", "./models"] and args.max_prompt_tokens == demo_request.MAX_PROMPT_TOKENS
    assert demo_app.build_parser().parse_args([]).allow_model == []
    assert demo_app.main(["--max-prompt-tokens", "0"]) == 2
    assert "--max-prompt-tokens must be >= 1" in capsys.readouterr().err
    assert demo_app.main(["--allow-model", "./no/such/folder"]) == 2
    assert "--allow-model ./no/such/folder: there is no folder" in capsys.readouterr().err


def test_long_questions_and_prompts_are_refused_with_the_limit(random_bundled_like):
    with pytest.raises(InputRefused, match=f"at most {demo_inputs.MAX_QUESTION_CHARS}"):
        parse_message("1 + " * 2000)
    loaded = demo_models.load_model(str(random_bundled_like), device="cpu")
    settings = DemoSettings(copies=2, max_new_tokens=8)
    run = demo_request.run_request(loaded, "a " * 40, [], settings, max_prompt_tokens=20)
    server_cap = r"is 4\d tokens .* at most 20 per copy \(the server's --max-prompt-tokens\)"
    with pytest.raises(InputRefused, match=server_cap):
        next(run)
    run = demo_request.run_request(loaded, "a " * 300, [], settings)  # the bundled model has 256 positions
    with pytest.raises(InputRefused, match="at most 248 per copy .the model's context of 256 positions minus 8 new"):
        next(run)
    *_, result = demo_request.run_request(loaded, "3 + 4 =", [], settings, max_prompt_tokens=20)
    assert result.prompt_tokens <= 20


@pytest.fixture(scope="module")
def random_bundled_like(tmp_path_factory):
    """The bundled model's architecture and processor with random weights (when demo/train.py is there)."""
    train = pytest.importorskip("demo.train", reason="demo/train.py (the bundled model's builders) is not here")
    from transformers import GenerationConfig, Qwen3VLMoeForConditionalGeneration

    tokenizer = train.build_tokenizer()
    processor = train.build_processor(tokenizer)
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(train.build_config(tokenizer)).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids(train.IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(train.PAD),
        do_sample=False,
    )
    path = tmp_path_factory.mktemp("random_bundled_like")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_run_request_streams_row_0_and_records_the_prefill(random_bundled_like):
    from demo.tasks import heldout_set

    loaded = demo_models.load_model(str(random_bundled_like), device="cpu")
    assert loaded.num_experts == 8 and loaded.is_vlm
    ex = heldout_set(1)[0]
    settings = DemoSettings(batch_threshold=64, copies=4, max_new_tokens=3, ep_size=4)
    items = list(demo_request.run_request(loaded, ex.question, [ex.image], settings, lock=threading.Lock()))
    *partials, result = items
    assert isinstance(result, RequestResult) and all(isinstance(p, str) for p in partials)
    assert partials == [] or partials[-1].strip() == result.answer
    pre = prefill_records(result.records)
    assert len(pre) == loaded.moe_layers and pre[0].num_tokens == 4 * result.prompt_tokens
    assert result.image_tokens == 36 and result.copies == 4

    # The answer is row 0's, and equals what one copy alone gives (greedy).
    inputs = loaded.processor.apply_chat_template(
        ex.messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    alone = loaded.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert result.answer == alone


def test_the_page_examples_and_question_forms_are_answered_right_by_the_bundled_model(tmp_path):
    """Every clickable example, and every form the page and the docs show, gets the right answer under the demo's
    default settings (48 copies, ReaLB on) and with one copy."""
    from demo.examples import QUESTION_FORMS, example_messages, examples

    if not (demo_models.BUNDLED_MODEL_DIR / "config.json").is_file():
        pytest.skip("demo/model/ is not built (python -m demo.train)")
    loaded = ModelStore(device="cpu").get("demo/model")
    shown = example_messages(tmp_path)
    cases = []
    for ex, message in zip(examples(), shown, strict=True):
        assert message["text"] == ex.question and len(message["files"]) == (ex.image is not None)
        images = [validate_upload(f) for f in message["files"]]  # the PNG the page offers, read back
        cases.append((message["text"], images, ex.answer))
    assert [ex.kind for ex in examples()] == list(QUESTION_FORMS)
    literal = {"add": "7", "sub": "5", "next": "d", "prev": "c"}  # the text forms exactly as written
    cases += [(QUESTION_FORMS[kind][0], [], answer) for kind, answer in literal.items()]
    for text, images, answer in cases:
        for settings in (DemoSettings(), DemoSettings(copies=1)):
            *_, result = demo_request.run_request(loaded, text, images, settings)
            assert result.answer == answer, (text, settings.copies, result.answer)
    *_, result = demo_request.run_request(loaded, "What is 3 + 4?", [], DemoSettings())
    assert result.answer != "7"  # what the docs say about other phrasings
    for doc in ("README.md", "docs/demo.md"):
        text = (ROOT / doc).read_text()
        assert all(f"`{form}`" in text for form, _ in QUESTION_FORMS.values()), doc


def test_the_model_box_is_read_only_unless_the_operator_allows_other_models():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'gradio>=6,<7')")

    def model_controls(store):
        blocks = demo_app.build_app(store=store).blocks.values()
        return {c.elem_id: c for c in blocks if getattr(c, "elem_id", None) in ("realb-model", "realb-load")}

    default = model_controls(ModelStore(loader=lambda s, d: None))
    assert default["realb-model"].interactive is False and default["realb-load"].visible is False
    assert "bundled model only" in default["realb-model"].info and "--allow-model" in default["realb-model"].info
    opened = model_controls(ModelStore(loader=lambda s, d: None, allowlist=ModelAllowlist(["org/a"])))
    assert opened["realb-model"].interactive is True and opened["realb-load"].visible is True
    assert "demo/model (bundled), org/a" in opened["realb-model"].info


def test_app_builds_with_stable_element_ids():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'gradio>=6,<7')")
    app = demo_app.build_app(store=ModelStore(loader=lambda s, d: None))
    ids = {c.elem_id for c in app.blocks.values() if getattr(c, "elem_id", None)}
    assert {
        "realb-chat",
        "realb-input",
        "realb-copies",
        "realb-model",
        "realb-ep",
        "realb-summary",
        "realb-heatmap",
        "realb-precision",
        "realb-balance",
    } <= ids


# ---- a long-running server --------------------------------------------------------------------------------


class PageLikeClient:
    """Gradio's HTTP protocol as the demo page speaks it: a message runs the server-side events of the chain the
    input box's submit starts (the others run in the browser), and every new session is a new page load."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)
        self.dependencies = self.http.get("config").json()["dependencies"]
        self.respond, self.show_panels = (
            next(i for i, d in enumerate(self.dependencies) if d.get("api_name") == name)
            for name in ("respond", "show_panels")
        )
        assert self.dependencies[self.show_panels]["trigger_after"] == self.respond

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            server_path = self.http.post("gradio_api/upload", files={"files": (path.name, f, "image/png")}).json()[0]
        return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def call(self, fn: int, data: list, session: str) -> list:
        """The outputs of one queued event once it completed (State inputs are sent as None, as the page does)."""
        import json

        body = {"data": data, "fn_index": fn, "event_data": None, "session_hash": session}
        self.http.post("gradio_api/queue/join", json=body).raise_for_status()
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and (event := json.loads(line[5:])).get("msg") == "process_completed":
                    assert event.get("success"), event
                    return event["output"]["data"]
        raise AssertionError("the server closed the event stream before the event completed")

    def send(self, session: str, text: str, files: list, copies: int = 1, max_new_tokens: int = 1) -> tuple[list, str]:
        """One message; returns the chat the page shows after it and the notice line (empty unless refused)."""
        controls = ["demo/model", "realb", "auto", 0.7, 2048, 0.1, "rank", 4, copies, max_new_tokens]
        chat, _, notice, *_ = self.call(self.respond, [{"text": text, "files": files}, None, *controls], session)
        self.call(self.show_panels, [None, 4], session)
        return chat, notice


@contextmanager
def served_demo(**launch_options):
    """The demo on a free port of 127.0.0.1 in this process, its bundled model loaded: (app, PageLikeClient)."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'gradio>=6,<7')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ModelStore(device="cpu")
    app = demo_app.launch(port=port, block=False, quiet=True, store=store, preload=True, **launch_options)
    try:
        yield app, PageLikeClient(f"http://127.0.0.1:{port}/")
    finally:
        app.close()


@pytest.mark.slow
def test_server_memory_levels_off_over_many_sessions_and_a_long_chat(tmp_path):
    """What a served demo keeps between requests stays flat once its bounds are reached.

    Gradio keeps, per session, the last value of every output (chat history, panels with the heatmap PNG); every
    page load is a session. Half the requests continue one chat with an image per turn (each turn also sends one
    refused message), half come from new sessions. After a warm-up that fills both bounds, another as many
    requests add nothing.
    """
    import json

    from demo.tasks import heldout_set

    image_ex, text_ex = heldout_set(1, kinds=("colour",))[0], heldout_set(1, kinds=("add",))[0]
    image = tmp_path / "question.png"
    image_ex.image.save(image)
    with served_demo(max_sessions=8) as (app, client):
        chat, history = str(uuid.uuid4()), []

        def held() -> tuple[int, int]:
            sessions = app.state_holder.session_data.values()
            return len(sessions), sum(len(json.dumps(s.config_values, default=str)) for s in sessions)

        def requests(n: int) -> None:
            nonlocal history
            for _ in range(n):
                history, notice = client.send(chat, image_ex.question, [client.upload(image)])
                assert history[-1]["content"][0]["text"] == image_ex.answer and notice == ""
                assert client.send(chat, " ", [])[1].startswith("**Refused:** type a question")
                assert client.send(str(uuid.uuid4()), text_ex.question, [])[1] == ""

        requests(20)  # 20 turns of 3 messages > 40; 21 sessions > 8
        warm_sessions, warm_bytes = held()
        assert len(history) == demo_app.MAX_CHAT_MESSAGES and warm_sessions == 8
        requests(20)
        sessions, held_bytes = held()
        assert len(history) == demo_app.MAX_CHAT_MESSAGES and sessions == 8
        assert held_bytes < 1.05 * warm_bytes, f"session state grew from {warm_bytes} to {held_bytes} bytes"


@pytest.mark.slow
def test_refusals_print_no_traceback_and_the_known_processor_notice_is_debug_only(tmp_path, caplog, capfd):
    """Ordinary refusals are logged at debug level only; the bundled processor's deprecation notice (transformers
    flags its own class) is moved to debug level; other warnings still come through."""
    import logging

    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    logging.Logger.warning_once.cache_clear()  # transformers prints a notice once per process; see it again
    with caplog.at_level(logging.DEBUG, logger="realb_hf.demo"), served_demo() as (_, client):
        refusals = [
            client.send(str(uuid.uuid4()), "", []),
            client.send(str(uuid.uuid4()), "3 + 4 =", [], copies=2.5),
            client.send(str(uuid.uuid4()), "what colour is the shape ?", [client.upload(fake)]),
            client.send(str(uuid.uuid4()), "a " * 300, []),  # longer than the bundled model's context
        ]
    assert all(notice.startswith("**Refused:**") and chat == [] for chat, notice in refusals), refusals
    console = capfd.readouterr()
    assert "Traceback" not in console.err + console.out and "PaddleOCRVLProcessor" not in console.err
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]
    quiet = [r.getMessage() for r in caplog.records if r.name == "realb_hf.demo" and r.levelno == logging.DEBUG]
    assert sum(m.startswith("request refused") for m in quiet) == 4
    assert any("PaddleOCRVLProcessor" in m for m in quiet)
    other = logging.getLogger("transformers.processing_utils")
    other.warning("a real warning")  # the filter drops only the known notice
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == ["a real warning"]
