"""`python -m realb_hf.accuracy` beyond the bundled model and CPU: devices, several EP sizes (every ReaLB row pins
its own), another task module, and findings per EP size (tiny bundled model, a few questions)."""

import json
import types

import pytest
import torch
from task_fixtures import write_other_tasks

from realb_hf import accuracy, bundled, get_runtime, get_telemetry
from realb_hf.accuracy_report import to_markdown
from realb_hf.accuracy_setup import default_configs, describe_machine, parse_device

N = 4

# ---- devices -----------------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_h200(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")


def test_devices_are_parsed_and_bad_ones_named(no_gpu):
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto") == torch.device("cpu")
    for bad in ("gpu", "tpu", "cpu:1", "cuda:x", "mps"):
        with pytest.raises(ValueError, match="choose one of cpu, cuda, cuda:N or auto"):
            parse_device(bad)
    with pytest.raises(ValueError, match="no CUDA GPU is visible here"):
        parse_device("cuda")


def test_gpu_devices_and_what_runs_natively_there(fake_h200):
    assert parse_device("auto") == torch.device("cuda")
    assert parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        parse_device("cuda:2")
    machine = describe_machine(torch.device("cuda"))
    assert machine.startswith("NVIDIA H200 (CUDA capability 9.0), torch ")
    assert "; fp8 real kernels; nvfp4/mxfp4 emulated" in machine  # fp8 tensor cores on sm90, FP4 needs sm100
    assert "auto = fp8 on cuda" in default_configs(device="cuda")[2].name


