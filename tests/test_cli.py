"""The `realb-hf` command line: the README's default run, bad options, forwarding to the benchmarks."""

import json
import re
from pathlib import Path

import pytest

from realb_hf import policy
from realb_hf.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = ["run", "--num-experts", "8", "--batch", "4", "--grid", "8", "--batch-threshold", "0"]


def test_run_prints_the_per_layer_report(capsys, tmp_path):
    out = tmp_path / "telemetry.json"
    assert main([*SMALL_RUN, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.language_model.layers.0.mlp.experts" in text and "r3:" in text and "summary:" in text
    document = json.loads(out.read_text())
    records = document["records"]
    assert len(records) == 2 and all(len(r["tokens_per_rank"]) == 4 for r in records)
    assert document["model"]["moe_layers"] == {f"model.language_model.layers.{i}.mlp.experts": 8 for i in range(2)}


def test_run_report_labels(capsys, tmp_path):
    """Per-rank loads are token-expert pairs, not tokens; one balancedness before ReaLB (the token balance and the
    predicted-time balance are equal by construction); reasons spelled as the policy's constants."""
    out = tmp_path / "telemetry.json"
    assert main([*SMALL_RUN, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    rank_lines = [line for line in text.splitlines() if line.lstrip().startswith("r0:")]
    assert len(rank_lines) == 2 and all(" tok " not in line and line.count(" pairs ") == 4 for line in rank_lines)
    for record, line in zip(records, rank_lines):
        assert sum(int(n) for n in re.findall(r"r\d:\s*(\d+) pairs", line)) == sum(record["tokens_per_rank"])
        assert record["balancedness_tokens"] == pytest.approx(record["balancedness_cost_before"], abs=1e-12)
    balance_lines = [line for line in text.splitlines() if line.lstrip().startswith("balancedness ")]
    assert len(balance_lines) == 2
    for record, line in zip(records, balance_lines):
        assert line.split()[1:4] == [
            f"{record['balancedness_cost_before']:.3f}",
            "->",
            f"{record['balancedness_cost_after']:.3f}",
        ]
    constants = {getattr(policy, n) for n in dir(policy) if n.startswith("REASON_")}
    reasons = re.findall(r"\((\w+)\)$", text, flags=re.M)
    assert len(reasons) == 2 and set(reasons) <= constants


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "-1"], "--batch"),
        (["--grid", "3"], "--grid"),
        (["--grid", "0"], "--grid"),
        (["--num-experts", "1"], "--num-experts"),
        (["--modality-threshold", "nan"], "--modality-threshold"),
        (["--seed", "x"], "--seed"),
    ],
)
def test_run_refuses_bad_numbers_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}: must be" in err and "Traceback" not in err


def test_run_reports_bad_combinations_without_a_traceback(capsys, tmp_path):
    assert main(["run", "--num-experts", "8", "--ep-size", "3"]) == 2
    assert "realb-hf run: error: --ep-size 3 must divide --num-experts 8" in capsys.readouterr().err
    assert main(["run", "--modality-threshold", "2"]) == 2
    assert "--modality-threshold: RealbConfig.modality_threshold=2.0 is out of range" in capsys.readouterr().err
    assert main([*SMALL_RUN, "--json", str(tmp_path / "missing" / "t.json")]) == 2
    assert f"--json {tmp_path / 'missing' / 't.json'}: no folder" in capsys.readouterr().err


def test_save_and_push_refuse_bad_inputs_before_writing_anything(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    weights = qwen_dir / "model.safetensors"
    cases = [
        (["save", "/nonexistent", str(out)], "/nonexistent: no such folder"),
        (["save", "./not/here", str(out)], "./not/here: no such folder"),
        (["save", str(weights), str(out)], "is a file, not a model folder"),
        (["save", str(qwen_dir), str(qwen_dir)], "is the source folder"),
        (["save", str(qwen_dir), str(weights)], f"OUT {weights} is a file"),
        (["save", str(qwen_dir), str(out), "--accuracy-table", str(ROOT / "docs" / "accuracy_bundled.json")], "not a table"),
        (["save", str(qwen_dir), str(out), "--accuracy-table", str(weights)], "must be a .json or .md file"),
        (["save", str(qwen_dir), str(out), "--base-model", "./local/folder"], "--base-model: './local/folder' is not"),
        (["save", str(qwen_dir), str(out), "--ep-size", "3"], "--ep-size 3: ep_size=3 must divide"),
        (["save", str(qwen_dir), str(out), "--modality-threshold", "7"], "--modality-threshold: RealbConfig"),
        (["push", str(qwen_dir), "not a repo"], "REPO_ID 'not a repo' is not a Hub repo id"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"realb-hf {argv[0]}: error: " in err and message in err and "Traceback" not in err, (argv, err)
        if "--accuracy-table" in argv:
            assert "--accuracy-table" in err
        assert not out.exists()


def test_bench_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "layer" in capsys.readouterr().out
