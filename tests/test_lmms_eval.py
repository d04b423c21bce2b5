"""integrations/lmms_eval: model args, the telemetry report, and lmms-eval runs end to end on the local
realb_synthetic tasks (offline: the data is generated from demo/tasks.py into a temp folder).

The model is the bundled demo/model when it is there (then accuracy is checked too: it answers held-out set 1
correctly in bf16, see test_bundled_model.py), else a randomly initialised model of the same architecture and
processor (then only the plumbing is checked: runs, results, telemetry, equality with direct `generate`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `demo` and `integrations` are not installed packages
    sys.path.insert(0, str(ROOT))

from task_fixtures import write_other_tasks  # noqa: E402

import realb_hf  # noqa: E402
import realb_hf.accuracy  # noqa: E402
from integrations.lmms_eval import require_lmms_eval  # noqa: E402
from integrations.lmms_eval._args import REALB_FIELDS, realb_config_from_args, split_realb_args  # noqa: E402
from integrations.lmms_eval.report import Aggregate, EvalReport  # noqa: E402
from realb_hf.layer_record import LayerRecord  # noqa: E402
from realb_hf.telemetry import Telemetry  # noqa: E402

try:
    import lmms_eval  # noqa: F401  (the package itself is light; the model and CLI import the rest)

    HAS_LMMS_EVAL = True
except ImportError:
    HAS_LMMS_EVAL = False
needs_lmms_eval = pytest.mark.skipif(
    not HAS_LMMS_EVAL,
    reason="lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 && "
    "pip install -r integrations/lmms_eval/requirements.txt",
)
BUNDLED = ROOT / "demo" / "model"
HAS_BUNDLED = (BUNDLED / "model.safetensors").is_file()
N_DOCS, HELDOUT_SET = 16, 1  # held-out set 1: the questions test_bundled_model.py checks
# ReaLB knobs that lower something even in a small batch: every forward is "large", any rank above the mean with
# any vision share is eligible, so the busiest rank runs fp8 unless the layer is perfectly balanced.
KNOBS = dict(
    policy="realb", low_precision="fp8", modality_threshold=0.0, imbalance_threshold=0.0, ep_size=4, batch_threshold=0
)


# ---- model args (no lmms-eval needed) ------------------------------------------------------------------------


# Every RealbConfig field, typed as lmms-eval's `simple_parse_args_string` types `key=value` strings.
EVERY_FIELD = {
    "low_precision": "nvfp4",
    "high_precision": "bf16",
    "policy": "static",
    "rank_precisions": "0:low;1:fp8",
    "modality_threshold": 0.5,
    "batch_threshold": 64,
    "imbalance_threshold": 0,
    "granularity": "expert",
    "weight_cache": "persistent",
    "ep_size": 2,
    "low_cost_ratio": 0.5,
    "conversion_cost": 256,
    "modules_to_not_convert": "visual;layers.0.mlp",
}
EVERY_FIELD_STRING = (
    "low_precision=nvfp4,high_precision=bf16,policy=static,rank_precisions=0:low;1:fp8,modality_threshold=0.5,"
    "batch_threshold=64,imbalance_threshold=0,granularity=expert,weight_cache=persistent,ep_size=2,"
    "low_cost_ratio=0.5,modules_to_not_convert=visual;layers.0.mlp"
)
EVERY_FIELD_CONFIG = dict(
    low_precision="nvfp4",
    high_precision="bf16",
    policy="static",
    rank_precisions={0: "low", 1: "fp8"},
    modality_threshold=0.5,
    batch_threshold=64,
    imbalance_threshold=0.0,
    granularity="expert",
    weight_cache="persistent",
    ep_size=2,
    low_cost_ratio=0.5,
    conversion_cost=256.0,
    modules_to_not_convert=["visual", "layers.0.mlp"],
)


def test_every_realb_config_field_is_a_model_arg():
    assert set(EVERY_FIELD) == set(REALB_FIELDS)
    realb, rest = split_realb_args({**EVERY_FIELD, "pretrained": "x", "batch_size": 8})
    assert rest == {"pretrained": "x", "batch_size": 8}
    config = realb_config_from_args(realb)
    assert config == realb_hf.RealbConfig(**EVERY_FIELD_CONFIG)
    assert realb_config_from_args({}) == realb_hf.RealbConfig()  # fields left out keep their defaults


def test_model_arg_forms_and_errors():
    config = realb_config_from_args(
        {
            "policy": "static",
            "ep_size": 4.0,
            "rank_precisions": '{"0": "low", "3": "high"}',
            "low_cost_ratio": "none",
            "modules_to_not_convert": '["visual"]',
            "modality_threshold": "0.9",
        }
    )
    assert config.rank_precisions == {0: "low", 3: "high"} and config.ep_size == 4
    assert config.low_cost_ratio is None and config.modules_to_not_convert == ["visual"]
    assert config.modality_threshold == 0.9
    with pytest.raises(ValueError, match="RealbConfig.policy"):
        realb_config_from_args({"policy": "fast"})
    with pytest.raises(ValueError, match="RealbConfig.ep_size"):
        realb_config_from_args({"ep_size": 0})
    with pytest.raises(ValueError, match="rank:precision"):
        realb_config_from_args({"policy": "static", "ep_size": 2, "rank_precisions": "0=low"})


# ---- telemetry report (no lmms-eval needed) -------------------------------------------------------------------


def _record(forward: int, layer: str, tokens: list[int], shares: list[float], precisions: list[str], **kw):
    return LayerRecord(
        forward=forward,
        layer=layer,
        num_tokens=sum(tokens) // 2,
        tokens_per_rank=tokens,
        vision_share_per_rank=shares,
        precision_per_rank=precisions,
        balancedness_tokens=kw.get("bal", 0.5),
        balancedness_cost_before=kw.get("bal", 0.5),
        balancedness_cost_after=kw.get("after", 0.6),
        predicted_speedup=kw.get("speedup", 1.2),
        lowered_fraction=kw.get("lowered", 0.0),
        lowered_experts=kw.get("experts", 0),
        reason=kw.get("reason", "below_batch_threshold"),
        modality_source="mm_token_type_ids",
    )


RECORDS = [
    _record(1, "l0", [30, 10], [0.9, 0.1], ["fp8", "bf16"], lowered=0.75, experts=2, reason="lowered", speedup=1.4),
    _record(
        1, "l1", [20, 20], [0.5, 0.5], ["bf16", "bf16"], bal=1.0, after=1.0, speedup=1.0, reason="no_eligible_rank"
    ),
    _record(2, "l0", [3, 1], [0.0, 0.0], ["bf16", "bf16"]),
    _record(2, "l1", [2, 2], [0.0, 0.0], ["bf16", "bf16"]),
]


def test_report_agrees_with_telemetry_summary(tmp_path):
    telemetry = Telemetry()
    for r in RECORDS:
        telemetry.add(r)
    expected = telemetry.summary()
    agg = Aggregate()
    agg.add(RECORDS)
    got = agg.to_dict()
    for key in ("records", "layers_lowered", "lowered_token_fraction", "balancedness_tokens", "predicted_speedup"):
        assert got[key] == pytest.approx(expected[key]), key
    assert got["balancedness_cost_after"] == pytest.approx(expected["balancedness_cost_after"])
    assert got["rank_low_fraction"] == [0.25, 0.0]
    assert got["reasons"] == {"below_batch_threshold": 2, "lowered": 1, "no_eligible_rank": 1}

    report = EvalReport({"model": "m", "realb_config": {"policy": "realb"}})
    report.add_batch("task_a", "generate_until", 2, 40, 1, 6, 0.5, RECORDS, prefill_forward=1)
    report.add_batch("task_b", "generate_until", 1, 20, 0, 3, 0.25, None)  # a stock model: counts only
    s = report.summary()
    assert s["tasks"]["task_a"]["prefill"]["records"] == 2 and s["tasks"]["task_a"]["decode"]["records"] == 2
    assert s["tasks"]["task_a"]["prefill"]["lowered_token_fraction"] == pytest.approx(30 / 80)
    assert s["overall"]["requests"] == 3 and s["overall"]["batches"] == 2
    assert [r["phase"] for r in report.to_dict()["records"]] == ["prefill", "prefill"]  # records="prefill"
    files = report.write(tmp_path, "20260101_000000")
    assert json.loads(files["summary"].read_text())["tasks"]["task_a"]["requests"] == 2
    assert len(json.loads(files["telemetry"].read_text())["records"]) == 2
    assert "| task_a |" in files["markdown"].read_text()


def test_missing_lmms_eval_names_the_install_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "integrations.lmms_eval.models.realb", raising=False)
    with pytest.raises(ImportError, match=r"--no-deps lmms-eval==0\.7\.3.*requirements\.txt"):
        require_lmms_eval()
    with pytest.raises(ImportError, match="integrations/lmms_eval/requirements.txt"):
        importlib.import_module("integrations.lmms_eval.models.realb")


# ---- lmms-eval runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """demo/model if bundled; else a random model with the demo's architecture, tokenizer and processor."""
    if HAS_BUNDLED:
        return BUNDLED
    from transformers import AutoModelForImageTextToText

    from demo.train import build_config, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config(tokenizer), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("random_demo_model")
    model.save_pretrained(path)
    build_processor(tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A self-contained copy of the realb_synthetic task folder with N_DOCS questions of held-out set 1."""
    from integrations.lmms_eval.tasks.realb_synthetic import make_data

    return make_data.build(tmp_path_factory.mktemp("tasks") / "realb_synthetic", n=N_DOCS, seed=HELDOUT_SET)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # both libraries read the variables once, at import, which came before this test
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return env


def _evaluate(lm, task_dir, task: str, limit=None) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True, verbosity="WARNING"
    )


def _answers(results: dict, task: str = "realb_synthetic") -> list[str]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0].strip() for s in samples]


@needs_lmms_eval
def test_registered_with_lmms_eval(monkeypatch):
    """`--model realb` resolves to the chat class (the simple one with --force_simple), by `register()` and by
    lmms-eval's LMMS_EVAL_PLUGINS hook; unknown model args are refused before anything loads."""
    import lmms_eval.models as lmms_models

    from integrations.lmms_eval import register
    from integrations.lmms_eval.models.realb import Realb, RealbChat

    register()
    assert lmms_models.get_model("realb") is RealbChat
    assert lmms_models.get_model("realb", force_simple=True) is Realb
    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "integrations.lmms_eval")
    with pytest.warns(DeprecationWarning, match="LMMS_EVAL_PLUGINS"):
        registry = lmms_models._initialize_model_registry()
    assert registry.get_model_class("realb") is Realb
    with pytest.raises(ValueError, match=r"unknown model arg\(s\) \['polcy'\].*modality_threshold"):
        Realb(pretrained="unused", polcy="off")
    with pytest.raises(ValueError, match="realb=false loads the stock model"):
        Realb(pretrained="unused", realb=False, policy="off")