def test_cli_refuses_bad_devices_sizes_and_counts(no_gpu, capsys):
    for argv, message in (
        (["--device", "tpu"], "--device 'tpu': choose one of cpu, cuda, cuda:N or auto"),
        (["--device", "cuda"], "--device 'cuda': no CUDA GPU is visible here"),
        (["--ep-size", "0"], "--ep-size: ep_size must be one or more positive integers"),
        (["--ep-size", "4", "4"], "--ep-size: ep_size [4, 4] repeats a size"),
        # refused before the model loads (a batch size of 0 used to end in "range() arg 3 must not be zero", an EP
        # size that does not divide the experts in a traceback after loading)
        (["--ep-size", "2", "3"], "--ep-size 2 3: each must divide the model's 8 experts"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--batch-threshold", "-1"], "--batch-threshold must be >= 0, got -1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            accuracy.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# ---- rows -------------------------------------------------------------------------------------------------------


def test_every_realb_row_runs_once_per_ep_size_and_pins_it():
    one = default_configs(2048, 4)
    two = default_configs(2048, (4, 8))
    realb_one = [c for c in one if c.realb is not None]
    assert all(c.realb["ep_size"] == 4 and c.realb["batch_threshold"] for c in realb_one)
    assert "ReaLB rank, M_d=0.7, low=nvfp4" in [c.name for c in one]  # one EP size: the names stay as they were
    once = [c for c in two if c.realb is None or c.realb.get("policy") in ("off", "all_low")]
    assert [c.name for c in once] == [
        "bf16 (stock, no ReaLB)", "ReaLB policy=off (plumbing check)",
        "fp8 everywhere", "nvfp4 everywhere", "mxfp4 everywhere",
    ]  # fmt: skip
    swept = [c for c in two if c not in once]
    assert len(swept) == 2 * 13 and len(two) == len(one) + 13
    assert {c.realb["ep_size"] for c in swept[:13]} == {4} and {c.realb["ep_size"] for c in swept[13:]} == {8}
    assert "ReaLB EP=8 rank, M_d=0.7, low=nvfp4" in [c.name for c in swept]
    assert all("ep_size" in c.realb for c in two if c.realb is not None)
    with pytest.raises(ValueError, match="repeats a size"):
        default_configs(2048, (4, 4))


def test_an_unpinned_row_is_refused():
    converted = types.SimpleNamespace(realb=object())  # the refusal comes before the model is used
    with pytest.raises(ValueError, match=r"does not set \['ep_size'\]"):
        accuracy.evaluate(converted, None, [], accuracy.EvalConfig("x", {"policy": "all_low", "batch_threshold": 0}))


@pytest.fixture(scope="module")
def other_tasks(tmp_path_factory):
    return write_other_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def two_ep_report(other_tasks):
    """`run` on another task module at EP 4 and 2, with a row after an EP=2 row that sets no EP size; records the
    EP size each row really ran at (the ranks in its telemetry)."""
    ran = []
    evaluate = accuracy.evaluate

    def spy(model, processor, examples, config, batch_size=64):
        result = evaluate(model, processor, examples, config, batch_size)
        if config.realb is not None:
            ranks = {len(r.tokens_per_rank) for r in get_telemetry(model).records}
            ran.append((config.name, get_runtime(model).config.ep_size, ranks))
        return result

    rank = {"granularity": "rank", "modality_threshold": 0.7, "low_precision": "nvfp4", "batch_threshold": 0}
    configs = [
        accuracy.EvalConfig("bf16 (stock, no ReaLB)", None),
        accuracy.EvalConfig("first", {**rank, "ep_size": 4}),
        accuracy.EvalConfig("second", {**rank, "ep_size": 2}),
        accuracy.EvalConfig("no EP given", {"policy": "all_low", "low_precision": "nvfp4"}),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy, "evaluate", spy)
        report = accuracy.run(
            bundled.bundled_model_dir(), n=N, batch_size=N, ep_size=[4, 2], tasks=str(other_tasks),
            configs=configs, progress=False, batchings=("mixed",), n_resamples=50,
        )  # fmt: skip
    return report, ran


def test_a_row_without_ep_size_runs_at_the_first_size_not_the_previous_rows(two_ep_report):
    report, ran = two_ep_report
    assert ran == [("first", 4, {4}), ("second", 2, {2}), ("no EP given", 4, {4})]
    rows = report["runs"][0]["results"]
    assert [r["realb"] and r["realb"]["ep_size"] for r in rows] == [None, 4, 2, 4]
    assert report["ep_sizes"] == [4, 2] and report["device"] == "cpu"
    assert json.loads(json.dumps(report)) == report  # the report is JSON


def test_report_on_another_task_module(two_ep_report, other_tasks):
    report, _ = two_ep_report
    assert report["tasks"] == {"module": None, "path": str(other_tasks.resolve()), "bundled_demo": False}
    assert (report["moe_layers"], report["num_experts"], report["top_k"]) == (4, 8, 2)
    text = to_markdown(report, "cmd", "2026-12-04")
    assert text.startswith("# Accuracy of `demo/model` under ReaLB")
    assert "(qwen3_vl_moe, Qwen3VLMoeForConditionalGeneration: 4 MoE layers, 8 experts, top-2)" in text
    assert f"of the task module `{other_tasks.resolve()}`: 2 image and 2 text questions" in text
    assert "Virtual EP: EP=4 (2 experts per rank), EP=2 (4 experts per rank)" in text
    assert "| configuration | hue | plus |" in text  # the kinds come from the results
    assert "one-digit sums" not in text and "demo/train.py" not in text and "- Procedural tasks:" in text
    assert "- CPU run: fp8 (e4m3, rowwise scales), nvfp4 and mxfp4 are emulated" in text


# ---- report -------------------------------------------------------------------------------------------------------


def _row(name, realb, overall, lowered, answers=("1", "2")):
    return {
        "name": name, "realb": realb, "accuracy": {"overall": overall, "image": overall, "text": overall, "add": overall},
        "answers": list(answers), "prefill_tokens": [512], "answer_nll": {"overall": 0.1, "image": 0.2, "text": 0.05},
        "prefill_lowered_token_fraction": lowered, "prefill_layers_lowered": lowered, "prefill_predicted_speedup": 1.1,
    }  # fmt: skip


def _report(rows, **extra):
    return {
        "model": "some/model", "model_type": "qwen3_vl_moe", "architecture": "Qwen3VLMoeForConditionalGeneration",
        "layers": 8, "moe_layers": 6, "num_experts": 16, "top_k": 4, "n": 2, "held_out_seed": 0,
        "counts": {"image": 1, "text": 1}, "batch_size": 2, "ep_sizes": [4, 8], "batch_threshold": 2048,
        "tasks": {"module": "demo.sensitive.tasks", "path": "demo/sensitive/tasks.py", "bundled_demo": False},
        "machine": "m", "runs": [{"batching": "mixed", "results": rows}], **extra,
    }  # fmt: skip


def test_findings_find_rows_by_configuration_per_ep_size():
    def realb(ep, md, low="nvfp4"):
        return {"granularity": "rank", "modality_threshold": md, "low_precision": low, "ep_size": ep}

    rows = [
        _row("stock", None, 0.80, 0.0),
        _row("renamed off row", {"policy": "off", "ep_size": 4}, 0.80, 0.0),
        _row("a", realb(4, 0.7), 0.795, 0.21),
        _row("b", realb(8, 0.7), 0.78, 0.34),
        _row("c", realb(8, 0.0), 0.70, 0.61),
        _row("d", realb(8, 0.9), 0.80, 0.05),
        _row("e", {"policy": "all_low", "low_precision": "mxfp4", "ep_size": 4}, 0.60, 1.0),
    ]
    text = to_markdown(_report(rows, device="cuda:0", formats={"native": ["fp8"], "emulated": ["nvfp4", "mxfp4"]}),
                       "cmd", "d")  # fmt: skip
    assert "- policy=off gives exactly the same answers as the stock model" in text
    assert "- ReaLB EP=4, rank granularity, M_d=0.7, nvfp4: 79.5% vs bf16 80.0% (-0.5 points; within" in text
    assert "with 21.0% of prefill token-expert pairs in nvfp4" in text
    assert "- ReaLB EP=8, rank granularity, M_d=0.7, nvfp4: 78.0% vs bf16 80.0% (-2.0 points; NOT within" in text
    assert "- Modality threshold, EP=8, rank granularity, nvfp4: M_d=0.0 lowers 61.0% of prefill pairs" in text
    assert "Modality threshold, EP=4" not in text  # EP=4 has no M_d=0.0 / 0.9 rows
    assert "- Everything low (the FP4/FP8-everywhere baselines): mxfp4 -20.0 points." in text
    assert (
        "Virtual EP: EP=4 (4 experts per rank), EP=8 (2 experts per rank); every ReaLB configuration runs once" in text
    )
    assert "(qwen3_vl_moe, Qwen3VLMoeForConditionalGeneration: 6 MoE layers of 8, 16 experts, top-4)" in text
    assert "of the task module `demo.sensitive.tasks` (demo/sensitive/tasks.py): 1 image" in text
    assert "- cuda:0 run: fp8 ran real low-precision kernels; nvfp4, mxfp4 ran emulated on this GPU" in text
    assert "CPU run" not in text and "one-digit sums" not in text