@needs_lmms_eval
def test_cli_run_writes_results_and_telemetry(model_dir, task_dir, tmp_path, offline):
    """`python -m integrations.lmms_eval` (lmms-eval's CLI): chat model, batched generation with images."""
    from lmms_eval.utils import sanitize_model_name

    knobs = ",".join(f"{k}={v}" for k, v in KNOBS.items())
    out = tmp_path / "logs"
    cmd = [
        *(sys.executable, "-m", "integrations.lmms_eval", "--model", "realb", "--tasks", "realb_synthetic"),
        *("--model_args", f"pretrained={model_dir},{knobs},batch_size=8"),
        *("--include_path", str(task_dir), "--output_path", str(out), "--log_samples"),
    ]
    env = {**os.environ, **offline, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    folder = out / sanitize_model_name(str(model_dir))
    found = sorted(folder.glob("*_results.json")) if folder.is_dir() else []
    assert proc.returncode == 0 and len(found) == 1, (proc.stdout[-4000:], proc.stderr[-4000:])
    stamp = found[0].name.removesuffix("_results.json")
    for suffix in ("realb_summary.json", "realb_summary.md", "realb_telemetry.json", "samples_realb_synthetic.jsonl"):
        assert (folder / f"{stamp}_{suffix}").is_file(), suffix  # telemetry next to the results, same stamp

    results = json.loads(found[0].read_text())
    exact = results["results"]["realb_synthetic"]["exact_match,none"]
    assert 0.0 <= exact <= 1.0
    summary = results["realb"]["summary"]
    assert summary == json.loads((folder / f"{stamp}_realb_summary.json").read_text())
    assert summary["interface"] == "chat" and summary["batch_size"] == 8
    assert {k: summary["realb_config"][k] for k in KNOBS} == KNOBS
    assert summary["low_precision_resolved"] == "fp8"
    layers = json.loads((Path(model_dir) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    task = summary["tasks"]["realb_synthetic"]
    assert task["requests"] == N_DOCS and task["batches"] == N_DOCS // 8 and task["images"] == N_DOCS // 2
    assert task["prefill"]["records"] == task["batches"] * layers
    assert task["prefill"]["lowered_token_fraction"] > 0  # ReaLB lowered the busiest ranks
    assert task["prefill"]["reasons"].get("lowered", 0) > 0
    telemetry = json.loads((folder / f"{stamp}_realb_telemetry.json").read_text())
    assert len(telemetry["records"]) == task["prefill"]["records"]
    assert {r["phase"] for r in telemetry["records"]} == {"prefill"}
    assert {r["modality_source"] for r in telemetry["records"]} == {"mm_token_type_ids"}
    if HAS_BUNDLED:
        assert exact >= 14 / N_DOCS, exact

    from integrations.lmms_eval import compare

    (row,) = compare.collect([out])
    assert row["scores"]["realb_synthetic/exact_match"] == exact
    assert row["lowered_token_fraction"] == summary["overall"]["prefill"]["lowered_token_fraction"]
    assert "policy=realb" in row["knobs"] and "| policy=realb" in compare.to_markdown([row])


@needs_lmms_eval
def test_answers_and_decisions_match_direct_generate(model_dir, task_dir, tmp_path, offline):
    """Through lmms-eval, the same batches reach the model as in realb_hf.accuracy: same answers, same decisions."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from demo import tasks
    from integrations.lmms_eval.models.realb import RealbChat
    from realb_hf.accuracy import generate_answers

    lm = RealbChat(pretrained=str(model_dir), batch_size=8, telemetry_path=str(tmp_path), **KNOBS)
    results = _evaluate(lm, task_dir, "realb_synthetic")
    via_lmms = _answers(results)
    kept = lm.realb_report.to_dict()["records"]
    assert sorted(p.name for p in tmp_path.glob("*_realb_*")) and lm.telemetry_files  # written by clean()

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=realb_hf.RealbConfig(**KNOBS)
    ).eval()
    telemetry = realb_hf.get_telemetry(model)
    prefill: list[int] = []
    examples = tasks.heldout_set(N_DOCS, seed=HELDOUT_SET)
    direct = generate_answers(
        model, processor, examples, batch_size=8, on_prefill=lambda ids: prefill.append(telemetry.forwards + 1)
    )
    assert via_lmms == direct
    direct_prefill = [r for r in telemetry.records if r.forward in prefill]
    assert [(r["tokens_per_rank"], r["precision_per_rank"]) for r in kept] == [
        (r.tokens_per_rank, r.precision_per_rank) for r in direct_prefill
    ]
    if HAS_BUNDLED:
        assert sum(a == ex.answer for a, ex in zip(via_lmms, examples)) >= 14


@needs_lmms_eval
def test_policy_off_matches_the_stock_model(model_dir, task_dir, offline):
    from integrations.lmms_eval.models.realb import Realb

    stock = Realb(pretrained=str(model_dir), realb=False, batch_size=8)
    stock_results = _evaluate(stock, task_dir, "realb_synthetic", limit=8)  # one batch
    assert stock.realb_report.summary()["realb_config"] is None
    # as lmms-eval's CLI builds it: a batch_size in --model_args wins over the CLI's default --batch_size 1
    off = Realb.create_from_arg_string(
        f"pretrained={model_dir},policy=off,ep_size=4,batch_size=8", {"batch_size": 1, "device": None}
    )
    assert off.batch_size == 8 and off.realb_config.policy == "off"
    off_results = _evaluate(off, task_dir, "realb_synthetic", limit=8)
    assert _answers(stock_results) == _answers(off_results)
    prefill = off.realb_report.summary()["overall"]["prefill"]
    assert prefill["records"] > 0 and prefill["lowered_token_fraction"] == 0.0
    if HAS_BUNDLED:  # held-out set 1 is answered correctly in bf16
        assert stock_results["results"]["realb_synthetic"]["exact_match,none"] == 1.0


@needs_lmms_eval
def test_loglikelihood_multiple_choice_matches_a_direct_forward(model_dir, task_dir, offline):
    """Simple model, loglikelihood requests (batched, left-padded prompts + continuations) vs one unpadded forward."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from demo import tasks
    from integrations.lmms_eval.models.realb import Realb

    lm = Realb(pretrained=str(model_dir), policy="off", batch_size=8)
    results = _evaluate(lm, task_dir, "realb_synthetic_mc", limit=2)  # colour + shape: 8 choices, one batch
    acc = results["results"]["realb_synthetic_mc"]["acc,none"]
    samples = sorted(results["samples"]["realb_synthetic_mc"], key=lambda s: s["doc_id"])
    losses = [[float(r[0][0]) for r in s["resps"]] for s in samples]  # resps: [[(loss, greedy)], ...]
    assert [len(x) for x in losses] == [5, 3]
    assert lm.realb_report.summary()["overall"]["request_types"] == {"loglikelihood": 8}

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    choices = {"colour": list(tasks.COLOURS), "shape": list(tasks.SHAPES)}
    for ex, got in zip(tasks.heldout_set(2, seed=HELDOUT_SET), losses):
        prompt = processor.apply_chat_template(ex.messages(), add_generation_prompt=True, tokenize=False)
        want = []
        for choice in choices[ex.kind]:
            n = len(processor.tokenizer(choice, add_special_tokens=False)["input_ids"])
            inputs = processor(text=[prompt + choice], images=[ex.image], return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0, -n - 1 : -1].float()
            targets = inputs["input_ids"][0, -n:]
            want.append(float(torch.nn.functional.cross_entropy(logits, targets)))
        assert got == pytest.approx(want, abs=1e-2), (ex.kind, got, want)  # equal on CPU; padding may round elsewhere
    if HAS_BUNDLED:  # its greedy answers are right, and every choice is one token: the answer has the lowest loss
        assert acc == 1.0


# ---- another task module, and the compare tool beside realb_hf.accuracy ------------------------------------------


def test_task_data_from_another_task_module(tmp_path):
    pytest.importorskip("datasets")
    import pandas

    from integrations.lmms_eval.tasks.realb_synthetic import make_data

    module = write_other_tasks(tmp_path)
    folder = make_data.build(tmp_path / "rs", n=4, seed=2, tasks=str(module))
    table = pandas.read_parquet(folder / make_data.DATA_FILE)
    expected = realb_hf.accuracy.load_tasks(module).heldout_set(4, seed=2)
    assert list(table["kind"]) == ["hue", "plus", "hue", "plus"] == [ex.kind for ex in expected]
    assert list(table["answer"]) == [ex.answer for ex in expected]
    assert list(table["modality"]) == ["image", "text", "image", "text"]
    assert (folder / "realb_synthetic.yaml").is_file()
    from integrations.lmms_eval.tasks.realb_synthetic import utils

    with pytest.raises(ValueError, match="choices for the demo's kinds .* not 'hue'"):
        utils.doc_to_choice({"kind": "hue"})
    # no question asked is refused, not written as an empty task (it used to report "wrote ... (-3 questions)")
    with pytest.raises(ValueError, match="n must be >= 1 question, got 0"):
        make_data.build(tmp_path / "empty", n=0)
    with pytest.raises(SystemExit) as exit_info:
        make_data.main(["--n", "-3", "--out", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and not (tmp_path / "empty").exists()


def _accuracy_row(name, realb, image, text):
    return {"name": name, "realb": realb, "accuracy": {"image": image, "text": text, "overall": (image + text) / 2}}


def _results_file(folder: Path, stamp: str, model_args: str, exact: float, batch_size: int = 8) -> None:
    summary = {"batch_size": batch_size, "overall": {"requests": 16, "prefill": {}, "seconds": 1.0}}
    results = {"results": {"realb_synthetic": {"exact_match,none": exact}}, "config": {"model_args": model_args}}
    (folder / f"{stamp}_results.json").write_text(json.dumps({**results, "realb": {"summary": summary}}))


def test_compare_names_paths_that_hold_no_runs(tmp_path, capsys):
    """A missing path, a folder without results and a file that is not a results JSON are refused by name (they
    used to end in a traceback, or in an empty table for the folder)."""
    from integrations.lmms_eval import compare

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        tmp_path / "missing": "missing: no such file or folder",
        tmp_path / "empty": r"empty: no lmms-eval results \(\*_results.json\) in this folder",
        tmp_path / "notes.json": r"notes.json: not an lmms-eval results JSON \(no 'results' table\)",
        tmp_path / "notes.txt": r"notes.txt: not an lmms-eval results JSON \(Expecting value",
    }
    for path, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            compare.main([str(path)])
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err), path


def test_compare_puts_the_accuracy_tools_rows_beside_the_runs(tmp_path, capsys):
    from integrations.lmms_eval import compare

    logs = tmp_path / "logs"
    logs.mkdir()
    _results_file(logs, "20260101_000001", "pretrained=m,realb=false", 0.75)
    _results_file(logs, "20260101_000002", "pretrained=m,policy=realb,low_precision=nvfp4,granularity=rank,"
                  "modality_threshold=0.7,ep_size=8", 0.70)  # fmt: skip
    _results_file(logs, "20260101_000003", "pretrained=m,policy=all_low,low_precision=mxfp4,ep_size=4", 0.5, 4)
    _results_file(logs, "20260101_000004", "pretrained=m,policy=realb,low_precision=fp8,ep_size=2", 0.75)
    rank = {"granularity": "rank", "modality_threshold": 0.7, "low_precision": "nvfp4", "batch_threshold": 2048}
    rows = [
        _accuracy_row("bf16 (stock, no ReaLB)", None, 0.75, 0.75),
        _accuracy_row("ReaLB EP=4 rank, M_d=0.7, low=nvfp4", {**rank, "ep_size": 4}, 0.5, 0.75),
        _accuracy_row("ReaLB EP=8 rank, M_d=0.7, low=nvfp4", {**rank, "ep_size": 8}, 0.625, 0.75),
        _accuracy_row("mxfp4 everywhere", {"policy": "all_low", "low_precision": "mxfp4", "ep_size": 4}, 0.5, 0.5),
    ]
    report = {"batch_size": 8, "n": 16, "runs": [{"batching": "mixed", "results": rows}]}
    (tmp_path / "acc.json").write_text(json.dumps(report))
    assert compare.main([str(logs), "--accuracy", str(tmp_path / "acc.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| realb_hf.accuracy row | its image / text / overall % | same batches |" in lines[0]
    assert lines[2].endswith("| bf16 (stock, no ReaLB) | 75.0 / 75.0 / 75.0 | yes |")
    assert lines[3].endswith("| ReaLB EP=8 rank, M_d=0.7, low=nvfp4 | 62.5 / 75.0 / 68.8 | yes |")  # by config
    assert lines[4].endswith("| mxfp4 everywhere | 50.0 / 50.0 / 50.0 | no (batch size 8) |")
    assert lines[5].endswith("| (no row of this configuration) | - | - |")
    report["runs"][0]["batching"] = "by-modality"
    (tmp_path / "acc.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit):
        compare.main([str(logs), "--accuracy", str(tmp_path / "acc.json")])
    assert "has no 'mixed' batching" in capsys.readouterr().err


@needs_lmms_eval
def test_runs_on_another_task_module_reproduce_the_accuracy_tools_rows(model_dir, tmp_path, offline):
    """The realb_synthetic data of a non-demo task module through lmms-eval (stock, nvfp4 everywhere, ReaLB) gives
    the exact matches `realb_hf.accuracy` gives on the same questions and batches (its "mixed" batching)."""
    from integrations.lmms_eval import compare
    from integrations.lmms_eval.models.realb import RealbChat
    from integrations.lmms_eval.tasks.realb_synthetic import make_data

    module = write_other_tasks(tmp_path)
    n, batch = 8, 4
    folder = make_data.build(tmp_path / "rs", n=n, seed=0, tasks=str(module))
    realb = {"policy": "realb", "low_precision": "fp8", "modality_threshold": 0.0, "ep_size": 4, "batch_threshold": 0}
    runs = {"realb=false": {"realb": False}, "all_low": {"policy": "all_low", "low_precision": "nvfp4", "ep_size": 4}}
    runs["realb"] = realb
    logs = tmp_path / "logs"
    logs.mkdir()
    for i, knobs in enumerate(runs.values()):
        lm = RealbChat(pretrained=str(model_dir), batch_size=batch, telemetry_path=str(tmp_path / "t"), **knobs)
        results = _evaluate(lm, folder, "realb_synthetic")
        model_args = ",".join([f"pretrained={model_dir}", *(f"{k}={v}" for k, v in knobs.items())]).replace("False", "false")
        summary = lm.realb_report.summary()
        payload = {"results": results["results"], "config": {"model_args": model_args}, "realb": {"summary": summary}}
        (logs / f"2026010{i}_000000_results.json").write_text(json.dumps(payload))
    configs = [
        realb_hf.accuracy.EvalConfig("bf16", None),
        realb_hf.accuracy.EvalConfig("nvfp4 everywhere", runs["all_low"]),
        realb_hf.accuracy.EvalConfig("ReaLB", realb),
    ]
    report = realb_hf.accuracy.run(
        model_dir, n=n, batch_size=batch, tasks=str(module), configs=configs, progress=False, batchings=("mixed",),
        n_resamples=20,
    )  # fmt: skip
    rows = compare.attach_accuracy(compare.collect([logs]), report)
    assert [r["accuracy"]["name"] for r in rows] == ["bf16", "nvfp4 everywhere", "ReaLB"]
    for row in rows:
        scores, acc = row["scores"], row["accuracy"]
        assert acc["same_batches"]
        assert scores["realb_synthetic/exact_match"] == pytest.approx(acc["overall"])
        assert scores["realb_synthetic/image_exact_match"] == pytest.approx(acc["image"])
        assert scores["realb_synthetic/text_exact_match"] == pytest.approx(acc["text"])
    assert rows[2]["lowered_token_fraction"] == report["runs"][0]["results"][2]["prefill_lowered_token_fraction"] > 0
